"""The real update at the accumulation boundary, in one place.

For a complete window, in this order: unscale (GradScaler) -> inf/NaN check -> clip to
``max_grad_norm`` over all optimizers' gradients -> every optimizer's step -> scaler
update -> every scheduler's step (not for a skipped window). Clearing the gradients is left
to the loop's own ``zero_grad`` call or the next window's start (see ``Accumulator``), so the
loop's ``set_to_none`` choice is honoured.

It calls the public methods (``optimizer.step()``, ``scaler.step(optimizer)``, ...): while it
runs the window is ``APPLYING`` and the loop interception passes every call through. It does
not know how the loop reached the boundary, and works outside a ``with`` block too.

On an error the window's state says what happened: still ``COMPLETE`` / ``UNSCALED`` if no
optimizer stepped (a retry applies it once), ``APPLIED`` as soon as one did (a retry is a
no-op), ``DISCARDED`` for ``on_nonfinite="raise"`` (gradients cleared).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torch_accum._gradients import clip_, total_norm
from torch_accum._precision import GradientPrecision
from torch_accum._window import Window, WindowState

logger = logging.getLogger("torch_accum.accumulator")


class BoundaryUpdate:
    """Applies complete windows to a fixed set of optimizers, schedulers and a scaler."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any] = (),
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        self.model = model
        self.optimizers = tuple(optimizers)
        self.schedulers = tuple(schedulers)
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        # Casts float32 sums of low-precision parameters back just before the step.
        self.precision = GradientPrecision(None)
        self._parameters: list[torch.Tensor] = []
        self._parameters_shape: list[int] = []
        # Per apply(): the state to return to if no optimizer stepped, the state it ends
        # in once that is decided, and the step number.
        self._rollback = WindowState.COMPLETE
        self._outcome: WindowState | None = None
        self._step_number = 1

    @property
    def scaler_enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    @property
    def checks_gradients_itself(self) -> bool:
        """Whether closing a window must check for inf/NaN (no scaler, no clipping norm)."""
        return not self.scaler_enabled and self.max_grad_norm is None

    def parameters(self) -> list[torch.Tensor]:
        """Every optimizer's parameters, each once (cached until the param groups change)."""
        shape = [len(group["params"]) for o in self.optimizers for group in o.param_groups]
        if shape != self._parameters_shape:
            seen: set[int] = set()
            self._parameters = []
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        if id(param) not in seen:
                            seen.add(id(param))
                            self._parameters.append(param)
            self._parameters_shape = shape
        return self._parameters

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.parameters() if p.grad is not None]

    def learning_rates(self) -> list[float | None]:
        """Each param group's learning rate (None for tensor rates, not read to avoid a sync)."""
        return [
            None if isinstance(group["lr"], torch.Tensor) else float(group["lr"])
            for optimizer in self.optimizers
            for group in optimizer.param_groups
        ]

    def check_learning_rates(self, at_window_start: list[float | None] | None) -> None:
        """Refuse a window whose learning rate changed between its micro-batches."""
        if at_window_start is None:
            return
        for index, (before, now) in enumerate(
            zip(at_window_start, self.learning_rates(), strict=False)
        ):
            if before is not None and now is not None and before != now:
                raise RuntimeError(
                    f"the learning rate of param group {index} changed in the middle of an "
                    f"accumulation window, before its optimizer step ({before:g} -> {now:g}): a "
                    "scheduler the Accumulator does not know was stepped inside the window (on "
                    "every micro-batch, or before optimizer.step()), which runs the schedule "
                    "too fast or applies the wrong rate. Pass it as Accumulator(..., "
                    "scheduler=...), or step it after optimizer.step() under `if "
                    "acc.sync_gradients:`"
                )

    # ------------------------------------------------------------------ the update
    def apply(self, window: Window, step_number: int = 1) -> None:
        """Apply a complete window; it ends APPLIED or SKIPPED (see the module docstring).

        ``step_number`` (the optimizer step this would be) only goes into messages.
        """
        self._rollback = window.state
        self._outcome = None
        self._step_number = step_number
        window.move_to(WindowState.APPLYING, "optimizer.step()")
        try:
            if self.scaler_enabled:
                self._scaled_update(window)
            else:
                self._plain_update(window)
            if self._outcome is WindowState.APPLIED:
                for scheduler in self.schedulers:
                    scheduler.step()
        finally:
            # Still APPLYING until here, so that the loop interception passes calls through.
            window.move_to(self._outcome or self._rollback)

    def _plain_update(self, window: Window) -> None:
        if self.max_grad_norm is not None:
            grads = self.grads()
            norm = total_norm(grads) if grads else None
            nonfinite = norm is not None and not math.isfinite(float(norm))
        else:
            grads, norm, nonfinite = [], None, bool(window.nonfinite)
        if nonfinite:
            self._reject_nonfinite(window)
            return
        if norm is not None:
            clip_(grads, self.max_grad_norm, norm)  # type: ignore[arg-type]
        self.precision.narrow()
        for optimizer in self.optimizers:
            optimizer.step()
            # From the first step on, the window counts as applied: a retry must not repeat it.
            self._outcome = WindowState.APPLIED

    def ready_scaler(self) -> None:
        """Give the scaler its scale tensor, if it has not scaled a loss yet, before unscaling.

        ``GradScaler`` creates it in ``scale()``; a window resumed complete in a fresh process
        is unscaled before any loss was scaled there (its loaded scale waits in
        ``_init_scale``). It is created as ``scale()`` would, on the gradients' device.
        """
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is not None:
            return
        grads = self.grads()
        device = grads[0].device if grads else torch.device(scaler._device)
        scaler._lazy_init_scale_growth_tracker(device)

    def _scaled_update(self, window: Window) -> None:
        scaler: torch.amp.GradScaler = self.scaler  # type: ignore[assignment]
        self.ready_scaler()
        for index, optimizer in enumerate(self.optimizers):
            if index not in window.unscaled:  # the loop may have unscaled it to clip
                scaler.unscale_(optimizer)
                window.unscaled.add(index)
                self._rollback = WindowState.UNSCALED
        if _found_inf(scaler, self.optimizers):
            # The scaler would skip only the optimizers whose own gradients hold the inf/NaN
            # (and clipping zeroes the others'): the window is skipped for all of them.
            scale_before = scaler.get_scale()
            scaler.update()
            logger.info(
                "GradScaler found inf/NaN gradients and skipped the step; scale %s -> %s",
                scale_before,
                scaler.get_scale(),
            )
            self._outcome = WindowState.SKIPPED
            return
        if self.max_grad_norm is not None:
            grads = self.grads()
            if grads:
                clip_(grads, self.max_grad_norm, total_norm(grads))
        self.precision.narrow()
        for optimizer in self.optimizers:
            scaler.step(optimizer)
            # From the first step on the window is used up (a retry must not step it again).
            # An error inside the first step leaves it to retry.
            self._outcome = WindowState.APPLIED
        # No inf/NaN (checked above), so every optimizer stepped and the scale does not back
        # off: reading it before and after, as a skip check, would cost two host syncs.
        scaler.update()

    def _reject_nonfinite(self, window: Window) -> None:
        names = self._nonfinite_parameter_names()
        more = " ..." if len(names) > 5 else ""
        where = f"{len(names)} parameter(s): {', '.join(names[:5])}{more}"
        if not names:  # FSDP2: the inf/NaN is in a shard that another rank holds
            where = "a parameter shard held by another rank"
        if self.on_nonfinite == "raise":
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self._outcome = WindowState.DISCARDED
            raise RuntimeError(
                f"non-finite gradient in {where}; the update was not applied and the "
                "gradients were cleared. Lower the learning rate, check the inputs, or "
                "pass on_nonfinite='skip'"
            )
        self._outcome = WindowState.SKIPPED
        message = f"non-finite gradient in {where}: optimizer step {self._step_number} skipped"
        # A warning for the person at the terminal, a log record for the training logs.
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def parameter_names(self) -> dict[int, str]:
        """The model's name of each parameter, by ``id``, for error messages."""
        return {id(p): name for name, p in self.model.named_parameters()}

    def _nonfinite_parameter_names(self) -> list[str]:
        names = self.parameter_names()
        found = []
        for param in self.parameters():
            grad = param.grad
            if grad is None:
                continue
            values = grad.coalesce()._values() if grad.is_sparse else grad
            if not torch.isfinite(values).all():
                found.append(names.get(id(param), f"<parameter of shape {tuple(param.shape)}>"))
        return found


def _found_inf(scaler: torch.amp.GradScaler, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether ``unscale_`` found an inf/NaN in any optimizer's gradients (one host sync)."""
    states = scaler._per_optimizer_states
    flags = [
        flag
        for optimizer in optimizers
        for flag in states[id(optimizer)]["found_inf_per_device"].values()
    ]
    if not flags:
        return False
    device = flags[0].device
    return bool(torch.stack([flag.to(device) for flag in flags]).sum().item())
