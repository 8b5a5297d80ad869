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
- A *stage* is a unit in which non-piece members of one class sit side by side (no
  layer with parameters between them): two held in a container (a ``ModuleList``, a
  ``Sequential``, a container subclass such as DenseNet's ``_DenseBlock``), or three as
  plain attributes (timm RegNet's ``s3.b1``..``b4``). Its blocks are inside. A decoder
  layer's self- and cross-attention, with a norm between them, do not make it a stage, nor
  do a block's two halves of one class (timm GhostNet's ``ghost1``, ``ghost2``).

From the model down: the first level whose members repeat a non-piece class gives the
blocks: the non-piece members of each child (or plain container) that holds one of the
repeated class (so a lone block in the same container counts), and any non-piece member
between the first and the last of them (Inception's lone reduction blocks; a lone module
after them does not count), each replaced by its blocks when its class is a stage class
(a stage holding a single block counts too). The units on that level before the first
block, the *stem*, are checkpointed too, pieces or not: a stem works at the input's full
resolution, and leaving it out cost up to a third more peak (timm regnetx_002: 0.57 of the
unwrapped peak instead of 0.48; torchvision mobilenet_v3_small 0.39 instead of 0.29). The
stem is not counted as a block by ``Checkpointing(every=n)``. A unit beside the blocks
that holds repeated blocks itself is no stem: its own blocks are taken instead (a
segmentation model's backbone next to its two heads of one class: torchvision
fcn_resnet50 peaks at 0.99 with the backbone wrapped whole, 0.44 with its Bottlenecks). A
level without such a repetition is searched one level deeper; if nothing is found below,
pieces that repeat on it are the blocks (a plain stack of conv-norm-act), with any piece
between them and those before them as the stem (wav2vec2's first feature conv, of a class
of its own and the largest).

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
    # them) do not make it a stage; a run of blocks does. Held in a container (a ModuleList
    # of layers, a Sequential of blocks, a container subclass such as DenseNet's
    # _DenseBlock) two are enough; as plain attributes it takes three (timm RegNet's
    # s3.b1..b4): a block made of two halves of one class (timm GhostNet's GhostBottleneck:
    # ghost1, ghost2) is a block, not a stage.
    children: list[tuple[nn.Module, bool]] = []
    own_container = isinstance(module, _PLAIN_CONTAINERS)
    for child in module.children():
        if type(child) in _PLAIN_CONTAINERS:
            children.extend((c, True) for c in _children(child))
        else:
            children.append((child, own_container))
    children = [(c, held) for c, held in children if _has_parameters(c)]
    run = 1
    for (a, held_a), (b, held_b) in itertools.pairwise(children):
        if type(a) is type(b) and _is_unit(a) and not _is_piece(a):
            run += 1
            if (held_a and held_b) or run >= 3:
                return True
        else:
            run = 1
    return False


class Choice(NamedTuple):
    """What one level of the search found: the stem and the blocks."""

    stem: list[nn.Module]
    blocks: list[nn.Module]
    pieces: bool = False  # found as repeated pieces only (a plain stack of conv-norm-act)


def choose_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The stem and the blocks of ``model`` under the rule above, each module once."""
    stages = {type(m) for m in model.modules() if m is not model and _is_stage(m)}
    stem, blocks, _ = _select(model, stages)
    unique: dict[int, nn.Module] = {}
    for module in stem + blocks:
        unique.setdefault(id(module), module)
    # A module registered twice (a shared one) may also sit inside another chosen block.
    inside = {id(m) for module in unique.values() for m in module.modules() if m is not module}
    order = {id(m): i for i, m in enumerate(model.modules())}
    kept = sorted((m for m in unique.values() if id(m) not in inside), key=lambda m: order[id(m)])
    in_stem = {id(m) for m in stem}
    return [m for m in kept if id(m) in in_stem], [m for m in kept if id(m) not in in_stem]


def _select(module: nn.Module, stages: set[type[nn.Module]]) -> Choice:
    members = _members(module)
    blocks = [m for m in members if not _is_piece(m)]
    repeated = {cls for cls, n in Counter(type(m) for m in blocks).items() if n >= 2}
    if repeated:
        # A lone block next to repeated ones in the same container (the first stage of an
        # EfficientNet) is a block too; a lone module beside them (an embedding) is not.
        found: set[int] = set()
        for child in module.children():
            inside = [m for m in _members_of_child(child) if not _is_piece(m)]
            if any(type(m) in repeated for m in inside):
                found.update(id(m) for m in inside)
        at = [i for i, m in enumerate(members) if id(m) in found]
        first, last = at[0], at[-1]
        # So is a lone block between them (Inception's reduction blocks, Mixed_6a between
        # the InceptionA and InceptionC blocks).
        chosen = [m for m in members[first : last + 1] if id(m) in found or not _is_piece(m)]
        blocks = [inner for block in chosen for inner in _expand(block, stages)]
        # The stem: units before the first block work at the input's full resolution,
        # so their activations are among the largest of the model. A unit beside the
        # blocks that holds blocks itself is no stem: a segmentation model's backbone next
        # to its two heads (torchvision FCN with aux_loss), whose blocks are the ones.
        stem: list[nn.Module] = []
        for index, member in enumerate(members[:first] + members[last + 1 :]):
            inner = _select(member, stages)
            if inner.blocks and not inner.pieces:
                stem += inner.stem
                blocks += inner.blocks
            elif index < first:
                stem.append(member)
        return Choice(stem, blocks)
    deeper = [_select(member, stages) for member in members]
    if any(choice.blocks for choice in deeper):
        return Choice(
            [m for choice in deeper for m in choice.stem],
            [m for choice in deeper for m in choice.blocks],
            all(choice.pieces for choice in deeper if choice.blocks),
        )
    # A plain stack of conv-norm-act pieces: the repeated ones, any lone piece between
    # them, and the stem before them (wav2vec2's first feature conv, which differs from
    # the others by its norm and is the largest).
    counts = Counter(type(m) for m in members)
    at = [i for i, m in enumerate(members) if counts[type(m)] >= 2]
    if not at:
        return Choice([], [], pieces=True)
    return Choice(members[: at[0]], members[at[0] : at[-1] + 1], pieces=True)


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
