"""Which modules ``checkpointing=True`` recomputes: the model's blocks, found from its tree.

The unit of recomputation that pays is the residual block / transformer layer: a stage of
blocks is recomputed whole in backward (its activations all live at once again), and a piece
inside a block leaves everything between the pieces stored. The rule, in the terms below:

- A *layer* is one parameterised op: a module without children, or one whose parameters are
  all its own (``BatchNorm`` with an activation child). A *unit* is any other module with
  parameters that is not a plain ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``.
- A unit's *members* are its child units, looked up through plain containers (nested ones
  too), so blocks held in a ``Sequential`` of ``Sequential`` stages, a ``ModuleDict`` or
  plain attributes are siblings alike.
- A *piece* is a unit whose members are all layers, at most two of them with parameters
  (conv + norm, the two 1x1 convs of a squeeze-excitation, linear + norm): too small to be
  a block of its own.
- A *stage* is a unit in which two non-piece members of one class sit side by side (no
  layer with parameters between them): its blocks are inside. A decoder layer's self- and
  cross-attention, with a norm between them, do not make it a stage.

From the model down: the first level whose members repeat a non-piece class gives the
blocks: the non-piece members of each child (or plain container) that holds one of the
repeated class (so a lone block in the same container counts, a lone module after them
does not), each replaced by its blocks when its class is a stage class (a stage holding a
single block counts too). The units on that level before the first block, the *stem*, are
checkpointed too, pieces or not: a stem works at the input's full resolution, and leaving
it out cost up to a third more peak (timm regnetx_002: 0.57 of the unwrapped peak instead
of 0.48; torchvision mobilenet_v3_small 0.39 instead of 0.29). A level without such a
repetition is searched one level deeper; if nothing is found below, pieces that repeat on
it are the blocks (a plain stack of conv-norm-act).

What the tree cannot show, such as one layer called many times (ALBERT), finds nothing:
``checkpointing=True`` then raises an error naming the candidate classes.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import NamedTuple

from torch import nn

_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_layer(module: nn.Module) -> bool:
    children = list(module.children())
    if not children:
        return True
    own = next(module.parameters(recurse=False), None) is not None
    return own and not any(_has_parameters(child) for child in children)


def _is_unit(module: nn.Module) -> bool:
    return (
        type(module) not in _PLAIN_CONTAINERS and _has_parameters(module) and not _is_layer(module)
    )


def _children(module: nn.Module) -> list[nn.Module]:
    """Children of ``module``, with plain containers replaced by their contents."""
    found: list[nn.Module] = []
    for child in module.children():
        if type(child) in _PLAIN_CONTAINERS:
            found.extend(_children(child))
        else:
            found.append(child)
    return found


def _members(module: nn.Module) -> list[nn.Module]:
    return [child for child in _children(module) if _is_unit(child)]


def _is_piece(module: nn.Module) -> bool:
    children = _children(module)
    if not all(_is_layer(c) or not _has_parameters(c) for c in children):
        return False
    with_parameters = sum(_has_parameters(c) for c in children)
    with_parameters += next(module.parameters(recurse=False), None) is not None
    return with_parameters <= 2


def _is_stage(module: nn.Module) -> bool:
    # Side by side: a decoder layer's self- and cross-attention (same class, a norm between
    # them) do not make it a stage; a run of blocks does.
    children = [c for c in _children(module) if _has_parameters(c)]
    return any(
        type(a) is type(b) and _is_unit(a) and not _is_piece(a)
        for a, b in itertools.pairwise(children)
    )


class Choice(NamedTuple):
    """What ``checkpointing=True`` wraps: the stem and the blocks, each in definition order."""

    stem: list[nn.Module]
    blocks: list[nn.Module]


def choose_blocks(model: nn.Module) -> Choice:
    """The stem and blocks of ``model`` under the rule above, each module once."""
    stages = {type(m) for m in model.modules() if m is not model and _is_stage(m)}
    stem, blocks = _select(model, stages)
    unique: dict[int, nn.Module] = {}
    for module in stem + blocks:
        unique.setdefault(id(module), module)
    # A module registered twice (a shared one) may also sit inside another chosen block.
    inside = {id(m) for module in unique.values() for m in module.modules() if m is not module}
    order = {id(m): i for i, m in enumerate(model.modules())}
    kept = sorted((m for m in unique.values() if id(m) not in inside), key=lambda m: order[id(m)])
    in_stem = {id(m) for m in stem}
    return Choice([m for m in kept if id(m) in in_stem], [m for m in kept if id(m) not in in_stem])


def _select(module: nn.Module, stages: set[type[nn.Module]]) -> Choice:
    members = _members(module)
    blocks = [m for m in members if not _is_piece(m)]
    repeated = {cls for cls, n in Counter(type(m) for m in blocks).items() if n >= 2}
    if repeated:
        # A lone block next to repeated ones in the same container (the first stage of an
        # EfficientNet) is a block too; a lone module beside them (an embedding) is not.
        chosen: list[nn.Module] = []
        for child in module.children():
            found = [m for m in _members_of_child(child) if not _is_piece(m)]
            if any(type(m) in repeated for m in found):
                chosen.extend(found)
        # The stem: units before the first block work at the input's full resolution,
        # so their activations are among the largest of the model.
        first = next(i for i, m in enumerate(members) if any(m is c for c in chosen))
        stem = members[:first]
        return Choice(stem, [inner for block in chosen for inner in _expand(block, stages)])
    deeper = [_select(member, stages) for member in members]
    if any(choice.blocks for choice in deeper):
        return Choice(
            [m for choice in deeper for m in choice.stem],
            [m for choice in deeper for m in choice.blocks],
        )
    counts = Counter(type(m) for m in members)
    return Choice([], [m for m in members if counts[type(m)] >= 2])


def _members_of_child(child: nn.Module) -> list[nn.Module]:
    if type(child) in _PLAIN_CONTAINERS:
        return [m for m in _children(child) if _is_unit(m)]
    return [child] if _is_unit(child) else []


def _expand(module: nn.Module, stages: set[type[nn.Module]]) -> list[nn.Module]:
    if type(module) not in stages:
        return [module]
    inner = [m for m in _members(module) if not _is_piece(m)]
    return [block for m in inner for block in _expand(m, stages)] or [module]


def candidate_classes(model: nn.Module, limit: int = 8) -> list[str]:
    """Names of the non-piece unit classes below ``model``, outermost first: what to pass."""
    names: dict[str, None] = {}
    for module in model.modules():
        if module is not model and _is_unit(module) and not _is_piece(module):
            names.setdefault(type(module).__name__, None)
    return list(names)[:limit]
