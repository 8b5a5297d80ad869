"""A whole-model gradient pass run once per window: rescale and check for inf/NaN."""

from __future__ import annotations

import torch
from torch.nn.utils import get_total_norm


class FiniteCheck:
    """Multiplies gradients by a scale and reports inf/NaN, in one fused pass.

    It uses the kernel behind ``GradScaler.unscale_`` (one pass per device and dtype) and
    one host sync per device. On a small model a pass over the gradients is a visible share
    of a step, so the flag and unit-scale buffers are kept between calls instead of being
    allocated each time. The kernel scales by a float32 factor, so float64 gradients are
    scaled separately to stay exact.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, grads: list[torch.Tensor], scale: float = 1.0) -> bool:
        """Multiply ``grads`` by ``scale`` in place; return whether any holds an inf or NaN."""
        if any(g.is_sparse for g in grads):
            if scale != 1.0:
                torch._foreach_mul_(grads, scale)
            return not bool(torch.isfinite(get_total_norm(grads)))
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        flags: dict[torch.device, torch.Tensor] = {}
        for (device, dtype), tensors in groups.items():
            found, unit = self._device_buffers(device)
            if device not in flags:
                found.zero_()
                flags[device] = found
            kernel_scale = unit
            if scale != 1.0:
                if dtype == torch.float64:
                    torch._foreach_mul_(tensors, scale)
                else:
                    kernel_scale = torch.full((1,), scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, kernel_scale)
        return any(bool(flag.item()) for flag in flags.values())

    def _device_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers.get(device)
        if buffers is None:
            buffers = self._buffers[device] = (
                torch.zeros(1, device=device),
                torch.ones(1, device=device),
            )
        return buffers
