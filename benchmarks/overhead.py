"""Per-micro-batch overhead of the Accumulator against the same loop written by hand.

    python benchmarks/overhead.py              # the figures in benchmarks/RESULTS.md
    python benchmarks/overhead.py --smoke      # seconds; CI runs this to keep it working

Both loops train the same small MLP on the same data from the same initialisation. The
hand-written loop is the one users write today: ``(loss / K).backward()``, and
``optimizer.step(); optimizer.zero_grad()`` every K micro-batches. The two are timed in
alternating order within one run (so drift and background load hit both alike), and the
reported figure is the median over repetitions of the per-repetition time ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import torch_accum
from torch_accum import Accumulator

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def hand_written(model: nn.Module, optimizer: torch.optim.Optimizer, data: Batches, k: int) -> None:
    for index, (x, y) in enumerate(data):
        loss = nn.functional.cross_entropy(model(x), y) / k
        loss.backward()
        if (index + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()


def with_accumulator(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Batches, k: int
) -> None:
    with Accumulator(model, optimizer, accumulation_steps=k) as acc:
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()


Loop = Callable[[nn.Module, torch.optim.Optimizer, Batches, int], None]


def time_loop(loop: Loop, model: nn.Module, data: Batches, k: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    loop(model, optimizer, data, k)
    return time.perf_counter() - start


def measure(k: int, args: argparse.Namespace) -> dict[str, float]:
    generator = torch.Generator().manual_seed(k)
    data = [
        (
            torch.randn(args.batch_size, 64, generator=generator),
            torch.randint(0, 10, (args.batch_size,), generator=generator),
        )
        for _ in range(args.micro_batches)
    ]
    loops: dict[str, Loop] = {"hand": hand_written, "acc": with_accumulator}
    for loop in loops.values():  # warm-up: allocator, kernels, first-call paths
        time_loop(loop, make_model(args.width), data[: 2 * k], k)
    times: dict[str, list[float]] = {name: [] for name in loops}
    ratios = []
    for repetition in range(args.repetitions):
        order = list(loops) if repetition % 2 == 0 else list(reversed(loops))
        current = {name: time_loop(loops[name], make_model(args.width), data, k) for name in order}
        for name, seconds in current.items():
            times[name].append(seconds)
        ratios.append(current["acc"] / current["hand"])
    per_micro_batch = {
        name: statistics.median(t) / args.micro_batches * 1e6 for name, t in times.items()
    }
    return {
        "hand_us": per_micro_batch["hand"],
        "acc_us": per_micro_batch["acc"],
        "ratio": statistics.median(ratios),
        "ratio_q1": statistics.quantiles(ratios, n=4)[0] if len(ratios) > 1 else ratios[0],
        "ratio_q3": statistics.quantiles(ratios, n=4)[2] if len(ratios) > 1 else ratios[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accumulator overhead vs a hand-written loop.")
    parser.add_argument("--accumulation-steps", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--width", type=int, default=256, help="MLP hidden width")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--micro-batches", type=int, default=400, help="per repetition")
    parser.add_argument("--repetitions", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.micro_batches, args.repetitions = 32, 16, 3
    if min(args.accumulation_steps) < 1 or args.micro_batches < max(args.accumulation_steps):
        parser.error("--accumulation-steps must be >= 1 and <= --micro-batches")
    torch.set_num_threads(args.threads)

    parameters = sum(p.numel() for p in make_model(args.width).parameters())
    print(
        f"torch {torch.__version__}, torch_accum {torch_accum.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {args.threads} thread(s)"
    )
    print(
        f"MLP 64-{args.width}-{args.width}-10 ({parameters:,} parameters), AdamW, "
        f"micro-batch {args.batch_size}, {args.micro_batches} micro-batches x "
        f"{args.repetitions} interleaved repetitions"
    )
    print(
        f"{'K':>3}  {'hand-written us/mb':>18}  {'Accumulator us/mb':>17}  "
        f"{'median ratio':>12}  {'IQR':>13}"
    )
    for k in args.accumulation_steps:
        r = measure(k, args)
        print(
            f"{k:>3}  {r['hand_us']:>18.1f}  {r['acc_us']:>17.1f}  {r['ratio']:>12.4f}  "
            f"{r['ratio_q1']:.4f}-{r['ratio_q3']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
