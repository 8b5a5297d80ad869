"""One accumulation window: its state, its micro-batches and their weights.

The window's life is one explicit state machine; every transition goes through
`Window.move_to`, which refuses the ones that the table below does not allow:

    ACCUMULATING --close--> COMPLETE --scaler.unscale_()--> UNSCALED
          |                     |                              |
          |                     +------------+-----------------+
          |                                  v
          |                               APPLYING --(error before any step)--> COMPLETE / UNSCALED
          |                                  |
          v                                  v
      DISCARDED  <-----------------  APPLIED | SKIPPED | DISCARDED

A terminal window (applied, skipped or discarded) stays current until the next micro-batch
starts a new one, so that ``acc.sync_gradients`` reads True for the rest of the loop
iteration that ended it.

Exact weighted normalisation without knowing the window's future weights: each
micro-batch's loss is multiplied by ``r_i / K``, where ``r_i`` is its weight relative to
the *first* micro-batch of the window, and the gradients are summed as usual. At the
boundary they are multiplied by ``K / sum(r_i)``, which gives ``sum(w_i * grad_i) /
sum(w_i)`` for any number of micro-batches, so a short final window is exact too. For
equal weights and a full window the correction is exactly 1 and costs nothing: the loop
then does what a hand-written ``(loss / K).backward()`` does. Relative rather than
absolute weights keep the scaled loss near its usual magnitude: multiplying by a raw token
count of 1e5 would overflow float16 activation gradients under a GradScaler.
"""

from __future__ import annotations

import enum
from typing import Any

import torch


class WindowState(enum.Enum):
    """Where a window is in its life.

    Read it as [`Accumulator.window_state`][torch_accum.Accumulator.window_state]; the
    transitions, and what triggers each, are listed in the design notes (`docs/design.md`).

    Attributes:
        ACCUMULATING: Taking micro-batches (possibly none yet).
        COMPLETE: Closed and normalised; the loop's next ``optimizer.step()`` applies it.
        UNSCALED: Complete, and the loop has unscaled it with ``scaler.unscale_`` (to clip
            or inspect).
        APPLYING: The boundary update is running: calls of the patched methods pass through.
        APPLIED: The optimizer step was taken (terminal).
        SKIPPED: Non-finite gradients: no step was taken (terminal).
        DISCARDED: Dropped without a step (terminal).
    """

    # Members are singletons: hash by identity, not by Enum's Python-level name hash, since
    # the state is looked up in sets several times per micro-batch.
    __hash__ = object.__hash__

    #: Taking micro-batches (possibly none yet).
    ACCUMULATING = "accumulating"
    #: Closed and normalised; the loop's next ``optimizer.step()`` applies it.
    COMPLETE = "complete"
    #: Complete, and the loop has unscaled it with ``scaler.unscale_`` (to clip or inspect).
    UNSCALED = "unscaled"
    #: The boundary update is running: calls of the patched methods pass through.
    APPLYING = "applying"
    #: The optimizer step was taken (terminal).
    APPLIED = "applied"
    #: Non-finite gradients: no step was taken (terminal).
    SKIPPED = "skipped"
    #: Dropped without a step (terminal).
    DISCARDED = "discarded"


_ALLOWED: dict[WindowState, frozenset[WindowState]] = {
    WindowState.ACCUMULATING: frozenset({WindowState.COMPLETE, WindowState.DISCARDED}),
    WindowState.COMPLETE: frozenset(
        {WindowState.UNSCALED, WindowState.APPLYING, WindowState.DISCARDED}
    ),
    WindowState.UNSCALED: frozenset({WindowState.APPLYING, WindowState.DISCARDED}),
    # Back to COMPLETE / UNSCALED only when an error came before any optimizer stepped.
    WindowState.APPLYING: frozenset(
        {
            WindowState.APPLIED,
            WindowState.SKIPPED,
            WindowState.DISCARDED,
            WindowState.COMPLETE,
            WindowState.UNSCALED,
        }
    ),
    WindowState.APPLIED: frozenset(),
    WindowState.SKIPPED: frozenset(),
    WindowState.DISCARDED: frozenset(),
}

TERMINAL = frozenset({WindowState.APPLIED, WindowState.SKIPPED, WindowState.DISCARDED})
#: States in which the window's gradients are final and waiting for the optimizer step.
READY = frozenset({WindowState.COMPLETE, WindowState.UNSCALED})


class InvalidTransitionError(RuntimeError):
    """A call came in an order that the window's state machine does not allow."""


class Window:
    """State, micro-batch count, relative weights and detached losses of one window."""

    def __init__(self, length: int) -> None:
        self.state = WindowState.ACCUMULATING
        # Micro-batches that complete it: accumulation_steps, or the split of step_batch().
        self.length = length
        self.count = 0
        # Single process: the first micro-batch's weight; across ranks: a shared one.
        self.reference_weight = 1.0
        self.weighted = False
        self.relative_weights: list[float] = []
        # ``K * seed`` per micro-batch: the relative weight its gradient actually got, which
        # differs from ``relative_weights`` when the seed was rounded to a bfloat16 or
        # float16 loss's dtype.
        self.seed_weights: list[float] = []
        self.losses: list[torch.Tensor] = []
        # Whether the complete window holds inf/NaN, when closing it checked (else None).
        self.nonfinite: bool | None = None
        # Optimizers (by index) whose gradients are unscaled (GradScaler.unscale_).
        self.unscaled: set[int] = set()
        # Optimizers (by index) whose gradients the loop cleared after the boundary.
        self.cleared_by_loop: set[int] = set()
        # False for step_batch() windows, which synchronise explicitly after the ranks agree.
        self.synchronise_in_backward = True
        # Each param group's learning rate when the first micro-batch arrived.
        self.learning_rates: list[float | None] | None = None

    def move_to(self, state: WindowState, action: str = "") -> None:
        """Change state, or raise naming ``action`` (what the user did) if not allowed."""
        if state not in _ALLOWED[self.state]:
            doing = f" ({action})" if action else ""
            raise InvalidTransitionError(
                f"a window that is {self.state.value} cannot become {state.value}{doing}"
            )
        self.state = state

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def is_ready(self) -> bool:
        return self.state in READY

    @property
    def pending(self) -> int:
        """Micro-batches accumulated and not yet applied or dropped."""
        return 0 if self.is_terminal else self.count

    @property
    def relative_weight_sum(self) -> float:
        return sum(self.relative_weights)

    @property
    def weight_sum(self) -> float:
        return self.reference_weight * self.relative_weight_sum

    def relative_weight(self, weight: float) -> float:
        """``weight`` relative to the window's reference weight (set at its first add)."""
        return weight / self.reference_weight

    def add(
        self, relative_weight: float, loss: torch.Tensor, seed_weight: float | None = None
    ) -> None:
        if self.state is not WindowState.ACCUMULATING:
            raise InvalidTransitionError(
                f"a window that is {self.state.value} takes no micro-batch"
            )
        self.count += 1
        self.relative_weights.append(relative_weight)
        self.seed_weights.append(relative_weight if seed_weight is None else seed_weight)
        self.losses.append(loss.detach())

    @property
    def correction(self) -> float:
        """The factor that turns the summed scaled gradients into the weighted mean."""
        return self.length / sum(self.seed_weights)

    @property
    def seed_rounding(self) -> float:
        """How much the seeds' rounding to the loss's dtype scaled the sum (1 when exact)."""
        return sum(self.seed_weights) / self.relative_weight_sum

    def mean_loss(self) -> float:
        """Weighted mean of the losses: ``sum(w_i * loss_i) / sum(w_i)``."""
        stacked = torch.stack([loss.reshape(()) for loss in self.losses]).to(torch.float64)
        weights = torch.tensor(self.relative_weights, dtype=torch.float64, device=stacked.device)
        return float((stacked * weights).sum()) / self.relative_weight_sum

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        losses = (
            torch.stack([loss.reshape(()) for loss in self.losses]).cpu()
            if self.losses
            else torch.empty(0, dtype=torch.float32)
        )
        return {
            "state": self.state.value,
            "length": self.length,
            "count": self.count,
            "reference_weight": self.reference_weight,
            "weighted": self.weighted,
            "relative_weights": list(self.relative_weights),
            "seed_weights": list(self.seed_weights),
            "losses": losses,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], length: int) -> Window:
        window = cls(int(state.get("length", length)))
        window.state = WindowState(state.get("state", WindowState.ACCUMULATING.value))
        window.count = int(state["count"])
        window.reference_weight = float(state["reference_weight"])
        window.weighted = bool(state.get("weighted", False))
        window.relative_weights = [float(w) for w in state["relative_weights"]]
        window.seed_weights = [float(w) for w in state.get("seed_weights", window.relative_weights)]
        window.losses = list(state["losses"].unbind(0))
        lengths = (len(window.relative_weights), len(window.seed_weights), len(window.losses))
        if not (lengths[0] == lengths[1] == lengths[2] == window.count):
            raise ValueError(
                f"state_dict['window'] is inconsistent: count={window.count}, "
                f"{len(window.relative_weights)} weights, {len(window.losses)} losses; pass a dict "
                "produced by Accumulator.state_dict()"
            )
        return window
