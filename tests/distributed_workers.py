"""Code that runs inside the process groups of test_distributed.py and test_uneven_inputs.py.

Every rank trains the same model (same seed) on its own slice of one global batch and
returns its results for the test process to compare with single-process references. Each
scenario runs two ways (``launch_ranks``): on gloo ranks that are processes (loopback, the
real thing), and on ranks that are threads of the test process (torch's threaded process
group), which take seconds and let mutation testing see which tests reach the library's
distributed code (docs/testing.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_accum import Accumulator
from torch_accum.distributed import UnevenInputsError

FEATURES = 6


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(FEATURES, 16)
        self.blocks = nn.ModuleList(Block(16) for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


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


# Ranks that are threads share torch's global generator: one seeded construction at a time.
_SEEDING = threading.Lock()


def make_net() -> Net:
    with _SEEDING:
        return Net().double()


def global_batches(steps: int, size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, FEATURES, generator=generator, dtype=torch.float64),
            torch.randn(size, 1, generator=generator, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def rank_micro_batches(
    batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int, k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's K micro-batches of every global batch, in training order."""
    out = []
    for x, y in batches:
        mine_x, mine_y = x.chunk(world)[rank], y.chunk(world)[rank]
        out.extend(zip(mine_x.chunk(k), mine_y.chunk(k), strict=True))
    return out


def counting_hook(counter: list[int]) -> Callable[..., Any]:
    # No annotations: DDP checks them, and `from __future__ import annotations` makes them str.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        counter.append(bucket.buffer().numel())
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook


def ddp_model(counter: list[int] | None = None) -> DDP:
    model = DDP(make_net())
    if counter is not None:
        model.register_comm_hook(None, counting_hook(counter))
    return model


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


WEIGHTED_SIZES = [[1, 5, 2, 4], [3, 3, 6, 1]]  # samples per micro-batch on rank 0 and 1


def train_weighted(model: nn.Module, rank: int, unit: float = 1.0) -> None:
    """One window of micro-batches of different sizes on the two ranks, weight = size * unit.

    Every unit gives the same mean; one like 1/3, which no binary float holds exactly,
    shows that the ranks sum their weights in float64.
    """
    optimizer = make_optimizer("sgd", model.parameters())
    x, y = global_batches(1, 64)[0]
    offset = sum(WEIGHTED_SIZES[0]) if rank else 0
    with Accumulator(model, optimizer, 4) as acc:
        for size in WEIGHTED_SIZES[rank]:
            mx, my = x[offset : offset + size], y[offset : offset + size]
            offset += size
            acc.backward(nn.functional.mse_loss(model(mx), my), weight=size * unit)
            optimizer.step()


def weighted_reference() -> list[torch.Tensor]:
    """One process, one step on all the samples the two ranks saw in train_weighted."""
    x, y = global_batches(1, 64)[0]
    seen = sum(map(sum, WEIGHTED_SIZES))
    model = make_net()
    optimizer = make_optimizer("sgd", model.parameters())
    nn.functional.mse_loss(model(x[:seen]), y[:seen]).backward()
    optimizer.step()
    return [p.detach() for p in model.parameters()]


# ----------------------------------------------------------------------------- scenarios
DDP_K, DDP_B, DDP_STEPS = 4, 2, 3


def _ddp_exact(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for optimizer_name in ("sgd", "adamw"):
        for checkpointing in (False, True):
            syncs: list[int] = []
            model = ddp_model(syncs)
            optimizer = make_optimizer(optimizer_name, model.parameters())
            acc = Accumulator(model, optimizer, DDP_K, checkpointing=checkpointing)
            first_grads = None
            with acc:
                for x, y in micro:
                    acc.backward(nn.functional.mse_loss(model(x), y))
                    if first_grads is None:
                        first_grads = [p.grad.clone() for p in model.parameters()]
                    optimizer.step()
                    optimizer.zero_grad()
            results[f"exact/{optimizer_name}/{checkpointing}"] = params_of(model.module)
            results[f"syncs/{optimizer_name}/{checkpointing}"] = (len(syncs), acc.optimizer_steps)
            results["first_grads"] = first_grads
            results["flag_after"] = model.require_backward_grad_sync
            results["hooks_after"] = len(model._forward_pre_hooks)
    return results


def _ddp_naive(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # The naive loop: every micro-batch synchronises.
    syncs: list[int] = []
    model = ddp_model(syncs)
    optimizer = make_optimizer("sgd", model.parameters())
    for index, (x, y) in enumerate(micro):
        (nn.functional.mse_loss(model(x), y) / DDP_K).backward()
        if (index + 1) % DDP_K == 0:
            optimizer.step()
            optimizer.zero_grad()
    return {"syncs/naive": len(syncs)}


def _ddp_weighted(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    model = ddp_model()
    train_weighted(model, rank)
    return {"weighted": params_of(model.module)}


def _ddp_weighted_in_thirds(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    model = ddp_model()
    train_weighted(model, rank, unit=1 / 3)
    return {"weighted_in_thirds": params_of(model.module)}


def _ddp_partial(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # A partial window at the end: 6 micro-batches with K=4, windows of 4 and 2.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, 4) as acc:
        for x, y in micro[:6]:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
    return {"partial": (params_of(model.module), acc.optimizer_steps)}


def _ddp_partial_known_length(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # The same, with the block's length known: the last micro-batch synchronises in backward.
    syncs: list[int] = []
    model = ddp_model(syncs)
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, 4, total_micro_batches=6) as acc:
        for x, y in micro[:6]:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
    return {"partial_known_length": (params_of(model.module), len(syncs))}


def _ddp_forwards_first(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # All of a window's forwards before its backwards (a contrastive loop; accelerate's
    # test_distributed_sync_multiple_fwd): no forward was marked to synchronise, so the
    # window is averaged when it closes instead of each rank stepping on its own gradient.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, DDP_K) as acc:
        for start in range(0, len(micro), DDP_K):
            losses = [nn.functional.mse_loss(model(x), y) for x, y in micro[start : start + DDP_K]]
            for loss in losses:
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    return {"forwards_first": (params_of(model.module), acc.optimizer_steps)}


def _ddp_restored_after_error(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # An error in the body restores DDP's flag and removes the hook.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    try:
        with Accumulator(model, optimizer, 4):
            model(micro[0][0])
            raise KeyError("boom")
    except KeyError:
        pass
    return {
        "restored_after_error": (model.require_backward_grad_sync, len(model._forward_pre_hooks))
    }


def _ddp_auto(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Auto micro-batching where only rank 0 runs out of memory: both ranks back off together.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(model, optimizer, micro_batch_size="auto")

    def compute_loss(micro: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if rank == 0 and micro[0].shape[0] > 3:
            raise torch.OutOfMemoryError("injected on rank 0")
        return nn.functional.mse_loss(model(micro[0]), micro[1])

    with acc:
        for x, y in global_batches(DDP_STEPS, world * DDP_K * DDP_B):
            acc.step_batch((x.chunk(world)[rank], y.chunk(world)[rank]), compute_loss)
    return {"auto": (params_of(model.module), acc.micro_batch_size, acc.oom_retries)}


def _ddp_uneven(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Uneven inputs: rank 0 runs 7 micro-batches, rank 1 runs 5.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(model, optimizer, 4)
    try:
        with acc:
            for x, y in micro[: 7 if rank == 0 else 5]:
                acc.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
        return {"uneven": None}
    except UnevenInputsError as error:
        # Rank 1 raised while leaving the block (at its end-of-block agreement), rank 0 at a
        # forward: either way every patch and DDP hook is undone.
        restored = (
            "step" in vars(optimizer),
            "zero_grad" in vars(optimizer),
            model.require_backward_grad_sync,
            len(model._forward_pre_hooks),
            acc.active,
        )
        return {"uneven": str(error), "uneven_restored": restored}


def _ddp_uneven_declared(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Uneven declared counts: one agreement at block entry refuses them on every rank.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(model, optimizer, 4, total_micro_batches=7 if rank == 0 else 5)
    try:
        with acc:
            raise AssertionError("the block must not start")
    except UnevenInputsError as error:
        return {"uneven_declared": str(error)}


def _ddp_counted(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Declared equal counts: exact, with one agreement per block instead of one per step.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, DDP_K, total_micro_batches=len(micro)) as acc:
        for x, y in micro:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"counted": (params_of(model.module), acc.optimizer_steps)}


def _ddp_carried(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # partial_window="carry" with a declared length: the carried partial window is not
    # synchronised at the block's end (it would be averaged twice); two blocks of 6.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(model, optimizer, DDP_K, partial_window="carry", total_micro_batches=6)
    for block in (micro[:6], micro[6:]):
        with acc:
            for x, y in block:
                acc.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return {"carried": (params_of(model.module), acc.optimizer_steps)}


def _ddp_step_batch_sizes(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # step_batch on 6 samples on rank 0 and 10 on rank 1, in micro-batches of 4: each step on
    # the mean over all 16 samples, although the ranks run 2 and 3 micro-batches. The second
    # step starts after the ranks ran different numbers of pieces, which is no error.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    mine = slice(0, 6) if rank == 0 else slice(6, 16)
    with Accumulator(model, optimizer, micro_batch_size=4) as acc:
        for x, y in global_batches(2, 16):
            acc.step_batch((x[mine], y[mine]), lambda m: nn.functional.mse_loss(model(m[0]), m[1]))
    return {"step_batch_sizes": params_of(model.module)}


def _ddp_declared_and_not(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Both loaders are empty; rank 0 declares it (total_micro_batches=0), rank 1 does not:
    # rank 0 agrees at entry where rank 1 agrees at the block's end, both after nothing.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    declared = {"total_micro_batches": 0} if rank == 0 else {}
    try:
        with Accumulator(model, optimizer, DDP_K, **declared):
            pass
    except UnevenInputsError as error:
        return {"declared_and_not": str(error)}
    return {"declared_and_not": None}


def _ddp_step_batch_extra(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Rank 1 starts a second acc.step_batch() where rank 0 leaves the with block, both after
    # the same micro-batches and forwards: only what they are about to do differs.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    x, y = global_batches(1, 8)[0]
    try:
        with Accumulator(model, optimizer, micro_batch_size=4) as acc:
            for _ in range(1 + rank):
                acc.step_batch((x, y), lambda m: nn.functional.mse_loss(model(m[0]), m[1]))
    except UnevenInputsError as error:
        return {"step_batch_extra": str(error)}
    return {"step_batch_extra": None}


def _ddp_step_batch_empty(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Rank 1's batch is empty (an uneven last batch cut per rank): every rank raises, naming
    # rank 1, instead of the others waiting for it at the next collective.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    x, y = global_batches(1, 8)[0]
    mine = slice(0, 8) if rank == 0 else slice(0, 0)
    acc = Accumulator(model, optimizer, micro_batch_size="auto")
    try:
        with acc:
            acc.step_batch((x[mine], y[mine]), lambda m: nn.functional.mse_loss(model(m[0]), m[1]))
    except ValueError as error:
        return {"step_batch_empty": (str(error), acc.micro_batch_size)}
    return {"step_batch_empty": (None, acc.micro_batch_size)}


def _ddp_fixed_size_oom(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # A fixed micro-batch size does not replay: the rank out of memory raises its error, the
    # others say why they stop too.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())

    def compute_loss(m: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if rank == 0:
            raise torch.OutOfMemoryError("injected on rank 0")
        return nn.functional.mse_loss(model(m[0]), m[1])

    x, y = global_batches(1, 8)[0]
    try:
        with Accumulator(model, optimizer, micro_batch_size=2) as acc:
            acc.step_batch((x.chunk(world)[rank], y.chunk(world)[rank]), compute_loss)
    except Exception as error:  # the test reads its type and message
        return {"fixed_size_oom": f"{type(error).__name__}: {error}"}
    return {"fixed_size_oom": None}


def _ddp_k1_syncs(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # K=1: every micro-batch ends its window, so DDP synchronises in every backward.
    syncs: list[int] = []
    model = ddp_model(syncs)
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, 1) as acc:
        for x, y in micro[:3]:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"k1_syncs": (len(syncs), acc.optimizer_steps)}


def _ddp_collectives(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # The library's own collectives, besides DDP's all-reduce in backward: with a declared
    # count one agreement at block entry and nothing per step; without it one agreement per
    # training forward and one at the block's end. Windows DDP synchronised are not averaged
    # again.
    results: dict[str, Any] = {}
    for declared, k in ((True, DDP_K), (False, DDP_K), (False, 1)):
        model = ddp_model()
        optimizer = make_optimizer("sgd", model.parameters())
        total = len(micro) if declared else None
        acc = Accumulator(model, optimizer, k, total_micro_batches=total)
        calls: list[str] = []
        sync = acc._sync
        for name in ("agree", "average_pending"):
            real = getattr(sync, name)

            def counted(
                *args: Any, _real: Any = real, _name: str = name, _calls: list[str] = calls
            ) -> Any:
                _calls.append(_name)
                return _real(*args)

            setattr(sync, name, counted)
        with acc:
            for x, y in micro:
                acc.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
        counts = (calls.count("agree"), calls.count("average_pending"))
        results[f"collectives/{declared}/{k}"] = counts
    return results


def _ddp_forwards_differ(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Rank 0 runs two training forwards per micro-batch, rank 1 one: at their second forward
    # the ranks have run different numbers of micro-batches.
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    try:
        with Accumulator(model, optimizer, DDP_K) as acc:
            for x, y in micro[:2]:
                out = model(x) if rank else model(x) + model(x)
                acc.backward(nn.functional.mse_loss(out, y))
                optimizer.step()
        return {"forwards_differ": None}
    except UnevenInputsError as error:
        return {"forwards_differ": str(error)}


def _ddp_mixed_calls(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # Rank 0 starts acc.step_batch() where rank 1 runs a forward for acc.backward().
    model = ddp_model()
    optimizer = make_optimizer("sgd", model.parameters())
    x, y = micro[0]
    try:
        with Accumulator(model, optimizer, 2, micro_batch_size=4) as acc:
            if rank == 0:
                acc.step_batch((x, y), lambda m: nn.functional.mse_loss(model(m[0]), m[1]))
            else:
                acc.backward(nn.functional.mse_loss(model(x), y))
    except UnevenInputsError as error:
        return {"mixed_calls": str(error)}
    return {"mixed_calls": None}


def _ddp_sync_each(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # sync_each_micro_batch=True: DDP synchronises in every backward, as without accumulation.
    syncs: list[int] = []
    model = ddp_model(syncs)
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, DDP_K, sync_each_micro_batch=True) as acc:
        for x, y in micro:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"sync_each": (params_of(model.module), len(syncs), acc.optimizer_steps)}


def _ddp_bfloat16(rank: int, world: int, micro: list[Any]) -> dict[str, Any]:
    # bfloat16 weights: the window's float32 sums are averaged once, in float32, by the
    # library (DDP's buckets hold bfloat16); DDP's own all-reduce never runs.
    if not hasattr(torch.Tensor, "grad_dtype"):
        return {"bfloat16": None}  # float32 sums need Tensor.grad_dtype (torch >= 2.10)
    with _SEEDING:
        net = Net().to(torch.bfloat16)
    model = DDP(net)
    syncs: list[int] = []
    model.register_comm_hook(None, counting_hook(syncs))
    optimizer = make_optimizer("sgd", model.parameters())
    sums = []
    with Accumulator(model, optimizer, DDP_K) as acc:
        for x, y in micro:
            out = model(x.to(torch.bfloat16))
            acc.backward(nn.functional.mse_loss(out, y.to(torch.bfloat16)))
            if acc.sync_gradients:
                sums.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
    refused = None
    try:
        Accumulator(model, optimizer, DDP_K, sync_each_micro_batch=True)
    except ValueError as error:
        refused = str(error)
    return {"bfloat16": (sums, len(syncs), acc.optimizer_steps, refused)}


# Each part of ddp_scenarios and the keys of the results it gives.
DDP_PARTS: dict[str, tuple[Callable[..., dict[str, Any]], tuple[str, ...]]] = {
    "exact": (
        _ddp_exact,
        ("exact/", "syncs/sgd/", "syncs/adamw/", "first_grads", "flag_after", "hooks_after"),
    ),
    "naive": (_ddp_naive, ("syncs/naive",)),
    "weighted": (_ddp_weighted, ("weighted",)),
    "weighted_in_thirds": (_ddp_weighted_in_thirds, ("weighted_in_thirds",)),
    "partial": (_ddp_partial, ("partial",)),
    "partial_known_length": (_ddp_partial_known_length, ("partial_known_length",)),
    "forwards_first": (_ddp_forwards_first, ("forwards_first",)),
    "restored_after_error": (_ddp_restored_after_error, ("restored_after_error",)),
    "auto": (_ddp_auto, ("auto",)),
    "uneven": (_ddp_uneven, ("uneven", "uneven_restored")),
    "uneven_declared": (_ddp_uneven_declared, ("uneven_declared",)),
    "counted": (_ddp_counted, ("counted",)),
    "carried": (_ddp_carried, ("carried",)),
    "step_batch_sizes": (_ddp_step_batch_sizes, ("step_batch_sizes",)),
    "step_batch_extra": (_ddp_step_batch_extra, ("step_batch_extra",)),
    "declared_and_not": (_ddp_declared_and_not, ("declared_and_not",)),
    "step_batch_empty": (_ddp_step_batch_empty, ("step_batch_empty",)),
    "fixed_size_oom": (_ddp_fixed_size_oom, ("fixed_size_oom",)),
    "k1_syncs": (_ddp_k1_syncs, ("k1_syncs",)),
    "collectives": (_ddp_collectives, ("collectives/",)),
    "forwards_differ": (_ddp_forwards_differ, ("forwards_differ",)),
    "mixed_calls": (_ddp_mixed_calls, ("mixed_calls",)),
    "sync_each": (_ddp_sync_each, ("sync_each",)),
    "bfloat16": (_ddp_bfloat16, ("bfloat16",)),
}


def ddp_part_giving(key: str) -> str:
    """The part of ddp_scenarios whose results hold ``key``."""
    for part, (_, keys) in DDP_PARTS.items():
        if key in keys or any(k.endswith("/") and key.startswith(k) for k in keys):
            return part
    raise KeyError(key)


def ddp_scenarios(
    rank: int, world: int, parts: tuple[str, ...] = tuple(DDP_PARTS)
) -> dict[str, Any]:
    """The DDP scenarios (all of them, or the given ``parts``), each on one global batch."""
    batches = global_batches(DDP_STEPS, world * DDP_K * DDP_B)
    micro = rank_micro_batches(batches, rank, world, DDP_K)
    results: dict[str, Any] = {}
    for part in parts:
        results.update(DDP_PARTS[part][0](rank, world, micro))
    return results


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


# Micro-batches per rank in the DDP pairs {0, 1} and {2, 3} of ddp_subgroups (K=4): each
# pair ends on a partial window of its own length.
SUBGROUP_COUNTS = (6, 5)


def pair_micro_batches(pair: int, rank_in_pair: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = global_batches(2, 2 * 4 * 2, seed=1 + pair)
    return rank_micro_batches(batches, rank_in_pair, 2, 4)[: SUBGROUP_COUNTS[pair]]


def ddp_subgroups(rank: int, world: int) -> dict[str, Any]:
    """Two DDP pairs of 4 ranks, each on its own data and count, in one default group.

    The library's agreements and its averaging of the final partial window must stay inside
    the model's own process group (on the default group the pairs would meet, or wait).
    """
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    pair = rank // 2
    model = DDP(make_net(), process_group=groups[pair])
    optimizer = make_optimizer("sgd", model.parameters())
    with Accumulator(model, optimizer, 4) as acc:
        for x, y in pair_micro_batches(pair, rank % 2):
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    results: dict[str, Any] = {"params": params_of(model.module), "steps": acc.optimizer_steps}
    # Both ranks of a pair stop before their declared count (no collective is waiting): each
    # names itself by its rank in the model's group, as the agreement's messages do.
    try:
        with Accumulator(model, optimizer, 4, total_micro_batches=8) as acc:
            for x, y in pair_micro_batches(pair, rank % 2)[:2]:
                acc.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
        results["short"] = None
    except UnevenInputsError as error:
        results["short"] = str(error)
    return results


# ----------------------------------------------------------------------------- uneven inputs
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


# ----------------------------------------------------------------------------- launching
def autofit_ranks(rank: int, world: int) -> dict[str, Any]:
    """autofit and checkpointing="auto" under DDP, where rank 1 is slow at large micro-batches."""
    from torch_accum import autofit

    model = ddp_model()
    x, y = global_batches(1, world * 16)[0]
    mine = (x.chunk(world)[rank], y.chunk(world)[rank])

    def compute_loss(micro: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        size = micro[0].shape[0]
        if rank == 1 and size > 4:
            time.sleep(0.0002 * size**3)  # slower per sample the larger the micro-batch
        return nn.functional.mse_loss(model(micro[0]), micro[1])

    plan = autofit(model, mine, compute_loss, memory_budget=10**9)
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(
        model, optimizer, micro_batch_size="auto", checkpointing="auto", memory_budget=10**9
    )
    with acc:
        for _ in range(2):
            acc.step_batch(mine, compute_loss)
    assert acc.plan is not None
    return {
        "standalone": (plan.micro_batch_size, plan.label),
        "auto": (acc.plan.micro_batch_size, acc.plan.label, acc.micro_batch_size),
        "params": params_of(model.module),
    }


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


def _entry(scenario: str, rank: int, world: int, out: str) -> None:
    # A file store, not a TCP port: concurrent test runs cannot collide on it.
    store = dist.FileStore(str(Path(out) / "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = globals()[scenario](rank, world)
        dist.barrier()  # both ranks are done before either tears the group down
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 180) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` gloo ranks; return each rank's results, bounded in time."""
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_entry, args=(scenario, rank, world, str(out)))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results = [out / f"rank{rank}.pt" for rank in range(world)]
    deadline = time.monotonic() + timeout
    # Every rank saves its results before tearing the process group down; that teardown
    # (gloo's destroy_process_group) has been seen to hang now and then in CI, so once
    # all results are saved the ranks get a grace period and are then stopped.
    finished_at = None
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if finished_at is None and all(path.exists() for path in results):
            finished_at = time.monotonic()
        if finished_at is not None and time.monotonic() - finished_at > 20:
            break
        time.sleep(0.1)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    if hung and finished_at is not None:
        hung = []  # the results are complete; only the teardown hung
    errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
    if hung:
        raise TimeoutError(f"{scenario}: ranks still running after {timeout} s\n{errors}")
    if any(p.exitcode != 0 for p in processes) and not all(path.exists() for path in results):
        raise RuntimeError(f"{scenario} failed:\n{errors}")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def launch_in_threads(
    scenario: str, world: int = 2, timeout: float = 30, *args: Any
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks that are threads of this process, bounded in time.

    torch's threaded process group (its own tests' ``MultiThreadedTestCase``) gives each
    thread its own default group; collectives are exchanged in memory.
    """
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    results: list[dict[str, Any]] = [{} for _ in range(world)]
    errors: dict[int, str] = {}
    store = dist.HashStore()

    def rank_main(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
            try:
                results[rank] = globals()[scenario](rank, world, *args)
            finally:
                dist.destroy_process_group()
        except BaseException as error:
            # SystemExit: the group woke this rank up because another one failed.
            if not isinstance(error, SystemExit):
                errors[rank] = traceback.format_exc()
            threaded.ProcessLocalGroup.exception_handle(error)  # wakes the waiting ranks

    multithreading = torch.autograd.is_multithreading_enabled()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    threaded._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = any(thread.is_alive() for thread in threads)
        if hung:
            threaded.ProcessLocalGroup.exception_handle(TimeoutError())
            for thread in threads:
                thread.join(5)
    finally:
        threaded.ProcessLocalGroup.reset()
        threaded._uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        # torch 2.6 leaves autograd's device threads off after the threaded group.
        torch.autograd.set_multithreading_enabled(multithreading)
    report = "\n".join(errors[rank] for rank in sorted(errors))
    if hung:
        raise TimeoutError(f"{scenario}: ranks still running after {timeout} s\n{report}")
    if errors:
        raise RuntimeError(f"{scenario} failed:\n{report}")
    return results


RANKS = ("processes", "threads")


def launch_ranks(
    ranks: str, scenario: str, out: Path, world: int = 2, timeout: float = 180
) -> list[dict[str, Any]]:
    """``launch`` (``ranks="processes"``) or ``launch_in_threads`` (``"threads"``).

    ``timeout`` bounds the processes, which start a Python each; threads take seconds, so a
    hang shows there after ``launch_in_threads``'s own, shorter bound.
    """
    if ranks == "threads":
        return launch_in_threads(scenario, world)
    return launch(scenario, out, world, timeout)
