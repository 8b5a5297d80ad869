"""torch.compile with checkpointing: torch_accum against the same loop written by hand.

    python benchmarks/compile.py                       # the figures in benchmarks/RESULTS.md
    python benchmarks/compile.py --backend aot_eager   # counts and parameters, minutes
    python benchmarks/compile.py --smoke               # seconds; CI runs this to keep it working

Each row of the table is one way a user combines ``torch.compile`` with gradient
accumulation and checkpointing, run twice in one process from the same initialisation and
data: once as the loop written by hand (``(loss / K).backward()``, ``optimizer.step()`` and
``zero_grad()`` every K micro-batches, each checkpointed block wrapped in a module that calls
``torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)``) and once
with ``Accumulator(..., checkpointing=...)``, both compiled the same way. Counted for each:
graph breaks (``torch._dynamo.utils.counters``), graphs handed to the backend and
recompilations (compilations of a frame after its first); then the largest parameter
difference after the same steps, and the time per micro-batch against the hand loop: the
median over repetitions of the ratio of one window each, the two run alternately so that
drift and background load hit both alike.

The hand loop also runs a second time, and its difference from itself is printed next to
the library's ("hand vs itself"): inductor's CPU kernels with more than one thread do not
give the same bits from run to run (the same graphs, the same process), and after a few
Adam steps that alone reaches 1e-5. Read the library's difference against that one; with
``--deterministic`` (``torch.use_deterministic_algorithms(True)``) both are 0.0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

# The compiled hand loop's wrapper and the counting backend, shared with the tests.
from _compiled_reference import (
    Batch,
    Counting,
    graph_breaks,
    loss_of,
    one_rank_group,
    wrap_by_hand,
)
from gpt import GPT, GPTConfig

from torch_accum import Accumulator, Checkpointing


# ----------------------------------------------------------------------------- models
class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class CNN(nn.Module):
    """A small ResNet-like CNN with BatchNorm: a stem layer, repeated blocks, a head."""

    def __init__(self, channels: int = 16, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ConvBlock(channels) for _ in range(depth)))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class Size:
    gpt_width: int = 128
    gpt_layers: int = 4
    gpt_tokens: int = 64
    cnn_channels: int = 16
    cnn_image: int = 16
    batch: int = 4


def make_model(kind: str, size: Size) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        config = GPTConfig(
            width=size.gpt_width, layers=size.gpt_layers, context=size.gpt_tokens, heads=4
        )
        return GPT(config)
    return CNN(size.cnn_channels)


def make_batches(kind: str, size: Size, count: int, ragged: bool = False) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    batches: list[Batch] = []
    for index in range(count):
        rows = size.batch // 2 if ragged and index == count - 1 else size.batch
        if kind == "gpt":
            tokens = torch.randint(0, 256, (rows, size.gpt_tokens + 1), generator=generator)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        else:
            image = torch.randn(rows, 3, size.cnn_image, size.cnn_image, generator=generator)
            batches.append((image, torch.randint(0, 10, (rows,), generator=generator)))
    return batches


# ----------------------------------------------------------------------------- the cells
@dataclass(frozen=True)
class Cell:
    name: str
    model: str
    k: int
    policy: object = False
    layout: str = "compile"
    blocks: int = 1  # `with` blocks (epochs), an evaluation pass between them


def cells(size: Size) -> list[Cell]:
    gpt_policies: list[tuple[str, object]] = [
        ("full", True),
        ("selective", "selective"),
        ("every=2", Checkpointing(every=2)),
        ("class", type(make_model("gpt", size).blocks[0])),  # type: ignore[index]
    ]
    found: list[Cell] = [Cell("off", "gpt", k) for k in (1, 4)]
    for k in (1, 4):
        found += [Cell(name, "gpt", k, policy) for name, policy in gpt_policies]
    found += [
        Cell("callable", "gpt", 4, "callable"),
        Cell("off", "cnn", 4),
        Cell("full", "cnn", 4, True),
        Cell("selective", "cnn", 4, "selective"),
        Cell("every=2", "cnn", 4, Checkpointing(every=2)),
        Cell("full, 3 with blocks + eval", "gpt", 4, True, blocks=3),
        Cell("full, 3 with blocks + eval", "cnn", 4, True, blocks=3),
        Cell("full, 3 with blocks + eval, an Accumulator each", "gpt", 4, True, "fresh", 3),
        Cell("full, compiled inside the block", "gpt", 4, True, "inside"),
        Cell("full, model.compile()", "gpt", 4, True, "method"),
        Cell("full, block.compile() per block", "gpt", 4, True, "per-block"),
        Cell("full, bf16 autocast", "gpt", 4, True, "autocast"),
        Cell("full, ragged last, dynamic=False", "gpt", 4, True, "ragged"),
        Cell("full, compile(DDP(model)), 1 rank", "gpt", 4, True, "ddp"),
        Cell("full, compile(ddp), the Accumulator given ddp", "gpt", 4, True, "ddp-bare"),
        Cell("off, compiled train_step", "gpt", 4, False, "step"),
        Cell("full, compiled train_step", "gpt", 4, True, "step"),
    ]
    return found


@dataclass
class Run:
    model: nn.Module
    step: Callable[[list[Batch]], None]  # one window of micro-batches
    counter: Counting
    acc: Accumulator | None = None
    call: Any = None  # what the loop calls: the compiled model, or the model itself
    renew: Callable[[], Accumulator] | None = None  # a new Accumulator for each block

    def open(self) -> None:
        if self.renew is not None:
            self.acc = self.renew()
        if self.acc is not None:
            self.acc.__enter__()

    def close(self) -> None:
        if self.acc is not None:
            self.acc.__exit__(None, None, None)


def _autocast(cell: Cell) -> contextlib.AbstractContextManager[Any]:
    if cell.layout == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compile(cell: Cell, module: nn.Module, counter: Counting) -> Any:
    return torch.compile(
        module, backend=counter, dynamic=False if cell.layout == "ragged" else None
    )


def _resolve(policy: object, model: nn.Module) -> object:
    if policy == "callable":
        blocks = list(model.blocks)  # type: ignore[arg-type]
        return lambda module: any(module is block for block in blocks)
    return policy


def hand_run(cell: Cell, size: Size, backend: str) -> Run:
    model = make_model(cell.model, size)
    counter = Counting(backend)
    wrappers = wrap_by_hand(model, _resolve(cell.policy, model)) if cell.policy else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    k = cell.k
    net: Any = model
    if cell.layout.startswith("ddp"):
        net = DistributedDataParallel(model)
    if cell.layout == "method":
        model.compile(backend=counter)
        run: Any = model
    elif cell.layout == "per-block":
        for block in wrappers if wrappers else model.blocks:  # type: ignore[union-attr]
            block.compile(backend=counter, fullgraph=True)
        run = model
    elif cell.layout == "step":
        run = net
    else:
        run = _compile(cell, net, counter)

    def micro(batch: Batch) -> None:
        with _autocast(cell):
            loss = loss_of(run, batch) / k
        loss.backward()

    if cell.layout == "step":
        micro = torch.compile(micro, backend=counter)

    def window(batches: list[Batch]) -> None:
        for index, batch in enumerate(batches):
            sync = index == len(batches) - 1
            ddp = cell.layout.startswith("ddp")
            context = net.no_sync() if ddp and not sync else contextlib.nullcontext()
            with context:
                micro(batch)
        optimizer.step()
        optimizer.zero_grad()

    return Run(model, window, counter, call=run)


def library_run(cell: Cell, size: Size, backend: str) -> Run:
    model = make_model(cell.model, size)
    counter = Counting(backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    policy = _resolve(cell.policy, model)
    net: Any = model
    if cell.layout.startswith("ddp"):
        net = DistributedDataParallel(model)
    if cell.layout == "method":
        model.compile(backend=counter)
        run: Any = model
    elif cell.layout in ("per-block", "step", "inside"):
        run = net
    else:
        run = _compile(cell, net, counter)
    # Under DDP the Accumulator gets the module the loop calls: the compiled one ("ddp-bare":
    # the DDP module inside it, one graph break more).
    given = net if cell.layout == "ddp-bare" else run
    acc = Accumulator(given, optimizer, cell.k, checkpointing=policy)
    if cell.layout == "per-block":
        for block in model.blocks:  # type: ignore[union-attr]
            block.compile(backend=counter, fullgraph=True)
    state = {"inside": cell.layout == "inside"}

    def micro(batch: Batch) -> None:
        with _autocast(cell):
            loss = loss_of(run, batch)
        acc.backward(loss)

    if cell.layout == "step":
        micro = torch.compile(micro, backend=counter)

    def window(batches: list[Batch]) -> None:
        nonlocal run
        if state["inside"]:
            run = _compile(cell, net, counter)
            state["inside"] = False
        for batch in batches:
            micro(batch)
            optimizer.step()
            optimizer.zero_grad()

    def renew() -> Accumulator:
        nonlocal acc
        acc = Accumulator(given, optimizer, cell.k, checkpointing=policy)
        return acc

    run_ = Run(model, window, counter, acc, call=run)
    run_.open()
    if cell.layout == "fresh":
        run_.renew = renew
    return run_


def evaluate(run: Run, batch: Batch) -> None:
    run.model.eval()
    with torch.no_grad():
        loss_of(run.call, batch)
    run.model.train()


@dataclass
class Row:
    cell: Cell
    hand: tuple[int, int, int]
    library: tuple[int, int, int]
    difference: float
    ratio: float
    spread: float  # the hand loop against a second run of itself


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p.float() - q.float()).abs().max().item()
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def measure(cell: Cell, size: Size, backend: str, steps: int, reps: int) -> Row:
    counts = []
    runs: list[Run] = []
    ragged = cell.layout == "ragged"
    # The hand loop twice (its run-to-run spread), then the library.
    for make in (hand_run, hand_run, library_run):
        torch._dynamo.reset()
        counters.clear()
        run = make(cell, size, backend)
        batches = make_batches(cell.model, size, cell.k * steps, ragged=ragged)
        for block in range(cell.blocks):
            for start in range(0, len(batches), cell.k):
                run.step(batches[start : start + cell.k])
            if cell.blocks > 1:
                run.close()
                evaluate(run, batches[0])
                if block < cell.blocks - 1:
                    run.open()
        counts.append((graph_breaks(), run.counter.graphs, run.counter.recompiles))
        runs.append(run)
    spread = largest_difference(runs[0].model, runs[1].model)
    del counts[0], runs[0]
    difference = largest_difference(runs[0].model, runs[1].model)
    ratios = []
    timing = make_batches(cell.model, size, cell.k, ragged=ragged)
    if cell.blocks > 1:
        runs[1].open()
    for rep in range(reps):
        times = [0.0, 0.0]
        for index in (0, 1) if rep % 2 == 0 else (1, 0):  # either goes first as often
            start = time.perf_counter()
            runs[index].step(timing)
            times[index] = time.perf_counter() - start
        ratios.append(times[1] / times[0])
    runs[1].close()
    ratio = statistics.median(ratios) if reps else 0.0
    return Row(cell, counts[0], counts[1], difference, ratio, spread)


# ----------------------------------------------------------------------------- DDP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps compared")
    parser.add_argument("--reps", type=int, default=20, help="timed windows per loop")
    parser.add_argument("--only", default="", help="run the rows whose label contains this")
    parser.add_argument("--width", type=int, default=128, help="GPT width")
    parser.add_argument("--layers", type=int, default=4, help="GPT blocks")
    parser.add_argument("--tokens", type=int, default=64, help="GPT tokens per sequence")
    parser.add_argument("--smoke", action="store_true", help="a tiny GPT, one row, no timing")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True): the same bits from run to run",
    )
    args = parser.parse_args()
    torch.use_deterministic_algorithms(args.deterministic)
    size = Size(gpt_width=args.width, gpt_layers=args.layers, gpt_tokens=args.tokens)
    chosen = cells(size)
    if args.smoke:
        size = Size(gpt_width=32, gpt_layers=2, gpt_tokens=16, cnn_channels=4, cnn_image=8)
        chosen = [Cell("full", "gpt", 2, True)]
        args.backend, args.steps, args.reps = "aot_eager", 2, 2
    if args.only:
        chosen = [c for c in chosen if args.only in f"{c.model} {c.name} K={c.k}"]
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(
        f"torch {torch.__version__}, {platform.machine()}, backend {args.backend}, "
        f"{torch.get_num_threads()} threads, "
        f"{'deterministic, ' if args.deterministic else ''}"
        f"{args.steps} steps compared, median of {args.reps} alternated windows"
    )
    print(
        "| model | checkpointing, layout | K | hand: breaks · graphs · recompiles "
        "| torch_accum: breaks · graphs · recompiles | max param diff | hand vs itself "
        "| time / hand |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ddp = any(c.layout.startswith("ddp") for c in chosen)
    group = one_rank_group() if ddp else contextlib.nullcontext()
    with group:
        for cell in chosen:
            row = measure(cell, size, args.backend, args.steps, args.reps)
            hand = " · ".join(map(str, row.hand))
            lib = " · ".join(map(str, row.library))
            flag = "" if row.hand == row.library else " **≠**"
            print(
                f"| {cell.model} | {cell.name} | {cell.k} | {hand} | {lib}{flag} "
                f"| {row.difference:.1e} | {row.spread:.1e} | {row.ratio:.3f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
