"""torch_accum against a hand-written loop, Hugging Face Accelerate and PyTorch Lightning.

    pip install -e ".[bench]"              # accelerate and lightning
    python benchmarks/peers.py             # the full comparison, a few minutes on 2 CPU cores
    python benchmarks/peers.py --smoke     # tiny sizes, well under a minute; the tests run this

The same models, data and seeds go through five setups, each written as its documentation
recommends: (1) a plain full-batch loop, the reference; (2) the hand-written accumulation
loop, ``(loss / K).backward()`` and a step every K micro-batches; (3) torch_accum's
``Accumulator``; (4) Accelerate, ``Accelerator(gradient_accumulation_steps=K, cpu=True)``,
``accelerator.prepare(...)``, ``with accelerator.accumulate(model):`` and
``accelerator.backward(loss)``; (5) Lightning, ``Trainer(accumulate_grad_batches=K, ...)``.

Rows of the printed table:

1-3. exactness in float64 (max |parameter difference| from the full-batch reference) on
     full windows, on a final partial window, and for a token-mean loss over ragged,
     padded micro-batches;
4.   scheduler and optimizer steps over an epoch whose length is not a multiple of K;
5.   time per micro-batch relative to the hand-written loop, all setups timed in rotating
     order within one run (median of the per-repetition ratios), for a small MLP and a
     small GPT (examples/gpt.py);
6.   peak activation memory of one micro-batch's forward and backward of the GPT at the
     same effective batch size, measured with ``torch_accum.measure_activation_memory``,
     without and with activation checkpointing where a setup offers it.

The exit status is 1 when a torch_accum exactness target (<= 1e-10) is missed, else 0;
the timing target is printed, not enforced, since timings depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import math
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import torch_accum
from torch_accum import Accumulator, measure_activation_memory

try:
    import accelerate
    import lightning
    from accelerate import Accelerator
except ImportError as error:  # pragma: no cover - exercised by hand
    raise SystemExit(
        f"benchmarks/peers.py compares against Hugging Face Accelerate and PyTorch Lightning, "
        f"which are not importable here ({error}); install them with: pip install -e '.[bench]'"
    ) from error


def _load_example_gpt() -> Any:
    # examples/gpt.py is loaded from its path rather than by adding examples/ to sys.path:
    # a longer sys.path would slow Accelerate, which looks up an optional package with
    # importlib.util.find_spec on every optimizer step.
    path = Path(__file__).resolve().parent.parent / "examples" / "gpt.py"
    spec = importlib.util.spec_from_file_location("gpt", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpt"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


_gpt = _load_example_gpt()
GPT, GPTConfig = _gpt.GPT, _gpt.GPTConfig

TOLERANCE = 1e-10
OVERHEAD_TARGET = 1.02
PAD = 0
COLUMNS = ("full batch (ref)", "hand-written", "torch_accum", "Accelerate", "Lightning")
TOOLS = ("hand", "torch_accum", "accelerate", "lightning")  # the timed setups, in COLUMNS order

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


# --------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A model, its micro-batches and its loss, the same for every setup."""

    make_model: Callable[[], nn.Module]
    loss: LossFn  # mean-reduced over the micro-batch (samples, or non-pad tokens)
    micro_batches: list[Batch]
    merge: Callable[[list[Batch]], Batch]  # the micro-batches of a window as one full batch
    make_optimizer: OptimizerFactory
    make_scheduler: SchedulerFactory | None = None
    # Token-mean problems: the micro-batch's number of loss terms, and a sum-reduced loss.
    weight: Callable[[Batch], torch.Tensor] | None = None
    sum_loss: LossFn | None = None


def sgd(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


def adamw(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3)


def decaying(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)


def mlp_problem(count: int, scheduler: bool = False) -> Problem:
    """A float64 MLP regression; ``count`` micro-batches of 8 samples."""

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).double()

    generator = torch.Generator().manual_seed(1)
    micro_batches = [
        (
            torch.randn(8, 8, generator=generator, dtype=torch.float64),
            torch.randn(8, 4, generator=generator, dtype=torch.float64),
        )
        for _ in range(count)
    ]

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def merge(batches: list[Batch]) -> Batch:
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    return Problem(make_model, loss, micro_batches, merge, sgd, decaying if scheduler else None)


class TinyLM(nn.Module):
    """Embedding + linear next-token model: every position is independent of the padding."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


def ragged_lm_problem(count: int) -> Problem:
    """``count`` micro-batches of 4 sequences of 2..40 tokens, right-padded with PAD."""
    vocab = 50

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return TinyLM(vocab).double()

    generator = torch.Generator().manual_seed(2)
    micro_batches = []
    for _ in range(count):
        # Each micro-batch has its own longest length, so token counts differ a lot.
        longest = int(torch.randint(3, 41, (), generator=generator))
        lengths = torch.randint(2, longest + 1, (4,), generator=generator).tolist()
        tokens = torch.full((4, max(lengths)), PAD, dtype=torch.long)
        for row, length in enumerate(lengths):
            tokens[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        micro_batches.append(tokens)

    def logits_targets(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return model(tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1)

    def loss(model: nn.Module, tokens: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(*logits_targets(model, tokens), ignore_index=PAD)

    def sum_loss(model: nn.Module, tokens: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(
            *logits_targets(model, tokens), ignore_index=PAD, reduction="sum"
        )

    def n_tokens(tokens: Batch) -> torch.Tensor:
        return (tokens[:, 1:] != PAD).sum()

    def merge(batches: list[Batch]) -> Batch:
        width = max(t.shape[1] for t in batches)
        return torch.cat(
            [nn.functional.pad(t, (0, width - t.shape[1]), value=PAD) for t in batches]
        )

    return Problem(make_model, loss, micro_batches, merge, sgd, None, n_tokens, sum_loss)


# --------------------------------------------------------------------------- the setups
@dataclass
class Outcome:
    parameters: list[torch.Tensor]
    optimizer_steps: int
    scheduler_steps: int | None


def loader_of(micro_batches: list[Batch]) -> torch.utils.data.DataLoader:
    """The user's DataLoader: yields the prepared micro-batches in order, one per item."""
    return torch.utils.data.DataLoader(micro_batches, batch_size=None)


def count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    """A counter of the optimizer's real steps (a post-hook fires only when it steps)."""
    counter = [0]

    def hook(*_: object) -> None:
        counter[0] += 1

    optimizer.register_step_post_hook(hook)
    return counter


def outcome(model: nn.Module, steps: list[int], scheduler: Any) -> Outcome:
    return Outcome(
        [p.detach().clone() for p in model.parameters()],
        steps[0],
        None if scheduler is None else scheduler.last_epoch,
    )


def windows(items: list[Batch], k: int) -> list[list[Batch]]:
    return [items[i : i + k] for i in range(0, len(items), k)]


def fresh_setup(problem: Problem) -> tuple[nn.Module, torch.optim.Optimizer, Any, list[int]]:
    """A new model, optimizer and scheduler, and the optimizer's step counter."""
    model = problem.make_model()
    optimizer = problem.make_optimizer(model.parameters())
    scheduler = problem.make_scheduler(optimizer) if problem.make_scheduler else None
    return model, optimizer, scheduler, count_steps(optimizer)


def run_reference(problem: Problem, k: int) -> Outcome:
    """One full-batch step per window of K micro-batches (the last window may be shorter)."""
    model, optimizer, scheduler, steps = fresh_setup(problem)
    for window in windows(problem.micro_batches, k):
        optimizer.zero_grad()
        problem.loss(model, problem.merge(window)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return outcome(model, steps, scheduler)


def run_hand(problem: Problem, k: int) -> Outcome:
    """The loop users write by hand: ``loss / K`` and a step every K micro-batches."""
    model, optimizer, scheduler, steps = fresh_setup(problem)
    for index, batch in enumerate(loader_of(problem.micro_batches)):
        loss = problem.loss(model, batch) / k
        loss.backward()
        if (index + 1) % k == 0:
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
    return outcome(model, steps, scheduler)


def run_torch_accum(problem: Problem, k: int) -> Outcome:
    """The user's plain loop inside ``with acc:``; ``weight=n_tokens`` for a token mean."""
    model, optimizer, scheduler, steps = fresh_setup(problem)
    with Accumulator(model, optimizer, k, scheduler=scheduler) as acc:
        for batch in loader_of(problem.micro_batches):
            loss = problem.loss(model, batch)
            acc.backward(loss, weight=None if problem.weight is None else problem.weight(batch))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
    return outcome(model, steps, scheduler)


def run_accelerate(problem: Problem, k: int) -> Outcome:
    """Accelerate's documented loop; for a token mean, its documented recipe for it."""
    model, optimizer, scheduler, steps = fresh_setup(problem)
    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    objects = [model, optimizer, loader_of(problem.micro_batches)]
    prepared = accelerator.prepare(*objects, *([] if scheduler is None else [scheduler]))
    model_, optimizer_, loader = prepared[:3]
    scheduler_ = prepared[3] if scheduler is not None else None
    if problem.sum_loss is None:
        for batch in loader:
            with accelerator.accumulate(model_):
                loss = problem.loss(model_, batch)
                accelerator.backward(loss)
                optimizer_.step()
                if scheduler_ is not None:
                    scheduler_.step()
                optimizer_.zero_grad()
    else:
        accelerate_token_mean(accelerator, problem, model_, optimizer_, loader, k)
    accelerator.free_memory()
    return outcome(model, steps, scheduler)


def accelerate_token_mean(
    accelerator: Any, problem: Problem, model: nn.Module, optimizer: Any, loader: Any, k: int
) -> None:
    """Accelerate's recipe for a token mean, from its guide (usage_guides/gradient_accumulation,
    "Gradient accumulation on training samples of variable size"): prefetch each window,
    count its loss tokens, gather the count across processes, and scale a sum-reduced loss
    by ``K * num_processes / num_items_in_batch`` before ``accelerator.backward``."""
    assert problem.sum_loss is not None and problem.weight is not None
    iterator = iter(loader)
    total_updates = math.ceil(len(loader) / k)
    remainder = len(loader) % k or k
    for update_step in range(total_updates):
        count = k if update_step != total_updates - 1 else remainder
        batch_samples = [next(iterator) for _ in range(count)]
        num_items_in_batch = sum(problem.weight(batch) for batch in batch_samples)
        num_items_in_batch = accelerator.gather(num_items_in_batch).sum().item()
        for batch in batch_samples:  # one process: no model.no_sync() needed
            loss = problem.sum_loss(model, batch)
            loss = loss * k * accelerator.num_processes / num_items_in_batch
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    # Not in the recipe: end the prepared loader's iteration so that it deregisters from
    # Accelerate's process-wide GradientState before the next Accelerator uses it.
    next(iterator, None)


class LitModule(lightning.LightningModule):
    """A LightningModule around the same model, loss, optimizer and scheduler."""

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler
        self.steps = [0]
        self.scheduler: Any = None

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.model.parameters())
        self.steps = count_steps(optimizer)
        if self.make_scheduler is None:
            return optimizer
        self.scheduler = self.make_scheduler(optimizer)
        # interval="step": a per-step schedule, stepped with each real optimizer step.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"},
        }


def lightning_trainer(k: int, precision: str, callbacks: list[Any] | None = None) -> Any:
    return lightning.Trainer(
        accumulate_grad_batches=k,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def run_lightning(problem: Problem, k: int) -> Outcome:
    """``trainer.fit`` with ``accumulate_grad_batches=K``; ``precision="64-true"`` for float64."""
    module = LitModule(
        problem.make_model(), problem.loss, problem.make_optimizer, problem.make_scheduler
    )
    lightning_trainer(k, "64-true").fit(module, train_dataloaders=loader_of(problem.micro_batches))
    return outcome(module.model, module.steps, module.scheduler)


RUNS: dict[str, Callable[[Problem, int], Outcome]] = {
    "reference": run_reference,
    "hand": run_hand,
    "torch_accum": run_torch_accum,
    "accelerate": run_accelerate,
    "lightning": run_lightning,
}


def max_difference(a: Outcome, b: Outcome) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.parameters, b.parameters, strict=True))


def exactness(problem: Problem, k: int) -> dict[str, float]:
    outcomes = {name: run(problem, k) for name, run in RUNS.items()}
    return {name: max_difference(o, outcomes["reference"]) for name, o in outcomes.items()}


def step_counts(problem: Problem, k: int) -> dict[str, tuple[int, int]]:
    counts = {}
    for name, run in RUNS.items():
        result = run(problem, k)
        assert result.scheduler_steps is not None
        counts[name] = (result.scheduler_steps, result.optimizer_steps)
    return counts


# --------------------------------------------------------------------------- timing
@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    loss: LossFn
    micro_batches: list[Batch]


def mlp_workload(args: argparse.Namespace) -> Workload:
    """The model of benchmarks/overhead.py: per-step overhead shows on it."""
    width = args.mlp_width

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )

    generator = torch.Generator().manual_seed(3)
    micro_batches = [
        (
            torch.randn(args.mlp_batch_size, 64, generator=generator),
            torch.randint(0, 10, (args.mlp_batch_size,), generator=generator),
        )
        for _ in range(args.mlp_micro_batches)
    ]

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    params = sum(p.numel() for p in make_model().parameters())
    name = (
        f"MLP 64-{width}-{width}-10 ({params:,} parameters), float32, AdamW, micro-batch "
        f"{args.mlp_batch_size}, {args.mlp_micro_batches} micro-batches x "
        f"{args.mlp_repetitions} repetitions"
    )
    return Workload(name, make_model, loss, micro_batches)


def gpt_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        layers=args.gpt_layers, width=args.gpt_width, heads=4, context=args.gpt_context
    )


def make_gpt(args: argparse.Namespace) -> Callable[[], nn.Module]:
    config = gpt_config(args)

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return GPT(config)

    return make_model


def gpt_batch(config: GPTConfig, size: int, generator: torch.Generator) -> Batch:
    tokens = torch.randint(0, config.vocab_size, (size, config.context + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def gpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def gpt_workload(args: argparse.Namespace) -> Workload:
    config = gpt_config(args)
    micro = args.gpt_batch // args.accumulation_steps
    generator = torch.Generator().manual_seed(4)
    micro_batches = [gpt_batch(config, micro, generator) for _ in range(args.gpt_micro_batches)]
    params = sum(p.numel() for p in make_gpt(args)().parameters())
    name = (
        f"GPT {config.layers} blocks, width {config.width}, {config.context} tokens "
        f"({params:,} parameters), float32, AdamW, micro-batch {micro}, "
        f"{args.gpt_micro_batches} micro-batches x {args.gpt_repetitions} repetitions"
    )
    return Workload(name, make_gpt(args), gpt_loss, micro_batches)


class EpochTimer(lightning.Callback):
    """Lightning's epoch loop alone: from the epoch's start to its end, past the last step."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.end = time.perf_counter()


class Timers:
    """One timed run of each setup on a fresh model; each returns seconds (and extras)."""

    def __init__(self, work: Workload, k: int) -> None:
        self.work, self.k = work, k
        self.accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)

    def hand(self, data: list[Batch]) -> dict[str, float]:
        model, loader, k = self.work.make_model(), loader_of(data), self.k
        start = time.perf_counter()
        optimizer = adamw(model.parameters())
        for index, batch in enumerate(loader):
            loss = self.work.loss(model, batch) / k
            loss.backward()
            if (index + 1) % k == 0:
                optimizer.step()
                optimizer.zero_grad()
        return {"total": time.perf_counter() - start}

    def torch_accum(self, data: list[Batch]) -> dict[str, float]:
        model, loader = self.work.make_model(), loader_of(data)
        start = time.perf_counter()
        optimizer = adamw(model.parameters())
        with Accumulator(model, optimizer, self.k) as acc:
            for batch in loader:
                acc.backward(self.work.loss(model, batch))
                optimizer.step()
                optimizer.zero_grad()
        return {"total": time.perf_counter() - start}

    def accelerate(self, data: list[Batch]) -> dict[str, float]:
        model, loader, accelerator = self.work.make_model(), loader_of(data), self.accelerator
        start = time.perf_counter()
        optimizer = adamw(model.parameters())
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = self.work.loss(model, batch)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        seconds = time.perf_counter() - start
        accelerator.free_memory()  # untimed: drops the references prepare() keeps
        return {"total": seconds}

    def lightning(self, data: list[Batch]) -> dict[str, float]:
        module = LitModule(self.work.make_model(), self.work.loss, adamw)
        timer = EpochTimer()
        trainer = lightning_trainer(self.k, "32-true", [timer])
        loader = loader_of(data)
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        total = time.perf_counter() - start
        return {"total": total, "loop": timer.end - timer.start}


@dataclass
class Timing:
    micro_us: dict[str, float]  # median seconds per micro-batch, in microseconds
    ratio: dict[str, float]  # median over repetitions of time / hand-written time
    iqr: dict[str, tuple[float, float]]
    lightning_loop_ratio: float
    lightning_startup_ms: float


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def measure_overhead(work: Workload, k: int, repetitions: int, threads: int) -> Timing:
    timers = Timers(work, k)
    runs = {name: getattr(timers, name) for name in TOOLS}
    for run in runs.values():  # warm-up: first-call paths, allocator, Lightning's first fit
        torch.set_num_threads(threads)
        run(work.micro_batches[: 2 * k])
    seconds: dict[str, list[float]] = {name: [] for name in TOOLS}
    loop_seconds: list[float] = []
    ratios: dict[str, list[float]] = {name: [] for name in TOOLS}
    loop_ratios: list[float] = []
    for repetition in range(repetitions):
        shift = repetition % len(TOOLS)  # rotate the order: every setup runs in every slot
        current = {}
        for name in TOOLS[shift:] + TOOLS[:shift]:
            torch.set_num_threads(threads)
            gc.collect()
            current[name] = runs[name](work.micro_batches)
        for name in TOOLS:
            seconds[name].append(current[name]["total"])
            ratios[name].append(current[name]["total"] / current["hand"]["total"])
        loop_seconds.append(current["lightning"]["loop"])
        loop_ratios.append(current["lightning"]["loop"] / current["hand"]["total"])
    n = len(work.micro_batches)
    return Timing(
        micro_us={name: statistics.median(t) / n * 1e6 for name, t in seconds.items()},
        ratio={name: statistics.median(r) for name, r in ratios.items()},
        iqr={name: quartiles(r) for name, r in ratios.items()},
        lightning_loop_ratio=statistics.median(loop_ratios),
        lightning_startup_ms=statistics.median(
            total - loop for total, loop in zip(seconds["lightning"], loop_seconds, strict=True)
        )
        * 1e3,
    )


# --------------------------------------------------------------------------- memory
def checkpointed_gpt_forward(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """GPT.forward rewritten by hand with torch.utils.checkpoint around each block."""
    length = tokens.shape[1]
    positions = torch.arange(length, device=tokens.device)
    x = model.token_embedding(tokens) + model.position_embedding(positions)
    causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
    for block in model.blocks:
        x = checkpoint(block, x, attention_mask=causal, use_reentrant=False)
    return model.head(model.norm(x))


def peak_mib(forward: Callable[[], torch.Tensor], model: nn.Module) -> float:
    return measure_activation_memory(forward, parameters=model.parameters()).peak / 2**20


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, float | None]]:
    """Peak activation MiB of one micro-batch (the reference: one full batch), per setup."""
    k, make_model = args.accumulation_steps, make_gpt(args)
    config = gpt_config(args)
    generator = torch.Generator().manual_seed(5)
    full = gpt_batch(config, args.gpt_batch, generator)
    micro = (full[0][: args.gpt_batch // k], full[1][: args.gpt_batch // k])
    off: dict[str, float | None] = {}
    on: dict[str, float | None] = {"reference": None, "accelerate": None, "lightning": None}

    model = make_model()
    off["reference"] = peak_mib(lambda: gpt_loss(model, full), model)

    model = make_model()
    off["hand"] = peak_mib(lambda: gpt_loss(model, micro) / k, model)
    inputs, targets = micro
    on["hand"] = peak_mib(
        lambda: (
            nn.functional.cross_entropy(
                checkpointed_gpt_forward(model, inputs).flatten(0, 1), targets.flatten()
            )
            / k
        ),
        model,
    )

    def with_accumulator(checkpointing: bool) -> float:
        model = make_model()
        with Accumulator(model, adamw(model.parameters()), k, checkpointing=checkpointing):
            return peak_mib(lambda: gpt_loss(model, micro), model)

    off["torch_accum"], on["torch_accum"] = with_accumulator(False), with_accumulator(True)

    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    model = make_model()
    model, _ = accelerator.prepare(model, adamw(model.parameters()))
    with accelerator.accumulate(model):
        # accelerator.backward(loss) is loss / K then loss.backward(): the same graph.
        off["accelerate"] = peak_mib(lambda: gpt_loss(model, micro) / k, model)
    accelerator.free_memory()

    module = LitModule(make_model(), gpt_loss, adamw)
    # Lightning's automatic optimisation divides training_step's loss by K, then backward.
    off["lightning"] = peak_mib(lambda: module.training_step(micro, 0) / k, module)
    return {"off": off, "on": on}


# --------------------------------------------------------------------------- output
def scientific(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def table_row(label: str, cells: list[str]) -> str:
    return f"{label:<46} | " + " | ".join(f"{cell:>18}" for cell in cells)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny sizes and few repetitions; for the tests")
    add("--accumulation-steps", type=positive_int, default=4, help="K, for every row")
    add("--steps", type=positive_int, default=3, help="optimizer steps in rows 1 and 3")
    add(
        "--epoch-micro-batches",
        type=positive_int,
        default=10,
        help="rows 2 and 4; not a multiple of K",
    )
    add("--mlp-width", type=positive_int, default=256)
    add("--mlp-batch-size", type=positive_int, default=32, help="MLP micro-batch size")
    add(
        "--mlp-micro-batches",
        type=positive_int,
        default=400,
        help="per repetition; a multiple of K",
    )
    add("--mlp-repetitions", type=positive_int, default=61)
    add("--gpt-layers", type=positive_int, default=4)
    add("--gpt-width", type=positive_int, default=128)
    add("--gpt-context", type=positive_int, default=64)
    add("--gpt-batch", type=positive_int, default=32, help="effective batch; a multiple of K")
    add(
        "--gpt-micro-batches", type=positive_int, default=16, help="per repetition; a multiple of K"
    )
    add("--gpt-repetitions", type=positive_int, default=31)
    add("--threads", type=positive_int, default=1, help="torch.set_num_threads, for every row")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.mlp_width, args.mlp_micro_batches, args.mlp_repetitions = 2, 32, 32, 3
        args.gpt_layers, args.gpt_width, args.gpt_context = 2, 32, 16
        args.gpt_batch, args.gpt_micro_batches, args.gpt_repetitions = 8, 8, 3
    k = args.accumulation_steps
    if k < 2:
        parser.error(f"--accumulation-steps must be at least 2 to compare accumulation, got {k}")
    if args.epoch_micro_batches % k == 0 or args.epoch_micro_batches < k:
        parser.error(
            f"--epoch-micro-batches {args.epoch_micro_batches} must be larger than and not a "
            f"multiple of --accumulation-steps {k}, so that the epoch ends with a partial "
            f"window; e.g. {2 * k + k // 2}"
        )
    for flag in ("mlp_micro_batches", "gpt_micro_batches", "gpt_batch"):
        value = getattr(args, flag)
        if value % k:
            parser.error(
                f"--{flag.replace('_', '-')} {value} must be a multiple of --accumulation-steps "
                f"{k}, so that every setup does the same full windows; "
                f"e.g. {value - value % k or k}"
            )
    if args.gpt_width % 4:
        parser.error(f"--gpt-width {args.gpt_width} must be a multiple of the GPT's 4 heads")
    return args


def quiet_peers() -> None:
    """Silence the peers' banners and advice, which would interleave with the table."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", module=r"accelerate(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|num_workers|litlogger).*")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_peers()
    torch.set_num_threads(args.threads)
    k = args.accumulation_steps
    command = shlex.join(
        ["python", "benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"command: {command}")
    print(
        f"versions: torch {torch.__version__}, torch_accum {torch_accum.__version__}, "
        f"accelerate {accelerate.__version__}, lightning {lightning.__version__}, "
        f"Python {platform.python_version()} ({platform.machine()}, CPU, "
        f"torch.set_num_threads({args.threads}) for every row)"
    )

    rows: list[tuple[str, list[str]]] = []
    exact = {}
    for row, label, problem in (
        ("1", f"1. exact, full windows ({args.steps} x K={k})", mlp_problem(args.steps * k)),
        (
            "2",
            f"2. exact, partial window ({args.epoch_micro_batches} mb, K={k})",
            mlp_problem(args.epoch_micro_batches),
        ),
        (
            "3",
            f"3. exact, ragged token mean ({args.steps} x K={k})",
            ragged_lm_problem(args.steps * k),
        ),
    ):
        exact[row] = exactness(problem, k)
        marks = {"hand": "", "accelerate": "", "lightning": ""}
        if row == "2":
            marks = {"hand": " [b]", "accelerate": " [c]", "lightning": " [c]"}
        if row == "3":
            marks = {"hand": " [d]", "accelerate": " [e]", "lightning": " [f]"}
        cells = ["0 (ref)"] + [
            scientific(exact[row][name]) + marks.get(name, "")
            for name in ("hand", "torch_accum", "accelerate", "lightning")
        ]
        rows.append((label, cells))
    counts = step_counts(mlp_problem(args.epoch_micro_batches, scheduler=True), k)
    rows.append(
        (
            f"4. scheduler / optimizer steps ({args.epoch_micro_batches} mb, K={k})",
            [f"{counts[name][0]} / {counts[name][1]}" for name in RUNS],
        )
    )

    timings = {}
    for row, work, reps in (
        ("5a", mlp_workload(args), args.mlp_repetitions),
        ("5b", gpt_workload(args), args.gpt_repetitions),
    ):
        timings[row] = (work, measure_overhead(work, k, reps, args.threads))
        t = timings[row][1]
        cells = [
            "n/a",
            "1 (ref)",
            f"{t.ratio['torch_accum']:.3f}",
            f"{t.ratio['accelerate']:.3f}",
            f"{t.ratio['lightning']:.3f} (loop {t.lightning_loop_ratio:.2f})",
        ]
        name = "small MLP" if row == "5a" else "GPT"
        rows.append((f"{row}. time / micro-batch vs hand, {name} [g]", cells))

    memory = measure_memory(args)
    for row, key, label in (("6a", "off", "no checkpointing"), ("6b", "on", "checkpointing")):
        cells = []
        for name in RUNS:
            value = memory[key][name]
            cells.append("n/a [i]" if value is None else f"{value:.2f}")
        if key == "on":
            cells[0] = "n/a"
            cells[1] += " [h]"
        if key == "off":
            cells[0] += f" (B={args.gpt_batch})"
        rows.append((f"{row}. peak activation MiB, {label} [j]", cells))

    print()
    print(table_row("row", list(COLUMNS)))
    print("-" * (46 + 3 + 5 * 18 + 4 * 3))
    for label, cells in rows:
        print(table_row(label, cells))

    print("\nnotes:")
    for line in notes(args, timings, memory):
        print(f"  {line}")

    print("\ntargets for torch_accum:")
    failed = False
    for row in ("1", "2", "3"):
        value = exact[row]["torch_accum"]
        met = value <= TOLERANCE
        failed |= not met
        print(
            f"  row {row}: float64 difference {scientific(value)} <= {TOLERANCE:g}: {verdict(met)}"
        )
    for row, (_work, t) in timings.items():
        ratio = t.ratio["torch_accum"]
        peers = {name: t.ratio[name] for name in ("accelerate", "lightning")}
        below = all(ratio < value for value in peers.values())
        print(
            f"  row {row}: overhead ratio {ratio:.3f} (IQR {t.iqr['torch_accum'][0]:.3f}-"
            f"{t.iqr['torch_accum'][1]:.3f}) <= {OVERHEAD_TARGET}: "
            f"{verdict(ratio <= OVERHEAD_TARGET)}; below every peer's "
            f"({', '.join(f'{n} {v:.3f}' for n, v in peers.items())}): {verdict(below)}"
        )
    print(f"\nrun time: {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def notes(
    args: argparse.Namespace,
    timings: dict[str, tuple[Workload, Timing]],
    memory: dict[str, dict[str, float | None]],
) -> Iterator[str]:
    k = args.accumulation_steps
    yield (
        "Rows 1-3: float64, SGD(lr=0.1, momentum=0.9), same initialisation and data; max "
        "|parameter difference| from the full-batch reference, one step per window on the "
        "concatenated (for row 3: right-padded and concatenated) micro-batches. Rows 1, 2, 4: "
        "MLP 8-32-4, MSE, micro-batches of 8. Row 3: embedding+linear LM, micro-batches of 4 "
        "sequences of 2-40 tokens padded with PAD, cross_entropy(ignore_index=PAD), loss = "
        "mean over the window's non-PAD targets."
    )
    yield (
        "Accelerate: Accelerator(gradient_accumulation_steps=K, cpu=True), prepare(model, "
        "optimizer, dataloader[, scheduler]), `with accelerator.accumulate(model):`, "
        "accelerator.backward(loss) (which divides by K). Lightning: Trainer(accumulate_grad_"
        'batches=K, accelerator="cpu", devices=1, max_epochs=1, logger=False, '
        "enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False), "
        'precision="64-true" for rows 1-4, scheduler as {"interval": "step"}; training_step '
        "returns the mean loss (Lightning divides it by K). torch_accum: "
        "Accumulator(model, optimizer, K, scheduler=...) around the unchanged loop."
    )
    yield (
        f"[b] the hand-written loop steps only every K micro-batches: the last "
        f"{args.epoch_micro_batches % k} of the epoch are never applied (row 4: one step fewer)."
    )
    yield (
        f"[c] steps on the final partial window (Accelerate: sync_with_dataloader, "
        f"Lightning: last batch), but with the loss divided by K={k} rather than by the "
        f"{args.epoch_micro_batches % k} micro-batches it holds: that update is "
        f"{args.epoch_micro_batches % k}/{k} of the reference's."
    )
    yield (
        "[d] hand-written: per-micro-batch token means / K, i.e. the mean of means; exact "
        "only with the prefetching recipe of [e] written by hand."
    )
    yield (
        "[e] Accelerate, as its guide prescribes for samples of variable size (usage_guides/"
        "gradient_accumulation): prefetch each window's K batches, count the non-PAD targets, "
        "accelerator.gather the count, cross_entropy(reduction='sum') * K * num_processes / "
        "num_items_in_batch, accelerator.backward, step after the window (no accumulate()). "
        "torch_accum needs only acc.backward(loss, weight=n_tokens), without prefetching."
    )
    yield (
        f"[f] Lightning {lightning.__version__} documents no way to normalise by the window's "
        "token count with accumulate_grad_batches (Lightning-AI/pytorch-lightning#20350 is "
        "open), so this is its default: each micro-batch's token mean / K."
    )
    for row, (work, t) in timings.items():
        us = ", ".join(
            f"{name} {t.micro_us[name]:.1f}"
            + (
                f" (IQR of ratio {t.iqr[name][0]:.3f}-{t.iqr[name][1]:.3f})"
                if name != "hand"
                else ""
            )
            for name in TOOLS
        )
        yield f"[g] row {row}: {work.name}; us per micro-batch: {us}."
        yield (
            f"    Lightning's fit() start-up and teardown (fit minus the epoch loop): "
            f"{t.lightning_startup_ms:.1f} ms per fit, i.e. "
            f"{t.lightning_startup_ms * 1e3 / len(work.micro_batches):.1f} us per micro-batch "
            "of a repetition; the ratio in brackets ('loop') leaves it out."
        )
    yield (
        "[g] what is timed, per repetition, on a fresh model from the same seed, with the "
        "same DataLoader(micro_batches, batch_size=None) for all: hand-written and "
        "torch_accum: optimizer construction + the loop (torch_accum: + Accumulator(...) and "
        "its with-block); Accelerate: optimizer construction + accelerator.prepare(model, "
        "optimizer, dataloader) + the accumulate() loop (the Accelerator itself is built once "
        "per row); Lightning: the whole trainer.fit(module, dataloader) (the Trainer and "
        "module are built untimed), and, in brackets, its epoch loop alone (on_train_epoch_"
        "start to on_train_epoch_end). The setups run in rotating order within each "
        "repetition after one warm-up run each; the figure is the median over repetitions "
        f"of (setup time / hand-written time). K={k}, no scheduler, no clipping; "
        f"torch.set_num_threads({args.threads})."
    )
    yield (
        "[h] by hand: GPT.forward rewritten to call torch.utils.checkpoint.checkpoint(block, "
        "x, use_reentrant=False) per block; torch_accum: checkpointing=True."
    )
    yield (
        "[i] no one-flag activation checkpointing for a single-device model: Accelerate "
        "offers it only through FullyShardedDataParallelPlugin(activation_checkpointing=True) "
        "(FSDP), Lightning only through FSDPStrategy/DeepSpeedStrategy "
        "(activation_checkpointing_policy=...); the model's own code would have to call "
        "torch.utils.checkpoint, as in [h]."
    )
    config = gpt_config(args)
    ratio = memory["on"]["torch_accum"] / memory["off"]["torch_accum"]  # type: ignore[operator]
    yield (
        f"[j] torch_accum.measure_activation_memory(...).peak of one forward+backward of the "
        f"GPT ({config.layers} blocks, width {config.width}, {config.context} tokens) on a "
        f"micro-batch of {args.gpt_batch // k} sequences (effective batch {args.gpt_batch} = "
        f"K x {args.gpt_batch // k}); the reference column holds the full batch of "
        f"{args.gpt_batch} in one pass. Parameter gradients excluded. torch_accum with "
        f"checkpointing holds {ratio:.2f}x of its peak without."
    )


if __name__ == "__main__":
    raise SystemExit(main())
