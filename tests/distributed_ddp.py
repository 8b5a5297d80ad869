"""DDP scenarios run on every rank by test_distributed.py and test_planner.py: exact
against one process, one all-reduce per window, ranks that disagree, step_batch across
ranks, subgroups, bfloat16, autofit with a slow rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from distributed_workers import (
    _SEEDING,
    Net,
    counting_hook,
    ddp_model,
    global_batches,
    make_net,
    make_optimizer,
    params_of,
    rank_micro_batches,
    train_weighted,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_accum import Accumulator
from torch_accum.distributed import UnevenInputsError

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
