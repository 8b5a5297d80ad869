"""One GPU acceptance run: every CUDA claim of torch_accum measured in one command.

    pip install --no-deps -e . && python benchmarks/gpu.py --out gpu-results   # <= 6 min, H100
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke    # CPU, tiny sizes; CI runs this

Writes ``gpu.json`` and ``gpu.md`` into ``--out`` (rewritten after every section, so a run
killed half-way keeps what it measured). Each section sets the library next to the same
loop written by hand, in the same process, and checks its targets (pass/fail):

1. fits: a GPT whose whole batch does not fit under a memory cap trains in it with
   accumulation and checkpointing (True, "selective", every=2); peaks, throughput against
   the unconstrained hand loop, measure_activation_memory against the CUDA allocator.
2. oom: step_batch(micro_batch_size="auto") recovers from real out-of-memory errors and
   ends bitwise equal to a run that never ran out (dropout and BatchNorm included).
3. precision: fp16 autocast + GradScaler (scale, skip, back-off), bf16 autocast, bf16
   weights, against a float64 reference and the hand loop.
4. syncs: host synchronisations per micro-batch and per optimizer step, each one named.
5. overhead: CUDA-event timing against the hand loop, small and medium GPT, K = 1, 4, 8.
6. compile: torch.compile with and without checkpointing against the compiled hand loop.
7. tests: the tests that skip without CUDA (``pytest -m cuda``).

With ``--smoke`` the same code runs on the CPU at tiny sizes; what needs CUDA is replaced
(the memory meter for the allocator, a simulated out-of-memory error, perf_counter for CUDA
events, the aot_eager backend for inductor) and every substitute is named in the notes.
Each section runs in try/except under its own time budget: an error is recorded and the
next section runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import math
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))
import memory as memory_bench  # noqa: E402
import overhead as overhead_bench  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402

import torch_accum  # noqa: E402
from torch_accum import Accumulator, Checkpointing  # noqa: E402

HAS_ACCUMULATION_DTYPE = "accumulation_dtype" in inspect.signature(Accumulator).parameters


@dataclass(frozen=True)
class Sizes:
    small: GPTConfig  # syncs, precision, overhead, compile
    medium: GPTConfig  # overhead
    micro: int  # micro-batch of the small and medium GPT
    micro_batches: int  # per timed repetition (overhead, compile)
    repetitions: int
    steps: int  # optimizer steps compared (precision, syncs)
    fits_width: int  # fits: memory.py's 12-block GPT
    fits_context: int
    fits_batch: int
    fits_k: int
    cap_gib: float
    oom_cap_gib: float
    oom_features: int  # oom: BatchNorm + dropout MLP
    oom_hidden: int
    budgets: dict[str, float]


GPU_SIZES = Sizes(
    small=GPTConfig(context=128, width=256, heads=4, layers=4),
    medium=GPTConfig(context=256, width=768, heads=12, layers=12),
    micro=8,
    micro_batches=16,
    repetitions=7,
    steps=4,
    fits_width=512,
    fits_context=512,
    fits_batch=64,
    fits_k=8,
    cap_gib=8.0,
    oom_cap_gib=4.0,
    oom_features=256,
    oom_hidden=2048,
    budgets={"tests": 40, "syncs": 20, "precision": 30, "oom": 35, "fits": 60},
)
SMOKE_SIZES = Sizes(
    small=GPTConfig(context=8, width=16, heads=2, layers=2),
    medium=GPTConfig(context=16, width=32, heads=2, layers=3),
    micro=2,
    micro_batches=8,
    repetitions=2,
    steps=2,
    fits_width=16,
    fits_context=16,
    fits_batch=8,
    fits_k=4,
    cap_gib=0.0,  # no allocator to cap: a virtual cap (see section_fits)
    oom_cap_gib=0.0,  # a simulated out-of-memory error (see section_oom)
    oom_features=8,
    oom_hidden=16,
    budgets={"tests": 60, "syncs": 30, "precision": 30, "oom": 20, "fits": 30},
)
DEFAULT_BUDGETS = {"overhead": 55, "compile": 85}
TOTAL_BUDGET_S = 330.0  # the sections' share of the issue's 6 minutes


# ---------------------------------------------------------------------------- bookkeeping
class SectionTimeout(BaseException):
    """Raised by SIGALRM when a section's budget runs out (BaseException: never swallowed)."""


@dataclass
class Section:
    name: str
    budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def row(self, **values: Any) -> None:
        self.rows.append(values)

    def target(
        self, name: str, value: Any, limit: str, passed: bool | None, source: str = "issue 27"
    ) -> None:
        """Record a check; ``passed=None`` means not applicable in this run (said in value)."""
        self.targets.append(
            {"target": name, "value": value, "limit": limit, "passed": passed, "source": source}
        )


@dataclass
class Context:
    device: torch.device
    smoke: bool
    sizes: Sizes

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def gpu_target(self, section: Section, name: str, value: Any, limit: str, ok: bool) -> None:
        """A target about GPU figures: checked on CUDA, recorded as not applicable on the CPU."""
        section.target(name, value, limit, ok if self.cuda else None)


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed(ctx: Context, fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()``: CUDA events on CUDA, perf_counter on the CPU."""
    if not ctx.cuda:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def interleaved(
    ctx: Context, runs: dict[str, Callable[[], Any]], repetitions: int
) -> dict[str, list[float]]:
    """Time each run ``repetitions`` times in a rotating order, after one warm-up call each."""
    for run in runs.values():
        run()
    names, times = list(runs), {name: [] for name in runs}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(ctx, runs[name]))
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


# ---------------------------------------------------------------------------- models, loops
class FlatGPT(GPT):
    """examples/gpt.py's GPT with logits as (tokens, vocab), for benchmarks/overhead.py's loops
    (``cross_entropy(model(x), y)`` with flattened targets)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).flatten(0, 1)


class HandCheckpointed(nn.Module):
    """A block run under torch.utils.checkpoint: checkpointing written by hand."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_by_hand(model: nn.Module) -> nn.Module:
    model.blocks = nn.ModuleList(HandCheckpointed(b) for b in model.blocks)  # type: ignore[union-attr]
    return model


def make_gpt(ctx: Context, config: GPTConfig, dtype: torch.dtype = torch.float32) -> FlatGPT:
    torch.manual_seed(0)
    return FlatGPT(config).to(ctx.device, dtype)


def gpt_data(ctx: Context, config: GPTConfig, count: int, size: int) -> list[Any]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(
        0, config.vocab_size, (count, size, config.context + 1), generator=generator
    )
    tokens = tokens.to(ctx.device)
    return [(t[:, :-1], t[:, 1:].flatten()) for t in tokens]


@dataclass(frozen=True)
class Features:
    name: str
    scaler: bool = False
    clip: float | None = None
    autocast: torch.dtype | None = None


def make_scaler(ctx: Context, features: Features) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(ctx.device.type) if features.scaler else None


def micro_loss(ctx: Context, model: nn.Module, batch: Any, features: Features) -> torch.Tensor:
    enabled = features.autocast is not None
    with torch.autocast(ctx.device.type, dtype=features.autocast, enabled=enabled):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])


def hand_loop(ctx, model, optimizer, data, k, features, scaler, poison=-1) -> Iterator[bool]:  # type: ignore[no-untyped-def]
    """The loop users write by hand; yields after each micro-batch whether it stepped."""
    for index, batch in enumerate(data):
        loss = micro_loss(ctx, model, batch, features) * (math.inf if index == poison else 1)
        (scaler.scale(loss / k) if scaler else loss / k).backward()
        boundary = (index + 1) % k == 0
        if boundary:
            if scaler is not None:
                if features.clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), features.clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                if features.clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), features.clip)
                optimizer.step()
            optimizer.zero_grad()
        yield boundary


def acc_loop(ctx, acc, model, optimizer, data, features, scaler, poison=-1) -> Iterator[bool]:  # type: ignore[no-untyped-def]
    """The same loop with the Accumulator: the loop's own calls, no division by K."""
    with acc:
        for index, batch in enumerate(data):
            loss = micro_loss(ctx, model, batch, features) * (math.inf if index == poison else 1)
            acc.backward(loss)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
            yield acc.sync_gradients


def drain(loop: Iterator[bool]) -> None:
    for _ in loop:
        pass


def make_accumulator(model, optimizer, k, features, scaler, **extra) -> Accumulator:  # type: ignore[no-untyped-def]
    return Accumulator(model, optimizer, k, scaler=scaler, max_grad_norm=features.clip, **extra)


# ---------------------------------------------------------------------------- 1. fits
def section_fits(ctx: Context, sec: Section) -> None:
    s = ctx.sizes
    args = argparse.Namespace(width=s.fits_width, context=s.fits_context)
    work = memory_bench.gpt_workload(args, ctx.device)
    x, y = work.make_batch(s.fits_batch)
    size = s.fits_batch // s.fits_k
    micro = [(x[i : i + size], y[i : i + size]) for i in range(0, s.fits_batch, size)]
    tokens = s.fits_batch * s.fits_context
    sec.notes.append(f"{work.name}; batch {s.fits_batch} = {s.fits_k} x {size}; AdamW")

    def hand_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any]) -> None:
        for batch in batches:
            (work.loss(model, batch) / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()

    def measure(loop: str, policy: Any, batches: list[Any]) -> dict[str, Any]:
        """Activation peak (MiB above the level before the step), step seconds, or OOM."""
        model = work.make_model()
        if loop == "hand" and policy:
            checkpoint_by_hand(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        acc = (
            None
            if loop == "hand"
            else Accumulator(model, optimizer, len(batches), checkpointing=policy)
        )

        def step() -> None:
            if acc is None:
                hand_step(model, optimizer, batches)
            else:
                memory_bench.timed_step(work, model, optimizer, acc, batches, time.perf_counter)

        try:
            step()  # warm-up; allocates the optimizer state
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                total = torch.cuda.max_memory_allocated() / 2**20
            else:  # CPU substitute: the meter on one micro-batch, under the same setting
                ckpt = acc if acc is not None else contextlib.nullcontext()
                with ckpt:
                    meter = torch_accum.measure_activation_memory(
                        lambda: work.loss(model, batches[0]), parameters=model.parameters()
                    )
                model.zero_grad(set_to_none=True)
                peak, total = meter.peak / 2**20, None
            seconds = statistics.median(timed(ctx, step) for _ in range(max(2, s.repetitions // 2)))
            return {"fits": True, "peak_mib": peak, "total_peak_mib": total, "seconds": seconds}
        except torch.OutOfMemoryError:
            return {"fits": False}
        finally:
            del model, optimizer, acc
            free_memory(ctx)

    unconstrained = measure("hand", False, [(x, y)])
    sec.row(
        setting="hand loop, whole batch, no cap",
        loop="hand",
        **unconstrained,
        tokens_per_s=tokens / unconstrained["seconds"],
    )
    if ctx.cuda:
        total_memory = torch.cuda.get_device_properties(ctx.device).total_memory
        cap = s.cap_gib * 2**30
        if unconstrained["total_peak_mib"] * 2**20 <= cap:
            cap = unconstrained["total_peak_mib"] * 2**20 / 2
            sec.notes.append("the whole batch fits in the requested cap: cap halved to its peak/2")
        torch.cuda.set_per_process_memory_fraction(cap / total_memory)
        sec.notes.append(f"cap {cap / 2**30:.2f} GiB of {total_memory / 2**30:.1f} GiB")
    else:
        cap = unconstrained["peak_mib"] * 2**20 / 2
        sec.notes.append(
            "CPU smoke: peaks are measure_activation_memory on one micro-batch; "
            "virtual cap = half the whole batch's peak; step times by perf_counter"
        )
    settings = [
        ("hand loop, whole batch", "hand", False, [(x, y)]),
        ("hand loop, K micro-batches", "hand", False, micro),
        ("hand loop, K, torch.utils.checkpoint by hand", "hand", True, micro),
        ("torch_accum, K, no checkpointing", "torch_accum", False, micro),
        ("torch_accum, K, checkpointing=True", "torch_accum", True, micro),
        ("torch_accum, K, 'selective'", "torch_accum", "selective", micro),
        ("torch_accum, K, every=2", "torch_accum", Checkpointing(every=2), micro),
    ]
    results = {}
    for name, loop, policy, batches in settings:
        r = measure(loop, policy, batches)
        if not ctx.cuda and r["fits"]:  # against the virtual cap
            r["fits"] = r["peak_mib"] * 2**20 <= cap
        r["tokens_per_s"] = tokens / r["seconds"] if "seconds" in r else None
        r["throughput_vs_unconstrained"] = (
            unconstrained["seconds"] / r["seconds"] if "seconds" in r else None
        )
        results[name] = r
        sec.row(setting=name + " (cap)", loop=loop, **r)
    if ctx.cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    whole = results["hand loop, whole batch"]
    sec.target(
        "the whole batch does not fit in the cap by hand",
        whole["fits"],
        "fits=False",
        not whole["fits"],
        source="script (premise)",
    )
    off = results["torch_accum, K, no checkpointing"]
    for name in ("checkpointing=True", "'selective'", "every=2"):
        r = results[f"torch_accum, K, {name}"]
        ctx.gpu_target(
            sec, f"GPT trains within the cap, accumulation + {name}", r["fits"], "True", r["fits"]
        )
    full = results["torch_accum, K, checkpointing=True"]
    if full["fits"] and off["fits"]:
        ratio = full["peak_mib"] / off["peak_mib"]
        ctx.gpu_target(
            sec,
            "activation peak, checkpointing=True / none (same K)",
            ratio,
            "<= 0.25",
            ratio <= 0.25,
        )
        speed = full["throughput_vs_unconstrained"]
        ctx.gpu_target(
            sec,
            "throughput, checkpointing=True in cap / unconstrained hand loop",
            speed,
            ">= 0.72",
            speed >= 0.72,
        )
    for policy in (False, True):  # the meter against the allocator, one micro-batch
        meter = memory_bench.micro_batch_memory(work, size, policy)
        free_memory(ctx)
        allocator = meter["cuda"] if ctx.cuda else None
        gap = abs(meter["peak"] - allocator) / allocator if allocator else None
        sec.row(
            setting=f"meter vs allocator, one micro-batch, checkpointing={policy}",
            loop="torch_accum",
            meter_peak_mib=meter["peak"],
            allocator_peak_mib=allocator,
            relative_gap=gap,
        )
        ctx.gpu_target(
            sec,
            f"measure_activation_memory within 5% of the allocator (ckpt={policy})",
            gap,
            "<= 0.05",
            gap is not None and gap <= 0.05,
        )


# ---------------------------------------------------------------------------- 2. oom
def make_oom_model(ctx: Context) -> nn.Module:
    torch.manual_seed(0)
    d, h = ctx.sizes.oom_features, ctx.sizes.oom_hidden
    return nn.Sequential(
        nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.1), nn.Linear(h, 10),
    ).to(ctx.device)  # fmt: skip


def section_oom(ctx: Context, sec: Section) -> None:
    s, capacity = ctx.sizes, None
    model = make_oom_model(ctx)
    loss_of = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    if ctx.cuda:  # size the batch so that it needs 2.5-5x the room under the cap
        cap = s.oom_cap_gib * 2**30
        total_memory = torch.cuda.get_device_properties(ctx.device).total_memory
        peaks = []
        for m in (256, 512):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            xs = torch.randn(m, s.oom_features, device=ctx.device)
            loss_of(model, (xs, torch.zeros(m, dtype=torch.long, device=ctx.device))).backward()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        per_sample = (peaks[1] - peaks[0]) / 256
        static = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        batch = 2 ** math.ceil(math.log2(2.5 * (cap - static) / per_sample))
        sec.notes.append(
            f"cap {cap / 2**30:.1f} GiB; {per_sample / 2**10:.0f} KiB/sample; "
            f"batch {batch} needs ~{batch * per_sample / (cap - static):.1f}x the room"
        )
    else:
        batch, capacity = 32, 8
        sec.notes.append(
            "CPU smoke: out-of-memory simulated (torch.OutOfMemoryError raised "
            f"above {capacity} samples); replay and bitwise comparison are real"
        )
    del model
    free_memory(ctx)
    generator = torch.Generator().manual_seed(2)
    batches = [  # on the host, as a data loader gives them: the cap is for the training
        (torch.randn(batch, s.oom_features, generator=generator),
         torch.randint(0, 10, (batch,), generator=generator))
        for _ in range(3)
    ]  # fmt: skip

    def train(micro_batch_size: int | str, by_hand: bool = False) -> tuple[nn.Module, Any]:
        model = make_oom_model(ctx)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def compute_loss(micro: Any) -> torch.Tensor:
            if capacity is not None and len(micro[0]) > capacity:
                raise torch.OutOfMemoryError(f"simulated: {len(micro[0])} > {capacity} samples")
            return loss_of(model, (micro[0].to(ctx.device), micro[1].to(ctx.device)))

        torch.manual_seed(3)
        if by_hand:  # the loop by hand, at the size the library found
            for x, y in batches:
                for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size)):  # type: ignore[arg-type]
                    (compute_loss((xs, ys)) * len(xs) / len(x)).backward()
                optimizer.step()
                optimizer.zero_grad()
            return model, None
        acc = Accumulator(model, optimizer, micro_batch_size=micro_batch_size)  # type: ignore[arg-type]
        with acc:
            for b in batches:
                acc.step_batch(b, compute_loss)
        return model, acc

    if ctx.cuda:
        torch.cuda.set_per_process_memory_fraction(cap / total_memory)
    try:
        start = time.perf_counter()
        auto, acc = train("auto")
        seconds = time.perf_counter() - start
        found = acc.micro_batch_size
        reference, _ = train(found)
        hand, _ = train(found, by_hand=True)
    finally:
        if ctx.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    state = lambda m: list(m.state_dict().values())  # noqa: E731 (parameters and buffers)
    equal = [torch.equal(a, b) for a, b in zip(state(auto), state(reference), strict=True)]
    hand_gap = max((a.double() - b.double()).abs().max().item()
                   for a, b in zip(state(hand), state(reference), strict=True))  # fmt: skip
    sec.row(
        loop="torch_accum, auto",
        batch=batch,
        micro_batch_size=found,
        oom_retries=acc.oom_retries,
        seconds=seconds,
        bitwise_equal_tensors=f"{sum(equal)}/{len(equal)}",
    )
    sec.row(
        loop="torch_accum, fixed size (never out of memory)", batch=batch, micro_batch_size=found
    )
    sec.row(
        loop="hand loop, fixed size",
        batch=batch,
        micro_batch_size=found,
        max_abs_diff_vs_reference=hand_gap,
    )
    sec.target("out-of-memory retries", acc.oom_retries, "1..3", 1 <= acc.oom_retries <= 3)
    sec.target(
        "parameters and buffers bitwise equal to the run without OOM",
        f"{sum(equal)}/{len(equal)}",
        "all",
        all(equal),
    )


# ---------------------------------------------------------------------------- 3. precision
def update(model: nn.Module, start: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [(p.double() - s.double()).flatten() for p, s in zip(model.parameters(), start)]
    )


def section_precision(ctx: Context, sec: Section) -> None:
    s, k = ctx.sizes, 4
    config = s.small
    data = gpt_data(ctx, config, s.steps * k, s.micro)
    start = [p.detach().clone() for p in make_gpt(ctx, config).parameters()]

    reference = make_gpt(ctx, config, torch.float64)  # the float64 full-batch reference
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(s.steps):
        window = data[step * k : (step + 1) * k]
        x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    exact = update(reference, start)
    del reference

    def train(loop: str, features: Features, dtype: torch.dtype, poison: int = -1, **extra: Any):  # type: ignore[no-untyped-def]
        model = make_gpt(ctx, config, dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler, scales = make_scaler(ctx, features), []
        if loop == "hand":
            steps = hand_loop(ctx, model, optimizer, data, k, features, scaler, poison)
            acc = None
        else:
            acc = make_accumulator(model, optimizer, k, features, scaler, **extra)
            steps = acc_loop(ctx, acc, model, optimizer, data, features, scaler, poison)
        for boundary in steps:
            if boundary and scaler is not None:
                scales.append(scaler.get_scale())
        return update(model, start), scales, acc

    fp16 = Features("fp16 autocast + GradScaler", scaler=True, autocast=torch.float16)
    runs = [
        (fp16, torch.float32, {}),
        (Features("bf16 autocast", autocast=torch.bfloat16), torch.float32, {}),
        (Features("bf16 weights"), torch.bfloat16, {}),
    ]
    if HAS_ACCUMULATION_DTYPE:
        runs.append(
            (Features("bf16 weights"), torch.bfloat16, {"accumulation_dtype": torch.float32})
        )
    else:
        sec.notes.append("Accumulator has no accumulation_dtype yet: bf16 weights without it only")
    if not ctx.cuda:
        sec.notes.append("CPU smoke: fp16 autocast and GradScaler on the CPU")
    norm = exact.norm().item()
    for features, dtype, extra in runs:
        hand, _, _ = train("hand", features, dtype)
        ours, _, _ = train("torch_accum", features, dtype, **extra)
        label = features.name + "".join(f", {k}={v}" for k, v in extra.items())
        hand_error, our_error = (
            (hand - exact).norm().item() / norm,
            (ours - exact).norm().item() / norm,
        )
        sec.row(mode=label, loop="hand", error_vs_float64=hand_error)
        sec.row(
            mode=label,
            loop="torch_accum",
            error_vs_float64=our_error,
            diff_vs_hand=(ours - hand).norm().item() / norm,
        )
        sec.target(
            f"{label}: error vs float64 <= 1.5x the hand loop's + 1e-6",
            our_error,
            f"<= {1.5 * hand_error + 1e-6:.3g}",
            our_error <= 1.5 * hand_error + 1e-6,
            source="script",
        )
    # Scale, skip, back-off: a non-finite micro-batch in the second window, in both loops.
    poison = k + 1
    hand, hand_scales, _ = train("hand", fp16, torch.float32, poison)
    ours, our_scales, acc = train("torch_accum", fp16, torch.float32, poison)
    sec.row(mode="fp16 + GradScaler, inf in window 2", loop="hand", scales=hand_scales)
    sec.row(
        mode="fp16 + GradScaler, inf in window 2",
        loop="torch_accum",
        scales=our_scales,
        skipped_steps=acc.skipped_steps,
        diff_vs_hand=(ours - hand).norm().item() / norm,
    )
    sec.target(
        "GradScaler: same scale after every step as the hand loop (skip + back-off)",
        our_scales,
        f"== {hand_scales}",
        our_scales == hand_scales,
        source="script",
    )
    backed_off = len(our_scales) > 1 and our_scales[1] < our_scales[0]
    sec.target(
        "the poisoned window skipped and the scale backed off",
        f"skipped_steps={acc.skipped_steps}",
        "skipped >= 1, scale halved",
        acc.skipped_steps >= 1 and backed_off,
        source="script",
    )


# ---------------------------------------------------------------------------- 4. syncs
class SyncCounter(TorchDispatchMode):
    """Counts aten._local_scalar_dense (.item(), float(t), bool(t)) with its call site."""

    def __init__(self, device_only: bool) -> None:
        super().__init__()
        self.device_only = device_only
        self.count = 0
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default and not (
            self.device_only and args[0].device.type == "cpu"
        ):
            self.count += 1
            self.sites[call_site()] += 1
        return func(*args, **(kwargs or {}))


def call_site() -> str:
    """Where .item() was called, after the torch_accum frame that led there, if any."""
    stack = traceback.extract_stack()
    last = max(i for i, f in enumerate(stack) if f.name == "__torch_dispatch__")
    frames = [  # the caller's frames, without the dispatch and dynamo wrappers
        f for f in stack[:last] if not re.search(r"_dynamo|torch.(_compile|utils._python_disp)", f.filename)
    ]  # fmt: skip
    inner = frames[-1]
    ours = next((f for f in reversed(frames) if "torch_accum" in Path(f.filename).parts), None)
    name = f"{Path(inner.filename).name}:{inner.lineno} {inner.name}"
    if ours is not None and ours is not inner:
        name = f"torch_accum/{Path(ours.filename).name}:{ours.lineno} {ours.name} -> {name}"
    elif ours is not None:
        name = "torch_accum/" + name
    return name


#: Why the library synchronises where the hand loop does not, by the code that does it.
JUSTIFIED = {
    "_gradients.py": "no scaler and no clipping: the window's inf/NaN verdict, to skip a "
    "non-finite update (on_nonfinite='skip') that the hand loop would apply",
    "_plain_update": "clipping: the total norm read once, to skip a non-finite window",
    "get_scale": "GradScaler.get_scale() before and after update(): tells a skipped step "
    "(skipped_steps, scheduler not stepped) from a real one",
}


def extra_syncs(hand: dict[str, float], ours: dict[str, float]) -> dict[str, str] | None:
    """The library's synchronisations per step that the hand loop does not make, explained.

    A site is matched to the hand loop's by its innermost frame (the ``.item()`` call);
    the rest is extra and named with the torch_accum frame that led to it.
    """
    left = Counter()
    for site, n in hand.items():
        left[site.split(" -> ")[-1]] += n
    extra = {}
    for site, n in ours.items():
        inner = site.split(" -> ")[-1]
        shared = min(n, left[inner])
        left[inner] -= shared
        if n > shared:
            why = next((v for key, v in JUSTIFIED.items() if key in site), "not explained")
            extra[site] = f"{n - shared:g}/step: {why}"
    return extra or None


def section_syncs(ctx: Context, sec: Section) -> None:
    s, k, config = ctx.sizes, 4, ctx.sizes.small
    data = gpt_data(ctx, config, (s.steps + 1) * k, s.micro)
    fp16 = torch.float16 if ctx.cuda else None
    variants = [
        Features("plain"),
        Features("clip", clip=1.0),
        Features("scaler", scaler=True, autocast=fp16),
        Features("scaler + clip", scaler=True, clip=1.0, autocast=fp16),
    ]
    if not ctx.cuda:
        sec.notes.append(
            "CPU smoke: counts every aten._local_scalar_dense (CPU tensors too); "
            "set_sync_debug_mode needs CUDA"
        )
    for features in variants:
        per_step, sites = {}, {}
        for loop in ("hand", "torch_accum"):
            model = make_gpt(ctx, config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = make_scaler(ctx, features)
            if loop == "hand":
                steps = hand_loop(ctx, model, optimizer, data, k, features, scaler)
            else:
                acc = make_accumulator(model, optimizer, k, features, scaler)
                steps = acc_loop(ctx, acc, model, optimizer, data, features, scaler)
            for _ in range(k):  # one warm-up window (optimizer state), not counted
                next(steps)
            counter, per_micro, debug = SyncCounter(device_only=ctx.cuda), [], 0
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if ctx.cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    with counter:
                        while True:
                            before = counter.count
                            try:
                                boundary = next(steps)
                            except StopIteration:
                                break
                            if not boundary:
                                per_micro.append(counter.count - before)
                finally:
                    if ctx.cuda:
                        torch.cuda.set_sync_debug_mode(0)
                debug = sum("synchroniz" in str(w.message) for w in caught)
            per_step[loop] = counter.count / s.steps
            sites[loop] = {site: n / s.steps for site, n in counter.sites.items()}
            sec.row(features=features.name, loop=loop, syncs_per_step=per_step[loop],
                    syncs_per_micro_batch=max(per_micro, default=0),
                    sync_debug_warnings_per_step=debug / s.steps if ctx.cuda else None,
                    sites=sites[loop])  # fmt: skip
            if loop == "torch_accum":
                sec.rows[-1]["extra_syncs_vs_hand"] = extra_syncs(sites["hand"], sites[loop])
                sec.target(
                    f"{features.name}: no sync per micro-batch",
                    max(per_micro, default=0),
                    "0",
                    max(per_micro, default=0) == 0,
                )
        extra = per_step["torch_accum"] - per_step["hand"]
        sec.target(f"{features.name}: syncs per step vs hand loop", extra, "<= +1", extra <= 1)


# ---------------------------------------------------------------------------- 5. overhead
def section_overhead(ctx: Context, sec: Section) -> None:
    s = ctx.sizes
    if not ctx.cuda:
        sec.notes.append("CPU smoke: perf_counter instead of CUDA events")
    for label, config in (("small", s.small), ("medium", s.medium)):
        for k in (1, 4, 8):
            data = gpt_data(ctx, config, s.micro_batches, s.micro)
            setups = {}
            for loop in ("hand", "torch_accum"):
                model = make_gpt(ctx, config)
                setups[loop] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
            runs = {
                "hand": lambda: overhead_bench.hand_written(*setups["hand"], data, k),
                "torch_accum": lambda: overhead_bench.with_accumulator(*setups["torch_accum"], data, k),
            }  # fmt: skip
            times = interleaved(ctx, runs, s.repetitions)
            ratios = [a / b for a, b in zip(times["torch_accum"], times["hand"])]
            ratio = statistics.median(ratios)
            per_micro = {n: statistics.median(t) / len(data) * 1e3 for n, t in times.items()}
            sec.row(
                model=f"{label} GPT ({config.layers}x{config.width})",
                k=k,
                hand_ms_per_micro_batch=per_micro["hand"],
                torch_accum_ms_per_micro_batch=per_micro["torch_accum"],
                median_ratio=ratio,
                min_ratio=min(ratios),
                max_ratio=max(ratios),
            )
            if label == "medium" and k == 4:
                ctx.gpu_target(sec, "overhead, medium GPT, K=4", ratio, "<= 1.02", ratio <= 1.02)
            del setups, runs
            free_memory(ctx)


# ---------------------------------------------------------------------------- 6. compile
def section_compile(ctx: Context, sec: Section) -> None:
    import torch._dynamo

    s, k, config = ctx.sizes, 4, ctx.sizes.small
    backend = "inductor" if ctx.cuda else "aot_eager"
    sec.notes.append(f"backend {backend}" + ("" if ctx.cuda else " (CPU smoke; inductor on CUDA)"))
    sec.notes.append(
        "graphs: new graphs compiled by that variant's first / second call "
        "(0 on the first: a graph compiled for an earlier variant was reused)"
    )
    counters = torch._dynamo.utils.counters
    limits = {n: getattr(torch._dynamo.config, n) for n in ("cache_size_limit", "recompile_limit")
              if hasattr(torch._dynamo.config, n)}  # fmt: skip
    for name in limits:  # four compiled models share GPT.forward's code: no eager fallback
        setattr(torch._dynamo.config, name, 64)
    data = gpt_data(ctx, config, s.micro_batches, s.micro)

    def hand(model: nn.Module, optimizer: torch.optim.Optimizer, _: Any) -> None:
        overhead_bench.hand_written(model, optimizer, data, k)

    def ours(model: nn.Module, optimizer: torch.optim.Optimizer, acc: Accumulator) -> None:
        drain(acc_loop(ctx, acc, model, optimizer, data, Features("plain"), None))

    variants = {  # name: (checkpoint by hand, the library's checkpointing, loop)
        "hand, compiled": (False, None, hand),
        "torch_accum, compiled": (False, False, ours),
        "hand, compiled, checkpoint by hand": (True, None, hand),
        "torch_accum, compiled, checkpointing=True": (False, True, ours),
    }
    try:
        torch._dynamo.reset()
        runs, models, rows = {}, {}, {}
        for name, (by_hand, policy, loop) in variants.items():
            model = make_gpt(ctx, config)
            if by_hand:
                checkpoint_by_hand(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            compiled = torch.compile(model, backend=backend)
            acc = (
                None
                if policy is None
                else Accumulator(compiled, optimizer, k, checkpointing=policy)
            )
            models[name], rows[name] = model, {}

            def run(c=compiled, o=optimizer, a=acc, f=loop, row=rows[name]) -> None:  # type: ignore[no-untyped-def]
                before = counters["stats"]["unique_graphs"]
                f(c, o, a)
                new = counters["stats"]["unique_graphs"] - before
                row["graphs_while_timing"] = row.get("graphs_while_timing", 0) + new

            runs[name] = run
            for call in ("first", "second"):
                counters.clear()
                rows[name][f"{call}_call_s"] = timed(ctx, runs[name])
                rows[name][f"graphs_{call}_call"] = counters["stats"]["unique_graphs"]
                breaks = dict(counters["graph_break"])
                if call == "first":
                    rows[name]["graph_breaks"] = sum(breaks.values())
                    reasons = {r.splitlines()[0][:100]: n for r, n in breaks.items()}
                    rows[name]["graph_break_reasons"] = reasons or None
            rows[name].pop("graphs_while_timing")
            rows[name]["graphs_while_timing"] = 0
        times = interleaved(ctx, runs, s.repetitions)
        pairs = (("hand, compiled", "torch_accum, compiled"),
                 ("hand, compiled, checkpoint by hand", "torch_accum, compiled, checkpointing=True"))  # fmt: skip
        for reference, name in pairs:
            for variant in (reference, name):
                gap = max((a - b).abs().max().item()
                          for a, b in zip(models[variant].parameters(), models[reference].parameters()))  # fmt: skip
                sec.row(variant=variant, **rows[variant],
                        ms_per_micro_batch=statistics.median(times[variant]) / len(data) * 1e3,
                        ratio_vs_hand=median_ratio(times, variant, reference),
                        max_abs_param_diff_vs_hand=gap)  # fmt: skip
            ok = rows[name]["graph_breaks"] <= rows[reference]["graph_breaks"]
            sec.target(f"{name}: graph breaks, no more than the compiled hand loop",
                       rows[name]["graph_breaks"], f"<= {rows[reference]['graph_breaks']}", ok,
                       source="script")  # fmt: skip
            again = rows[name]["graphs_second_call"]
            sec.target(f"{name}: no recompilation on the second call", again, "0", again == 0,
                       source="script")  # fmt: skip
        ours = {n: row["graphs_while_timing"] for n, row in rows.items() if "torch_accum" in n}
        sec.target("torch_accum variants: no recompilation while timing", ours, "0",
                   not any(ours.values()), source="script")  # fmt: skip
    finally:
        for name, value in limits.items():
            setattr(torch._dynamo.config, name, value)
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- 7. tests
def section_tests(ctx: Context, sec: Section) -> None:
    command = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rA",
               "-p", "no:cacheprovider"]  # fmt: skip
    sec.notes.append("command: " + " ".join(command[1:]))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            timeout=max(5.0, sec.budget_s - 5))  # fmt: skip
    outcomes: Counter[str] = Counter()
    for line in result.stdout.splitlines():
        skipped = re.match(r"SKIPPED \[(\d+)\] (\S+?):? (.*)", line)
        other = re.match(r"(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)(.*)", line)
        if skipped:
            cuda = "cuda" in skipped[3].lower()
            outcomes["SKIPPED (no CUDA)" if cuda else "SKIPPED (other)"] += int(skipped[1])
            sec.row(outcome="SKIPPED", test=skipped[2], count=int(skipped[1]), detail=skipped[3])
        elif other:
            outcomes[other[1]] += 1
            sec.row(outcome=other[1], test=other[2], detail=other[3].strip(" -") or None)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    sec.notes.append(f"pytest exit code {result.returncode}: {summary}")
    if result.returncode not in (0, 5) or not outcomes:
        sec.notes.append("stderr tail: " + result.stderr[-1500:])
    failed = outcomes["FAILED"] + outcomes["ERROR"]
    if ctx.cuda:
        ok = outcomes["PASSED"] > 0 and not failed and not outcomes["SKIPPED (no CUDA)"]
        sec.target("every CUDA test runs and passes", dict(outcomes), "PASSED only", ok)
    else:
        ok = outcomes["SKIPPED (no CUDA)"] > 0 and not failed and not outcomes["PASSED"]
        sec.target("-m cuda selects the CUDA tests; without CUDA they skip", dict(outcomes),
                   "SKIPPED (no CUDA) only", ok, source="script (smoke)")  # fmt: skip


# ---------------------------------------------------------------------------- driver
SECTIONS: dict[str, Callable[[Context, Section], None]] = {
    "tests": section_tests,
    "syncs": section_syncs,
    "precision": section_precision,
    "oom": section_oom,
    "fits": section_fits,
    "overhead": section_overhead,
    "compile": section_compile,
}


def run_section(ctx: Context, sec: Section, fn: Callable[[Context, Section], None]) -> None:
    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section {sec.name!r} ran past its budget of {sec.budget_s:.0f} s")

    alarm = hasattr(signal, "SIGALRM")
    if alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, sec.budget_s)
    start = time.perf_counter()
    try:
        fn(ctx, sec)
        sec.status = "ok"
    except SectionTimeout as error:
        sec.status, sec.error = "timeout", str(error)
    except Exception as error:
        sec.status = "error"
        sec.error = "".join(traceback.format_exception(error)[-6:])
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sec.seconds = time.perf_counter() - start
        if ctx.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.set_sync_debug_mode(0)
        free_memory(ctx)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# GPU acceptance run (`benchmarks/gpu.py`)",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {report['device']}; torch {report['torch']}; torch_accum "
        f"{report['torch_accum']}; Python {report['python']}; {report['started']}; "
        f"{report['seconds']:.0f} s",
    ]
    if report["smoke"]:
        lines += [
            "",
            "**Smoke run on the CPU: smoke figures at tiny sizes, not GPU measurements.**",
        ]
    result = {True: "pass", False: "**FAIL**", None: "n/a"}
    lines += ["", "## Targets", ""]
    lines += table([{"section": t["section"], "target": t["target"], "value": t["value"],
                     "limit": t["limit"], "result": result[t["passed"]], "source": t["source"]}
                    for t in report["targets"]])  # fmt: skip
    for name, sec in report["sections"].items():
        lines += [
            "",
            f"## {name}: {sec['status']} ({sec['seconds']:.1f} s of {sec['budget_s']:.0f} s)",
            "",
        ]
        lines += [f"- {note}" for note in sec["notes"]]
        if sec["error"]:
            lines += ["", "```", sec["error"].rstrip(), "```"]
        if sec["rows"]:
            lines += ["", *table(sec["rows"])]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], sections: list[Section], out: Path) -> None:
    report["sections"] = {
        s.name: {k: v for k, v in vars(s).items() if k != "name"} for s in sections
    }
    report["targets"] = [{"section": s.name, **t} for s in sections for t in s.targets]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu.json, gpu.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, for CI")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:  # tiny ops: one thread is faster, and immune to a busy machine's other jobs
        torch.set_num_threads(1)
    ctx = Context(device, smoke, SMOKE_SIZES if smoke else GPU_SIZES)
    name = (f"cuda ({torch.cuda.get_device_name()}, "
            f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
            if ctx.cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")  # fmt: skip
    report: dict[str, Any] = {
        "command": "python "
        + " ".join(
            [
                Path(sys.argv[0]).name if argv is None else "gpu.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "smoke": smoke,
        "device": name,
        "torch": torch.__version__,
        "torch_accum": torch_accum.__version__,
        "python": platform.python_version(),
        "accumulation_dtype_available": HAS_ACCUMULATION_DTYPE,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not args.smoke and smoke:
        report["note"] = "no CUDA device: ran the CPU smoke run instead"
    budgets = {**DEFAULT_BUDGETS, **ctx.sizes.budgets}
    selected = args.only or list(SECTIONS)
    sections = [Section(n, budgets[n]) for n in SECTIONS if n in selected]
    start = time.perf_counter()
    for sec in sections:
        report["seconds"] = time.perf_counter() - start
        left = TOTAL_BUDGET_S - report["seconds"]
        if left < 5:
            sec.status, sec.error = "skipped", "the run's total time budget is spent"
            continue
        sec.budget_s = min(sec.budget_s, left)
        print(f"[gpu.py] {sec.name} (budget {sec.budget_s:.0f} s) ...", flush=True)
        run_section(ctx, sec, SECTIONS[sec.name])
        print(f"[gpu.py] {sec.name}: {sec.status} in {sec.seconds:.1f} s", flush=True)
        report["seconds"] = time.perf_counter() - start
        write(report, sections, args.out)
    failed = [t for s in sections for t in s.targets if t["passed"] is False]
    print(f"[gpu.py] wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}; "
          f"{len(failed)} target(s) failed")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
