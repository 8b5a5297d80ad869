"""What the Accumulator intercepts in the user's loop, and how every patch is undone.

While a ``with`` block runs, these calls are routed to the Accumulator, which decides
whether they take effect now (at the accumulation boundary) or not at all:

============================  ===============================================================
patched on the instance        routed to
============================  ===============================================================
``optimizer.step``             ``on_step``: applies a complete window, else nothing
``optimizer.zero_grad``        ``on_zero_grad``: clears only when no micro-batch is pending
``module.zero_grad``           the same, for the model and every submodule
``scheduler.step``             nothing: the boundary steps the schedulers
``scheduler.state_dict``       the real one, without these patches in it
``scaler.step(optimizer)``     ``on_step`` for the Accumulator's optimizers
``scaler.update``              nothing: the boundary updates the scaler
``scaler.unscale_(optimizer)``  ``on_unscale``: unscales a complete window once
``scaler.scale(loss)``         the real one; the result is remembered, so that
                               ``acc.backward`` refuses a loss scaled twice
============================  ===============================================================

While the boundary update runs (the window is ``APPLYING``) every call passes straight
through to the original, so the boundary can use the public methods.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from torch_accum._gradients import has_nonzero
from torch_accum._patching import MethodPatches, patch_owner


class LoopHandlers(Protocol):
    """What the Accumulator does with each intercepted call."""

    def passing_through(self) -> bool: ...
    def on_step(self, index: int) -> None: ...
    def on_zero_grad(self, index: int | None, set_to_none: bool) -> bool: ...
    def on_unscale(self, index: int) -> bool: ...


class LoopInterception:
    """Installs the patches of one ``with`` block and keeps the original methods."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.scaler = scaler
        self._patches = MethodPatches()
        # The originals, for calls that must bypass the handlers.
        self._real_steps: list[Callable[..., Any]] = []
        self._real_zero_grads: list[Callable[..., Any]] = []
        self._module_zero_grads: dict[int, Callable[..., Any]] = {}
        self._scaled: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    @property
    def patches(self) -> MethodPatches:
        return self._patches

    def check_free(self) -> None:
        """Refuse optimizers that another active Accumulator already drives."""
        for optimizer in self.optimizers:
            if patch_owner(optimizer.step) is not None:
                raise RuntimeError(
                    "the optimizer is already driven by another active Accumulator; use one "
                    "Accumulator per optimizer (pass several optimizers to one Accumulator "
                    "when they train on the same loss), or leave the other's `with` block first"
                )

    def install(self, handlers: LoopHandlers, owner: object) -> None:
        replace = self._patches.replace
        for index, optimizer in enumerate(self.optimizers):
            step = replace(optimizer, "step", self._step_handler(index, handlers), owner)
            zero_grad = replace(
                optimizer, "zero_grad", self._zero_grad_handler(index, handlers), owner
            )
            self._real_steps.append(step)
            self._real_zero_grads.append(zero_grad)
        for module in self.model.modules():
            self._module_zero_grads[id(module)] = replace(
                module, "zero_grad", self._module_zero_grad(handlers), owner, pass_self=True
            )
        for scheduler in self.schedulers:
            replace(scheduler, "step", self._swallow(handlers, scheduler.step), owner)
            if callable(getattr(scheduler, "state_dict", None)):
                replace(scheduler, "state_dict", self._clean_state_dict(scheduler), owner)
        if self.scaler is not None:
            self._install_scaler(self.scaler, handlers, owner)

    def restore(self) -> None:
        """Put back every original method, newest first; safe to call more than once."""
        self._patches.restore()
        self._module_zero_grads.clear()
        self._real_steps.clear()
        self._real_zero_grads.clear()

    def forget_unscale(self, indices: set[int]) -> None:
        """Let the scaler unscale these optimizers again: their unscaled window was dropped.

        GradScaler resets its per-optimizer progress only in ``update()``, which a dropped
        window never reaches; without this the next ``unscale_`` would be refused.
        """
        if self.scaler is None:
            return
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if states is not None:
            for index in indices:
                states.pop(id(self.optimizers[index]), None)

    def was_scaled(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` came out of the scaler's ``scale`` in this block."""
        return loss in self._scaled

    def real_zero_grad(self, index: int, set_to_none: bool) -> None:
        if self._real_zero_grads:
            self._real_zero_grads[index](set_to_none=set_to_none)
        else:
            self.optimizers[index].zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the handlers
    def _step_handler(self, index: int, handlers: LoopHandlers) -> Callable[..., Any]:
        optimizer = self.optimizers[index]

        def step(*args: Any, **kwargs: Any) -> Any:
            if handlers.passing_through():
                return self._real_steps[index](*args, **kwargs)
            if args or kwargs.get("closure") is not None:
                raise TypeError(
                    "optimizer.step(closure) is not supported inside an Accumulator: a "
                    "closure re-evaluates the loss, which defeats accumulation; call "
                    f"{type(optimizer).__name__}.step() without a closure"
                )
            handlers.on_step(index)
            return None

        return step

    def _zero_grad_handler(self, index: int, handlers: LoopHandlers) -> Callable[..., None]:
        def zero_grad(set_to_none: bool = True) -> None:
            if handlers.passing_through() or handlers.on_zero_grad(index, set_to_none):
                self._real_zero_grads[index](set_to_none=set_to_none)

        return zero_grad

    def _module_zero_grad(self, handlers: LoopHandlers) -> Callable[..., None]:
        def zero_grad(module: nn.Module, set_to_none: bool = True) -> None:
            original = self._module_zero_grads.get(id(module))
            if original is None:  # a deep copy of a patched module: it clears as usual
                type(module).zero_grad(module, set_to_none=set_to_none)
            elif handlers.passing_through() or handlers.on_zero_grad(None, set_to_none):
                original(set_to_none=set_to_none)

        return zero_grad

    @staticmethod
    def _swallow(handlers: LoopHandlers, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if handlers.passing_through():
                return original(*args, **kwargs)
            return None

        return call

    def _clean_state_dict(self, scheduler: Any) -> Callable[[], dict[str, Any]]:
        original = scheduler.state_dict

        # Schedulers copy their __dict__, which holds the patches while the block runs.
        def state_dict() -> dict[str, Any]:
            return self._patches.scrub(scheduler, original())

        return state_dict

    def _install_scaler(
        self, scaler: torch.amp.GradScaler, handlers: LoopHandlers, owner: object
    ) -> None:
        replace = self._patches.replace
        indices = {id(optimizer): index for index, optimizer in enumerate(self.optimizers)}
        real_step = scaler.step
        real_unscale = scaler.unscale_

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            index = indices.get(id(optimizer))
            if handlers.passing_through() or index is None:
                return real_step(optimizer, *args, **kwargs)
            # scaler.step(optimizer) in the loop means optimizer.step() at the boundary.
            return self.optimizers[index].step(*args, **kwargs)

        def unscale_(optimizer: torch.optim.Optimizer) -> None:
            index = indices.get(id(optimizer))
            if handlers.passing_through() or index is None or handlers.on_unscale(index):
                real_unscale(optimizer)

        real_scale = scaler.scale

        def scale(outputs: Any) -> Any:
            scaled = real_scale(outputs)
            if isinstance(scaled, torch.Tensor):
                self._scaled.add(scaled)
            return scaled

        replace(scaler, "step", step, owner)
        replace(scaler, "unscale_", unscale_, owner)
        replace(scaler, "scale", scale, owner)
        replace(scaler, "update", self._swallow(handlers, scaler.update), owner)


class GradientWatch:
    """Notices gradients that change between the micro-batches of a window.

    Only ``acc.backward`` may write into ``.grad`` while a window accumulates. Anything else
    (``loss.backward()``, a second Accumulator's backward reaching these parameters, per
    micro-batch clipping, ``p.grad = None``) would make the update silently wrong. Such a
    write reaches whole layers, so watching the first and last parameter of every param
    group is enough, and costs reading a few integers per micro-batch: each watched
    gradient's identity and version counter, recorded after every ``acc.backward``, are
    compared at the next one.
    """

    def __init__(self) -> None:
        self._seen: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []

    @staticmethod
    def watched(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
        """The first and last parameter of every param group."""
        found: list[torch.Tensor] = []
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                params = group["params"]
                found += (params[0], params[-1]) if params else ()
        return found

    def record(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        seen = []
        for param in self.watched(optimizers):
            grad = param.grad
            seen.append((param, grad, -1 if grad is None else grad._version))
        self._seen = seen

    def forget(self) -> None:
        """Drop the references, so that a cleared gradient's memory is freed at once."""
        self._seen = []

    def check_cleared(
        self, optimizers: Sequence[torch.optim.Optimizer], names: Callable[[], dict[int, str]]
    ) -> None:
        """Refuse gradients written after a finished window was cleared, before the next one.

        ``optimizers`` had their gradients cleared (to None or zeros) when the last window
        ended; whatever they hold now came from outside ``acc.backward`` (a
        ``loss.backward()`` between two with blocks, say) and would be added to the next
        update. Watched as between micro-batches: the first and last parameter of every
        param group; a gradient that is there is read (one sync each, once per window).
        """
        written = [(p, grad) for p in self.watched(optimizers) if (grad := p.grad) is not None]
        if not has_nonzero([grad for _, grad in written]):
            return
        param = next(p for p, grad in written if has_nonzero([grad]))  # the error path only
        lookup = names()
        example = lookup.get(id(param), f"<parameter of shape {tuple(param.shape)}>")
        raise RuntimeError(
            f"parameters (e.g. {example}) have gradients that were written after the last "
            "optimizer step cleared them and before this window's first acc.backward(), so "
            "they would be added to its update. Something other than acc.backward() wrote "
            "them, such as a loss.backward() between two with blocks: clear them with "
            "optimizer.zero_grad() before the next acc.backward(), or use acc.backward(loss)"
        )

    def check(self, names: Callable[[], dict[int, str]]) -> None:
        changed = [
            param
            for param, grad, version in self._seen
            if grad is not None and (param.grad is not grad or grad._version != version)
        ]
        if not changed:
            return
        lookup = names()
        example = lookup.get(id(changed[0]), f"<parameter of shape {tuple(changed[0].shape)}>")
        raise RuntimeError(
            f"the gradients of {len(changed)} parameter(s) (e.g. {example}) changed between two "
            "acc.backward() calls of one window, so the accumulated update would be wrong. "
            "Something other than acc.backward() wrote to them: loss.backward() instead of "
            "acc.backward(loss), a second loss or Accumulator reaching the same parameters "
            "(pass optimizers that train on one loss to one Accumulator), clipping or "
            "zeroing gradients in the loop (use max_grad_norm=, or clip under `if "
            "acc.sync_gradients:`), or a GradScaler not passed to the Accumulator unscaling "
            "them (pass scaler=). acc.discard() drops the window"
        )
