"""What accumulation does to training: loss curves for accumulation_steps K = 1 ... 16.

    python examples/sweep_accumulation_steps.py          # seconds; writes docs/images/sweep.png
    python examples/sweep_accumulation_steps.py --accumulation-steps 1 4 --epochs 2 --no-plot

The same small MLP regressor, from the same initialisation and on the same shuffled data,
is trained with every K in two regimes:

(a) fixed micro-batch (``--micro-batch-size``): each optimizer step sees K micro-batches,
    so the effective batch grows with K and an epoch has K times fewer optimizer steps;
(b) fixed effective batch (``--effective-batch-size``): the batch is cut into K
    micro-batches of effective/K samples. Accumulation is exact, so every K trains the
    same model: the curves coincide and the script checks that they do.

It prints a table (with the final loss on all the data, less noisy than the last
window's), draws the window losses (``acc.loss``) against optimizer steps and against
samples seen, and ends with the largest difference across K in regime (b). Training is in
float64 so that "identical" can be checked to ~1e-15 instead of to float32 rounding.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _extras import import_error, install_hint
from cli_types import positive_float, positive_int
from torch import nn

from torch_accum import Accumulator

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 4096
FEATURES = 8
DTYPE = torch.float64
# Float64 round-off is ~1e-16; summing the micro-batch gradients in a different order
# than the full-batch mean leaves a few ulps, far below this.
TOLERANCE = 1e-10
SMOOTH_SAMPLES = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--accumulation-steps",
        type=positive_int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        metavar="K",
        help="the values of K to compare (default: 1 2 4 8 16)",
    )
    parser.add_argument(
        "--micro-batch-size", type=positive_int, default=16, help="regime (a) (default: 16)"
    )
    parser.add_argument(
        "--effective-batch-size",
        type=positive_int,
        default=128,
        help="regime (b); must be divisible by every K (default: 128)",
    )
    parser.add_argument("--epochs", type=positive_int, default=3, help="(default: 3)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW (default: 3e-3)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--plot",
        type=Path,
        default=ROOT / "docs" / "images" / "sweep.png",
        metavar="PATH",
        help="where to write the PNG (default: docs/images/sweep.png)",
    )
    output.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    ks = args.accumulation_steps
    repeated = sorted({k for k in ks if ks.count(k) > 1})
    if repeated:
        parser.error(
            f"--accumulation-steps lists {', '.join(map(str, repeated))} more than once; "
            "give each value once"
        )
    args.accumulation_steps = sorted(ks)
    indivisible = [k for k in args.accumulation_steps if args.effective_batch_size % k]
    if indivisible:
        multiple = math.lcm(*args.accumulation_steps)
        suggestion = -(-args.effective_batch_size // multiple) * multiple
        parser.error(
            f"--effective-batch-size {args.effective_batch_size} is not divisible by "
            f"--accumulation-steps {', '.join(map(str, indivisible))}; pick a multiple of "
            f"every K, e.g. {suggestion}"
        )
    largest = args.micro_batch_size * max(args.accumulation_steps)
    if largest > SAMPLES:
        parser.error(
            f"--micro-batch-size {args.micro_batch_size} times K={max(args.accumulation_steps)} "
            f"is an effective batch of {largest}, more than the {SAMPLES} training samples; "
            "lower --micro-batch-size or the largest K"
        )
    if args.effective_batch_size > SAMPLES:
        parser.error(
            f"--effective-batch-size {args.effective_batch_size} is more than the {SAMPLES} "
            f"training samples; pick one of at most {SAMPLES}"
        )
    if args.no_plot:
        args.plot = None
    elif args.plot.is_dir():
        parser.error(f"--plot {args.plot} is a directory; give a file name such as sweep.png")
    return args


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs and the output of a fixed random 'teacher' network.

    Learnable by the MLP and noise-free, so the loss keeps falling instead of stalling at a
    noise floor.
    """
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=DTYPE)
    weights = torch.randn(FEATURES, 32, generator=generator, dtype=DTYPE) / FEATURES**0.5
    y = torch.tanh(x @ weights) @ torch.randn(32, 1, generator=generator, dtype=DTYPE)
    # Unit variance: a loss of 1 is what predicting the mean gets.
    return x, (y - y.mean()) / y.std()


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every run starts from the same weights
    return nn.Sequential(
        nn.Linear(FEATURES, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    ).to(DTYPE)


@dataclass
class Run:
    regime: str
    k: int
    micro_batch: int
    steps: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    parameters: torch.Tensor | None = None
    full_loss: float = float("nan")

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.k


def train(
    regime: str,
    k: int,
    micro_batch: int,
    data: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
) -> Run:
    """The plain loop inside ``with acc:``, logging the window loss at every real step."""
    x, y = data
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    run = Run(regime, k, micro_batch)
    window = micro_batch * k
    # Drop the tail that cannot fill a whole window (DataLoader's drop_last, per window):
    # every optimizer step then sees exactly the effective batch, in both regimes.
    used = SAMPLES // window * window
    seen = 0
    with Accumulator(model, optimizer, accumulation_steps=k) as acc:
        for epoch in range(epochs):
            # The same order for every run, so that regime (b) runs see identical batches.
            order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(100 + epoch))
            for start in range(0, used, micro_batch):
                index = order[start : start + micro_batch]
                loss = nn.functional.mse_loss(model(x[index]), y[index])
                acc.backward(loss)
                optimizer.step()  # a no-op until the window is complete
                optimizer.zero_grad()
                seen += len(index)
                if acc.sync_gradients:
                    run.steps.append(acc.optimizer_steps)
                    run.samples.append(seen)
                    run.losses.append(float(acc.loss))  # type: ignore[arg-type]
    with torch.no_grad():
        run.parameters = torch.cat([p.detach().flatten() for p in model.parameters()])
        run.full_loss = nn.functional.mse_loss(model(x), y).item()
    return run


def spread(runs: list[Run]) -> tuple[float, float]:
    """Largest relative difference across K of the step-by-step losses and of the final
    parameters: relative to each step's loss, and to the largest parameter, so that the
    numbers mean "digits that agree" whatever the scale."""
    losses = torch.tensor([run.losses for run in runs], dtype=DTYPE)
    parameters = torch.stack([run.parameters for run in runs])  # type: ignore[misc]
    loss_spread = (losses.amax(dim=0) - losses.amin(dim=0)) / losses.abs().amax(dim=0)
    parameter_spread = (parameters.amax(dim=0) - parameters.amin(dim=0)).max()
    return loss_spread.max().item(), (parameter_spread / parameters.abs().max()).item()


def print_table(runs: list[Run]) -> None:
    header = (
        f"{'regime':<26} {'K':>3} {'micro-batch':>11} {'effective batch':>15} "
        f"{'optimizer steps':>15} {'samples seen':>12} {'final window loss':>17} "
        f"{'loss on all data':>16}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        print(
            f"{run.regime:<26} {run.k:>3} {run.micro_batch:>11} {run.effective_batch:>15} "
            f"{run.steps[-1]:>15} {run.samples[-1]:>12} {run.losses[-1]:>17.6f} "
            f"{run.full_loss:>16.6f}"
        )


def smoothed(run: Run) -> list[float]:
    """Moving average of the window losses over ~SMOOTH_SAMPLES samples.

    Averaging over a fixed number of samples, not of steps, treats every K alike (K=1 with
    micro-batches of 16 averages 32 windows, K=16 two windows of 256). The window is
    centred; near the start it shrinks to stay centred, so that later, lower losses do not
    pull the fast first steps down, and at the end it is cut off, so that the last point
    is not a single noisy window.
    """
    half = max(1, SMOOTH_SAMPLES // run.effective_batch) // 2
    totals = [0.0]
    for loss in run.losses:
        totals.append(totals[-1] + loss)
    last = len(run.losses) - 1
    averages = []
    for i in range(len(run.losses)):
        low, high = max(0, i - half), min(last, i + min(half, i))
        averages.append((totals[high + 1] - totals[low]) / (high + 1 - low))
    return averages


def plot(
    fixed_micro: list[Run],
    fixed_effective: list[Run],
    loss_spread: float,
    args: argparse.Namespace,
    path: Path,
) -> None:
    # The plot is optional: without matplotlib (or with one that fails to import, e.g. built
    # for another numpy) the table and the check still run.
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, so it also runs on a headless machine
        import matplotlib.pyplot as plt
    except Exception as error:
        print(
            f"(plot skipped: matplotlib does not import ({import_error(error)}); "
            f"{install_hint('examples')}, or pass --no-plot)"
        )
        return
    figure, axes = plt.subplots(2, 2, figsize=(13, 9), sharey=True)
    colours = plt.get_cmap("viridis")
    micro, effective = args.micro_batch_size, args.effective_batch_size
    rows = [
        (
            fixed_micro,
            f"(a) fixed micro-batch {micro}: effective batch = {micro}·K\n"
            "larger K: bigger batches, K times fewer optimizer steps per epoch",
        ),
        (
            fixed_effective,
            f"(b) fixed effective batch {effective}: micro-batch = {effective}/K\n"
            "accumulation is exact: every K trains the same model",
        ),
    ]
    columns = [("steps", "optimizer steps (log scale)"), ("samples", "samples seen")]
    for row, (runs, title) in enumerate(rows):
        for column, (attribute, xlabel) in enumerate(columns):
            axis = axes[row][column]
            for index, run in enumerate(runs):
                colour = colours(0.85 * index / max(1, len(runs) - 1))
                x = getattr(run, attribute)
                axis.plot(x, run.losses, color=colour, linewidth=0.6, alpha=0.25)
                # In (b) the curves lie on top of each other; decreasing widths keep every
                # colour visible as a stripe instead of only the last one drawn.
                width = 1.8 if row == 0 else 1.5 + 2.0 * (len(runs) - 1 - index)
                axis.plot(
                    x,
                    smoothed(run),
                    color=colour,
                    linewidth=width,
                    label=f"K={run.k}: micro-batch {run.micro_batch}, "
                    f"effective {run.effective_batch}",
                )
            axis.set(yscale="log", xlabel=xlabel, title=title)
            if attribute == "steps":
                axis.set_xscale("log")
                axis.set_ylabel("training loss (acc.loss)")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8, loc="upper right")
            if row == 1:
                axis.text(
                    0.03,
                    0.04,
                    f"max relative spread of the loss across K: {loss_spread:.1e}",
                    transform=axis.transAxes,
                    fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "0.7"},
                )
    figure.suptitle(
        f"Gradient accumulation with K = {', '.join(map(str, args.accumulation_steps))}: "
        f"same MLP, data and AdamW (lr {args.lr:g}), {args.epochs} epoch(s) of {SAMPLES} "
        f"samples\nfaint: loss of every optimizer step's window; solid: moving average over "
        f"{SMOOTH_SAMPLES} samples",
        fontsize=12,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        # A 256-colour palette makes the PNG three times smaller with no visible change;
        # Pillow is a dependency of matplotlib.
        from PIL import Image

        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=100, format="png")
        Image.open(buffer).convert("RGB").quantize(256).save(path, format="PNG", optimize=True)
    else:
        figure.savefig(path, dpi=100)
    plt.close(figure)
    try:
        shown = path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path
    print(f"plot written to {shown}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The matrices are tiny: a second thread buys nothing and, on a busy machine, its
    # spin-waits made the run ten times slower.
    torch.set_num_threads(1)
    data = make_data()
    started = time.perf_counter()
    fixed_micro = [
        train("(a) fixed micro-batch", k, args.micro_batch_size, data, args.epochs, args.lr)
        for k in args.accumulation_steps
    ]
    fixed_effective = [
        train(
            "(b) fixed effective batch",
            k,
            args.effective_batch_size // k,
            data,
            args.epochs,
            args.lr,
        )
        for k in args.accumulation_steps
    ]
    seconds = time.perf_counter() - started
    print_table(fixed_micro + fixed_effective)
    print(f"\n{2 * len(args.accumulation_steps)} runs trained in {seconds:.1f} s")
    loss_spread, parameter_spread = spread(fixed_effective)
    if args.plot is not None:
        plot(fixed_micro, fixed_effective, loss_spread, args, args.plot)
    if not all(math.isfinite(loss) for run in fixed_micro + fixed_effective for loss in run.losses):
        # nan compares unequal to itself, so a spread would call diverged runs different.
        print(f"DIVERGED: the loss became non-finite at --lr {args.lr:g}; lower --lr")
        return 1
    identical = max(loss_spread, parameter_spread) <= TOLERANCE
    print(
        f"fixed effective batch: losses {'identical' if identical else 'DIFFER'} across K "
        f"(max spread {loss_spread:.1e}, relative; parameters {parameter_spread:.1e}; "
        f"tolerance {TOLERANCE:.0e})"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
