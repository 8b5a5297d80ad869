"""Auto-fit: choose the micro-batch size and what to recompute for the most samples per second.

Given the model, one batch, the loss and a memory budget, `autofit` measures instead of
modelling. For every checkpointing policy (off, every n-th block, selective, full) it
measures the activation peak of two small micro-batches (an empty one where the model
takes it, and one sample) with `measure_activation_memory`: the peak is linear in the
micro-batch size (``benchmarks/memory.py``), so two points give the largest size that
fits the budget. A policy that cannot hold a larger micro-batch than one that recomputes
a subset of what it recomputes is hopeless and is skipped; the others are timed at their
largest fitting size, smallest first, each run stopped once it cannot come within 3% of
the fastest; the fastest is also timed at smaller sizes while that gets faster, and the
winner's peak is measured at its size before it is returned. Planning
leaves no trace: parameters, buffers, gradients and the CPU and CUDA random number
generators are as they were (the optimizer is never touched).

>>> import torch
>>> from torch_accum import Accumulator, autofit
>>> model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
...                               for _ in range(4)])
>>> x = torch.randn(64, 16)
>>> def compute_loss(micro):
...     return model(micro).pow(2).mean()
>>> # The whole batch of 64 needs more than this budget without checkpointing:
>>> plan = autofit(model, x, compute_loss, memory_budget=60_000)
>>> plan.measured_peak <= 60_000
True
>>> plan.micro_batch_size * plan.accumulation_steps >= 64
True
>>> # One line to train with it:
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> acc = Accumulator(model, optimizer, **plan.accumulator_kwargs())
>>> with acc:
...     loss = acc.step_batch(x, compute_loss)
>>> acc.optimizer_steps
1
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torch_accum.checkpointing import (
    ActivationCheckpointing,
    Checkpointing,
    CheckpointPolicy,
    as_checkpointing,
)
from torch_accum.distributed import Step
from torch_accum.memory import _tensors_in, measure_activation_memory
from torch_accum.microbatch import MicroBatchSize, batch_size_of

if TYPE_CHECKING:
    from torch_accum._driver import WindowDriver
    from torch_accum.accumulator import Accumulator

__all__ = ["Candidate", "Plan", "autofit"]

logger = logging.getLogger(__name__)

#: The policies tried by default, from the least to the most recomputation.
DEFAULT_POLICIES: tuple[CheckpointPolicy, ...] = (
    False,
    Checkpointing(every=4),
    Checkpointing(every=2),
    "selective",
    True,
)

Gather = Callable[[float], list[float]]
SizeChoice = Literal["balanced", "divisors"]


@dataclass(frozen=True)
class Candidate:
    """One (checkpointing, micro-batch size) pair the planner looked at.

    ``predicted_peak`` comes from the two measured probes of the policy (bytes, linear in
    the micro-batch size; None when the policy was not probed: a policy that recomputes
    less already fits the largest size); ``measured_peak`` is measured at this size (None
    when it was not); ``samples_per_second`` is the measured forward and backward
    throughput of one micro-batch of this size (None when it was not timed, or its run was
    stopped); ``status`` says what the planner did with it: ``"chosen"``, ``"timed"``,
    ``"stopped under <n> samples/s"`` (its run was stopped once it could no longer come
    within 3% of the fastest, or, a smaller size of the fastest policy, be 2% faster than
    it), ``"dominated by <label>"`` (another policy recomputes less and fits a micro-batch
    as large), ``"over budget"`` (predicted), ``"over budget (measured)"``, ``"allocator
    retries"`` (CUDA: timing it made the allocator free its cache and retry, so it counts
    as 0 samples/s).
    """

    label: str
    checkpointing: CheckpointPolicy
    micro_batch_size: int
    accumulation_steps: int
    predicted_peak: int | None
    measured_peak: int | None
    samples_per_second: float | None
    status: str
    #: A stopped run: the samples/s it could no longer reach (its throughput is below).
    stopped_below: float | None = None


@dataclass(frozen=True)
class Plan:
    """What `autofit` chose, and the candidates it measured.

    Train with it in one line: ``Accumulator(model, optimizer, **plan.accumulator_kwargs())``
    (or ``plan.accumulator(model, optimizer)``). With ``acc.step_batch(batch, ...)`` the
    Accumulator cuts each batch of ``effective_batch`` samples into micro-batches of
    ``micro_batch_size`` itself. In an ``acc.backward`` loop, load micro-batches of
    ``micro_batch_size`` samples (``DataLoader(batch_size=plan.micro_batch_size)``):
    a window of ``accumulation_steps`` of them holds
    ``micro_batch_size * accumulation_steps`` samples, the effective batch exactly when
    the size divides it (``autofit(..., micro_batch_sizes="divisors")`` makes sure).

    Examples:
        >>> plan = Plan(micro_batch_size=8, accumulation_steps=4, checkpointing=True,
        ...             label="full", effective_batch=32, memory_budget=10**6,
        ...             predicted_peak=900_000, measured_peak=899_000,
        ...             samples_per_second=120.0, planning_seconds=1.5)
        >>> plan.accumulator_kwargs()
        {'accumulation_steps': 4, 'micro_batch_size': 8, 'checkpointing': True}
    """

    micro_batch_size: int
    accumulation_steps: int
    checkpointing: CheckpointPolicy
    label: str
    effective_batch: int
    memory_budget: int
    predicted_peak: int
    measured_peak: int
    samples_per_second: float
    planning_seconds: float
    candidates: tuple[Candidate, ...] = field(default=(), repr=False)

    def accumulator_kwargs(self) -> dict[str, Any]:
        """The `Accumulator` arguments of this plan, for both kinds of loop."""
        return {
            "accumulation_steps": self.accumulation_steps,
            "micro_batch_size": self.micro_batch_size,
            "checkpointing": self.checkpointing,
        }

    def accumulator(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        **options: Any,
    ) -> Accumulator:
        """``Accumulator(model, optimizer, **self.accumulator_kwargs(), **options)``."""
        from torch_accum.accumulator import Accumulator

        clash = sorted(set(options) & set(self.accumulator_kwargs()))
        if clash:
            raise TypeError(
                f"plan.accumulator() sets {', '.join(clash)} from the plan; leave "
                f"{'it' if len(clash) == 1 else 'them'} out, or build the Accumulator "
                "yourself from plan.accumulator_kwargs()"
            )
        return Accumulator(model, optimizer, **self.accumulator_kwargs(), **options)

    def table(self) -> str:
        """The candidates as a text table, the chosen one marked with ``*``."""
        header = (
            f"{'':1} {'checkpointing':<16} {'micro':>5} {'K':>4} {'predicted MiB':>13} "
            f"{'measured MiB':>12} {'samples/s':>10}  status"
        )
        lines = [
            f"budget {_mib(self.memory_budget)} MiB, effective batch {self.effective_batch}, "
            f"planned in {self.planning_seconds:.1f} s",
            header,
            "-" * len(header),
        ]
        for c in self.candidates:
            predicted = "" if c.predicted_peak is None else _mib(c.predicted_peak)
            measured = "" if c.measured_peak is None else _mib(c.measured_peak)
            speed = "" if c.samples_per_second is None else f"{c.samples_per_second:.1f}"
            lines.append(
                f"{'*' if c.status == 'chosen' else '':1} {c.label:<16} "
                f"{c.micro_batch_size:>5} {c.accumulation_steps:>4} "
                f"{predicted:>13} {measured:>12} {speed:>10}  {c.status}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"micro-batches of {self.micro_batch_size} x {self.accumulation_steps} steps "
            f"(effective batch {self.effective_batch}), checkpointing {self.label}: "
            f"peak {_mib(self.measured_peak)} MiB of {_mib(self.memory_budget)} MiB, "
            f"{self.samples_per_second:.1f} samples/s"
        )

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """Peak memory against samples/s of the timed candidates (needs matplotlib).

        The chosen point is circled and the budget is a vertical line; a candidate whose
        run was stopped is a downward triangle at the samples/s it could no longer reach
        (it is slower than that). Saved to ``path`` when given; returns the matplotlib
        ``Figure``.
        """
        import matplotlib.pyplot as plt

        figure = None
        if ax is None:
            figure, ax = plt.subplots(figsize=(6.4, 4.2))
        timed = [c for c in self.candidates if c.samples_per_second is not None]
        for label in dict.fromkeys(c.label for c in timed):
            points = [c for c in timed if c.label == label]
            ax.plot(
                [_peak_of(c) / 2**20 for c in points],
                [c.samples_per_second for c in points],
                "o",
                label=label,
            )
            for c in points:
                ax.annotate(
                    str(c.micro_batch_size),
                    (_peak_of(c) / 2**20, c.samples_per_second),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        stopped = [c for c in self.candidates if c.stopped_below is not None]
        if stopped:
            ax.plot(
                [_peak_of(c) / 2**20 for c in stopped],
                [c.stopped_below for c in stopped],
                "v",
                color="grey",
                label="stopped: slower than shown",
            )
            for c in stopped:
                ax.annotate(
                    f"{c.label}, {c.micro_batch_size}",
                    (_peak_of(c) / 2**20, c.stopped_below),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color="grey",
                )
        ax.plot(
            [self.measured_peak / 2**20],
            [self.samples_per_second],
            "o",
            markersize=16,
            markerfacecolor="none",
            markeredgecolor="black",
            label="chosen",
        )
        ax.axvline(self.memory_budget / 2**20, color="red", linestyle="--", label="budget")
        ax.set_xlabel("peak activation memory of a micro-batch (MiB)")
        ax.set_ylabel("samples / s")
        ax.set_title(
            f"effective batch {self.effective_batch}: {self.label}, "
            f"micro-batches of {self.micro_batch_size}"
        )
        ax.legend(fontsize=8)
        figure = figure if figure is not None else ax.figure
        if path is not None:
            figure.savefig(path, dpi=110, bbox_inches="tight")
        return figure


def _peak_of(candidate: Candidate) -> int:
    if candidate.measured_peak is not None:
        return candidate.measured_peak
    # Only timed or stopped candidates are plotted, and their policies were probed.
    return cast(int, candidate.predicted_peak)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


# ---------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class _Policy:
    label: str
    setting: CheckpointPolicy
    blocks: frozenset[str]
    mode: str | None  # None: no checkpointing

    def recomputes_within(self, other: _Policy) -> bool:
        """Whether this policy costs no more time than ``other``: it recomputes a subset.

        Only in the same mode: selective checkpointing recomputes less than full, but its
        policy runs on every op of the block (measured slower than full on ResNet-50,
        whose blocks hold no matmul for it to keep; `_Search._keeping_nothing` skips it
        where its probes show that).
        """
        if self.mode is None:
            return True
        if other.mode is None:
            return False
        return self.mode == other.mode and self.blocks <= other.blocks


def _label(setting: Checkpointing) -> str:
    blocks = "" if setting.blocks is True else "chosen blocks, "
    if setting.every == 1:
        return f"{blocks}{setting.mode}"
    nth = {2: "2nd", 3: "3rd"}.get(setting.every, f"{setting.every}th")
    mode = "" if setting.mode == "full" else f", {setting.mode}"
    return f"{blocks}every {nth}{mode}"


def _policies(model: nn.Module, requested: Iterable[CheckpointPolicy]) -> list[_Policy]:
    """The distinct policies of ``requested`` that apply to ``model``."""
    found: list[_Policy] = []
    seen: set[tuple[frozenset[str], str | None]] = set()
    for setting in requested:
        if setting is False or setting is None:
            policy = _Policy("off", False, frozenset(), None)
        else:
            settings = as_checkpointing(setting)
            try:
                names = ActivationCheckpointing(model, settings).names
            except ValueError as error:
                # checkpointing=True on a model without repeated blocks: nothing to try.
                logger.info("autofit: leaving out checkpointing %r: %s", setting, error)
                continue
            policy = _Policy(_label(settings), setting, frozenset(names), settings.mode)
        key = (policy.blocks, policy.mode)
        if key not in seen:
            seen.add(key)
            found.append(policy)
    if not found:
        raise ValueError(
            "autofit(policies=...) left no policy to try for this model; include False "
            "(no checkpointing), or policies whose blocks exist in the model"
        )
    return found


# ---------------------------------------------------------------------------- batches
def _resized(batch: Any, size: int, total: int) -> Any:
    """``batch`` with ``size`` samples: its first ones, or itself repeated to reach ``size``."""
    if isinstance(batch, torch.Tensor):
        if size <= total:
            return batch[:size]
        index = torch.arange(size, dtype=torch.long, device=batch.device) % total
        return batch.index_select(0, index)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_resized(item, size, total) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_resized(item, size, total) for item in batch)
    if isinstance(batch, dict):
        return type(batch)((key, _resized(item, size, total)) for key, item in batch.items())
    return batch


def _candidate_sizes(
    effective_batch: int, choice: SizeChoice | Iterable[int], upper: int | None
) -> list[int]:
    """Micro-batch sizes to consider, largest first."""
    if choice == "balanced":
        # The sizes that cut the batch into K nearly equal micro-batches, for every K.
        sizes = {math.ceil(effective_batch / k) for k in range(1, effective_batch + 1)}
    elif choice == "divisors":
        sizes = {k for k in range(1, effective_batch + 1) if effective_batch % k == 0}
    elif isinstance(choice, str):
        raise ValueError(
            f"micro_batch_sizes must be 'balanced', 'divisors' or an iterable of ints, got "
            f"{choice!r}"
        )
    else:
        sizes = set()
        for size in choice:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"micro_batch_sizes must hold positive ints, got {size!r}; pass e.g. "
                    "micro_batch_sizes=[32, 16, 8]"
                )
            sizes.add(min(size, effective_batch))
    if upper is not None:
        sizes = {s for s in sizes if s <= upper} or {upper}
    if not sizes:
        raise ValueError("micro_batch_sizes is empty; pass at least one size")
    return sorted(sizes, reverse=True)


# ---------------------------------------------------------------------------- no trace
class _Untouched:
    """Saves what planning may change (gradients, buffers, RNG) and puts it back bit for bit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.grads = [p.grad for p in self.params]
        self.buffers = [b.detach().clone() for b in model.buffers()]
        self.cpu_rng = torch.random.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self.cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
        self.training = [m.training for m in model.modules()]
        self.ddp_flag: bool | None = None
        if isinstance(model, DistributedDataParallel):
            # Planning runs the ranks in lockstep; no gradient all-reduce is needed.
            self.ddp_flag = bool(model.require_backward_grad_sync)
            model.require_backward_grad_sync = False
        self.clear_gradients()

    def clear_gradients(self) -> None:
        for p in self.params:
            p.grad = None

    def reset_between_runs(self) -> None:
        """Before each measured run: no gradients, the buffers and RNG as they were."""
        self.clear_gradients()
        self.restore_state()

    def restore_state(self) -> None:
        torch.random.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), self.buffers, strict=True):
                buffer.copy_(saved)

    def restore(self) -> None:
        self.restore_state()
        for p, grad in zip(self.params, self.grads, strict=True):
            p.grad = grad
        for module, training in zip(self.model.modules(), self.training, strict=True):
            module.training = training
        if self.ddp_flag is not None:  # set only for a DistributedDataParallel model
            cast(DistributedDataParallel, self.model).require_backward_grad_sync = self.ddp_flag


# ---------------------------------------------------------------------------- planning
def autofit(
    model: nn.Module,
    batch: Any,
    compute_loss: Callable[[Any], torch.Tensor],
    *,
    memory_budget: int | float | None = None,
    effective_batch: int | None = None,
    policies: Sequence[CheckpointPolicy] | None = None,
    micro_batch_sizes: SizeChoice | Iterable[int] = "balanced",
    max_micro_batch_size: int | None = None,
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> Plan:
    """Choose the micro-batch size and the checkpointing with the most samples per second.

    Args:
        model: the model being trained (plain, DDP or FSDP2; in training mode).
        batch: one batch as ``acc.step_batch`` takes it (a tensor, or tuples/lists/dicts of
            tensors with the samples along dimension 0). It is repeated along dimension 0
            when the effective batch is larger.
        compute_loss: ``compute_loss(micro_batch)`` returns the micro-batch's scalar loss.
        memory_budget: bytes that one micro-batch's forward and backward may hold: the
            activation peak measured by `measure_activation_memory` (on CUDA the
            allocator's peak, gradients and workspaces included). On CUDA also a float in
            (0, 1]: that fraction of the device's free memory; by default 0.9 of it.
            Required on other devices.
        effective_batch: samples per optimizer step (default: the size of ``batch``).
        policies: the checkpointing settings to try, as ``Accumulator(checkpointing=...)``
            takes them. Default: off, every 4th block, every 2nd block, selective, full.
        micro_batch_sizes: ``"balanced"`` (default: ``ceil(effective_batch / K)`` for every
            number of steps K), ``"divisors"`` (sizes that divide the effective batch, for
            ``acc.backward`` loops over a DataLoader) or an iterable of sizes.
        max_micro_batch_size: leave out larger sizes.
        repeats: timed runs per candidate (the fastest counts; the first also warms up).
        clock: what times the runs: wall time by default; on a CPU shared with other
            processes ``time.process_time`` (CPU seconds of this process) ranks the
            candidates more steadily.

    Returns:
        The [`Plan`][torch_accum.Plan]; ``print(plan.table())`` shows every candidate.

    Raises:
        ValueError: no candidate fits the budget (the message gives the smallest peak).

    Under DDP or FSDP2 every rank must call it with its own batch of the same shape: the
    ranks measure in lockstep, every measurement is agreed (the largest peak and the
    slowest time over the ranks count), so every rank takes the same decisions, and rank
    0's plan is checked against every rank's before it is returned.

    Examples:
        >>> import torch
        >>> from torch_accum import autofit
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 1))
        >>> x = torch.randn(32, 8)
        >>> plan = autofit(model, x, lambda micro: model(micro).pow(2).mean(),
        ...                memory_budget=2**20)
        >>> # A mebibyte holds the whole batch: one step, nothing recomputed.
        >>> plan.micro_batch_size, plan.accumulation_steps, plan.checkpointing
        (32, 1, False)
    """
    return _autofit(
        model,
        batch,
        compute_loss,
        memory_budget=memory_budget,
        effective_batch=effective_batch,
        policies=policies,
        micro_batch_sizes=micro_batch_sizes,
        max_micro_batch_size=max_micro_batch_size,
        repeats=repeats,
        gather=_process_group_gather(model),
        clock=clock,
    )


def _process_group_gather(model: nn.Module) -> Gather | None:
    """All-gather of one float over the model's process group (DDP/FSDP2), else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:  # public from torch 2.6 on
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if not isinstance(model, (DistributedDataParallel, FSDPModule)):
        return None
    group = (
        getattr(model, "process_group", None)
        if isinstance(model, DistributedDataParallel)
        else None
    )
    group = group if group is not None else dist.group.WORLD
    device = next(model.parameters()).device
    world = dist.get_world_size(group)

    def gather(value: float) -> list[float]:
        mine = torch.tensor([value], dtype=torch.float64, device=device)
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine, group=group)
        return [float(row.item()) for row in rows]

    return gather


def _autofit(
    model: nn.Module,
    batch: Any,
    compute_loss: Callable[[Any], torch.Tensor],
    *,
    memory_budget: int | float | None,
    effective_batch: int | None,
    policies: Sequence[CheckpointPolicy] | None,
    micro_batch_sizes: SizeChoice | Iterable[int],
    max_micro_batch_size: int | None,
    repeats: int,
    gather: Gather | None,
    clock: Callable[[], float] = time.perf_counter,
) -> Plan:
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(compute_loss):
        raise TypeError(
            f"compute_loss must be a callable micro_batch -> loss, got "
            f"{type(compute_loss).__name__}; pass e.g. lambda micro: loss_fn(model(micro))"
        )
    available = batch_size_of(batch)
    total = available if effective_batch is None else effective_batch
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(
            f"effective_batch must be a positive int, got {effective_batch!r}; pass the "
            "number of samples per optimizer step"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if max_micro_batch_size is not None and (
        isinstance(max_micro_batch_size, bool)
        or not isinstance(max_micro_batch_size, int)
        or max_micro_batch_size < 1
    ):
        raise ValueError(
            f"max_micro_batch_size must be a positive int or None, got {max_micro_batch_size!r}"
        )
    first_parameter = next(model.parameters(), None)
    if first_parameter is None:
        raise ValueError(
            f"autofit needs a model with parameters; {type(model).__name__} has none to train"
        )
    if not model.training:
        raise ValueError(
            "autofit plans for training, but the model is in evaluation mode (checkpointing, "
            "dropout and BatchNorm act differently there); call model.train() first"
        )
    device = first_parameter.device
    budget = _budget(memory_budget, device)
    sizes = _candidate_sizes(total, micro_batch_sizes, max_micro_batch_size)
    tried = _policies(model, DEFAULT_POLICIES if policies is None else policies)
    if not callable(clock):
        raise TypeError(
            f"clock must be a callable returning seconds, e.g. time.process_time, got {clock!r}"
        )
    search = _Search(model, batch, available, compute_loss, device, repeats, gather, clock)
    try:
        choice = search.run(tried, sizes, budget, total)
    finally:
        search.untouched.restore()
    policy, size = choice
    if gather is not None:
        # Every rank took the same decisions from agreed numbers; rank 0's plan is the
        # one all use, and a rank that would differ raises instead of training otherwise.
        index = tried.index(policy)
        plans = gather(float(index * (total + 1) + size))
        if any(p != plans[0] for p in plans):
            raise RuntimeError(
                f"autofit chose different plans on different ranks ({plans}); the ranks "
                "must pass batches of the same shape and the same arguments"
            )
    candidates = search.table(tried, sizes, budget, total, choice)
    plan = Plan(
        micro_batch_size=size,
        accumulation_steps=math.ceil(total / size),
        checkpointing=policy.setting,
        label=policy.label,
        effective_batch=total,
        memory_budget=budget,
        predicted_peak=search.predicted(policy, size),
        measured_peak=search.peaks[policy, size],
        samples_per_second=search.speeds[policy, size],
        planning_seconds=time.perf_counter() - started,
        candidates=tuple(candidates),
    )
    logger.info("autofit: %s", plan)
    return plan


def _budget(memory_budget: int | float | None, device: torch.device) -> int:
    cuda = device.type == "cuda"
    if isinstance(memory_budget, bool):
        raise TypeError(f"memory_budget must be bytes (an int), got {memory_budget!r}")
    if isinstance(memory_budget, int):
        if memory_budget < 1:
            raise ValueError(
                f"memory_budget must be a positive number of bytes, got {memory_budget}"
            )
        return memory_budget
    if memory_budget is None and not cuda:
        raise ValueError(
            f"autofit needs memory_budget (bytes) for a model on {device.type}: pass e.g. "
            "memory_budget=2 * 2**30 for 2 GiB of activations"
        )
    fraction = 0.9 if memory_budget is None else memory_budget
    if not isinstance(fraction, float) or not 0 < fraction <= 1 or not cuda:
        raise ValueError(
            f"memory_budget={memory_budget!r}: pass bytes as an int, or (on CUDA only) a "
            "fraction of the device's free memory as a float in (0, 1]"
        )
    free, _ = torch.cuda.mem_get_info(device)
    return int(fraction * free)


_OUT_OF_MEMORY = float(2**62)
#: A smaller micro-batch replaces the fastest one only when it is this much faster.
_WALK_DOWN_GAIN = 1.02
#: Candidates timed within this fraction of the fastest are timed again before one wins,
#: unless their runs took this many seconds already: one long run averages out the
#: disturbances that make a short one look slow. A run falling further behind is stopped.
#: Picking the wrong one among them gives up at most 3%, within the 5% a plan may lose.
_CONTENDER = 0.97
_TIMED_ENOUGH = 0.5
#: What BatchNorm raises for one value per channel in training.
_ONE_SAMPLE_REFUSED = "Expected more than 1 value per channel"


def _allocator_retries(device: torch.device) -> int:
    """How often the CUDA allocator freed its cache to retry an allocation, so far."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def _release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _TooSlow(Exception):
    """A timed run went past its deadline: it cannot be as fast as it had to be."""


class _RunDeadline:
    """Stops a timed forward and backward once the clock passes a deadline.

    A candidate timed after a faster one only has to show that it cannot come close: its
    run stops where it passes the time the faster one would allow (full checkpointing
    of the GPT at the whole batch took 2 s to lose by 18%). The clock is read where the
    model's blocks start and end their forward and where backward leaves them (the
    gradient of their inputs); an exception leaves the run there, and the next run starts
    from clean gradients.
    """

    def __init__(self, modules: list[nn.Module], clock: Callable[[], float]) -> None:
        self.modules = modules
        self.clock = clock
        self.deadline = math.inf

    @contextlib.contextmanager
    def stopping_at(self, deadline: float) -> Iterator[None]:
        if deadline == math.inf or not self.modules:
            yield
            return
        self.deadline = deadline
        handles = []
        try:
            for module in self.modules:
                handles.append(module.register_forward_pre_hook(self._check_in_backward))
                handles.append(module.register_forward_hook(self._check))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.deadline = math.inf

    def _check(self, *_: object) -> None:
        if self.clock() > self.deadline:
            raise _TooSlow

    def _check_in_backward(self, module: nn.Module, args: object) -> None:
        """Checks now, and again once backward has gone through this block (its inputs)."""
        self._check()
        for tensor in _tensors_in(args):
            if tensor.requires_grad:
                tensor.register_hook(self._check)  # type: ignore[no-untyped-call]


def _is_compiled(model: nn.Module) -> bool:
    """Whether torch.compile wraps the model or one of its modules (hooks would recompile)."""
    return hasattr(model, "_orig_mod") or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )


def _watched_modules(model: nn.Module, policies: list[_Policy]) -> list[nn.Module]:
    """Where a timed run reads the clock: the blocks the policies checkpoint, else the children.

    TorchScript modules take no hooks: a scripted model's runs are not stopped.
    """
    names = sorted(set().union(*(p.blocks for p in policies)))
    modules = [model.get_submodule(name) for name in names] or list(model.children())
    return [m for m in modules if not isinstance(m, torch.jit.ScriptModule)]


class _Search:
    """The measurements of one planning run, and the decisions taken from them."""

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        available: int,
        compute_loss: Callable[[Any], torch.Tensor],
        device: torch.device,
        repeats: int,
        gather: Gather | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.batch = batch
        self.available = available
        self.compute_loss = compute_loss
        self.device = device
        self.repeats = repeats
        self.gather = gather
        self.clock = clock
        self.lines: dict[_Policy, tuple[float, float]] = {}  # intercept, slope
        self.peaks: dict[tuple[_Policy, int], int] = {}
        self.speeds: dict[tuple[_Policy, int], float] = {}
        self.seconds: dict[tuple[_Policy, int], float] = {}
        self.runs: dict[tuple[_Policy, int], int] = {}
        self.retried: set[tuple[_Policy, int]] = set()
        self.dominated: dict[_Policy, _Policy] = {}
        self.checkpointing: dict[_Policy, ActivationCheckpointing] = {}
        self.untouched = _Untouched(model)
        self.one_sample_trains = True  # until a probe of one sample says otherwise
        self.empty_batch_trains = True  # until the model or loss fails on 0 samples
        # Candidates whose timed run was stopped: under this many samples/s.
        self.slower_than: dict[tuple[_Policy, int], float] = {}
        # Set by run(): None where runs must not stop early (ranks in lockstep, compiled).
        self.run_deadline: _RunDeadline | None = None

    # -------------------------------------------------------------- measurements
    def _agreed(self, value: float) -> float:
        """The largest ``value`` over the ranks (the peak or time that binds)."""
        return value if self.gather is None else max(self.gather(value))

    def _with_policy(self, policy: _Policy, run: Callable[[], float]) -> float:
        checkpointing = None
        if policy.mode is not None:
            # One per policy: choosing its blocks walks the whole model each time.
            checkpointing = self.checkpointing.get(policy)
            if checkpointing is None:
                checkpointing = ActivationCheckpointing(self.model, policy.setting)
                self.checkpointing[policy] = checkpointing
        if checkpointing is not None:
            checkpointing.install()
        try:
            return run()
        finally:
            if checkpointing is not None:
                checkpointing.restore()
            self.untouched.reset_between_runs()

    def peak(self, policy: _Policy, size: int) -> int:
        if (policy, size) not in self.peaks:
            micro = _resized(self.batch, size, self.available)

            def measure() -> float:
                self.untouched.reset_between_runs()
                try:
                    memory = measure_activation_memory(
                        lambda: self.compute_loss(micro), parameters=self.model.parameters()
                    )
                except torch.OutOfMemoryError:  # CUDA: over any budget
                    _release_cached_memory()
                    return _OUT_OF_MEMORY
                peak = memory.peak
                if memory.cuda_max_allocated is not None:
                    peak = max(peak, memory.cuda_max_allocated)
                return float(peak)

            self.peaks[policy, size] = int(self._agreed(self._with_policy(policy, measure)))
        return self.peaks[policy, size]

    def speed(self, policy: _Policy, size: int, runs: int = 1, at_least: float = 0.0) -> float:
        """Samples/s of one micro-batch's forward and backward: the fastest of ``runs`` runs.

        Runs add up: asking again with more runs only runs the missing ones. The first
        call runs more (up to 20) when its runs add up to less than a quarter of a second:
        small micro-batches are cheap to time again, and the fastest of several is the
        least disturbed by other processes. Ranks in lockstep run the same count (FSDP2
        gathers parameters in every forward): it is computed from the agreed time.

        ``at_least``: the samples/s that matter. A run is stopped once it has taken longer
        than that allows (in one process, on a model not compiled); a candidate none of
        whose runs finished returns 0.0 and is recorded in ``slower_than``.
        """
        key = (policy, size)
        done = self.runs.get(key, 0)
        if done >= runs:
            return self.speeds[key]
        known_slower = self.slower_than.get(key)
        if done == 0 and known_slower is not None and known_slower <= at_least:
            return 0.0
        micro = _resized(self.batch, size, self.available)
        limit = size / at_least if at_least > 0 and self.run_deadline is not None else math.inf
        stopped = False

        def timed(count: int) -> float:
            nonlocal stopped
            best = math.inf
            if self.peaks.get(key, 0) >= _OUT_OF_MEMORY:
                return best
            retries = _allocator_retries(self.device)
            for _ in range(count):
                self.untouched.reset_between_runs()
                self._synchronize()
                start = self.clock()
                try:
                    with self._stopping_at(start + limit):
                        self.compute_loss(micro).backward()  # type: ignore[no-untyped-call]
                    self._synchronize()
                except _TooSlow:
                    stopped = True
                    continue
                except torch.OutOfMemoryError:  # CUDA: this candidate cannot run
                    _release_cached_memory()
                    return math.inf
                best = min(best, self.clock() - start)
            if _allocator_retries(self.device) > retries:
                # The CUDA allocator freed its cache and retried: this size works only at
                # the edge of the device's memory, slowly, and may fail next time.
                logger.info("autofit: %s at %d made the allocator retry", policy.label, size)
                self.retried.add(key)
                return math.inf
            return best

        count = runs - done
        seconds = self._agreed(self._with_policy(policy, lambda: timed(count)))
        if done == 0 and seconds == math.inf and stopped:
            logger.info(
                "autofit: %s at %d stopped: under %.1f samples/s", policy.label, size, at_least
            )
            self.slower_than[key] = at_least
            return 0.0
        if done == 0 and seconds > 0 and seconds * count < 0.25:
            more = min(20, math.ceil(0.25 / seconds)) - count
            if more > 0:
                again = self._agreed(self._with_policy(policy, lambda: timed(more)))
                seconds, count = min(seconds, again), count + more
        seconds = min(seconds, self.seconds.get(key, math.inf))
        self.runs[key] = done + count
        self.seconds[key] = seconds
        self.speeds[key] = size / max(seconds, 1e-9)
        self.slower_than.pop(key, None)
        return self.speeds[key]

    def _stopping_at(self, deadline: float) -> contextlib.AbstractContextManager[None]:
        if self.run_deadline is None:
            return contextlib.nullcontext()
        return self.run_deadline.stopping_at(deadline)

    def forget_timing(self, policy: _Policy, size: int) -> None:
        for measured in (self.runs, self.seconds, self.speeds):
            measured.pop((policy, size), None)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -------------------------------------------------------------- decisions
    def predicted(self, policy: _Policy, size: int) -> int:
        intercept, slope = self.lines[policy]
        return math.ceil(intercept + slope * size)

    def fit(self, policy: _Policy, sizes: list[int]) -> None:
        """Two small probes: the peak's line in the micro-batch size.

        The first is an empty micro-batch where the model and loss take one: it measures
        what does not grow with the batch for little more than the ops' overhead (a
        third of a probe of one sample on the GPT). The second is the smallest size.
        """
        small = sorted(sizes)
        # The smallest sizes cost least. One sample is refused in training by a BatchNorm
        # that would see one value per channel (no spatial dimensions): then 2 samples.
        first = small[0]
        if first == 1 and self.one_sample_trains:
            try:
                self.peak(policy, 1)
            except ValueError as error:
                if _ONE_SAMPLE_REFUSED not in str(error):
                    raise
                self.one_sample_trains = False
        if first == 1 and not self.one_sample_trains:
            first = next((s for s in small if s >= 2), first)
        if self._empty_probe(policy):
            self.refit(policy, 0, first)
            return
        second = next((s for s in small if s >= 2 * first), small[-1])
        self.refit(policy, first, second)

    def _empty_probe(self, policy: _Policy) -> bool:
        """Whether the peak of an empty micro-batch could be measured (once refused: never).

        Only in one process: ranks in lockstep must not differ in what they run.
        """
        if not self.empty_batch_trains or self.gather is not None:
            return False
        try:
            self.peak(policy, 0)
        except Exception as error:  # the user's model or loss need not take 0 samples
            logger.info("autofit: an empty micro-batch fails (%s); probing two sizes", error)
            self.empty_batch_trains = False
            return False
        return True

    def refit(self, policy: _Policy, first: int, second: int) -> None:
        """The line through the measured peaks at ``first`` and ``second`` samples.

        The peak is the largest of lines (one per point of the run), so a line through two
        small sizes can only under-predict at larger ones: a size measured over budget
        refits the line through it (``_fastest``), which moves it up.
        """
        p1 = self.peak(policy, first)
        if second == first:
            self.lines[policy] = (float(p1), 0.0)
            return
        p2 = self.peak(policy, second)
        slope = max(0.0, (p2 - p1) / (second - first))
        self.lines[policy] = (p1 - slope * first, slope)

    def largest_fitting(self, policy: _Policy, sizes: list[int], budget: int) -> int | None:
        """The largest size whose peak fits: measured where known, else predicted."""
        for size in sizes:
            known = self.peaks.get((policy, size))
            peak = known if known is not None else self.predicted(policy, size)
            if peak <= budget:
                return size
        return None

    def run(
        self, policies: list[_Policy], sizes: list[int], budget: int, total: int
    ) -> tuple[_Policy, int]:
        if self.gather is None and not _is_compiled(self.model):
            self.run_deadline = _RunDeadline(_watched_modules(self.model, policies), self.clock)
        largest: dict[_Policy, int | None] = {}
        for policy in policies:
            # A policy is probed only if it might hold a larger micro-batch than every
            # policy that recomputes less: once one of those fits the largest candidate
            # size, this one is hopeless before any measurement (the whole batch fits).
            ahead = self._recomputing_less(policy, policies, largest, sizes[0])
            if ahead is not None:
                self.dominated[policy] = ahead
                continue
            self.fit(policy, sizes)
            largest[policy] = self.largest_fitting(policy, sizes, budget)
        if all(s is None for s in largest.values()):
            lowest = min(self.predicted(p, sizes[-1]) for p in largest)
            raise ValueError(
                f"no candidate fits memory_budget={budget} bytes ({_mib(budget)} MiB): the "
                f"smallest peak, {sizes[-1]} sample(s) with the most checkpointing, is about "
                f"{lowest} bytes ({_mib(lowest)} MiB); raise memory_budget or make the "
                "model's per-sample memory smaller"
            )
        # Hopeless: a policy that fits no larger micro-batch than one that recomputes less.
        frontier: list[_Policy] = []
        for policy in largest:
            size = largest[policy]
            if size is None:
                continue
            better = self._recomputing_less(policy, policies, largest, size)
            better = better or self._keeping_nothing(policy, largest, sizes)
            if better is not None:
                self.dominated[policy] = better
            else:
                frontier.append(policy)
        best = self._fastest(frontier, sizes, budget, largest)
        if best is None:
            raise ValueError(
                f"no candidate fits memory_budget={budget} bytes ({_mib(budget)} MiB) once "
                "measured at its size; raise memory_budget"
            )
        return best

    @staticmethod
    def _recomputing_less(
        policy: _Policy,
        policies: list[_Policy],
        largest: dict[_Policy, int | None],
        size: int,
    ) -> _Policy | None:
        """A measured policy that recomputes less than ``policy`` and fits ``size`` too."""
        return next(
            (
                other
                for other in policies
                if other is not policy
                and other in largest
                and other.recomputes_within(policy)
                and not policy.recomputes_within(other)
                and (largest[other] or 0) >= size
            ),
            None,
        )

    def _keeping_nothing(
        self, policy: _Policy, largest: dict[_Policy, int | None], sizes: list[int]
    ) -> _Policy | None:
        """Full checkpointing of the same blocks, where selective measured no more memory.

        Selective keeps some results that full recomputes, so it holds more; where its
        probes hold no more than full's (a ResNet's blocks have no matmul to keep), it
        keeps nothing, recomputes the same and runs its policy on every op on top: it
        cannot be faster.
        """
        if policy.mode != "selective":
            return None
        return next(
            (
                other
                for other in largest
                if other.mode == "full"
                and other.blocks == policy.blocks
                and all(self.predicted(policy, s) <= self.predicted(other, s) for s in sizes)
            ),
            None,
        )

    def _fastest(
        self,
        frontier: list[_Policy],
        sizes: list[int],
        budget: int,
        largest: dict[_Policy, int | None],
    ) -> tuple[_Policy, int] | None:
        # The cheapest first (smallest micro-batch): once the fastest so far is known, a
        # slower candidate's run stops where it falls more than 3% behind it, so the long
        # runs of large micro-batches that cannot win are cut short.
        timed: list[tuple[_Policy, int]] = []
        fastest = 0.0
        for policy in sorted(frontier, key=lambda p: cast(int, largest[p])):
            size = cast(int, largest[policy])
            speed = self.speed(policy, size, at_least=_CONTENDER * fastest)
            if (policy, size) in self.speeds:
                timed.append((policy, size))
                fastest = max(fastest, speed)
        if not timed:
            return None
        policy, size = max(timed, key=lambda t: self.speeds[t])
        # The largest micro-batch is not always the fastest (allocator retries, caches):
        # walk down this policy's sizes while that gets clearly faster (or this one cannot
        # run). Timing noise alone makes a smaller size look a little faster about half the
        # time, and each step down costs a timing; a gain within the margin is not worth it.
        # A gain against a single run is checked against a second one (the first timed run
        # of a planning session is often the slowest: the allocator's first large blocks).
        for smaller in (s for s in sizes if s < size):
            current = self.speeds[policy, size]
            faster = self.speed(policy, smaller, at_least=_WALK_DOWN_GAIN * current)
            if current > 0 and faster > _WALK_DOWN_GAIN * current:
                runs = max(self.repeats, self.runs[policy, size])
                current = self.speed(policy, size, runs, at_least=faster / _WALK_DOWN_GAIN)
            if current > 0 and faster <= _WALK_DOWN_GAIN * current:
                break
            size = smaller
            timed.append((policy, size))
        self._time_contenders_again(timed)
        policy, size = max(timed, key=lambda t: self.speeds[t])
        # Measured, not predicted, before it is chosen.
        if self.peak(policy, size) <= budget:
            return policy, size
        self.refit(policy, sizes[-1], size)
        fits = self.largest_fitting(policy, sizes, budget)
        logger.info(
            "autofit: %s at %d measured %d bytes > budget %d; next size %s",
            policy.label,
            size,
            self.peaks[policy, size],
            budget,
            fits,
        )
        largest[policy] = fits
        return None if fits is None else self._fastest(frontier, sizes, budget, largest)

    def _time_contenders_again(self, timed: list[tuple[_Policy, int]]) -> None:
        """More runs for the candidates within 3% behind the fastest, until none is left.

        One run each so far, and a disturbed run only makes a candidate look slower: one
        within 3% may be the faster, one further behind would have to have been disturbed
        by more than that. The fastest needs no second run to stay ahead; once another
        overtakes it, it is the one behind and gets its runs too. A run of half a second
        or more is not repeated (it averages out short disturbances), and a run again
        stops once it falls behind the fastest.
        """
        while True:
            fastest = max(timed, key=lambda t: self.speeds[t])
            behind = [
                key
                for key in dict.fromkeys(timed)
                if key != fastest
                and self.speeds[key] >= _CONTENDER * self.speeds[fastest]
                and self.runs[key] < self.repeats
                and self.seconds[key] * self.runs[key] < _TIMED_ENOUGH
            ]
            if not behind:
                return
            for key in behind:
                self.speed(*key, runs=self.repeats, at_least=self.speeds[fastest])

    def table(
        self,
        policies: list[_Policy],
        sizes: list[int],
        budget: int,
        total: int,
        choice: tuple[_Policy, int],
    ) -> list[Candidate]:
        rows: list[Candidate] = []
        for policy in policies:
            timed_sizes = sorted(
                {s for p, s in [*self.speeds, *self.slower_than] if p is policy}, reverse=True
            )
            probed = policy in self.lines
            fitting = self.largest_fitting(policy, sizes, budget) if probed else sizes[0]
            shown = timed_sizes or [fitting or sizes[-1]]
            for size in shown:
                key = (policy, size)
                if key == choice:
                    status = "chosen"
                elif key in self.retried:
                    status = "allocator retries"
                elif key in self.peaks and self.peaks[key] > budget:
                    status = "over budget (measured)"
                elif key in self.speeds:
                    status = "timed"
                elif key in self.slower_than:
                    status = f"stopped under {self.slower_than[key]:.1f} samples/s"
                elif policy in self.dominated:
                    status = f"dominated by {self.dominated[policy].label}"
                else:
                    status = "over budget"
                rows.append(
                    Candidate(
                        label=policy.label,
                        checkpointing=policy.setting,
                        micro_batch_size=size,
                        accumulation_steps=math.ceil(total / size),
                        predicted_peak=self.predicted(policy, size) if probed else None,
                        measured_peak=self.peaks.get((policy, size)),
                        samples_per_second=self.speeds.get((policy, size)),
                        stopped_below=self.slower_than.get((policy, size)),
                        status=status,
                    )
                )
        return rows


def plan_first_batch(
    driver: WindowDriver,
    sizes: MicroBatchSize,
    batch: Any,
    compute_loss: Callable[[Any], torch.Tensor],
    memory_budget: int | None,
) -> Plan:
    """``Accumulator(checkpointing="auto")``: plan on the first ``step_batch`` batch.

    Under DDP the numbers travel in the ranks' agreement (``Step.PLAN``), so a rank that
    is elsewhere in its loop raises ``UnevenInputsError`` instead of waiting.
    """
    sync = driver.sync
    gather: Gather | None = None
    total = batch_size_of(batch)
    if sync is not None:

        def gather(value: float) -> list[float]:
            return sync.agree(Step.PLAN, value)

        totals = gather(float(total))
        if len(set(totals)) > 1:
            raise ValueError(
                f"checkpointing='auto' plans on the first step_batch() batch, whose size must "
                f"be the same on every rank; the ranks' sizes are {[int(t) for t in totals]}"
            )
    with driver.sync_paused():
        plan = _autofit(
            driver.model,
            batch,
            compute_loss,
            memory_budget=memory_budget,
            effective_batch=total,
            policies=None,
            micro_batch_sizes="balanced",
            max_micro_batch_size=sizes.upper_bound,
            repeats=2,
            gather=gather,
        )
    sizes.current = plan.micro_batch_size
    sizes.sized_from_budget = True
    return plan
