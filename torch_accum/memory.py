"""Measure the activation memory that a forward (and backward) pass holds, on any device.

Live tensor storages are tracked with a ``TorchDispatchMode``: it sees every op, including the
recomputation inside non-reentrant ``torch.utils.checkpoint`` regions that saved-tensor hooks
miss, and a timeline of allocations and frees gives a true peak, which process RSS (allocator
caching, no peak) and summed profiler events (no frees) cannot.

>>> import torch
>>> from torch_accum.memory import measure_activation_memory
>>> x = torch.ones(32, 100)
>>> w = torch.ones(100, 50, requires_grad=True)
>>> memory = measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w])
>>> memory.retained_after_forward  # the relu output saved for backward (32*50*4) + the loss (4)
6404
>>> memory.peak > memory.retained_after_forward
True
>>> memory.cuda_max_allocated is None  # no CUDA tensors were involved
True
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten
from torch.utils.hooks import RemovableHandle

__all__ = ["ActivationMemory", "measure_activation_memory"]


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes of tensor storages created while measuring, parameter gradients excluded.

    ``retained_after_forward`` counts the storages created by ``forward()`` that are still alive
    when it returns (the loss included); ``peak`` is the largest number of live bytes at any
    point of the forward and the backward; ``cuda_max_allocated`` is the CUDA allocator's peak
    above its level at the start (it also sees kernel workspaces and the gradients), or ``None``
    when no CUDA tensor was created.

    Examples:
        >>> ActivationMemory(retained_after_forward=4, peak=8, cuda_max_allocated=None).peak
        8
    """

    retained_after_forward: int
    peak: int
    cuda_max_allocated: int | None


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or results, however nested.

    ATen ops take and return tensors, tuples and lists of them and dicts of keyword
    arguments; walking these directly costs a fraction of ``tree_flatten``, which ran on
    every op and made up half of a measured run's overhead. Other registered pytree
    containers go through ``tree_flatten``.
    """
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif type(value) in SUPPORTED_NODES:
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor):
                yield leaf


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    # Wrapper subclasses (e.g. DTensor) own no memory themselves; their inner tensors do.
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(tensor, name))]
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return []


class _StorageTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records a ``(storage key, +/- bytes)`` event for every storage an op creates or frees."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.events: list[tuple[int, int]] = []
        self.cuda_devices: set[int] = set()
        self.gradient_keys: set[int] = set()
        # id(storage) -> (key, nbytes) of the storages alive now; keys are never reused, ids are.
        self._live: dict[int, tuple[int, int]] = {}
        # Holding the weakrefs keeps their callbacks armed; dropping them in close() disarms them.
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._keys = itertools.count()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None
        for t in _tensors_in(out):
            for storage in _storages(t):
                if inputs is None and id(storage) not in self._live:
                    # Only a storage not counted yet asks whether an input brought it.
                    inputs = {id(s) for i in _tensors_in((args, kwargs)) for s in _storages(i)}
                self._record(storage, is_input=inputs is not None and id(storage) in inputs)
        return out

    def _record(self, storage: torch.UntypedStorage, *, is_input: bool) -> None:
        nbytes = storage.nbytes()
        known = self._live.get(id(storage))
        if known is not None:
            key, old = known
            if nbytes != old:  # resize_() or out= grew/shrank a storage we already count
                self._live[id(storage)] = (key, nbytes)
                self.events.append((key, nbytes - old))
            return
        # Views and in-place ops return an input's storage; if it was not ours, it predates us.
        if is_input:
            return
        key = next(self._keys)
        self._live[id(storage)] = (key, nbytes)
        self._refs[key] = weakref.ref(storage, functools.partial(self._freed, id(storage)))
        self.events.append((key, nbytes))
        if storage.device.type == "cuda":
            self.cuda_devices.add(storage.device.index or 0)

    def _freed(self, sid: int, _ref: object) -> None:
        # PyTorch keeps a storage's Python object alive as long as the C++ storage lives, so
        # this callback fires when the memory itself is released, not when a wrapper dies.
        known = self._live.pop(sid, None)
        if known is not None:  # None only if close() raced with a free on another thread
            self._refs.pop(known[0], None)
            self.events.append((known[0], -known[1]))

    def key_of(self, tensor: torch.Tensor) -> int | None:
        known = self._live.get(id(tensor.untyped_storage()))
        return None if known is None else known[0]

    def gradient_hook(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        # Into an existing .grad, backward adds its fresh gradient in place and frees it; that
        # is a gradient, not an activation. When .grad is None the end-of-run check covers it.
        # A storage holding more or less than this gradient (e.g. a broadcast) is not its own.
        key = self.key_of(grad)
        own = grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
        if param.grad is not None and key is not None and own:
            self.gradient_keys.add(key)

    def close(self) -> None:
        self._refs.clear()
        self._live.clear()


def _live_bytes(events: list[tuple[int, int]], excluded: set[int]) -> Iterator[int]:
    live = 0
    yield live
    for key, delta in events:
        if key not in excluded:
            live += delta
            yield live


def measure_activation_memory(
    forward: Callable[[], torch.Tensor],
    *,
    parameters: Iterable[torch.Tensor] = (),
    backward: bool = True,
) -> ActivationMemory:
    """Run ``forward()`` (and ``loss.backward()``) and measure the activation memory it holds.

    Only storages created during the call count, not the inputs and parameters that exist
    before it. Gradients of ``parameters`` (an iterable, or a single tensor) are removed from
    the whole timeline: the storages that are their ``.grad`` at the end, and the fresh
    gradients that backward adds in place into an existing ``.grad``. ``.grad`` itself is
    left as backward leaves it. On CUDA the allocator's peak statistics are reset.

    Examples:
        >>> import torch
        >>> w = torch.ones(1000, requires_grad=True)
        >>> memory = measure_activation_memory(lambda: (w * 2).sum(), backward=False)
        >>> memory.retained_after_forward
        4
    """
    if not callable(forward):
        raise TypeError(
            f"forward must be a callable that runs the model and returns the loss, got "
            f"{_describe(forward)}; pass a function, e.g. forward=lambda: model(x).sum(), "
            "not the result of calling it"
        )
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be True or False, got {_describe(backward)}")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"parameters must be an iterable of tensors, got an element {_describe(p)}; "
                "pass e.g. parameters=model.parameters()"
            )
    # Allocator statistics are kept on the host as tensors are allocated, so no synchronize is
    # needed; an uninitialized CUDA starts at zero, with nothing to reset.
    cuda_start: dict[int, int] = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)
            cuda_start[device] = torch.cuda.memory_allocated(device)
    tracker = _StorageTracker()
    hooks: list[RemovableHandle] = []
    try:
        for p in params:
            if p.requires_grad:
                on_grad = functools.partial(tracker.gradient_hook, p)
                hooks.append(p.register_hook(on_grad))  # type: ignore[no-untyped-call]
        with tracker:
            loss = forward()
            forward_end = len(tracker.events)
            _check_loss(loss, backward)
            if backward:
                loss.backward()  # type: ignore[no-untyped-call]
        grads = [tracker.key_of(p.grad) for p in params if p.grad is not None]
        events = list(tracker.events)
    finally:
        for hook in hooks:
            hook.remove()
        tracker.close()
    excluded = tracker.gradient_keys | {key for key in grads if key is not None}
    retained = list(_live_bytes(events[:forward_end], excluded))[-1]
    peak = max(_live_bytes(events, excluded))
    cuda_peak = None
    if tracker.cuda_devices:
        cuda_peak = sum(
            torch.cuda.max_memory_allocated(device) - cuda_start.get(device, 0)
            for device in sorted(tracker.cuda_devices)
        )
    return ActivationMemory(retained, peak, cuda_peak)


def _describe(value: object) -> str:
    text = repr(value)
    if "\n" in text or len(text) > 60:
        return f"an object of type {type(value).__name__}"
    return f"{text} ({type(value).__name__})"


def _check_loss(loss: object, backward: bool) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"forward() must return the loss as a scalar tensor, but it returned "
            f"{_describe(loss)}; return e.g. model(x).sum() or loss_fn(model(x), y)"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"forward() must return a scalar loss, but it returned a tensor of shape "
            f"{tuple(loss.shape)}; reduce it, e.g. return model(x).sum() or .mean()"
        )
    if backward and not loss.requires_grad:
        raise ValueError(
            "backward=True but the loss returned by forward() does not require grad (was it "
            "computed under torch.no_grad(), or from tensors without requires_grad?); compute "
            "it with grad enabled, or pass backward=False to measure the forward only"
        )
