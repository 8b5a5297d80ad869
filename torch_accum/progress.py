"""A tqdm progress bar that counts optimizer steps, not micro-batches.

The bar advances once per real optimizer step and shows, as its postfix, the micro-batch
within the current window, the mean loss of the last window, the learning rate and the
skipped steps. tqdm redraws at most every ``mininterval`` seconds on one line, so a long
window never prints a line per micro-batch. tqdm is optional (``pip install
torch_accum[progress]``); by default the bar appears only when stderr is a terminal.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

_INSTALL_HINT = "install tqdm (pip install 'torch_accum[progress]') or pass progress=False"


def check_progress(progress: object) -> bool:
    """Whether to show the bar: ``None`` means when stderr is a terminal and tqdm exists."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(
            f"progress must be True, False or None, got {progress!r} "
            f"({type(progress).__name__}); None shows a bar on interactive terminals"
        )
    has_tqdm = importlib.util.find_spec("tqdm") is not None
    if progress is None:
        return has_tqdm and sys.stderr.isatty()
    if progress and not has_tqdm:
        raise ImportError(f"progress=True needs tqdm, which is not installed; {_INSTALL_HINT}")
    return progress


class ProgressBar:
    """One bar per ``with`` block; ``total`` optimizer steps when known."""

    def __init__(self, total: int | None, description: str = "optimizer steps") -> None:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        interactive = sys.stderr.isatty()
        self._bar: Any = tqdm(
            total=total,
            desc=description,
            unit="step",
            dynamic_ncols=interactive,
            # In a log file every redraw is kept; redraw rarely there.
            mininterval=0.1 if interactive else 10.0,
        )
        self._last: dict[str, str] = {}

    def micro_batch(self, position: int, window: int) -> None:
        self._last["micro"] = f"{position}/{window}"
        self._bar.set_postfix(self._last, refresh=False)

    def optimizer_step(self, loss: float | None, lr: float, skipped: int) -> None:
        self._last.update(loss=f"{loss:.4g}" if loss is not None else "-", lr=f"{lr:.3g}")
        if skipped:
            self._last["skipped"] = str(skipped)
        self._bar.set_postfix(self._last, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
