"""The compiled hand-written loop that the compile benchmark and tests compare with.

Blocks wrapped for checkpointing by hand, as users (and torchtitan) do, and a backend that
counts the graphs it gets and the recompilations among them. ``benchmarks/compile.py`` and
``tests/test_checkpointing_compile.py`` both use this one copy, so that the reference the
library is held to is the same in the figures and in the tests.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

from torch_accum._selective import traced_selective_contexts
from torch_accum.checkpointing import as_checkpointing

Batch = tuple[torch.Tensor, torch.Tensor]

# The library's selective policy, passed as a user passes one: a plain function.
SELECTIVE = traced_selective_contexts


def loss_of(model: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class HandCheckpointed(nn.Module):
    """What users write by hand: the block run under non-reentrant checkpointing."""

    def __init__(self, block: nn.Module, selective: bool) -> None:
        super().__init__()
        self.block = block
        self.selective = selective

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.block(*args, **kwargs)
        if self.selective:
            return checkpoint(
                self.block, *args, use_reentrant=False, context_fn=SELECTIVE, **kwargs
            )
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def wrap_by_hand(model: nn.Module, policy: object) -> list[nn.Module]:
    """Wrap the blocks ``policy`` selects, as the hand loop does; the wrappers."""
    settings = as_checkpointing(policy)  # type: ignore[arg-type]
    blocks = model.blocks  # type: ignore[union-attr]
    chosen = range(0, len(blocks), settings.every)
    for index in chosen:
        blocks[index] = HandCheckpointed(blocks[index], settings.mode == "selective")
    return [blocks[index] for index in chosen]


class Counting:
    """A backend that counts the graphs it gets and the recompilations among them.

    ``codes``, when given, receives the code of every graph, in order.
    """

    def __init__(self, backend: str = "aot_eager", codes: list[str] | None = None) -> None:
        self.backend = backend
        self.codes = codes
        self.graphs = 0
        self.compiles: set[tuple[Any, ...]] = set()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._dynamo.backends.registry import lookup_backend
        from torch._guards import CompileContext

        self.graphs += 1
        if self.codes is not None:
            self.codes.append(gm.code)
        compile_id = CompileContext.current_compile_id()
        if compile_id is not None:
            self.compiles.add((compile_id.frame_id, compile_id.frame_compile_id))
        return lookup_backend(self.backend)(gm, example_inputs)

    @property
    def recompiles(self) -> int:
        return sum(1 for _, frame_compile_id in self.compiles if frame_compile_id)


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A gloo process group of one rank (loopback, a file store), for DDP on one process."""
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()
