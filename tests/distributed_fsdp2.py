"""FSDP2 scenarios run on every rank by test_distributed.py and test_planner.py: exact against
one process, partial and weighted windows, bfloat16 refused, non-finite shards, autofit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from typing import Any

import torch
from distributed_workers import (
    _SEEDING,
    Net,
    global_batches,
    make_net,
    make_optimizer,
    rank_micro_batches,
    train_weighted,
)
from torch import nn

from torch_accum import Accumulator


class _ThisThreadsRecords(logging.Handler):
    """Warning messages logged by the thread that made it (each rank, when ranks are threads)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


class Poisoned(nn.Module):
    """A Net plus a parameter whose gradient is ``poison``: one element's gradient can be
    made inf without touching any other gradient."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.net = make_net()
        self.probe = nn.Parameter(torch.ones(world, dtype=torch.float64))

    def forward(self, x: torch.Tensor, poison: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), (self.probe * poison).sum()


def fsdp_scenarios(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    k, b, steps = 4, 2, 2
    batches = global_batches(steps, world * k * b)
    micro = rank_micro_batches(batches, rank, world, k)
    results: dict[str, Any] = {}

    def sharded() -> nn.Module:
        model = make_net()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def full_params(model: nn.Module) -> list[torch.Tensor]:
        return [p.full_tensor().detach().clone() for p in model.parameters()]

    for sync_each in (False, True):
        model = sharded()
        optimizer = make_optimizer("adamw", model.parameters())
        with Accumulator(model, optimizer, k, sync_each_micro_batch=sync_each) as acc:
            for x, y in micro:
                acc.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
        results[f"exact/{sync_each}"] = (full_params(model), acc.optimizer_steps)

    model = sharded()
    train_weighted(model, rank)
    results["weighted"] = full_params(model)

    # An error mid-window switches gradient synchronisation back on.
    model = sharded()
    optimizer = make_optimizer("sgd", model.parameters())
    try:
        with Accumulator(model, optimizer, 4) as acc:
            acc.backward(nn.functional.mse_loss(model(micro[0][0]), micro[0][1]))
            raise KeyError("boom")
    except KeyError:
        pass
    nn.functional.mse_loss(model(micro[1][0]), micro[1][1]).backward()
    results["synchronises_after_error"] = all(p.grad is not None for p in model.parameters())

    model = sharded()
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, 4, total_micro_batches=6) as acc:
        for x, y in micro[:6]:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
    results["partial_known_length"] = (full_params(model), acc.optimizer_steps)

    model = sharded()
    optimizer = make_optimizer("sgd", model.parameters())
    try:
        with Accumulator(model, optimizer, 4) as acc:
            for x, y in micro[:6]:
                acc.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
        results["partial_unknown_length"] = None
    except RuntimeError as error:
        results["partial_unknown_length"] = str(error)

    # bfloat16 sharded parameters: FSDP2 accumulates unsharded gradients itself.
    with _SEEDING:
        model = Net().to(torch.bfloat16)
    fully_shard(model, mesh=mesh)
    try:
        Accumulator(model, make_optimizer("sgd", model.parameters()), 4)
        results["bfloat16_refused"] = None
    except ValueError as error:
        results["bfloat16_refused"] = str(error)

    # Rank 1 poisons the gradient of probe[0], which after the reduce-scatter only rank 0's
    # shard holds: every rank must still skip that window (and apply the next one).
    model = Poisoned(world)
    for block in model.net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = make_optimizer("sgd", model.parameters())
    poison = torch.zeros(world, dtype=torch.float64)
    if rank == 1:
        poison[0] = math.inf
    params = []
    # The log, not warnings: ranks that are threads share the warnings filters.
    messages = _ThisThreadsRecords()
    logging.getLogger("torch_accum").addHandler(messages)
    with Accumulator(model, optimizer, 2) as acc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, (x, y) in enumerate(micro[:4]):
            out, penalty = model(x, poison if index == 0 else torch.zeros_like(poison))
            acc.backward(nn.functional.mse_loss(out, y) + penalty)
            optimizer.step()
            optimizer.zero_grad()
            if acc.sync_gradients:
                params.append(full_params(model))
    logging.getLogger("torch_accum").removeHandler(messages)
    found = messages.messages
    results["nonfinite_on_one_shard"] = (acc.skipped_steps, acc.optimizer_steps, params, found)
    return results


def autofit_fsdp2(rank: int, world: int) -> dict[str, Any]:
    """autofit on an FSDP2 model, rank 1 slow at large micro-batches: ranks in lockstep."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torch_accum import autofit

    mesh = init_device_mesh("cpu", (world,))
    model = make_net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = global_batches(1, world * 16)[0]
    mine = (x.chunk(world)[rank], y.chunk(world)[rank])

    def compute_loss(micro: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        size = micro[0].shape[0]
        if rank == 1 and size > 4:
            time.sleep(0.0002 * size**3)
        return nn.functional.mse_loss(model(micro[0]), micro[1])

    before = [p.full_tensor().detach().clone() for p in model.parameters()]
    plan = autofit(model, mine, compute_loss, memory_budget=10**9)
    after = [p.full_tensor().detach().clone() for p in model.parameters()]
    return {
        "plan": (plan.micro_batch_size, plan.label),
        "table": plan.table(),
        "untouched": all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        and all(p.grad is None for p in model.parameters()),
    }
