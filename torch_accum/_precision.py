"""The dtype gradients accumulate in: float32 sums for bfloat16 and float16 parameters.

Adding K micro-batch gradients into a bfloat16 ``.grad`` rounds the running sum K times, so
the error grows with the window (measured: 4.8x the K = 1 error at K = 256). During a window
of more than one micro-batch, every trainable parameter narrower than the accumulation dtype
gets ``param.grad_dtype = float32`` (``Tensor.grad_dtype``, torch >= 2.10): autograd's
AccumulateGrad then adds each micro-batch's gradient into a float32 ``.grad``, with no extra
pass. Unscaling, the inf/NaN check and clipping run on those float32 sums; just before the
optimizers step the boundary casts each sum to the parameter's dtype once, because
optimizers expect gradients of their parameters' dtype.

A pending window keeps its float32 sums (in ``state_dict`` too); everything else is put
back as it was once the window is applied, skipped or dropped, or when the ``with`` block
ends without a pending window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Whether this torch has ``Tensor.grad_dtype`` (torch 2.10 and newer).
HAS_GRAD_DTYPE = hasattr(torch.Tensor, "grad_dtype")

LOW_PRECISION = frozenset({torch.bfloat16, torch.float16})


def narrower_parameters(
    params: Sequence[torch.Tensor], dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """The trainable floating-point ``params`` whose dtype is narrower than ``dtype``."""
    if dtype is None:
        return []
    width = torch.finfo(dtype).bits
    return [
        p
        for p in params
        if p.requires_grad and p.is_floating_point() and torch.finfo(p.dtype).bits < width
    ]


def unsupported_reason(params: Sequence[torch.Tensor], dtype: torch.dtype | None) -> str | None:
    """Why gradients of ``params`` cannot accumulate in ``dtype`` here, or None if they can."""
    narrower = narrower_parameters(params, dtype)
    if not narrower:
        return None
    if not HAS_GRAD_DTYPE:
        return (
            f"accumulation_dtype={dtype} needs Tensor.grad_dtype (torch 2.10 or newer), but "
            f"torch {torch.__version__} lacks it and {len(narrower)} parameter(s) are "
            f"{narrower[0].dtype}. Upgrade torch, or pass accumulation_dtype=None to "
            "accumulate in the parameters' own dtype (less precise as the window grows: "
            "docs/precision.md)"
        )
    return None


class GradientPrecision:
    """Widens low-precision parameters' gradients for a window, and narrows them again."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        # Why widening cannot work for this Accumulator (old torch, FSDP2, ...), if it cannot.
        self.refusal: str | None = None
        # Parameters whose grad_dtype this object set, with the grad_dtype they had before.
        self._widened: dict[int, tuple[torch.Tensor, torch.dtype | None]] = {}
        self._candidates: list[torch.Tensor] = []
        self._candidates_of: list[torch.Tensor] | None = None

    @property
    def widened(self) -> bool:
        """Whether some parameter accumulates in the wider dtype now."""
        return bool(self._widened)

    def applies_to(self, params: list[torch.Tensor]) -> bool:
        """Whether any of ``params`` would be widened."""
        return bool(self._narrower(params))

    def _narrower(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        # The boundary hands out the same list until the param groups change.
        if params is not self._candidates_of:
            self._candidates = narrower_parameters(params, self.dtype)
            self._candidates_of = params
        return self._candidates

    def widen(self, params: list[torch.Tensor]) -> None:
        """Make the gradients of the narrower ``params`` accumulate in the wider dtype.

        A gradient already there (zeros that ``zero_grad(set_to_none=False)`` left, or a
        restored window's sums) is converted exactly, so nothing it holds is lost.
        """
        dtype = self.dtype
        narrower = self._narrower(params)
        if dtype is None or not narrower:
            return
        if self.refusal is not None:
            raise ValueError(self.refusal)
        for param in narrower:
            if param.grad_dtype == dtype:
                continue
            grad = param.grad
            param.grad = None
            self._widened.setdefault(id(param), (param, param.grad_dtype))
            param.grad_dtype = dtype
            if grad is not None:
                param.grad = grad.to(dtype)

    def narrow(self) -> None:
        """Cast each widened gradient to its parameter's dtype, once, and restore grad_dtype."""
        for param, original in self._widened.values():
            grad = param.grad
            param.grad = None
            param.grad_dtype = original
            if grad is not None:
                param.grad = grad.to(param.dtype)
        self._widened.clear()
