"""Activation checkpointing of a model's repeated blocks, switched on for a ``with`` block.

Each selected block's ``forward`` is shadowed on the instance (so ``state_dict`` keys and
the module tree stay as they are) by one that runs the original under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the block keeps only its
inputs for backward and recomputes the rest. Whole blocks are wrapped, never their
children (a wrapped child still stores everything between children) and never a block
inside another wrapped block (nested recomputation would run the inner forward 3 times).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torch_accum._patching import MethodPatches

logger = logging.getLogger(__name__)

CheckpointPolicy = (
    bool | type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool]
)

_CONTAINERS = (nn.ModuleList, nn.Sequential)


def is_repeated_block(module: nn.Module, parent: nn.Module | None) -> bool:
    """A non-leaf module with parameters inside a ModuleList/Sequential of its own kind."""
    if not isinstance(parent, _CONTAINERS) or len(parent) < 2:
        return False
    if not all(type(sibling) is type(module) for sibling in parent):
        return False
    has_children = next(module.children(), None) is not None
    has_parameters = next(module.parameters(), None) is not None
    return has_children and has_parameters


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _as_predicate(policy: CheckpointPolicy) -> Callable[[nn.Module, nn.Module | None], bool]:
    if policy is True:
        return is_repeated_block
    if isinstance(policy, type) and issubclass(policy, nn.Module):
        return lambda module, _parent: isinstance(module, policy)
    if (
        isinstance(policy, tuple)
        and policy
        and all(isinstance(c, type) and issubclass(c, nn.Module) for c in policy)
    ):
        return lambda module, _parent: isinstance(module, policy)
    if callable(policy) and not isinstance(policy, (type, bool)):
        return lambda module, _parent: bool(policy(module))
    raise TypeError(
        f"checkpointing must be True, False, an nn.Module class, a tuple of them, or a "
        f"callable module -> bool; got {_describe(policy)}. For example "
        "checkpointing=True, checkpointing=MyBlock or checkpointing=lambda m: m in model.blocks"
    )


def select_blocks(model: nn.Module, policy: CheckpointPolicy) -> list[tuple[str, nn.Module]]:
    """The outermost modules of ``model`` that ``policy`` selects, in definition order."""
    predicate = _as_predicate(policy)
    if next(model.parameters(), None) is None:
        raise ValueError(
            f"checkpointing was requested for a {type(model).__name__} without parameters: "
            "there is no activation gradient to save memory on; pass checkpointing=False"
        )
    selected: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, name: str, parent: nn.Module | None) -> None:
        if module is not model and predicate(module, parent):
            selected.append((name, module))
            return  # never wrap anything inside a wrapped block
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, module)

    visit(model, "", None)
    if not selected:
        if policy is True:
            raise ValueError(
                f"checkpointing=True found no repeated blocks in {type(model).__name__}: no "
                "nn.ModuleList or nn.Sequential holds two or more modules of one class that "
                "have parameters and submodules. Say which modules to checkpoint with "
                "checkpointing=<block class>, a tuple of classes, or a callable module -> bool"
            )
        raise ValueError(
            f"checkpointing={policy!r} matches no submodule of {type(model).__name__}; pass "
            "the class of the model's blocks (e.g. checkpointing=type(model.blocks[0])) or "
            "a callable that returns True for them"
        )
    return selected


class ActivationCheckpointing:
    """Runs the selected blocks of a model under non-reentrant activation checkpointing.

    Args:
        model: the model whose blocks to checkpoint.
        policy: ``True`` for the repeated blocks (see `is_repeated_block`), an
            ``nn.Module`` class or tuple of classes, or a callable ``module -> bool``.
    """

    def __init__(self, model: nn.Module, policy: CheckpointPolicy) -> None:
        self.blocks = select_blocks(model, policy)
        self.names = tuple(name for name, _ in self.blocks)

    def install(self, patches: MethodPatches, owner: object) -> None:
        """Shadow each block's ``forward``; ``patches.restore()`` undoes it."""
        for _, block in self.blocks:
            patches.replace(block, "forward", _checkpointed(block, block.forward), owner)
        logger.debug("checkpointing %d blocks: %s", len(self.names), ", ".join(self.names))


def _checkpointed(block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    running_stats = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        # Nothing to save for backward in evaluation or under no_grad: run it plainly.
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        if not running_stats:
            # partial(): the block's keyword arguments must not meet checkpoint()'s own.
            return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)
        calls = 0

        def run(*inner_args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*inner_args, **kwargs)
            # The recomputation in backward must not update running statistics again.
            with _frozen_running_stats(running_stats):
                return forward(*inner_args, **kwargs)

        return checkpoint(run, *args, use_reentrant=False)

    return functools.wraps(forward)(checkpointed_forward)


@contextlib.contextmanager
def _frozen_running_stats(modules: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    # With momentum 0 the running update is `1 * running + 0 * batch`: the statistics keep
    # their values bit for bit, while the op (and so what it saves for backward) is the
    # same as in the original forward, which checkpoint() verifies.
    saved = [(m.momentum, m.num_batches_tracked) for m in modules]
    counts = [None if count is None else count.clone() for _, count in saved]
    try:
        for module in modules:
            module.momentum = 0.0
        yield
    finally:
        for module, (momentum, count), value in zip(modules, saved, counts, strict=True):
            module.momentum = momentum
            if count is not None and value is not None:
                count.copy_(value)
