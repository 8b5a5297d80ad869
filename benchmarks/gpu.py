"""One GPU acceptance run: every CUDA claim of torch_accum measured by one command.

    pip install --no-deps -e . && python benchmarks/gpu.py --out gpu-results  # <= 7 min, H100
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke  # CPU, tiny sizes; the tests run it

Writes ``gpu.json`` and ``gpu.md`` into ``--out``, again after every section, so that a run
stopped half-way keeps what it measured. Each section runs the library next to the same
loop written by hand, in the same process, and checks its targets (pass / FAIL / n/a):

- tests: the tests that need CUDA (``pytest -m cuda``) all run and pass.
- syncs: host synchronisations per micro-batch and per optimizer step, each extra one named.
- precision: fp16 autocast + GradScaler (scale, skip, back-off), bf16 autocast, bf16
  weights, against a float64 reference and the hand loop.
- oom: ``step_batch(micro_batch_size="auto")`` recovers from real out-of-memory errors and
  ends bitwise equal to a run that never ran out (dropout and BatchNorm included).
- fits: a GPT whose whole batch does not fit under a memory cap trains in it with
  accumulation and checkpointing (True, "selective", every=2): peaks, throughput against
  the unconstrained hand loop, measure_activation_memory against the CUDA allocator.
- overhead: CUDA-event times against the hand loop, small and medium GPT, K = 1, 4, 8.
- compile: torch.compile with and without checkpointing against the compiled hand loop.
- autofit: ``benchmarks/autofit.py``'s grid and plans for a GPT at 20%, 50% and 100% of
  the whole batch's peak (the allocator's ``max_memory_allocated`` on CUDA), then training
  with each plan: its micro-batch peak against the budget, out-of-memory errors and
  allocator retries (``num_alloc_retries``), plan against the grid's best.

``--smoke`` runs the same code on the CPU at tiny sizes. What needs CUDA is replaced and
the replacement named in the section's notes (the memory meter for the allocator, a
simulated out-of-memory error, perf_counter for CUDA events, aot_eager for inductor);
targets about GPU figures then read "n/a". Every section runs in try/except under its own
time budget: an error or a timeout is recorded and the next section runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import memory as memory_bench  # noqa: E402
import overhead as overhead_bench  # noqa: E402
from _gpu_report import (  # noqa: E402
    Context,
    Section,
    free_memory,
    interleaved,
    ratios,
    run_section,
    timed,
    write,
)
from gpt import GPT, GPTConfig  # noqa: E402

import torch_accum  # noqa: E402
from torch_accum import Accumulator, Checkpointing  # noqa: E402
from torch_accum.checkpointing import ActivationCheckpointing  # noqa: E402

PACKAGE = str(Path(torch_accum.__file__).parent)
HAS_ACCUMULATION_DTYPE = "accumulation_dtype" in inspect.signature(Accumulator).parameters
TOTAL_BUDGET_S = 390.0  # the sections' share of issue 27's 6 minutes, + 1 for autofit (26)
SMALL = {  # by ctx.smoke
    False: GPTConfig(context=128, width=256, heads=4, layers=4),
    True: GPTConfig(context=8, width=16, heads=2, layers=2),
}
MEDIUM = {
    False: GPTConfig(context=256, width=768, heads=12, layers=12),
    True: GPTConfig(context=16, width=32, heads=2, layers=3),
}


# ---------------------------------------------------------------------------- models, loops
class FlatGPT(GPT):
    """examples/gpt.py's GPT with logits of shape (tokens, vocab), so that the loops of
    benchmarks/overhead.py (``cross_entropy(model(x), y)``) train it as they are."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).flatten(0, 1)


class HandCheckpointed(nn.Module):
    """A block under torch.utils.checkpoint: activation checkpointing written by hand."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_by_hand(model: Any) -> nn.Module:
    model.blocks = nn.ModuleList(HandCheckpointed(b) for b in model.blocks)
    return model  # type: ignore[no-any-return]


def make_gpt(ctx: Context, config: GPTConfig, dtype: torch.dtype = torch.float32) -> FlatGPT:
    torch.manual_seed(0)
    return FlatGPT(config).to(ctx.device, dtype)


def gpt_data(ctx: Context, config: GPTConfig, count: int, size: int) -> list[Any]:
    """``count`` micro-batches of ``size`` sequences: (tokens, flattened next tokens)."""
    generator = torch.Generator().manual_seed(1)
    shape = (count, size, config.context + 1)
    tokens = torch.randint(0, config.vocab_size, shape, generator=generator).to(ctx.device)
    return [(t[:, :-1], t[:, 1:].flatten()) for t in tokens]


@dataclass(frozen=True)
class Features:
    name: str
    scaler: bool = False
    clip: float | None = None
    autocast: torch.dtype | None = None

    def make_scaler(self, ctx: Context) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(ctx.device.type) if self.scaler else None

    def loss(self, ctx: Context, model: nn.Module, batch: Any, poison: bool) -> torch.Tensor:
        with torch.autocast(ctx.device.type, self.autocast, enabled=self.autocast is not None):
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return loss * math.inf if poison else loss  # a non-finite micro-batch, on request


def hand_loop(ctx, model, optimizer, data, k, features, scaler, poison=-1) -> Iterator[bool]:  # type: ignore[no-untyped-def]
    """The loop users write by hand; yields after each micro-batch whether it stepped."""
    for index, batch in enumerate(data):
        loss = features.loss(ctx, model, batch, index == poison) / k
        (scaler.scale(loss) if scaler else loss).backward()
        if (index + 1) % k == 0:
            if scaler is not None and features.clip is not None:
                scaler.unscale_(optimizer)
            if features.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), features.clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
        yield (index + 1) % k == 0


def acc_loop(ctx, acc, model, optimizer, data, features, scaler, poison=-1) -> Iterator[bool]:  # type: ignore[no-untyped-def]
    """The same loop with the Accumulator: the loop's own calls, no division by K."""
    with acc:
        for index, batch in enumerate(data):
            acc.backward(features.loss(ctx, model, batch, index == poison))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
            yield acc.sync_gradients


def train(ctx, loop, model, optimizer, data, k, features, poison=-1, **extra):  # type: ignore[no-untyped-def]
    """The loop ``loop`` ("hand" or "torch_accum") as a generator, with its Accumulator."""
    scaler = features.make_scaler(ctx)
    if loop == "hand":
        return hand_loop(ctx, model, optimizer, data, k, features, scaler, poison), None, scaler
    kwargs = {"scaler": scaler, "max_grad_norm": features.clip, **extra}
    acc = Accumulator(model, optimizer, k, **kwargs)
    return acc_loop(ctx, acc, model, optimizer, data, features, scaler, poison), acc, scaler


# ---------------------------------------------------------------------------- tests
def section_tests(ctx: Context, sec: Section) -> None:
    command = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rA"]
    sec.notes.append("command: python " + " ".join(command[1:]))
    result = subprocess.run(
        command, cwd=HERE.parent, capture_output=True, text=True, timeout=sec.budget_s - 5
    )
    outcomes: Counter[str] = Counter()
    for line in result.stdout.splitlines():
        skipped = re.match(r"SKIPPED \[(\d+)\] (\S+?):? (.*)", line)
        other = re.match(r"(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)(.*)", line)
        if skipped:
            kind = "SKIPPED (no CUDA)" if "cuda" in skipped[3].lower() else "SKIPPED (other)"
            outcomes[kind] += int(skipped[1])
            sec.row(outcome=kind, test=skipped[2], count=int(skipped[1]), detail=skipped[3])
        elif other:
            outcomes[other[1]] += 1
            sec.row(outcome=other[1], test=other[2], count=1, detail=other[3].strip(" -"))
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    sec.notes.append(f"pytest exit code {result.returncode}: {summary[0]}")
    if result.returncode not in (0, 5):
        sec.notes.append("stderr tail: " + result.stderr[-1500:])
    failed = outcomes["FAILED"] + outcomes["ERROR"]
    if ctx.cuda:
        ok = outcomes["PASSED"] > 0 and not failed and not outcomes["SKIPPED (no CUDA)"]
        sec.target("every CUDA test runs and passes", dict(outcomes), "PASSED only", ok)
    else:
        ok = outcomes["SKIPPED (no CUDA)"] > 0 and not failed and not outcomes["PASSED"]
        name = "-m cuda selects the CUDA tests, which skip without CUDA"
        sec.target(name, dict(outcomes), "SKIPPED (no CUDA)", ok, "script (smoke)")


# ---------------------------------------------------------------------------- syncs
class SyncCounter(TorchDispatchMode):
    """Counts aten._local_scalar_dense (``.item()``, ``float(t)``, ``bool(t)``) by call site;
    on CUDA only those of device tensors (the CPU ones do not synchronise)."""

    def __init__(self, device_only: bool) -> None:
        super().__init__()
        self.device_only, self.count, self.sites = device_only, 0, Counter[str]()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        scalar = func is torch.ops.aten._local_scalar_dense.default
        if scalar and not (self.device_only and args[0].device.type == "cpu"):
            self.count += 1
            self.sites[call_site()] += 1
        return func(*args, **(kwargs or {}))


def call_site() -> str:
    """Where ``.item()`` was called, after the torch_accum frame that led there, if any."""
    stack = traceback.extract_stack()
    last = max(i for i, f in enumerate(stack) if f.name == "__torch_dispatch__")
    wrapper = re.compile(r"_dynamo|torch.(_compile|utils._python_dispatch)")
    frames = [f for f in stack[:last] if not wrapper.search(f.filename)]
    ours = [f for f in frames if f.filename.startswith(PACKAGE)]
    name = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
    if ours and ours[-1] is not frames[-1]:
        name = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name} -> {name}"
    return "torch_accum/" + name if ours else name


#: Why the library synchronises where the hand loop does not, by the code that does it.
JUSTIFIED = {
    "_gradients.py": "no scaler and no clipping: the window's inf/NaN verdict, to skip a "
    "non-finite update (on_nonfinite='skip') that the hand loop would apply",
    "_plain_update": "clipping: the total norm read once, to skip a non-finite window",
    "_found_inf": "GradScaler: whether unscale_ found an inf/NaN in any optimizer's "
    "gradients, read once, so that a window is skipped for all optimizers or none",
}


def extra_syncs(hand: dict[str, float], ours: dict[str, float]) -> dict[str, str] | None:
    """The library's synchronisations per step that the hand loop does not make, explained.

    Sites match the hand loop's by their innermost frame (the ``.item()`` call).
    """
    left: Counter[str] = Counter()
    for site, n in hand.items():
        left[site.split(" -> ")[-1]] += n
    extra = {}
    for site, n in ours.items():
        shared = min(n, left[site.split(" -> ")[-1]])
        left[site.split(" -> ")[-1]] -= shared
        if n > shared:
            why = next((v for key, v in JUSTIFIED.items() if key in site), "not explained")
            extra[site] = f"{n - shared:g}/step: {why}"
    return extra or None


def count_syncs(ctx: Context, steps: Iterator[bool], windows: int) -> dict[str, Any]:
    """Synchronisations per step and per micro-batch, of ``steps`` after its first window."""
    while not next(steps):  # one warm-up window (optimizer state), not counted
        pass
    counter, per_micro = SyncCounter(device_only=ctx.cuda), [0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                before = 0
                for boundary in steps:
                    if not boundary:
                        per_micro.append(counter.count - before)
                    before = counter.count
        finally:
            if ctx.cuda:
                torch.cuda.set_sync_debug_mode(0)
    debug = sum("synchroniz" in str(w.message) for w in caught) / windows
    return {
        "syncs_per_step": counter.count / windows,
        "syncs_per_micro_batch": max(per_micro),
        "sync_debug_warnings_per_step": debug if ctx.cuda else None,
        "sites": {site: n / windows for site, n in counter.sites.items()},
    }


def section_syncs(ctx: Context, sec: Section) -> None:
    k, windows, config = 4, 3, SMALL[ctx.smoke]
    data = gpt_data(ctx, config, (windows + 1) * k, ctx.size(8, 2))
    fp16 = torch.float16 if ctx.cuda else None
    if not ctx.cuda:
        sec.notes.append(
            "CPU smoke: counts every aten._local_scalar_dense (CPU tensors too); "
            "no set_sync_debug_mode, no autocast"
        )
    for features in (
        Features("plain"),
        Features("clip", clip=1.0),
        Features("scaler", scaler=True, autocast=fp16),
        Features("scaler + clip", scaler=True, clip=1.0, autocast=fp16),
    ):
        found = {}
        for loop in ("hand", "torch_accum"):
            model = make_gpt(ctx, config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps, _, _ = train(ctx, loop, model, optimizer, data, k, features)
            found[loop] = count_syncs(ctx, steps, windows)
            sec.row(features=features.name, loop=loop, **found[loop])
        extra = extra_syncs(found["hand"]["sites"], found["torch_accum"]["sites"])
        sec.rows[-1]["extra_syncs_vs_hand"] = extra
        per_micro = found["torch_accum"]["syncs_per_micro_batch"]
        sec.target(f"{features.name}: syncs per micro-batch", per_micro, "0", per_micro == 0)
        extra = found["torch_accum"]["syncs_per_step"] - found["hand"]["syncs_per_step"]
        sec.target(
            f"{features.name}: syncs per step beyond the hand loop's", extra, "<= 1", extra <= 1
        )


# ---------------------------------------------------------------------------- precision
def section_precision(ctx: Context, sec: Section) -> None:
    k, windows, config = 4, ctx.size(4, 2), SMALL[ctx.smoke]
    data = gpt_data(ctx, config, windows * k, ctx.size(8, 2))

    def update(model: nn.Module, start: list[torch.Tensor]) -> torch.Tensor:
        pairs = zip(model.parameters(), start, strict=True)
        return torch.cat([(p.double() - s).flatten() for p, s in pairs])

    def run(loop: str, features: Features, dtype: torch.dtype, poison: int = -1, **extra: Any):  # type: ignore[no-untyped-def]
        """The update (float64) after ``windows`` steps of SGD, the scale after each, the acc."""
        model = make_gpt(ctx, config, dtype)
        start = [p.detach().double() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        steps, acc, scaler = train(ctx, loop, model, optimizer, data, k, features, poison, **extra)
        scales = [scaler.get_scale() for boundary in steps if boundary and scaler is not None]
        return update(model, start), scales, acc

    # The float64 reference: each window's micro-batches as one batch, no accumulation.
    windowed = [data[i : i + k] for i in range(0, len(data), k)]
    whole = [(torch.cat([b[0] for b in w]), torch.cat([b[1] for b in w])) for w in windowed]
    model = make_gpt(ctx, config, torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in hand_loop(ctx, model, optimizer, whole, 1, Features("float64"), None):
        pass
    exact = update(model, start)
    norm = exact.norm().item()

    fp16 = Features("fp16 autocast + GradScaler", scaler=True, autocast=torch.float16)
    cases: list[tuple[Features, torch.dtype, dict[str, Any]]] = [
        (fp16, torch.float32, {}),
        (Features("bf16 autocast", autocast=torch.bfloat16), torch.float32, {}),
        (Features("bf16 weights"), torch.bfloat16, {}),
    ]
    if HAS_ACCUMULATION_DTYPE:  # without it (None) and with float32 accumulation
        # float32 sums need Tensor.grad_dtype (torch >= 2.10); older torch refuses them.
        wide = (torch.float32,) if hasattr(torch.Tensor, "grad_dtype") else ()
        if not wide:
            sec.notes.append("torch without Tensor.grad_dtype: bf16 weights summed in bf16 only")
        for dtype in (None, *wide):
            cases.append((Features("bf16 weights"), torch.bfloat16, {"accumulation_dtype": dtype}))
        del cases[2]
    else:
        sec.notes.append("Accumulator has no accumulation_dtype yet: bf16 weights without it")
    if not ctx.cuda:
        sec.notes.append("CPU smoke: fp16 autocast and the GradScaler on the CPU")
    for features, dtype, extra in cases:
        label = features.name + "".join(f", {n}={v}" for n, v in extra.items())
        hand, _, _ = run("hand", features, dtype)
        ours, _, _ = run("torch_accum", features, dtype, **extra)
        hand_error, error = [(u - exact).norm().item() / norm for u in (hand, ours)]
        sec.row(mode=label, loop="hand", error_vs_float64=hand_error)
        gap = (ours - hand).norm().item() / norm
        sec.row(mode=label, loop="torch_accum", error_vs_float64=error, diff_vs_hand=gap)
        limit = 1.5 * hand_error + 1e-6
        name = f"{label}: error vs float64 within 1.5x the hand loop's"
        sec.target(name, error, f"<= {limit:.3g}", error <= limit, "script")
    # Scale, skip and back-off: one micro-batch of the second window is made non-finite.
    label = "fp16 + GradScaler, inf in window 2"
    hand, hand_scales, _ = run("hand", fp16, torch.float32, poison=k + 1)
    ours, scales, acc = run("torch_accum", fp16, torch.float32, poison=k + 1)
    sec.row(mode=label, loop="hand", scales=hand_scales)
    gap = (ours - hand).norm().item() / norm
    sec.row(
        mode=label, loop="torch_accum", scales=scales, skipped=acc.skipped_steps, diff_vs_hand=gap
    )
    name = "GradScaler: the scale after every step equals the hand loop's"
    sec.target(name, scales, f"== {hand_scales}", scales == hand_scales, "script")
    backed_off = acc.skipped_steps == 1 and scales[1] == scales[0] / 2
    name = "the non-finite window is skipped and the scale halved"
    sec.target(name, f"skipped_steps={acc.skipped_steps}", "1, halved", backed_off, "script")


# ---------------------------------------------------------------------------- oom
def make_oom_model(ctx: Context, features: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, 10),
    ).to(ctx.device)


def oom_batch_size(ctx: Context, sec: Section, features: int, hidden: int, cap: float) -> int:
    """A batch needing 2.5-5x the room under the cap: 2 or 3 halvings until it fits."""
    model, peaks = make_oom_model(ctx, features, hidden), []
    for m in (512, 512, 2048):  # the first one warms up (cuBLAS workspace)
        model.zero_grad(set_to_none=True)  # each peak then holds the gradients alike
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        x = torch.randn(m, features, device=ctx.device)
        nn.functional.cross_entropy(model(x), torch.zeros_like(x[:, 0]).long()).backward()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    per_sample = (peaks[2] - peaks[1]) / (2048 - 512)
    room = cap - 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    batch = min(2**21, 2 ** math.ceil(math.log2(2.5 * room / max(per_sample, 1.0))))
    sec.notes.append(
        f"cap {cap / 2**30:.1f} GiB, {per_sample / 2**10:.0f} KiB per sample: "
        f"batch {batch} needs {batch * per_sample / room:.1f}x the room"
    )
    return batch


def section_oom(ctx: Context, sec: Section) -> None:
    features, hidden, cap = ctx.size(256, 8), ctx.size(2048, 16), 4 * 2**30
    if ctx.cuda:
        batch, capacity = oom_batch_size(ctx, sec, features, hidden, cap), None
        free_memory(ctx)
    else:
        batch, capacity = 32, 8
        note = "CPU smoke: out-of-memory simulated (raised after the forward of more than "
        note += f"{capacity} samples: dropout drew random numbers, BatchNorm updated its "
        sec.notes.append(note + "statistics); the replay and the comparison are real")
    generator = torch.Generator().manual_seed(2)
    batches = [  # on the host, as a data loader gives them: the cap is for the training
        (
            torch.randn(batch, features, generator=generator),
            torch.randint(0, 10, (batch,), generator=generator),
        )
        for _ in range(3)
    ]

    def run(micro_batch_size: int | str, by_hand: bool = False) -> tuple[nn.Module, Any]:
        model = make_oom_model(ctx, features, hidden)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def compute_loss(micro: Any) -> torch.Tensor:
            x, y = micro[0].to(ctx.device), micro[1].to(ctx.device)
            loss = nn.functional.cross_entropy(model(x), y)
            if capacity is not None and len(x) > capacity:  # after the forward, as a real one
                raise torch.OutOfMemoryError(f"simulated: {len(x)} > {capacity} samples")
            return loss

        torch.manual_seed(3)
        if by_hand:  # the hand loop, at the size the library found
            for x, y in batches:
                for micro in zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True):  # type: ignore[arg-type]
                    (compute_loss(micro) * len(micro[0]) / len(x)).backward()
                optimizer.step()
                optimizer.zero_grad()
            return model, None
        acc = Accumulator(model, optimizer, micro_batch_size=micro_batch_size)  # type: ignore[arg-type]
        with acc:
            for b in batches:
                acc.step_batch(b, compute_loss)
        return model, acc

    if ctx.cuda:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
    start = time.perf_counter()
    auto, acc = run("auto")
    seconds = time.perf_counter() - start
    reference, _ = run(acc.micro_batch_size)
    hand, _ = run(acc.micro_batch_size, by_hand=True)
    state = lambda m: list(m.state_dict().values())  # noqa: E731 (parameters and buffers)
    equal = [torch.equal(a, b) for a, b in zip(state(auto), state(reference), strict=True)]
    pairs = zip(state(hand), state(reference), strict=True)
    gap = max((a.double() - b.double()).abs().max().item() for a, b in pairs)
    size, retries = acc.micro_batch_size, acc.oom_retries
    sec.row(
        loop="torch_accum, auto",
        batch=batch,
        micro_batch_size=size,
        oom_retries=retries,
        seconds=seconds,
        equal_tensors=f"{sum(equal)}/{len(equal)}",
    )
    sec.row(loop="torch_accum, that size from the start", micro_batch_size=acc.micro_batch_size)
    sec.row(loop="hand loop, that size", max_abs_diff_vs_reference=gap)
    sec.target("out-of-memory retries", acc.oom_retries, "1 to 3", 1 <= acc.oom_retries <= 3)
    name = "parameters and buffers bitwise equal to a run without out-of-memory errors"
    sec.target(name, f"{sum(equal)}/{len(equal)} tensors", "all", all(equal))


# ---------------------------------------------------------------------------- fits
def section_fits(ctx: Context, sec: Section) -> None:
    width, context, batch, k = ctx.size((512, 512, 64, 8), (16, 16, 8, 4))
    work = memory_bench.gpt_workload(argparse.Namespace(width=width, context=context), ctx.device)
    x, y = work.make_batch(batch)
    size = batch // k
    micro = [(x[i : i + size], y[i : i + size]) for i in range(0, batch, size)]
    sec.notes.append(f"{work.name}; batch {batch} = {k} x {size}; AdamW")

    def measure(loop: str, policy: Any, batches: list[Any]) -> dict[str, Any]:
        """Activation peak (MiB above the level before the step), step seconds; or no fit."""
        model = work.make_model()
        model = checkpoint_by_hand(model) if loop == "hand" and policy else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        acc = (
            Accumulator(model, optimizer, len(batches), checkpointing=policy)
            if loop != "hand"
            else None
        )

        def step() -> None:
            if acc is not None:
                memory_bench.timed_step(work, model, optimizer, acc, batches, time.perf_counter)
                return
            for batch in batches:
                (work.loss(model, batch) / len(batches)).backward()
            optimizer.step()
            optimizer.zero_grad()

        try:
            step()  # warm-up; allocates the optimizer state
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:  # CPU substitute: the meter on one micro-batch under the same setting
                with acc if acc is not None else contextlib.nullcontext():
                    forward = lambda: work.loss(model, batches[0])  # noqa: E731
                    meter = torch_accum.measure_activation_memory(
                        forward, parameters=model.parameters()
                    )
                    peak = meter.peak / 2**20
                model.zero_grad(set_to_none=True)
            seconds = statistics.median(timed(ctx, step) for _ in range(ctx.size(3, 2)))
            return {"fits": True, "peak_mib": peak, "seconds": seconds}
        except torch.OutOfMemoryError:
            return {"fits": False}

    free = measure("hand", False, [(x, y)])
    sec.row(setting="hand loop, whole batch, no cap", **free)
    free_memory(ctx)
    if ctx.cuda:
        cap, total = 8 * 2**30, torch.cuda.get_device_properties(ctx.device).total_memory
        if torch.cuda.max_memory_allocated() <= cap:
            cap = torch.cuda.max_memory_allocated() // 2
            sec.notes.append("the whole batch fits in 8 GiB: the cap is half its peak instead")
        torch.cuda.set_per_process_memory_fraction(cap / total)
        sec.notes.append(f"cap {cap / 2**30:.2f} GiB of {total / 2**30:.0f} GiB")
    else:
        cap = free["peak_mib"] * 2**20 / 2
        sec.notes.append(
            "CPU smoke: peak = measure_activation_memory of one micro-batch; "
            "a virtual cap of half the whole batch's peak; perf_counter"
        )
    settings = {
        "hand loop, whole batch": ("hand", False, [(x, y)]),
        "hand loop, K micro-batches": ("hand", False, micro),
        "hand loop, K, torch.utils.checkpoint": ("hand", True, micro),
        "torch_accum, K": ("torch_accum", False, micro),
        "torch_accum, K, checkpointing=True": ("torch_accum", True, micro),
        "torch_accum, K, 'selective'": ("torch_accum", "selective", micro),
        "torch_accum, K, every=2": ("torch_accum", Checkpointing(every=2), micro),
    }
    found = {}
    for name, (loop, policy, batches) in settings.items():
        r = found[name] = measure(loop, policy, batches)
        free_memory(ctx)
        r["fits"] = r["fits"] and (ctx.cuda or r["peak_mib"] * 2**20 <= cap)
        if "seconds" in r:
            r["throughput_vs_free_hand_loop"] = free["seconds"] / r["seconds"]
        sec.row(setting=name + " (in the cap)", **r)
    if ctx.cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    whole, off = found["hand loop, whole batch"], found["torch_accum, K"]
    name = "premise: the whole batch does not fit in the cap"
    sec.target(name, whole["fits"], "False", not whole["fits"], "script")
    for policy in ("checkpointing=True", "'selective'", "every=2"):
        fits = found[f"torch_accum, K, {policy}"]["fits"]
        ctx.gpu_target(sec, f"trains within the cap: K + {policy}", fits, "True", fits)
    full = found["torch_accum, K, checkpointing=True"]
    if full["fits"] and off["fits"]:
        ratio = full["peak_mib"] / off["peak_mib"]
        name = "activation peak: checkpointing=True / none, same K"
        ctx.gpu_target(sec, name, ratio, "<= 0.25", ratio <= 0.25)
        speed = full["throughput_vs_free_hand_loop"]
        name = "throughput: K + checkpointing=True in the cap / hand loop without cap"
        ctx.gpu_target(sec, name, speed, ">= 0.72", speed >= 0.72)
    for policy in (False, True):  # the meter against the allocator, one micro-batch
        memory = memory_bench.micro_batch_memory(work, size, policy)
        free_memory(ctx)
        allocator = memory["cuda"] if ctx.cuda else None
        gap = abs(memory["peak"] - allocator) / allocator if allocator else None
        sec.row(
            setting=f"one micro-batch, checkpointing={policy}",
            meter_peak_mib=memory["peak"],
            allocator_peak_mib=allocator,
            meter_vs_allocator=gap,
        )
        name = f"measure_activation_memory vs allocator peak, checkpointing={policy}"
        ctx.gpu_target(sec, name, gap, "within 5%", gap is not None and gap <= 0.05)


# ---------------------------------------------------------------------------- autofit
def section_autofit(ctx: Context, sec: Section) -> None:
    """benchmarks/autofit.py on the device, then training with each plan under its budget."""
    # By path: examples/ (on sys.path for the GPT) has an autofit.py of its own.
    spec = importlib.util.spec_from_file_location("autofit_benchmark", HERE / "autofit.py")
    autofit_bench = importlib.util.module_from_spec(cast(Any, spec))
    cast(Any, spec).loader.exec_module(autofit_bench)

    width, context, total = ctx.size((512, 256, 32), (16, 16, 8))
    work = memory_bench.gpt_workload(argparse.Namespace(width=width, context=context), ctx.device)
    model = work.make_model()
    batch = work.make_batch(total)

    def compute_loss(micro: Any) -> torch.Tensor:
        return work.loss(model, micro)

    retries_before = allocator_retries(ctx)
    rows = autofit_bench.run_case(
        work.name,
        model,
        batch,
        compute_loss,
        total,
        device=ctx.device,
        clock=time.perf_counter,
        fractions=(0.2, 0.5, 1.0),
        rounds=ctx.size(5, 2),
    )
    planning_retries = allocator_retries(ctx) - retries_before
    sec.notes.append(
        f"{work.name}; effective batch {total}; budgets: fractions of the whole batch's peak "
        "without checkpointing (the allocator's on CUDA, the meter's on the CPU); grid and "
        "plan in one process, timed with perf_counter after synchronizing"
    )
    for row in rows:
        plan = row.pop("chosen_plan")
        budget = row["budget"]
        # Train one step with the plan: the peak of each micro-batch, measured again
        # outside the planner, and the errors and retries the allocator met.
        peak, errors, retries = train_with_plan(ctx, model, batch, compute_loss, plan)
        label = f"{int(row['fraction'] * 100)}%"
        sec.row(
            budget=label,
            budget_mib=budget / 2**20,
            plan=row["plan"],
            plan_vs_grid_best=row["ratio"],
            largest_without_checkpointing=row["largest_off"],
            full_checkpointing_largest=row["full_largest"],
            planning_s=row["planning_s"][0],
            grid_s=row["grid_s"][0],
            trained_peak_mib=peak / 2**20,
            out_of_memory_errors=errors,
            allocator_retries=retries,
        )
        ratio = row["ratio"]
        ctx.gpu_target(sec, f"{label}: plan samples/s / grid's best", ratio, ">= 0.95",
                       ratio >= 0.95)  # fmt: skip
        fits = peak <= budget
        name = f"{label}: planned micro-batch peak <= budget (trained, measured again)"
        sec.target(name, peak / budget, "<= 1", fits, "issue 26")
        ctx.gpu_target(sec, f"{label}: out-of-memory errors training with the plan", errors,
                       "0", errors == 0)  # fmt: skip
        ctx.gpu_target(sec, f"{label}: allocator retries training with the plan", retries,
                       "0", retries == 0)  # fmt: skip
        share = row["planning_s"][0] / row["grid_s"][0]
        ctx.gpu_target(sec, f"{label}: planning time / grid's", share, "<= 0.10", share <= 0.10)
    sec.row(allocator_retries_while_planning_and_grid=planning_retries)
    for target in sec.targets:
        target["source"] = "issue 26"


def allocator_retries(ctx: Context) -> int:
    if not ctx.cuda:
        return 0
    return int(torch.cuda.memory_stats(ctx.device).get("num_alloc_retries", 0))


def train_with_plan(
    ctx: Context, model: nn.Module, batch: Any, compute_loss: Callable[[Any], Any], plan: Any
) -> tuple[int, int, int]:
    """(peak bytes of a planned micro-batch, out-of-memory errors, allocator retries).

    The peak is ``measure_activation_memory``'s under the plan's checkpointing (on CUDA the
    allocator's, gradients included), as the planner counts it; then one optimizer step of
    ``step_batch`` with the plan (learning rate 0: the model stays as it was).
    """
    checkpointing = None
    if plan.checkpointing is not False:
        checkpointing = ActivationCheckpointing(model, plan.checkpointing)
        checkpointing.install()
    micro = tuple(t[: plan.micro_batch_size] for t in batch)
    try:
        memory = torch_accum.measure_activation_memory(
            lambda: compute_loss(micro), parameters=model.parameters()
        )
    finally:
        if checkpointing is not None:
            checkpointing.restore()
        model.zero_grad(set_to_none=True)
    peak = max(memory.peak, memory.cuda_max_allocated or 0)
    free_memory(ctx)
    retries, errors = allocator_retries(ctx), 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        with plan.accumulator(model, optimizer) as acc:
            acc.step_batch(batch, compute_loss)
    except torch.OutOfMemoryError:
        errors += 1
    model.zero_grad(set_to_none=True)
    free_memory(ctx)
    return peak, errors, allocator_retries(ctx) - retries


# ---------------------------------------------------------------------------- overhead
def section_overhead(ctx: Context, sec: Section) -> None:
    if not ctx.cuda:
        sec.notes.append("CPU smoke: perf_counter instead of CUDA events")
    for label, config in (("small", SMALL[ctx.smoke]), ("medium", MEDIUM[ctx.smoke])):
        for k in (1, 4, 8):
            data = gpt_data(ctx, config, ctx.size(16, 8), ctx.size(8, 2))
            hand, ours = make_gpt(ctx, config), make_gpt(ctx, config)
            runs = {
                "hand": overhead_run(overhead_bench.hand_written, hand, data, k),
                "torch_accum": overhead_run(overhead_bench.with_accumulator, ours, data, k),
            }
            times = interleaved(ctx, runs, ctx.size(7, 2))
            ratio = ratios(times, "torch_accum", "hand")
            per_micro = {n: statistics.median(t) / len(data) * 1e3 for n, t in times.items()}
            sec.row(
                model=f"{label} GPT ({config.layers}x{config.width})",
                k=k,
                hand_ms_per_micro_batch=per_micro["hand"],
                torch_accum_ms_per_micro_batch=per_micro["torch_accum"],
                median_ratio=statistics.median(ratio),
                min_ratio=min(ratio),
                max_ratio=max(ratio),
            )
            if (label, k) == ("medium", 4):
                value = statistics.median(ratio)
                ctx.gpu_target(sec, "overhead: medium GPT, K=4", value, "<= 1.02", value <= 1.02)
            del hand, ours, runs
            free_memory(ctx)


def overhead_run(
    loop: Callable[..., None], model: nn.Module, data: Any, k: int
) -> Callable[[], None]:
    """One call of benchmarks/overhead.py's ``loop`` on ``model`` with its own AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return lambda: loop(model, optimizer, data, k)


# ---------------------------------------------------------------------------- compile
def section_compile(ctx: Context, sec: Section) -> None:
    import torch._dynamo

    k, config = 4, ctx.size(GPTConfig(context=128, width=256, heads=4, layers=2), SMALL[True])
    backend = "inductor" if ctx.cuda else "aot_eager"
    sec.notes.append(f"backend {backend}" + ("" if ctx.cuda else " (CPU smoke)"))
    note = f"GPT {config.layers}x{config.width}, K={k}; graphs: new graphs compiled by a call"
    sec.notes.append(note + " (0 on a first call: a graph compiled before was reused)")
    counters = torch._dynamo.utils.counters
    names = [n for n in ("cache_size_limit", "recompile_limit") if hasattr(torch._dynamo.config, n)]
    limits = {n: getattr(torch._dynamo.config, n) for n in names}
    for name in limits:  # four models share GPT.forward's code: no fallback to eager
        setattr(torch._dynamo.config, name, 64)
    data = gpt_data(ctx, config, ctx.size(16, 8), ctx.size(8, 2))
    variants = {  # name: (checkpoint by hand, the library's checkpointing or None: hand loop)
        "hand, compiled": (False, None),
        "torch_accum, compiled": (False, False),
        "hand, compiled, torch.utils.checkpoint": (True, None),
        "torch_accum, compiled, checkpointing=True": (False, True),
    }
    try:
        torch._dynamo.reset()
        runs, models, rows = {}, {}, {}
        for name, (by_hand, policy) in variants.items():
            model = models[name] = make_gpt(ctx, config)
            compiled = torch.compile(
                checkpoint_by_hand(model) if by_hand else model, backend=backend
            )
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            acc = (
                None
                if policy is None
                else Accumulator(compiled, optimizer, k, checkpointing=policy)
            )
            row = rows[name] = {"variant": name, "graphs": 0}
            sec.rows.append(row)  # filled in as it is measured: a timeout keeps what was

            def run(c=compiled, o=optimizer, a=acc, row=row) -> None:  # type: ignore[no-untyped-def]
                before = counters["stats"]["unique_graphs"]
                if a is None:
                    overhead_bench.hand_written(c, o, data, k)
                else:  # overhead_bench.with_accumulator, with one Accumulator for all calls
                    with a:
                        for x, y in data:
                            a.backward(nn.functional.cross_entropy(c(x), y))
                            o.step()
                            o.zero_grad()
                row["graphs"] += counters["stats"]["unique_graphs"] - before

            runs[name] = run
            for call in ("first", "second"):
                counters.clear()
                row[f"{call}_call_s"] = timed(ctx, run)
                row[f"graphs_{call}_call"], row["graphs"] = row["graphs"], 0
                if call == "first":
                    reasons = counters["graph_break"].items()
                    breaks = {r.splitlines()[0][:100]: n for r, n in reasons}
                    row.update(graph_breaks=sum(breaks.values()), graph_break_reasons=breaks)
        times = interleaved(ctx, runs, ctx.size(7, 2))
        for reference, name in (
            ("hand, compiled", "torch_accum, compiled"),
            ("hand, compiled, torch.utils.checkpoint", "torch_accum, compiled, checkpointing=True"),
        ):
            for variant in (reference, name):
                pairs = zip(
                    models[variant].parameters(), models[reference].parameters(), strict=True
                )
                rows[variant].update(
                    graphs_while_timing=rows[variant].pop("graphs"),
                    ms_per_micro_batch=statistics.median(times[variant]) / len(data) * 1e3,
                    ratio_vs_hand=statistics.median(ratios(times, variant, reference)),
                    max_abs_param_diff_vs_hand=max((a - b).abs().max().item() for a, b in pairs),
                )
            ours, theirs = rows[name]["graph_breaks"], rows[reference]["graph_breaks"]
            limit = f"<= {theirs} (hand)"
            sec.target(f"{name}: graph breaks", ours, limit, ours <= theirs, "script")
            again = rows[name]["graphs_second_call"] + rows[name]["graphs_while_timing"]
            name = f"{name}: recompilations after the first call"
            sec.target(name, again, "0", again == 0, "script")
    finally:
        for name, value in limits.items():
            setattr(torch._dynamo.config, name, value)
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- driver
SECTIONS: dict[str, tuple[Callable[[Context, Section], None], float]] = {
    "tests": (section_tests, 50),
    "syncs": (section_syncs, 20),
    "precision": (section_precision, 30),
    "oom": (section_oom, 35),
    "fits": (section_fits, 55),
    "overhead": (section_overhead, 50),
    "compile": (section_compile, 85),
    "autofit": (section_autofit, 60),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu.json, gpu.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, for CI")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    ctx = Context(torch.device("cpu" if smoke else "cuda"), smoke)
    if smoke:  # tiny ops: one thread is faster, and immune to other jobs on the machine
        torch.set_num_threads(1)
    if ctx.cuda:
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        device = f"cuda ({torch.cuda.get_device_name()}, {memory:.0f} GiB)"
    else:
        device = f"cpu ({platform.machine()}, {torch.get_num_threads()} thread)"
    report: dict[str, Any] = {
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smoke": smoke,
        "device": device,
        "torch": torch.__version__,
        "torch_accum": torch_accum.__version__,
        "python": platform.python_version(),
        "accumulation_dtype_available": HAS_ACCUMULATION_DTYPE,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": 0.0,
    }
    if smoke and not args.smoke:
        report["note"] = "no CUDA device: this is the CPU smoke run"
    selected = args.only or list(SECTIONS)
    sections = [Section(name, budget) for name, (_, budget) in SECTIONS.items() if name in selected]
    start = time.perf_counter()
    for sec in sections:
        sec.budget_s = min(sec.budget_s, TOTAL_BUDGET_S - (time.perf_counter() - start))
        if sec.budget_s < 10:
            sec.status, sec.error = "skipped", "the run's total time budget is spent"
        else:
            print(f"[gpu.py] {sec.name} (budget {sec.budget_s:.0f} s)", flush=True)
            run_section(ctx, sec, SECTIONS[sec.name][0])
            print(f"[gpu.py] {sec.name}: {sec.status} in {sec.seconds:.1f} s", flush=True)
        report["seconds"] = time.perf_counter() - start
        write(report, sections, args.out)
    failed = sum(t["passed"] is False for s in sections for t in s.targets)
    print(f"[gpu.py] {failed} target(s) failed; wrote {args.out}/gpu.json and gpu.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
