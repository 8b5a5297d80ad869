"""Low-precision weights: how precise is the window's gradient, against float64?

    python benchmarks/precision.py           # the figures in benchmarks/RESULTS.md
    python benchmarks/precision.py --smoke   # seconds; CI runs this to keep it working

For bfloat16 and float16 weights, an MLP (256-256-1) and the project's GPT
(examples/gpt.py), and K micro-batches per window, it compares the gradient that the
optimizer is handed at the step with the full-batch gradient of the same weights in float64:

- relative error: ``|g - g64| / |g64|``;
- scale bias: the projection of ``g`` on ``g64``, minus 1 (a seed of 1/3 rounded to
  bfloat16 shows as +2e-3 at every K that is not a power of two).

Three loops: the hand-written ``(loss / K).backward()``, the Accumulator accumulating in the
parameters' dtype (``accumulation_dtype=None``), and in float32 (the default). Each
micro-batch holds a power-of-two number of samples (tokens for the GPT), so that the loss's
own mean is exact and what is left is what the accumulation adds; the whole batch grows with
K. Figures are means over seeds. Then the bytes the gradients hold during a window and the
time of a window at K = 16, float32 path against the parameter-dtype path, alternated in one
process (median of the per-repetition ratios).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gpt import GPT, GPTConfig

import torch_accum
from torch_accum import Accumulator

MicroBatch = tuple[torch.Tensor, torch.Tensor]
LOOPS = ("hand", "param dtype", "float32")


@dataclass
class Task:
    """A model factory, its micro-batches and its loss."""

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[int, int], list[MicroBatch]]  # (micro-batches, seed) -> micro-batches
    loss: Callable[[nn.Module, MicroBatch], torch.Tensor]


def mlp_task(width: int, micro: int) -> Task:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def data(count: int, seed: int) -> list[MicroBatch]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(count * micro, width, generator=generator, dtype=torch.float64)
        y = torch.randn(count * micro, 1, generator=generator, dtype=torch.float64)
        return list(zip(x.split(micro), y.split(micro), strict=True))

    def loss(model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return nn.functional.mse_loss(model(batch[0].to(dtype)), batch[1].to(dtype))

    return Task(f"MLP {width}-{width}-1", build, data, loss)


def gpt_task(config: GPTConfig, sequences: int) -> Task:
    def data(count: int, seed: int) -> list[MicroBatch]:
        generator = torch.Generator().manual_seed(seed)
        shape = (count * sequences, config.context + 1)
        tokens = torch.randint(0, config.vocab_size, shape, generator=generator)
        return [(t[:, :-1], t[:, 1:]) for t in tokens.split(sequences)]

    def loss(model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        logits = model(batch[0])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    name = f"GPT {config.layers}x{config.width}"
    return Task(name, lambda: GPT(config), data, loss)


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.to(torch.float64).flatten() for g in grads])


def reference(task: Task, model: nn.Module, batches: list[MicroBatch]) -> torch.Tensor:
    """The full-batch gradient of ``model``'s weights, in float64."""
    wide = copy.deepcopy(model).to(torch.float64)
    for batch in batches:  # equal micro-batches: the full-batch mean is the mean of means
        (task.loss(wide, batch) / len(batches)).backward()
    return flat([p.grad for p in wide.parameters()])


def window_gradient(
    task: Task, model: nn.Module, batches: list[MicroBatch], loop: str
) -> tuple[torch.Tensor, int]:
    """The gradient the optimizer gets at the step, and the bytes gradients held mid-window."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[torch.Tensor] = []
    held = [0]

    def record(*_: object) -> None:
        seen.append(flat([p.grad for p in model.parameters()]))

    def measure() -> None:
        held[0] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())

    optimizer.register_step_pre_hook(record)
    k = len(batches)
    if loop == "hand":
        for index, batch in enumerate(batches):
            (task.loss(model, batch) / k).backward()
            if index == 0:
                measure()
        optimizer.step()
    else:
        dtype = torch.float32 if loop == "float32" else None
        with Accumulator(model, optimizer, k, accumulation_dtype=dtype) as acc:
            for index, batch in enumerate(batches):
                acc.backward(task.loss(model, batch))
                if index == 0:
                    measure()
                optimizer.step()
                optimizer.zero_grad()
    return seen[0], held[0]


def precision_rows(task: Task, ks: list[int], seeds: int) -> list[dict[str, object]]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for k in ks:
            row: dict[str, object] = {"model": task.name, "dtype": str(dtype)[6:], "K": k}
            for loop in LOOPS:
                errors, biases = [], []
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    model = task.build().to(dtype)
                    batches = task.data(k, seed + 1)
                    g64 = reference(task, model, batches)
                    got, held = window_gradient(task, model, batches, loop)
                    errors.append(float((got - g64).norm() / g64.norm()))
                    biases.append(float(got @ g64 / (g64 @ g64)) - 1.0)
                row[f"{loop} error"] = statistics.mean(errors)
                row[f"{loop} bias"] = statistics.mean(biases)
                row[f"{loop} grad bytes"] = held
            rows.append(row)
    return rows


def step_time_ratio(task: Task, k: int, repetitions: int) -> float:
    """Median time of a window, float32 path / parameter-dtype path (bfloat16 weights)."""
    batches = task.data(k, 1)
    ratios = []
    for _ in range(repetitions):
        times = {}
        for dtype in (None, torch.float32):  # alternated: drift hits both alike
            torch.manual_seed(0)
            model = task.build().to(torch.bfloat16)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            with Accumulator(model, optimizer, k, accumulation_dtype=dtype) as acc:
                start = time.perf_counter()
                for batch in batches:
                    acc.backward(task.loss(model, batch))
                    optimizer.step()
                    optimizer.zero_grad()
                times[dtype] = time.perf_counter() - start
        ratios.append(times[torch.float32] / times[None])
    return statistics.median(ratios)


def print_table(rows: list[dict[str, object]]) -> None:
    print("| model | weights | K | " + " | ".join(f"{loop}: error / bias" for loop in LOOPS) + " |")
    print("|---|---|---:|" + "---:|" * len(LOOPS))
    for row in rows:
        cells = [f"{row[f'{loop} error']:.2e} / {row[f'{loop} bias']:+.1e}" for loop in LOOPS]
        print(f"| {row['model']} | {row['dtype']} | {row['K']} | " + " | ".join(cells) + " |")


def check_targets(rows: list[dict[str, object]]) -> list[str]:
    """The issue's targets, each as a line saying whether it holds."""
    lines = []
    by_key = {(r["model"], r["dtype"], r["K"]): r for r in rows}
    for (model, dtype, k), row in by_key.items():
        base = by_key[(model, dtype, 1)]
        if k == max(key[2] for key in by_key if key[:2] == (model, dtype)) and k > 1:
            ratio = float(row["float32 error"]) / float(base["float32 error"])  # type: ignore[arg-type]
            verdict = "holds" if ratio <= 1.2 else "FAILS"
            lines.append(f"{model} {dtype}: float32 error at K={k} is {ratio:.2f}x K=1 ({verdict})")
    for model, dtype in sorted({key[:2] for key in by_key}):
        for loop in ("float32", "param dtype"):
            base = float(by_key[(model, dtype, 1)][f"{loop} bias"])  # type: ignore[arg-type]
            drift = max(
                (
                    float(r[f"{loop} bias"]) - base
                    for key, r in by_key.items()
                    if key[:2] == (model, dtype)
                ),  # type: ignore[arg-type]
                key=abs,
            )
            verdict = "holds" if abs(drift) <= 1e-3 else "FAILS"
            lines.append(
                f"{model} {dtype}: {loop} bias at most {drift:+.1e} from K=1's ({verdict})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--seeds", type=int, default=6, help="runs averaged per figure")
    args = parser.parse_args()
    if not hasattr(torch.Tensor, "grad_dtype"):
        parser.exit(
            2,
            f"float32 sums need Tensor.grad_dtype: torch 2.10 or newer, not {torch.__version__}\n",
        )
    print(
        f"torch {torch.__version__}, torch_accum {torch_accum.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s)"
    )
    if args.smoke:
        tasks = [mlp_task(16, 8), gpt_task(GPTConfig(context=8, width=16, layers=1), 2)]
        ks, seeds, repetitions = [1, 3, 4], 1, 3
    else:
        config = GPTConfig(context=32, width=64, heads=4, layers=2)
        tasks = [mlp_task(256, 16), gpt_task(config, 2)]
        ks, seeds, repetitions = [1, 3, 4, 16, 64, 256], args.seeds, 21
    rows = [row for task in tasks for row in precision_rows(task, ks, seeds)]
    print_table(rows)
    print()
    print("Gradient bytes held during a window (bfloat16 weights):")
    for row in rows:
        if row["dtype"] == "bfloat16" and row["K"] == max(ks):
            print(
                f"  {row['model']}: param dtype {row['param dtype grad bytes']:,} B, "
                f"float32 {row['float32 grad bytes']:,} B"
            )
    k = 16 if not args.smoke else 4
    for task in tasks:
        ratio = step_time_ratio(task, k, repetitions)
        print(f"Window time at K={k}, {task.name}, bfloat16: float32 / param dtype = {ratio:.3f}x")
    print()
    lines = check_targets(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
