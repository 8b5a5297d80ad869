"""What a run has done so far, and how it is saved and restored.

``RunState`` holds every counter of an Accumulator and the current window; its
``state_dict`` / ``load_state_dict`` are the Accumulator's, so that what is saved is defined
next to what it saves. A pending window is saved with its accumulated gradients, so a run
resumed mid-window continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from torch_accum._window import Window, WindowState


class RunState:
    """Counters, the current window and the last finished one."""

    def __init__(self, accumulation_steps: int) -> None:
        self.accumulation_steps = accumulation_steps
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.window = Window(accumulation_steps)
        # The last applied or skipped window, for acc.loss; its mean loss once computed.
        self.last_window: Window | None = None
        self.last_loss: float | None = None
        # Micro-batches of the running ``with`` block, and how many of them acc.step_batch() ran.
        self.block_micro_batches = 0
        self.block_runner_micro_batches = 0

    def finish_window(self) -> None:
        """Count a window that has just become terminal."""
        window = self.window
        if window.state is WindowState.APPLIED:
            self.optimizer_steps += 1
        elif window.state is WindowState.SKIPPED:
            self.skipped_steps += 1
        else:
            return
        self.last_window = window
        self.last_loss = None

    def loss(self) -> float | None:
        if self.last_window is None:
            return None
        if self.last_loss is None:
            self.last_loss = self.last_window.mean_loss()
        return self.last_loss

    # ------------------------------------------------------------------ resumable state
    def state_dict(self, params: list[torch.Tensor]) -> dict[str, Any]:
        window = self.window
        if window.state is WindowState.UNSCALED:
            raise RuntimeError(
                "state_dict() was called between scaler.unscale_() and the step; call it "
                "after acc.backward() or after optimizer.step()"
            )
        pending = window.pending
        gradients = None
        if pending:
            gradients = [None if p.grad is None else p.grad.detach().clone() for p in params]
        return {
            "accumulation_steps": self.accumulation_steps,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "window": window.state_dict()
            if pending
            else Window(self.accumulation_steps).state_dict(),
            "window_ready": window.is_ready,
            "last_window": None if self.last_window is None else self.last_window.state_dict(),
            "gradients": gradients,
        }

    def load_state_dict(
        self,
        state_dict: dict[str, Any],
        params: list[torch.Tensor],
        check_nonfinite: Callable[[list[torch.Tensor]], bool],
    ) -> None:
        _check_saved_by_accumulator(state_dict)
        saved_steps = state_dict["accumulation_steps"]
        window = Window.from_state_dict(state_dict["window"], saved_steps)
        if window.count and saved_steps != self.accumulation_steps:
            raise ValueError(
                f"state_dict holds a pending window of accumulation_steps={saved_steps}, "
                f"but this Accumulator has accumulation_steps={self.accumulation_steps}; "
                "construct it with the saved value to resume mid-window"
            )
        if state_dict["window_ready"] and window.state is WindowState.ACCUMULATING:
            window.state = WindowState.COMPLETE  # saved before windows had explicit states
        gradients = state_dict["gradients"]
        if gradients is not None:
            _load_gradients(params, gradients)
        self.optimizer_steps = int(state_dict["optimizer_steps"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        if window.is_ready:
            # The verdict is not saved: it is a function of the restored gradients.
            grads = [p.grad for p in params if p.grad is not None]
            window.nonfinite = bool(grads) and check_nonfinite(grads)
        self.window = window
        last = state_dict["last_window"]
        self.last_window = None if last is None else Window.from_state_dict(last, saved_steps)
        self.last_loss = None


_SAVED_KEYS = (
    "accumulation_steps",
    "optimizer_steps",
    "skipped_steps",
    "window",
    "window_ready",
    "last_window",
    "gradients",
)


def _check_saved_by_accumulator(state_dict: object) -> None:
    """Refuse anything but a dict from ``Accumulator.state_dict()`` (a model's, say)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "acc.load_state_dict() expects the dict returned by acc.state_dict(), got an "
            f"object of type {type(state_dict).__name__}"
        )
    missing = [key for key in _SAVED_KEYS if key not in state_dict]
    if missing:
        keys = [repr(key) for key in list(state_dict)[:5]]
        got = ", ".join(keys) + (", ..." if len(state_dict) > 5 else "") if keys else "none"
        raise ValueError(
            "acc.load_state_dict() expects the dict returned by acc.state_dict() (keys "
            f"{', '.join(_SAVED_KEYS)}), but this one lacks {', '.join(map(repr, missing))} "
            f"(its keys: {got}); it looks like another object's state dict, such as the "
            "model's or the optimizer's. Save acc.state_dict() next to them and pass that"
        )


def _load_gradients(params: list[torch.Tensor], gradients: list[torch.Tensor | None]) -> None:
    if len(gradients) != len(params):
        raise ValueError(
            f"state_dict['gradients'] has {len(gradients)} entries but the optimizer "
            f"has {len(params)} parameters; load it into the same model and optimizer"
        )
    for index, (param, grad) in enumerate(zip(params, gradients, strict=True)):
        if grad is not None and grad.shape != param.shape:
            raise ValueError(
                f"state_dict['gradients'][{index}] has shape {tuple(grad.shape)} but "
                f"the parameter has shape {tuple(param.shape)}; load it into the same "
                "model and optimizer"
            )
    for param, grad in zip(params, gradients, strict=True):
        # A parameter accumulating in a wider dtype (_precision.py) takes its sum as saved.
        dtype = getattr(param, "grad_dtype", None) or param.dtype
        param.grad = None if grad is None else grad.to(device=param.device, dtype=dtype, copy=True)
