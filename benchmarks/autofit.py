"""autofit against an exhaustive grid of the same candidates, and what other tools would pick.

    python benchmarks/autofit.py                 # the figures in benchmarks/RESULTS.md
    python benchmarks/autofit.py --quick         # smaller inputs, a few minutes on 2 cores
    python benchmarks/autofit.py --smoke         # seconds; the tests run this

Two models: the project's GPT (examples/gpt.py, 12 blocks) and a torchvision ResNet-50 (when
torchvision imports). For each, memory budgets at 20%, 35%, 50% and 100% of the activation
peak of the whole effective batch without checkpointing. At every budget:

- plan: ``torch_accum.autofit`` from scratch, its choice and its planning time;
- grid: every candidate (the same checkpointing policies x the same micro-batch sizes)
  measured in this run, peak and time, once per model; its best under the budget, and what
  it cost (the peaks of all candidates plus the timings of those that fit);
- (b) the largest micro-batch that fits without checkpointing (what Composer's and
  Lightning's batch-size finders pick), (c) full checkpointing, its largest micro-batch.

The samples/s compared (forward + backward of one micro-batch) are measured again after the
grid, side by side: the plan's choice, the grid's best and the two baselines are timed in turn
for 5 rounds and each keeps its best, so that all four share the machine's state. On a CPU
shared with other processes the default clock is ``time.process_time`` (``--clock wall``
for wall time). Planning and grid times are given in CPU seconds of this process (steady
when other jobs share the machine) and in wall seconds. Peaks are
``torch_accum.measure_activation_memory``'s (on CUDA the allocator's peak).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torch_accum
from torch_accum import autofit
from torch_accum.planner import DEFAULT_POLICIES, _candidate_sizes, _policies, _Search

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gpt import GPT, GPTConfig

HERE = Path(__file__).resolve().parent

FRACTIONS = (0.20, 0.35, 0.50, 1.00)


def gpt_case(args: argparse.Namespace) -> tuple[str, nn.Module, Any, Callable[[Any], Any]]:
    config = GPTConfig(vocab_size=256, context=args.context, width=args.width, heads=4, layers=12)
    torch.manual_seed(0)
    model = GPT(config)
    tokens = torch.randint(0, config.vocab_size, (args.batch, config.context + 1))

    def compute_loss(micro: torch.Tensor) -> torch.Tensor:
        logits = model(micro[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten())

    params = sum(p.numel() for p in model.parameters())
    name = f"GPT 12 blocks, width {args.width}, {params / 1e6:.1f}M params, {args.context} tokens"
    return name, model, tokens, compute_loss


def resnet_case(
    args: argparse.Namespace,
) -> tuple[str, nn.Module, Any, Callable[[Any], Any]] | None:
    try:
        import torchvision
    except Exception as error:  # a torchvision built for another torch fails otherwise
        print(f"(ResNet-50 skipped: torchvision does not import: {error})")
        return None
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    side = args.image_size
    batch = (torch.randn(args.batch, 3, side, side), torch.randint(0, 10, (args.batch,)))

    def compute_loss(micro: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(micro[0]), micro[1])

    return f"ResNet-50, {side}x{side} images", model, batch, compute_loss


def run_case(
    name: str,
    model: nn.Module,
    batch: Any,
    compute_loss: Callable[[Any], Any],
    total: int,
    *,
    device: torch.device | None = None,
    clock: Callable[[], float] = time.process_time,
    fractions: tuple[float, ...] = FRACTIONS,
    rounds: int = 5,
    plot: str | None = None,
) -> list[dict[str, Any]]:
    """The grid, then a plan at each budget, judged side by side: a row per budget.

    ``device`` is the model's (on CUDA the peaks are the allocator's and runs synchronize);
    each row keeps the `Plan` under ``"chosen_plan"``.
    """
    print(f"\n== {name}, effective batch {total}", flush=True)
    device = device or torch.device("cpu")
    policies = _policies(model, DEFAULT_POLICIES)
    sizes = _candidate_sizes(total, "balanced", None)
    grid = _Search(model, batch, total, compute_loss, device, 2, None, clock)
    try:
        started = clocks()
        peaks = {(p, s): grid.peak(p, s) for p in policies for s in sizes}
        peak_seconds = since(started)
        timing_seconds: dict[tuple[Any, int], tuple[float, float]] = {}
        for p in policies:
            for s in sizes:
                started = clocks()
                grid.speed(p, s, runs=2)
                timing_seconds[p, s] = since(started)
    finally:
        grid.untouched.restore()
    speeds = grid.speeds
    off = policies[0]
    full = next(p for p in policies if p.label == "full")
    whole = peaks[off, total]
    rows = []
    last_plan = None
    for fraction in fractions:
        budget = int(fraction * whole)
        fitting = [key for key, peak in peaks.items() if peak <= budget]
        grid_wall = peak_seconds[0] + sum(timing_seconds[key][0] for key in fitting)
        grid_cpu = peak_seconds[1] + sum(timing_seconds[key][1] for key in fitting)
        best = max(fitting, key=lambda key: speeds[key])
        started = clocks()
        plan = autofit(
            model, batch, compute_loss, memory_budget=budget, effective_batch=total, clock=clock
        )
        planning_wall, planning_cpu = since(started)
        chosen = next(
            key for key in speeds if key[0].label == plan.label and key[1] == plan.micro_batch_size
        )
        largest_off = next(((off, s) for s in sizes if peaks[off, s] <= budget), None)
        largest_full = next(((full, s) for s in sizes if peaks[full, s] <= budget), None)
        # The figures compared: these candidates timed again side by side, round after round.
        judged = judge(
            model,
            batch,
            compute_loss,
            total,
            [chosen, best, largest_off, largest_full],
            device,
            clock,
            rounds,
        )

        def speed_of(key: tuple[Any, int] | None, judged: dict[Any, float] = judged) -> str:
            return "none fits" if key is None else f"{judged[key]:.1f} ({key[1]})"

        row = {
            "model": name,
            "fraction": fraction,
            "budget": budget,
            "chosen_plan": plan,
            "budget_mib": budget / 2**20,
            "plan": f"{plan.label}, {plan.micro_batch_size} x {plan.accumulation_steps}",
            "plan_peak_mib": plan.measured_peak / 2**20,
            "plan_fits": plan.measured_peak <= budget and peaks[chosen] <= budget,
            "plan_speed": judged[chosen],
            "plan_own_speed": plan.samples_per_second,
            "best": f"{best[0].label}, {best[1]}",
            "best_speed": judged[best],
            "ratio": judged[chosen] / judged[best],
            "largest_off": speed_of(largest_off),
            "full_largest": speed_of(largest_full),
            "planning_s": (planning_wall, planning_cpu),
            "grid_s": (grid_wall, grid_cpu),
        }
        rows.append(row)
        print(
            f"{int(fraction * 100):>3}%: plan {row['plan']} {row['plan_speed']:.1f}/s, grid best "
            f"{row['best']} {row['best_speed']:.1f}/s, ratio {row['ratio']:.3f}, planning "
            f"{planning_cpu:.1f} s vs grid {grid_cpu:.1f} s of CPU ({planning_wall:.1f} vs "
            f"{grid_wall:.1f} s of wall time)",
            flush=True,
        )
        if fraction == fractions[min(1, len(fractions) - 1)]:
            print(plan.table())
            last_plan = plan
    if plot and last_plan is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            path = Path(plot.replace("{model}", name.split()[0].lower().rstrip(",")))
            last_plan.plot(path)
            print(f"plot: {path}")
        except ImportError:
            print("(no plot: matplotlib is not installed)")
    return rows


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(started: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since ``started``: the machine is shared, so both are shown."""
    wall, cpu = clocks()
    return wall - started[0], cpu - started[1]


def judge(
    model: nn.Module,
    batch: Any,
    compute_loss: Callable[[Any], Any],
    total: int,
    keys: list[tuple[Any, int] | None],
    device: torch.device,
    clock: Callable[[], float],
    rounds: int = 5,
) -> dict[tuple[Any, int], float]:
    """Samples/s of each candidate: the best of ``rounds`` rounds that time them in turn."""
    found = list(dict.fromkeys(key for key in keys if key is not None))
    timer = _Search(model, batch, total, compute_loss, device, 1, None, clock)
    best = dict.fromkeys(found, 0.0)
    try:
        for _ in range(rounds):
            for key in found:
                timer.forget_timing(*key)
                best[key] = max(best[key], timer.speed(*key))
    finally:
        timer.untouched.restore()
    return best


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | budget | plan (checkpointing, micro x K) | plan peak MiB | plan samples/s "
        "| grid best | grid best samples/s | plan / grid | (b) largest, no checkpointing "
        "| (c) full checkpointing, largest | planning s (CPU / wall) | grid s (CPU / wall) "
        "| planning / grid (CPU / wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model'].split(',')[0]} | {int(r['fraction'] * 100)}% "
            f"({r['budget_mib']:.1f} MiB) | {r['plan']} | {r['plan_peak_mib']:.1f}"
            f"{'' if r['plan_fits'] else ' OVER'} | {r['plan_speed']:.1f} | {r['best']} "
            f"| {r['best_speed']:.1f} | {r['ratio']:.3f} | {r['largest_off']} "
            f"| {r['full_largest']} | {r['planning_s'][1]:.1f} / {r['planning_s'][0]:.1f} "
            f"| {r['grid_s'][1]:.1f} / {r['grid_s'][0]:.1f} "
            f"| {100 * r['planning_s'][1] / r['grid_s'][1]:.1f}% / "
            f"{100 * r['planning_s'][0] / r['grid_s'][0]:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT only (seconds)")
    parser.add_argument("--model", choices=("gpt", "resnet", "both"), default="both")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=("process", "wall"),
        default="process",
        help="time runs in CPU seconds of this process (default: steady on a shared CPU) or wall",
    )
    parser.add_argument("--plot", default=None, help="save the 35%% budget's plot, {model} filled")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    args.width, args.context, args.batch, args.image_size = 256, 64, 32, 96
    if args.quick:
        args.context, args.batch, args.image_size = 32, 24, 64
    if args.smoke:
        args.width, args.context, args.batch = 32, 16, 8
    print(
        f"torch {torch.__version__}, torch_accum {torch_accum.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), {args.clock} clock"
    )
    options = {"clock": clock, "rounds": 2 if args.smoke else 5, "plot": args.plot}
    rows = [] if args.model == "resnet" else run_case(*gpt_case(args), args.batch, **options)
    if not args.smoke and args.model != "gpt":
        resnet = resnet_case(args)
        if resnet is not None:
            rows += run_case(*resnet, args.batch, **options)
    print()
    print(markdown(rows))
    ok = all(r["ratio"] >= 0.95 and r["plan_fits"] for r in rows)
    print(f"\nplan >= 0.95 x grid best and within budget everywhere: {ok}")
    cheap = all(r["planning_s"][1] <= 0.1 * r["grid_s"][1] for r in rows)
    print(f"planning <= 10% of the grid's CPU time everywhere: {cheap}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
