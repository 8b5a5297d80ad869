"""Gradient synchronisation cost under DDP: the Accumulator against the naive loop.

    python benchmarks/ddp.py              # the figures in benchmarks/RESULTS.md
    python benchmarks/ddp.py --smoke      # seconds; the tests run this

Two CPU ranks over gloo (loopback) train an MLP of a few million parameters. For each K the
naive accumulation loop (``(loss / K).backward()`` on every micro-batch, so DDP all-reduces
the gradients every time), the Accumulator loop (one all-reduce per optimizer step) and the
same with ``total_micro_batches`` (the ranks agree on the block's length once, at entry,
instead of before every synchronising micro-batch) run in alternating order, each run a few
optimizer steps in one ``with`` block. A DDP communication hook counts the all-reduces and
their bytes; the time is the median per optimizer step over the runs, as seen by rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torch_accum
from torch_accum import Accumulator


def counting_hook(counts: dict[str, int]):  # no annotations on the hook itself: DDP checks them
    def hook(state, bucket):
        counts["calls"] += 1
        counts["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook


def make_mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def make_model(width: int, depth: int, counts: dict[str, int]) -> DistributedDataParallel:
    # DDP's constructor is a collective: every rank must build the same models in order.
    model = DistributedDataParallel(make_mlp(width, depth))
    model.register_comm_hook(None, counting_hook(counts))
    return model


def naive_loop(model, optimizer, micro, k: int) -> None:
    for index, (x, y) in enumerate(micro):
        (nn.functional.mse_loss(model(x), y) / k).backward()
        if (index + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()


def accumulator_loop(model, optimizer, micro, k: int) -> None:
    with Accumulator(model, optimizer, k) as acc:
        for x, y in micro:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()


def counted_loop(model, optimizer, micro, k: int) -> None:
    # The block's length known on every rank: one agreement at entry, none per step.
    with Accumulator(model, optimizer, k, total_micro_batches=len(micro)) as acc:
        for x, y in micro:
            acc.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()


def worker(rank: int, world: int, store_path: str, args: argparse.Namespace) -> None:
    # A file store, not a TCP port: nothing else on the machine can take it.
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    loops = {"naive": naive_loop, "accumulator": accumulator_loop, "counted": counted_loop}
    steps = args.steps_per_run
    if rank == 0:
        params = sum(p.numel() for p in make_mlp(args.width, args.depth).parameters())
        print(
            f"torch {torch.__version__}, torch_accum {torch_accum.__version__}, {world} ranks, "
            f"gloo on loopback, 1 thread each; MLP {params:,} parameters, micro-batch "
            f"{args.micro_batch}, {args.repetitions} timed runs of {steps} optimizer steps each"
        )
        print(
            f"{'K':>3} | {'naive all-reduces':>17} {'MiB/step':>9} {'s/step':>7} | "
            f"{'acc all-reduces':>15} {'MiB/step':>9} {'s/step':>7} | {'count ratio':>11} "
            f"{'time ratio':>10} | {'time ratio, total_micro_batches':>31}"
        )
    for k in args.accumulation_steps:
        generator = torch.Generator().manual_seed(rank)
        micro = [
            (
                torch.randn(args.micro_batch, args.width, generator=generator),
                torch.randn(args.micro_batch, 1, generator=generator),
            )
            for _ in range(k * steps)
        ]
        setups = {}
        for name in loops:
            counts = {"calls": 0, "bytes": 0}
            model = make_model(args.width, args.depth, counts)
            setups[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3), counts)
        times: dict[str, list[float]] = {name: [] for name in loops}
        for repetition in range(args.repetitions + 1):  # the first round warms up
            for name in list(loops) if repetition % 2 == 0 else list(reversed(loops)):
                model, optimizer, counts = setups[name]
                dist.barrier()
                start = time.perf_counter()
                loops[name](model, optimizer, micro, k)
                elapsed = time.perf_counter() - start
                if repetition:
                    times[name].append(elapsed / steps)
                else:
                    counts["calls"] = counts["bytes"] = 0
        if rank == 0:
            row = {}
            for name in loops:
                counts = setups[name][2]
                row[name] = (
                    counts["calls"] / args.repetitions / steps,
                    counts["bytes"] / args.repetitions / steps / 2**20,
                    statistics.median(times[name]),
                )
            naive, acc, counted = row["naive"], row["accumulator"], row["counted"]
            print(
                f"{k:>3} | {naive[0]:>17.0f} {naive[1]:>9.1f} {naive[2]:>7.3f} | "
                f"{acc[0]:>15.0f} {acc[1]:>9.1f} {acc[2]:>7.3f} | {naive[0] / acc[0]:>11.1f} "
                f"{acc[2] / naive[2]:>10.3f} | {counted[2] / naive[2]:>31.3f}"
            )
    # Release the DDP models (and their reducers) on both ranks before tearing the group
    # down together; a rank leaving early once hung at shutdown in CI.
    del setups
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3, help="hidden Linear layers")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=10, help="timed runs per setting")
    parser.add_argument("--steps-per-run", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.depth, args.repetitions, args.accumulation_steps = 64, 1, 2, [1, 4]
    if min(args.accumulation_steps) < 1:
        parser.error("--accumulation-steps must be >= 1")
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(2, os.path.join(directory, "store"), args), nprocs=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
