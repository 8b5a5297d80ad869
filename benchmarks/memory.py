"""Activation memory and step time vs accumulation steps, with checkpointing off and on.

    python benchmarks/memory.py                 # the table and plot in benchmarks/RESULTS.md
    python benchmarks/memory.py --smoke         # seconds; the tests run this
    python benchmarks/memory.py --no-sweep --resnet resnet50 --image-size 128
                                                # only the modes side by side (see below)

A 12-block GPT-style model (examples/gpt.py) at a fixed effective batch size: with K
accumulation steps each micro-batch holds batch/K sequences. For every K, with
checkpointing off and on, it reports the activation memory of one micro-batch (bytes
retained after the forward and the peak over forward+backward, measured on any device with
torch_accum.measure_activation_memory; on CUDA also torch.cuda.max_memory_allocated) and
the time of one optimizer step (K micro-batches), the two settings timed in alternating
order. A torchvision ResNet (``--resnet``, ResNet-18 by default) gets the same table when
torchvision is importable. The plot goes to docs/images/memory.png.

Then the checkpointing modes side by side, at each K of ``--modes-k``: off, "full" (all
blocks), every 2nd / 3rd block, "selective" (matmul and attention results kept), each
with its peak and step time relative to no checkpointing; all modes are timed in one
rotating order, so that they share the machine's state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torch_accum
from torch_accum import Accumulator, Checkpointing, measure_activation_memory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gpt import GPT, GPTConfig

HERE = Path(__file__).resolve().parent


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def gpt_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    config = GPTConfig(layers=12, width=args.width, heads=4, context=args.context)

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return GPT(config).to(device)

    def make_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, config.vocab_size, (size, config.context + 1), device=device)
        return tokens[:, :-1], tokens[:, 1:]

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())

    params = sum(p.numel() for p in make_model().parameters())
    return Workload(
        f"GPT, 12 blocks, width {args.width}, {params:,} parameters, {config.context} tokens",
        make_model,
        make_batch,
        loss,
    )


def resnet_workload(args: argparse.Namespace, device: torch.device) -> Workload | None:
    try:
        import torchvision
    except Exception as error:  # torchvision needs a torch build with its compiled ops
        print(f"(ResNet skipped: torchvision is not importable here: {error})")
        return None

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return getattr(torchvision.models, args.resnet)(num_classes=10).to(device)

    def make_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        side = args.image_size
        return (
            torch.randn(size, 3, side, side, device=device),
            torch.randint(0, 10, (size,), device=device),
        )

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return Workload(
        f"torchvision {args.resnet}, {args.image_size}x{args.image_size} images",
        make_model,
        make_batch,
        loss,
    )


def micro_batch_memory(work: Workload, size: int, checkpointing: object) -> dict[str, float]:
    model = work.make_model()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        1,
        checkpointing=checkpointing,  # type: ignore[arg-type]
    )
    batch = work.make_batch(size)
    with acc:
        memory = measure_activation_memory(
            lambda: work.loss(model, batch), parameters=model.parameters()
        )
    return {
        "retained": memory.retained_after_forward / 2**20,
        "peak": memory.peak / 2**20,
        "cuda": (memory.cuda_max_allocated or 0) / 2**20,
    }


def timed_step(
    work: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    acc: Accumulator,
    micro: list[Any],
    clock: Callable[[], float],
) -> float:
    """Seconds of one optimizer step (one ``with`` block over ``micro``) by ``clock``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    with acc:
        for batch in micro:
            acc.backward(work.loss(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start


def step_times(work: Workload, k: int, batch: int, repetitions: int) -> dict[bool, float]:
    """Median seconds per optimizer step, checkpointing off and on, in alternating order."""
    micro = [work.make_batch(batch // k) for _ in range(k)]
    setups = {}
    for checkpointing in (False, True):
        model = work.make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[checkpointing] = (
            model,
            optimizer,
            Accumulator(model, optimizer, k, checkpointing=checkpointing),
        )
    times: dict[bool, list[float]] = {False: [], True: []}
    for repetition in range(repetitions + 1):
        order = (False, True) if repetition % 2 == 0 else (True, False)
        for checkpointing in order:
            seconds = timed_step(work, *setups[checkpointing], micro, time.perf_counter)
            if repetition:  # the first round warms up
                times[checkpointing].append(seconds)
    return {c: statistics.median(t) for c, t in times.items()}


def run(work: Workload, args: argparse.Namespace) -> list[dict[str, float]]:
    print(f"\n{work.name}; effective batch {args.batch}")
    cuda = torch.cuda.is_available()
    header = (
        f"{'K':>3} {'micro':>5} | {'retained MiB':>12} {'peak MiB':>9} "
        f"{'ckpt ret.':>9} {'ckpt peak':>9} {'peak ratio':>10} | "
        f"{'step s':>7} {'ckpt step s':>11} {'time ratio':>10}"
    )
    print(header + (f" | {'CUDA max MiB':>12} {'ckpt':>8}" if cuda else ""))
    rows = []
    for k in args.accumulation_steps:
        size = args.batch // k
        off = micro_batch_memory(work, size, False)
        on = micro_batch_memory(work, size, True)
        seconds = step_times(work, k, args.batch, args.repetitions)
        row = {
            "k": k,
            "micro": size,
            "retained": off["retained"],
            "peak": off["peak"],
            "ckpt_retained": on["retained"],
            "ckpt_peak": on["peak"],
            "step": seconds[False],
            "ckpt_step": seconds[True],
        }
        rows.append(row)
        line = (
            f"{k:>3} {size:>5} | {off['retained']:>12.2f} {off['peak']:>9.2f} "
            f"{on['retained']:>9.2f} {on['peak']:>9.2f} {on['peak'] / off['peak']:>10.3f} | "
            f"{seconds[False]:>7.3f} {seconds[True]:>11.3f} "
            f"{seconds[True] / seconds[False]:>10.3f}"
        )
        print(line + (f" | {off['cuda']:>12.1f} {on['cuda']:>8.1f}" if cuda else ""))
    return rows


#: The points on the memory/time curve that the modes table measures, least memory first.
MODES: dict[str, object] = {
    "off": False,
    "full": "full",
    "every 2nd": Checkpointing(every=2),
    "every 3rd": Checkpointing(every=3),
    "selective": "selective",
}


def modes(work: Workload, args: argparse.Namespace) -> list[dict[str, object]]:
    """Peak and step time of every mode at each K of --modes-k, relative to no checkpointing."""
    clock = "CPU s, 1 thread" if args.cpu_time else "wall s"
    print(
        f"\n{work.name}; effective batch {args.batch}: checkpointing modes side by side "
        f"(step times in {clock})"
    )
    print(
        f"{'mode':>10} {'K':>3} {'micro':>5} | {'blocks':>6} {'retained MiB':>12} "
        f"{'peak MiB':>9} {'peak ratio':>10} | {'step s':>7} {'time ratio':>10}"
    )
    rows = []
    for k in args.modes_k:
        size = args.batch // k
        memory = {name: micro_batch_memory(work, size, policy) for name, policy in MODES.items()}
        micro = [work.make_batch(size) for _ in range(k)]
        setups = {}
        for name, policy in MODES.items():
            model = work.make_model()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            acc = Accumulator(model, optimizer, k, checkpointing=policy)  # type: ignore[arg-type]
            setups[name] = (model, optimizer, acc)
        times: dict[str, list[float]] = {name: [] for name in MODES}
        names = list(MODES)
        for repetition in range(args.repetitions + 1):
            shift = repetition % len(names)
            for name in names[shift:] + names[:shift]:  # each mode in every position in turn
                seconds = timed_step(work, *setups[name], micro, args.clock)
                if repetition:  # the first round warms up
                    times[name].append(seconds)
        step = {name: statistics.median(t) for name, t in times.items()}
        for name in names:
            row = {
                "mode": name,
                "k": k,
                "micro": size,
                "blocks": len(setups[name][2].checkpointed_modules),
                "retained": memory[name]["retained"],
                "peak": memory[name]["peak"],
                "peak_ratio": memory[name]["peak"] / memory["off"]["peak"],
                "step": step[name],
                "time_ratio": step[name] / step["off"],
            }
            rows.append(row)
            print(
                f"{name:>10} {k:>3} {size:>5} | {row['blocks']:>6} {row['retained']:>12.2f} "
                f"{row['peak']:>9.2f} {row['peak_ratio']:>10.3f} | {row['step']:>7.3f} "
                f"{row['time_ratio']:>10.3f}"
            )
    return rows


def plot(results: dict[str, list[dict[str, float]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(plot skipped: matplotlib is not installed; pip install -e '.[examples]')")
        return
    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for axis, (name, rows) in zip(axes[0], results.items(), strict=True):
        ks = [r["k"] for r in rows]
        axis.plot(ks, [r["peak"] for r in rows], "o-", label="peak, no checkpointing")
        axis.plot(ks, [r["ckpt_peak"] for r in rows], "o-", label="peak, checkpointing")
        axis.plot(ks, [r["retained"] for r in rows], "s--", label="after forward, no ckpt")
        axis.plot(ks, [r["ckpt_retained"] for r in rows], "s--", label="after forward, ckpt")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="accumulation steps K (micro-batch = B/K)",
            ylabel="activation memory per micro-batch (MiB)",
            title=name.split(",")[0],
        )
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"\nplot written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=32, help="effective batch size")
    parser.add_argument("--width", type=int, default=128, help="GPT width")
    parser.add_argument("--context", type=int, default=128, help="GPT sequence length")
    parser.add_argument("--image-size", type=int, default=64, help="ResNet input side")
    parser.add_argument("--resnet", default="resnet18", help="torchvision ResNet to build")
    parser.add_argument(
        "--modes-k", type=int, nargs="*", default=[1, 4], help="K values of the modes table"
    )
    parser.add_argument("--no-sweep", action="store_true", help="only the modes table")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="modes table: time steps in CPU seconds of this process on 1 thread (stable on "
        "a machine shared with other jobs, where wall time is not)",
    )
    parser.add_argument("--repetitions", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "images" / "memory.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no plot; for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.accumulation_steps, args.batch, args.width, args.context = [1, 2], 4, 32, 16
        args.image_size, args.repetitions, args.plot = 32, 1, None
        args.modes_k = [2]
    args.clock = time.perf_counter
    if args.cpu_time:
        args.clock = time.process_time
        torch.set_num_threads(1)
    if args.no_sweep:
        args.accumulation_steps, args.plot = [], None
    if any(k < 1 or args.batch % k for k in args.accumulation_steps + args.modes_k):
        parser.error(f"every --accumulation-steps must divide --batch {args.batch}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"torch {torch.__version__}, torch_accum {torch_accum.__version__}, device {device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if device.type == "cuda"
            else f", {torch.get_num_threads()} threads"
        )
    )
    results = {}
    for make in (gpt_workload, resnet_workload):
        work = make(args, device)
        if work is not None:
            if args.accumulation_steps:
                results[work.name] = run(work, args)
            modes(work, args)
    if args.plot is not None:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
