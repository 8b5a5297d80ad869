"""Whole-model gradient passes: rescale and check for inf/NaN, total norm, clipping.

They accept every gradient an optimizer can hold: dense real tensors of any floating dtype,
complex tensors (checked through their real view) and sparse COO tensors (checked through
their values; coalesced before a norm, since duplicate indices add up). Internal buffers
have explicit dtypes and devices, so ``torch.set_default_dtype`` changes nothing here.
"""

from __future__ import annotations

import torch
from torch.nn.utils import get_total_norm

# The eps torch.nn.utils.clip_grad_norm_ adds to the norm, kept so that clipping here
# gives the same numbers as clipping by hand.
_CLIP_EPS = 1e-6


def _real_dense(grad: torch.Tensor) -> torch.Tensor:
    """A dense real tensor sharing memory with ``grad``'s values."""
    values = grad._values() if grad.is_sparse else grad
    return torch.view_as_real(values) if values.is_complex() else values


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
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            view = _real_dense(grad)
            groups.setdefault((view.device, view.dtype), []).append(view)
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
                    kernel_scale = torch.full((1,), scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, kernel_scale)
        return any(bool(flag.item()) for flag in flags.values())

    def _device_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers.get(device)
        if buffers is None:
            buffers = self._buffers[device] = (
                torch.zeros(1, dtype=torch.float32, device=device),
                torch.ones(1, dtype=torch.float32, device=device),
            )
        return buffers


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as ``clip_grad_norm_`` computes it."""
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g.coalesce()._values() for g in grads if g.is_sparse]
    return get_total_norm(dense + sparse)


def clip_(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale ``grads`` in place so that their total 2-norm ``norm`` is at most ``max_norm``.

    The same coefficient as ``clip_grad_norm_`` (multiplied even when it is clamped to 1,
    which avoids a host sync), applied to sparse values in place as well.
    """
    coefficient = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        values = grad._values() if grad.is_sparse else grad
        groups.setdefault(values.device, []).append(values)
    for device, tensors in groups.items():
        torch._foreach_mul_(tensors, coefficient.to(device))


def has_nonzero(grads: list[torch.Tensor]) -> bool:
    """Whether any of ``grads`` holds a nonzero value (one sync per tensor; rare paths only)."""
    return any(bool(_real_dense(g).any()) for g in grads)


class BackwardSeeds:
    """Gradients to start backward from (the loss's factor instead of 1), reused safely.

    Seeding backward with the factor, rather than multiplying the loss by it, adds no node
    to the graph; reusing one seed per factor saves an allocation per micro-batch. But
    autograd may adopt the seed as a parameter's ``.grad`` (a loss that is a view of a
    leaf) and later add into it in place; no tensor of ours may become a ``.grad``. So a
    seed whose storage gained a reference, or whose version moved, during backward is
    dropped and never handed out again.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[float, torch.dtype, torch.device], tuple[torch.Tensor, int]] = {}
        self._rounded: dict[tuple[float, torch.dtype], float] = {}

    @staticmethod
    def _references(seed: torch.Tensor) -> int:
        return int(torch._C._storage_Use_Count(seed.untyped_storage()._cdata))

    def get(self, loss: torch.Tensor, factor: float) -> torch.Tensor:
        if loss.dim() != 0 or not _CAN_COUNT_REFERENCES:
            return torch.full_like(loss, factor)
        key = (factor, loss.dtype, loss.device)
        cached = self._cache.get(key)
        if cached is None:
            seed = torch.full_like(loss, factor)
            cached = self._cache[key] = (seed, self._references(seed))
        return cached[0]

    def representable(self, relative_weight: float, length: int, dtype: torch.dtype) -> float:
        """A seed for ``relative_weight / length`` that ``dtype`` holds exactly.

        ``relative_weight`` times the power of two at or below ``1 / length``, rounded to
        ``dtype`` (no device sync): exact for equal weights, and otherwise off by the
        rounding of the weight alone, never by a factor that depends on ``length``.
        """
        power_of_two = 2.0 ** -((length - 1).bit_length())
        key = (relative_weight * power_of_two, dtype)
        rounded = self._rounded.get(key)
        if rounded is None:
            rounded = self._rounded[key] = float(torch.tensor(key[0], dtype=dtype))
        return rounded

    def release(self, seed: torch.Tensor, factor: float) -> None:
        """After backward: forget ``seed`` if autograd kept or changed it."""
        key = (factor, seed.dtype, seed.device)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not seed:
            return
        if seed._version != 0 or self._references(seed) != cached[1]:
            del self._cache[key]


_CAN_COUNT_REFERENCES = hasattr(torch._C, "_storage_Use_Count")
