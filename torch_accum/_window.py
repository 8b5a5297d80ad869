"""Bookkeeping of one accumulation window: how many micro-batches, with which weights.

Exact weighted normalisation without knowing the window's future weights: each
micro-batch's loss is multiplied by its weight relative to the *first* micro-batch of the
window, the gradients are summed as usual, and at the boundary they are divided by the sum
of those relative weights. The result is ``sum(w_i * grad_i) / sum(w_i)`` for any number
of micro-batches, so a short final window is exact too. Relative rather than absolute
weights keep the scaled loss near its usual magnitude: multiplying by a raw token count of
1e5 would overflow float16 activation gradients under a GradScaler.
"""

from __future__ import annotations

from typing import Any

import torch


class Window:
    """Micro-batch count, relative weights and detached losses of one window."""

    def __init__(self) -> None:
        self.count = 0
        self.reference_weight = 1.0
        self.factors: list[float] = []
        self.losses: list[torch.Tensor] = []

    @property
    def factor_sum(self) -> float:
        return sum(self.factors)

    def factor_for(self, weight: float) -> float:
        """The multiplier for a micro-batch of ``weight``: 1.0 for the window's first."""
        return 1.0 if self.count == 0 else weight / self.reference_weight

    def add(self, weight: float, factor: float, loss: torch.Tensor) -> None:
        if self.count == 0:
            self.reference_weight = weight
        self.count += 1
        self.factors.append(factor)
        self.losses.append(loss.detach())

    def mean_loss(self) -> float:
        """Weighted mean of the losses: ``sum(w_i * loss_i) / sum(w_i)``."""
        stacked = torch.stack([loss.reshape(()) for loss in self.losses]).to(torch.float64)
        factors = torch.tensor(self.factors, dtype=torch.float64, device=stacked.device)
        return float((stacked * factors).sum()) / self.factor_sum

    def state_dict(self) -> dict[str, Any]:
        losses = (
            torch.stack([loss.reshape(()) for loss in self.losses]).cpu()
            if self.losses
            else torch.empty(0)
        )
        return {
            "count": self.count,
            "reference_weight": self.reference_weight,
            "factors": list(self.factors),
            "losses": losses,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Window:
        window = cls()
        window.count = int(state["count"])
        window.reference_weight = float(state["reference_weight"])
        window.factors = [float(f) for f in state["factors"]]
        window.losses = list(state["losses"].unbind(0))
        if not (len(window.factors) == len(window.losses) == window.count):
            raise ValueError(
                f"state_dict['window'] is inconsistent: count={window.count}, "
                f"{len(window.factors)} factors, {len(window.losses)} losses; pass a dict "
                "produced by Accumulator.state_dict()"
            )
        return window
