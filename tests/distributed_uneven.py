"""The uneven-inputs matrix run on every rank by test_distributed.py: each layout of
micro-batch counts per rank raises the same UnevenInputsError on every rank within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from distributed_workers import global_batches, make_net, make_optimizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_accum import Accumulator
from torch_accum.distributed import UnevenInputsError

UNEVEN_K = 2


def uneven_layouts(world: int) -> dict[str, list[int]]:
    """Micro-batches per rank; every layout leaves the ranks' counts unequal."""
    return {
        "one_more": [4] + [3] * (world - 1),  # the others stop mid-window
        "one_empty": [3] * (world - 1) + [0],
        "at_boundary": [UNEVEN_K] + [4] * (world - 1),  # rank 0 stops right after a step
        "all_different": [2 * rank + 1 for rank in range(world)],
    }


class NormNet(nn.Module):
    """Net with a BatchNorm: DDP broadcasts its buffers in every forward (a collective)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.norm = nn.BatchNorm1d(1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x))


def _uneven_matrix(rank: int, world: int, wrap: Callable[[], nn.Module]) -> dict[str, Any]:
    """Every uneven layout, weighted or not, with total_micro_batches or not.

    Each case records what this rank raised and how long after the case began.
    """
    results: dict[str, Any] = {}
    x, y = global_batches(1, 64)[0]
    for layout, counts in uneven_layouts(world).items():
        for weighted in (False, True):
            for declared in (False, True):
                model = wrap()
                optimizer = make_optimizer("sgd", model.parameters())
                sizes = [2 + (rank + i) % 3 for i in range(counts[rank])]  # rows per batch
                total = len(sizes) if declared else None
                dist.barrier()
                began = time.monotonic()
                outcome: tuple[str, str] | None = None
                try:
                    with Accumulator(model, optimizer, UNEVEN_K, total_micro_batches=total) as acc:
                        for size in sizes:
                            loss = nn.functional.mse_loss(model(x[:size]), y[:size])
                            acc.backward(loss, weight=size if weighted else None)
                            optimizer.step()
                            optimizer.zero_grad()
                except Exception as error:  # the test inspects its type and message
                    outcome = (type(error).__name__, str(error))
                results[f"{layout}/{weighted}/{declared}"] = (outcome, time.monotonic() - began)
    # Equal counts, but rank 0 accumulates over fewer micro-batches than the others.
    for declared in (False, True):
        model = wrap()
        optimizer = make_optimizer("sgd", model.parameters())
        steps = UNEVEN_K if rank == 0 else 2 * UNEVEN_K
        try:
            total = 4 if declared else None
            with Accumulator(model, optimizer, steps, total_micro_batches=total) as acc:
                for _ in range(4):
                    acc.backward(nn.functional.mse_loss(model(x[:2]), y[:2]))
                    optimizer.step()
                    optimizer.zero_grad()
            results[f"steps/{declared}"] = None
        except UnevenInputsError as error:
            results[f"steps/{declared}"] = str(error)
    return results


def uneven_matrix_ddp(rank: int, world: int) -> dict[str, Any]:
    return _uneven_matrix(rank, world, lambda: DDP(NormNet()))


def uneven_matrix_fsdp2(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded() -> nn.Module:
        model = make_net()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    return _uneven_matrix(rank, world, sharded)
