"""Selective recomputation that stays exact when a kept result is changed in place.

``checkpointing="selective"`` keeps the outputs of matmuls and attention from the forward
(PyTorch's ``create_selective_checkpoint_contexts``) and hands them to the recomputation in
backward instead of running those ops again. A kept output must therefore still hold its
forward value when backward comes. Models break that in two ways:

- directly: ``F.relu(self.fc1(x), inplace=True)`` (torchvision GoogLeNet's auxiliary heads,
  Swin V2's ``cpb_mlp``) writes into the ``addmm`` result itself. PyTorch notices (the
  version counter moved) and backward fails with "Tensor cached during selective activation
  checkpoint has been mutated".
- through an alias with a version counter of its own: a 4-D ``q @ k.transpose(-2, -1)`` is a
  ``bmm`` followed by ``_unsafe_view``, so ``attn[..., 1:, 1:] += rel_pos`` (timm MViTv2)
  writes into the kept ``bmm`` output without moving its version counter. The recomputation
  then starts from the changed value and adds the term twice: gradients silently wrong.

`WriteWatch` sees both. Mixed into PyTorch's caching mode for the block's forward, it notes
the storages of the results that are kept, and when an op is about to write into one of
them (any op whose schema marks an argument as written: in-place, ``out=``, ``copy_``), it
first replaces the kept value by a copy taken before the write. The recomputation then
sees exactly what the forward saw, and the gradients are bit-identical to a plain run; the
cost is the memory of that one copy, what selective meant to keep anyway. Storages are
compared, not tensors, so every alias counts. If this torch's cache cannot be reached (its
layout is private), the write is refused with an error that names the block instead.

Under ``torch.compile`` the plain PyTorch contexts are used: the traced graph is functional.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import create_selective_checkpoint_contexts


@functools.cache
def saved_ops() -> frozenset[Any]:
    """Ops whose outputs selective checkpointing keeps: matmuls and attention.

    Not convolutions: for a CNN that would keep nearly every activation, which is the
    plain run's memory, not a point between it and full recomputation.
    """
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


_SAVED = saved_ops()


@functools.cache
def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments that ``func`` writes into, from its schema."""
    schema = getattr(func, "_schema", None)
    if schema is None:  # a higher-order op: nothing written that the cache could hold
        return ()
    return tuple(
        (i, arg.name)
        for i, arg in enumerate(schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )


def _storage_key(value: object) -> tuple[str, int] | None:
    """Where ``value``'s memory lives, if it is a tensor with memory of its own."""
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return None
    try:
        storage = value.untyped_storage()
        if storage.nbytes() == 0:
            return None
        return str(value.device), storage.data_ptr()
    except (RuntimeError, NotImplementedError):  # wrapper subclasses, fake tensors
        return None


def _tracing() -> bool:
    """Inside ``torch.compile`` (Dynamo or the AOT trace of a checkpointed region)."""
    if torch.compiler.is_compiling():
        return True
    keys = getattr(torch._C, "_TorchDispatchModeKey", None)
    get_mode = getattr(torch._C, "_get_dispatch_mode", None)
    return keys is not None and get_mode is not None and get_mode(keys.PROXY) is not None


def _kept_values(cache: object) -> list[Any] | None:
    """The entries of PyTorch's selective cache that hold a tensor, or None if unknown.

    ``_CachingTorchDispatchMode.storage`` maps each op to its kept outputs: a list in
    torch 2.6, a dict by call index later; each output is wrapped in an object with
    ``val`` and ``version`` (``_VersionWrapper``), in a tuple for ops with several outputs.
    """
    storage = getattr(cache, "storage", None)
    if not isinstance(storage, dict):
        return None
    kept: list[Any] = []
    for per_op in storage.values():
        if isinstance(per_op, dict):
            entries = list(per_op.values())
        elif isinstance(per_op, list):
            entries = per_op
        else:
            return None
        for entry in entries:
            leaves, _ = tree_flatten(entry)
            kept.extend(
                leaf
                for leaf in leaves
                if isinstance(getattr(leaf, "val", None), torch.Tensor) and hasattr(leaf, "version")
            )
    return kept


class WriteWatch:
    """Mixed into PyTorch's caching mode: copies a kept result before an op writes into it.

    PyTorch's ``_CachingTorchDispatchMode`` of one checkpoint call gets this class mixed in
    (`watch`), so the watch costs no dispatch mode of its own: it notes the storages of
    the results the mode keeps and, before an op that writes into one of them runs, gives
    the cache a copy. Inside the handler the mode is off, so the copy is not recorded as
    an op of the block (a memory-measuring mode below still sees it).
    """

    supports_higher_order_operators = True  # the caching mode's own handler takes them
    storage: Any
    watched_block: str
    kept_storages: dict[tuple[str, int], str]  # storage -> the op that produced it

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kept = self.kept_storages
        if kept:
            for position, name in _written_arguments(func):
                if position < len(args):
                    target = args[position]
                else:
                    target = None if kwargs is None else kwargs.get(name)
                targets = target if isinstance(target, (list, tuple)) else (target,)
                for tensor in targets:
                    key = _storage_key(tensor)
                    if key is not None and key in kept:
                        self._copy_before_write(key, func)
        out = super().__torch_dispatch__(func, types, args, kwargs)  # type: ignore[misc]
        if func in _SAVED:
            for leaf in tree_flatten(out)[0]:
                key = _storage_key(leaf)
                if key is not None:
                    kept[key] = str(func)
        return out

    def _copy_before_write(self, key: tuple[str, int], writer: Any) -> None:
        producer = self.kept_storages.pop(key)
        kept = _kept_values(self)
        found = [] if kept is None else [w for w in kept if _storage_key(w.val) == key]
        if not found:
            raise RuntimeError(
                f"checkpointing='selective': block {self.watched_block!r} writes in place "
                f"({writer}) into the result of {producer}, which selective checkpointing "
                f"keeps for backward, and this torch version's cache (torch "
                f"{torch.__version__}) cannot be given a copy: the recomputation would start "
                "from the changed value. Use checkpointing='full' for this model, or leave "
                "this block out with Checkpointing(blocks=..., mode='selective')"
            )
        for wrapper in found:
            copy = wrapper.val.clone()
            wrapper.val, wrapper.version = copy, copy._version


_WATCHING: dict[type, type] = {}


def _watching(mode_class: type) -> type:
    """``mode_class`` (PyTorch's caching mode) with `WriteWatch` mixed in, made once."""
    if mode_class not in _WATCHING:
        name = f"Watching{mode_class.__name__}"
        _WATCHING[mode_class] = type(name, (WriteWatch, mode_class), {})
    return _WATCHING[mode_class]


def watch(cache: Any, block: str) -> Any:
    """Make PyTorch's caching mode ``cache`` copy kept results before they are written."""
    cache.__class__ = _watching(type(cache))
    cache.watched_block = block
    cache.kept_storages = {}
    return cache


def selective_contexts(block: str) -> tuple[Any, Any]:
    """``checkpoint(context_fn=...)``'s pair for the selective mode of block ``block``."""
    cache, cached = create_selective_checkpoint_contexts(list(saved_ops()))  # type: ignore[no-untyped-call]
    if _tracing():
        return cache, cached
    return watch(cache, block), cached


def traced_selective_contexts() -> tuple[Any, Any]:
    """The selective pair for ``checkpoint`` under ``torch.compile``.

    A plain function without arguments, the only ``context_fn`` compiled checkpointing
    takes; the traced graph is functional, so there is no in-place write to watch.
    """
    contexts: tuple[Any, Any] = create_selective_checkpoint_contexts(list(saved_ops()))  # type: ignore[no-untyped-call]
    return contexts
