"""Bookkeeping of one accumulation window: how many micro-batches, with which weights.

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

from typing import Any

import torch


class Window:
    """Micro-batch count, relative weights and detached losses of one window."""

    def __init__(self) -> None:
        self.count = 0
        # Single process: the first micro-batch's weight; across ranks: a shared one.
        self.reference_weight = 1.0
        self.weighted = False
        self.relative_weights: list[float] = []
        self.losses: list[torch.Tensor] = []

    @property
    def relative_weight_sum(self) -> float:
        return sum(self.relative_weights)

    @property
    def weight_sum(self) -> float:
        return self.reference_weight * self.relative_weight_sum

    def relative_weight(self, weight: float) -> float:
        """``weight`` relative to the window's reference weight (set at its first add)."""
        return weight / self.reference_weight

    def add(self, relative_weight: float, loss: torch.Tensor) -> None:
        self.count += 1
        self.relative_weights.append(relative_weight)
        self.losses.append(loss.detach())

    def mean_loss(self) -> float:
        """Weighted mean of the losses: ``sum(w_i * loss_i) / sum(w_i)``."""
        stacked = torch.stack([loss.reshape(()) for loss in self.losses]).to(torch.float64)
        weights = torch.tensor(self.relative_weights, dtype=torch.float64, device=stacked.device)
        return float((stacked * weights).sum()) / self.relative_weight_sum

    def state_dict(self) -> dict[str, Any]:
        losses = (
            torch.stack([loss.reshape(()) for loss in self.losses]).cpu()
            if self.losses
            else torch.empty(0)
        )
        return {
            "count": self.count,
            "reference_weight": self.reference_weight,
            "weighted": self.weighted,
            "relative_weights": list(self.relative_weights),
            "losses": losses,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Window:
        window = cls()
        window.count = int(state["count"])
        window.reference_weight = float(state["reference_weight"])
        window.weighted = bool(state.get("weighted", False))
        window.relative_weights = [float(w) for w in state["relative_weights"]]
        window.losses = list(state["losses"].unbind(0))
        if not (len(window.relative_weights) == len(window.losses) == window.count):
            raise ValueError(
                f"state_dict['window'] is inconsistent: count={window.count}, "
                f"{len(window.relative_weights)} weights, {len(window.losses)} losses; pass a dict "
                "produced by Accumulator.state_dict()"
            )
        return window
