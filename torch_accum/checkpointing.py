"""Activation checkpointing of a model's blocks, switched on for a ``with`` block.

Each selected block's ``forward`` is shadowed on the instance (so ``state_dict`` keys and
the module tree stay as they are) by a `CheckpointedForward` that runs the original under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the block keeps only its
inputs for backward and recomputes the rest ("full"), or keeps the results of its matmuls
and attention and recomputes only the cheap ops between them ("selective").
Whole blocks are wrapped, never their children (a wrapped child still stores everything
between children) and never a block inside another wrapped block (nested recomputation
would run the inner forward 3 times). Which blocks ``True`` finds: see ``_block_choice``.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import checkpoint

from torch_accum._block_choice import candidate_classes, choose_blocks
from torch_accum._caches import CACHE_ARGUMENTS, CacheSwitch, without_caches
from torch_accum._selective import selective_contexts, traced_selective_contexts

logger = logging.getLogger(__name__)

BlockPolicy = bool | type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool]
Mode = Literal["full", "selective"]
MODES: tuple[Mode, ...] = ("full", "selective")

_ACCEPTED = (
    "True, False, an nn.Module class, a tuple of them, a callable module -> bool, 'full', "
    "'selective', or a torch_accum.Checkpointing(blocks=..., mode=..., every=...)"
)


@dataclass(frozen=True)
class Checkpointing:
    """Which blocks to checkpoint and how: one point on the memory/time curve.

    Args:
        blocks: ``True`` for the model's blocks (the residual blocks / transformer layers,
            found from the module tree), an ``nn.Module`` class or tuple of classes, or a
            callable ``module -> bool``.
        mode: ``"full"`` keeps only each block's inputs and recomputes the rest in backward
            (least memory, one extra forward of the blocks); ``"selective"`` also keeps the
            outputs of matmuls and attention and recomputes only the cheap
            ops between them (norms, activations, dropout, residual adds).
        every: checkpoint every ``every``-th block only (blocks 0, every, 2*every, ...):
            between no checkpointing (memory) and all blocks (time). Only the blocks are
            counted: the stem that ``blocks=True`` wraps in front of them (a patch
            embedding, a conv stem) stays wrapped.

    Examples:
        >>> from torch_accum import Checkpointing
        >>> Checkpointing(mode="selective")
        Checkpointing(blocks=True, mode='selective', every=1)
        >>> Checkpointing(every=2).every
        2
    """

    blocks: BlockPolicy = True
    mode: Mode = "full"
    every: int = 1

    def __post_init__(self) -> None:
        _check_blocks(self.blocks, "Checkpointing(blocks=...)")
        if self.mode not in MODES:
            raise ValueError(
                f"Checkpointing(mode=...) must be 'full' or 'selective', got {_describe(self.mode)}"
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(
                f"Checkpointing(every=...) must be an int >= 1 (1 checkpoints every block, 2 "
                f"every second one), got {_describe(self.every)}"
            )


CheckpointPolicy = BlockPolicy | Mode | Checkpointing


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_module_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)


def _check_blocks(blocks: object, argument: str) -> None:
    if blocks is True or _is_module_class(blocks):
        return
    if isinstance(blocks, tuple) and blocks and all(_is_module_class(c) for c in blocks):
        return
    if callable(blocks) and not isinstance(blocks, (type, bool, Checkpointing)):
        return
    raise TypeError(
        f"{argument} must be True, an nn.Module class, a tuple of them, or a callable "
        f"module -> bool; got {_describe(blocks)}"
    )


def as_checkpointing(policy: object) -> Checkpointing:
    """The `Checkpointing` that the ``checkpointing=`` argument ``policy`` stands for."""
    if isinstance(policy, Checkpointing):
        return policy
    if isinstance(policy, str):
        if policy not in MODES:
            raise ValueError(
                f"checkpointing={policy!r} is not a mode: the strings accepted are 'full' "
                "(the same as True) and 'selective'; for every n-th block pass "
                "checkpointing=torch_accum.Checkpointing(every=n)"
            )
        return Checkpointing(mode=policy)
    try:
        _check_blocks(policy, "checkpointing")
    except TypeError:
        raise TypeError(
            f"checkpointing must be {_ACCEPTED}; got {_describe(policy)}. For example "
            "checkpointing=True, checkpointing='selective', checkpointing=MyBlock or "
            "checkpointing=lambda m: m in model.blocks"
        ) from None
    return Checkpointing(blocks=policy)  # type: ignore[arg-type]  # checked just above


def _as_predicate(blocks: BlockPolicy) -> Callable[[nn.Module], bool]:
    if _is_module_class(blocks) or isinstance(blocks, tuple):
        classes = blocks
        return lambda module: isinstance(module, classes)  # type: ignore[arg-type]
    return lambda module: bool(blocks(module))  # type: ignore[operator]


def select_blocks(
    model: nn.Module, blocks: BlockPolicy, every: int = 1
) -> list[tuple[str, nn.Module]]:
    """The outermost modules of ``model`` that ``blocks`` selects, in definition order.

    With ``every=n`` only blocks 0, n, 2n, ... of them; the stem that ``True`` wraps in
    front of the blocks (see ``_block_choice``) is not counted as a block and stays wrapped.
    """
    if next(model.parameters(), None) is None:
        raise ValueError(
            f"checkpointing was requested for a {type(model).__name__} without parameters: "
            "there is no activation gradient to save memory on; pass checkpointing=False"
        )
    if blocks is True:
        stem, chosen = choose_blocks(model)
        if not chosen:
            candidates = candidate_classes(model)
            hint = (
                f" Classes of modules with layers of their own: {', '.join(candidates)}; "
                "pass the one your model runs once per layer (for one shared layer, that "
                "layer's class)."
                if candidates
                else ""
            )
            raise ValueError(
                f"checkpointing=True found no repeated blocks in {type(model).__name__}: no "
                "class of module with layers of its own occurs twice side by side (as "
                "attributes or in an nn.Sequential/ModuleList/ModuleDict); a layer shared and "
                f"called repeatedly cannot be seen from the module tree.{hint} Say which "
                "modules to checkpoint with checkpointing=<block class>, a tuple of classes, "
                "or a callable module -> bool"
            )
        kept = {id(module) for module in stem + chosen[::every]}
        return [(name, module) for name, module in model.named_modules() if id(module) in kept]
    predicate = _as_predicate(blocks)
    selected: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, name: str) -> None:
        if module is not model and predicate(module):
            selected.append((name, module))
            return  # never wrap anything inside a wrapped block
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    if not selected:
        raise ValueError(
            f"checkpointing={blocks!r} matches no submodule of {type(model).__name__}; pass "
            "the class of the model's blocks (e.g. checkpointing=type(model.blocks[0])) or "
            "a callable that returns True for them"
        )
    return selected[::every]


class ActivationCheckpointing:
    """Runs the selected blocks of a model under non-reentrant activation checkpointing.

    Args:
        model: the model whose blocks to checkpoint.
        policy: what ``Accumulator(checkpointing=...)`` accepts: see `Checkpointing`.
    """

    def __init__(self, model: nn.Module, policy: CheckpointPolicy) -> None:
        self.settings = as_checkpointing(policy)
        self.blocks = select_blocks(model, self.settings.blocks, self.settings.every)
        self.names = tuple(name for name, _ in self.blocks)
        self._caches = CacheSwitch(model)
        self._previous: list[tuple[nn.Module, object]] = []
        self.logged_cache_drop = False

    def install(self) -> None:
        """Shadow each block's ``forward`` and switch KV caches off; `restore` undoes it."""
        self._caches.switch_off()
        for name, block in self.blocks:
            previous = vars(block).get("forward", _ABSENT)
            self._previous.append((block, previous))
            vars(block)["forward"] = _forward_for(block, name, self, previous)
        logger.debug(
            "checkpointing %d blocks (%s): %s",
            len(self.names),
            self.settings.mode,
            ", ".join(self.names),
        )

    def restore(self) -> None:
        """Put back every ``forward`` and ``use_cache``; safe to call more than once."""
        try:
            while self._previous:
                block, previous = self._previous.pop()
                if previous is _ABSENT:
                    vars(block).pop("forward", None)
                else:
                    vars(block)["forward"] = previous
        finally:
            self._caches.restore()

    def context_fn(self, block: str = "") -> Any:
        """``checkpoint(context_fn=...)`` for the mode: what to save instead of recompute.

        Selective keeps matmul and attention results, copied first if ``block`` writes into
        one in place (see ``_selective``).
        """
        if self.settings.mode == "selective":
            return selective_contexts(block)
        return contextlib.nullcontext(), contextlib.nullcontext()


_ABSENT = object()
_CACHE_KEYWORDS = (*CACHE_ARGUMENTS, "use_cache")

#: The attribute under which a block keeps its `CheckpointedForward` between `with` blocks.
_KEPT = "_torch_accum_checkpointed_forward"


class _Kept:
    """Holds a block's `CheckpointedForward` on the block, for the next Accumulator too.

    A compiled model guards on the identity of the ``forward`` objects it traced: new ones
    per ``with`` block or per Accumulator would recompile it each time. Copied and pickled
    as ``None``: a copy of the block makes a forward of its own, and loading a pickled model
    needs no torch_accum.
    """

    __slots__ = ("forward",)

    def __init__(self, forward: CheckpointedForward) -> None:
        self.forward = forward

    def __reduce__(self) -> tuple[Any, ...]:
        return type(None), ()


def _forward_for(
    block: nn.Module, name: str, owner: ActivationCheckpointing, previous: object
) -> CheckpointedForward:
    """The forward ``block`` last had if it still wraps ``previous``, else a new one."""
    kept = vars(block).get(_KEPT)
    forward = kept.forward if isinstance(kept, _Kept) else None
    if forward is None or forward.block is not block or forward.shadowed is not previous:
        forward = CheckpointedForward(block, name, owner, previous)
        vars(block)[_KEPT] = _Kept(forward)
    else:
        forward.name, forward.owner = name, owner
    return forward


def _unpatched_forward(block: nn.Module, previous: object) -> object:
    """What a copy of a block gets for the ``forward`` that was shadowed in the original."""
    if previous is not None:
        return previous
    return types.MethodType(type(block).forward, block)


def _snapshot(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts copied (recursively); the rest shared."""
    if type(value) is list:
        return [_snapshot(item) for item in value]
    if type(value) is tuple:
        return tuple(_snapshot(item) for item in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_snapshot(item) for item in value))
    if type(value) is dict:
        return {key: _snapshot(item) for key, item in value.items()}
    return value


class CheckpointedForward:
    """The ``forward`` of a block while it is checkpointed; an instance attribute.

    A class rather than a closure so that copies of the model made inside the ``with``
    block (``copy.deepcopy``, ``torch.save``) get a plain ``forward`` of their own block
    (`__reduce__`), not one that runs the live model's block.
    """

    def __init__(
        self,
        block: nn.Module,
        name: str,
        owner: ActivationCheckpointing,
        previous: object,
    ) -> None:
        self.block = block
        self.name = name
        self.owner = owner
        self.shadowed = previous
        self.previous = None if previous is _ABSENT else previous
        self.forward: Callable[..., Any] = getattr(block, "forward")  # noqa: B009
        self.running_stats = [
            m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        # inspect.signature() follows __wrapped__: code that reads a block's signature
        # (Hugging Face does) sees the real one.
        self.__wrapped__ = self.forward
        self.__name__ = "forward"
        self.__doc__ = getattr(self.forward, "__doc__", None)

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpatched_forward, (self.block, self.previous)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Nothing to save for backward in evaluation or under no_grad: run it plainly.
        if not (self.block.training and torch.is_grad_enabled()):
            return self.forward(*args, **kwargs)
        owner = self.owner
        if torch.compiler.is_compiling():
            # Traced: no log flag to set (a side effect), no identity test of dicts (the
            # dynamo of torch 2.6 breaks the graph on it and the model would run eagerly),
            # and the block's name read only for a cache to drop: torch 2.6's dynamo guards
            # on it when read, and the blocks of a per-block compile share this frame.
            if any(key in kwargs for key in _CACHE_KEYWORDS):
                kwargs = without_caches(self.name, kwargs, log=False)
            return self._traced(args, kwargs)
        cleaned = without_caches(self.name, kwargs, log=not owner.logged_cache_drop)
        if cleaned is not kwargs:
            owner.logged_cache_drop = True
        # Recomputation in backward must see the arguments as they were now, even if the
        # caller appends to a list it passed (DenseNet): copy the containers, not tensors.
        saved_args, saved_kwargs = _snapshot(args), _snapshot(cleaned)
        forward, running_stats = self.forward, self.running_stats
        calls = 0

        def run(*first_args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*first_args, **cleaned)
            # The recomputation in backward must not update running statistics again.
            with _frozen_running_stats(running_stats):
                return forward(*saved_args, **saved_kwargs)

        return checkpoint(run, *args, use_reentrant=False, context_fn=self.context_fn)

    def context_fn(self) -> Any:
        """``checkpoint(context_fn=...)`` for this block (a bound method, as Dynamo takes)."""
        return self.owner.context_fn(self.name)

    def _traced(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call as dynamo traces it: the same ``checkpoint`` a hand-written loop makes.

        Dynamo turns ``checkpoint`` into a higher-order op whose body must not touch state
        outside it, so the eager path's call counter cannot be traced. Nor is it needed:
        the compiled graph recomputes only what backward needs (no second running-statistics
        update), replays random ops itself and reads the inputs as they were when traced,
        exactly as it does for ``checkpoint(block, x, use_reentrant=False)`` written by hand.

        The class's ``forward`` gets the block as an argument, not as a bound method of
        its own: torch 2.6's dynamo guards on a bound method's identity, and the blocks of
        a per-block compile, which share this frame, would each compile it once more.
        """
        forward: Any = self.previous  # a forward set on the instance before ours, if any
        if forward is None:
            forward, args = _class_forward, (self.block, *args)
        if self.owner.settings.mode == "selective":
            return checkpoint(
                forward,
                *args,
                use_reentrant=False,
                context_fn=traced_selective_contexts,
                **kwargs,
            )
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _class_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``block``'s ``forward`` as its class defines it."""
    return type(block).forward(block, *args, **kwargs)


@contextlib.contextmanager
def _frozen_running_stats(modules: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    # With momentum 0 the running update is `1 * running + 0 * batch`: the statistics keep
    # their values bit for bit, while the op (and so what it saves for backward) is the
    # same as in the original forward, which checkpoint() verifies.
    # The count is saved and put back outside any dispatch mode: selective checkpointing
    # replays the recomputation against the ops of the first forward, and these are extra.
    saved = [(m.momentum, m.num_batches_tracked) for m in modules]
    with _disable_current_modes():
        counts = [None if count is None else count.clone() for _, count in saved]
    try:
        for module in modules:
            module.momentum = 0.0
        yield
    finally:
        for module, (momentum, count), value in zip(modules, saved, counts, strict=True):
            module.momentum = momentum
            if count is not None and value is not None:
                with _disable_current_modes():
                    count.copy_(value)
