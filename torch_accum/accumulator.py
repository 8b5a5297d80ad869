"""The Accumulator: exact gradient accumulation around an unchanged training loop.

A facade that wires the concepts, each in its own module (see docs/design.md): the window
and its states (``_window.py``), the boundary update (``_boundary.py``), what is patched in
the loop (``_interception.py``), counters and resumable state (``_state.py``), distributed
synchronisation (``distributed.py``) and whole-batch micro-batching (``microbatch.py``).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import torch
from torch import nn

from torch_accum._boundary import BoundaryUpdate
from torch_accum._driver import WindowDriver
from torch_accum._interception import LoopInterception
from torch_accum._precision import GradientPrecision, unsupported_reason
from torch_accum._state import RunState
from torch_accum._validation import (
    check_accumulation_dtype,
    check_accumulation_steps,
    check_autofit,
    check_choice,
    check_flag,
    check_loss,
    check_max_grad_norm,
    check_micro_batch_size,
    check_model,
    check_optimizers,
    check_optional_count,
    check_optional_positive_int,
    check_scaler,
    check_schedulers,
    check_weight,
)
from torch_accum._window import WindowState
from torch_accum.checkpointing import ActivationCheckpointing, CheckpointPolicy
from torch_accum.distributed import GradientSync
from torch_accum.microbatch import MicroBatchRunner, MicroBatchSize
from torch_accum.planner import Plan, plan_first_batch
from torch_accum.progress import ProgressBar, check_progress

PartialWindow = Literal["apply", "discard", "carry"]
OnNonFinite = Literal["skip", "raise"]
Item = TypeVar("Item")


class Accumulator:
    """Exact gradient accumulation as a context manager around your own training loop.

    Inside ``with acc:`` the loop keeps its ``optimizer.step()``, ``optimizer.zero_grad()``
    (or ``model.zero_grad()``) and ``scheduler.step()`` calls (and the AMP calls
    ``scaler.step(optimizer)``, ``scaler.update()``, ``scaler.unscale_(optimizer)``); they
    take effect only at the accumulation boundary, every ``accumulation_steps`` calls of
    [`backward`][torch_accum.Accumulator.backward]. There the Accumulator performs the real
    update, in this order: unscale (scaler), non-finite check, clipping to ``max_grad_norm``,
    optimizer step(s), scaler update, scheduler step(s); the loop's next ``zero_grad`` (or
    the next window's start) clears the gradients, with the loop's ``set_to_none`` choice.
    Leaving the block restores every patched method, also on an exception.

    The update equals ``sum(w_i * grad(loss_i)) / sum(w_i)`` over the micro-batches of the
    window, with ``w_i = 1`` unless ``backward`` is given a ``weight``. So K micro-batches
    with mean-reduced losses give the full-batch mean gradient, a short final window is
    averaged over its own length, and ``weight=n_tokens`` gives the exact token mean.

    Args:
        model: the module being trained.
        optimizer: the optimizer that updates it, or a list of optimizers that train on the
            same loss (e.g. Muon for matrices and AdamW for the rest): all step at the same
            boundary, clipped together.
        accumulation_steps: micro-batches per optimizer step (1 disables accumulation).
            Settable between windows; a new value applies from the next window on.
        scheduler: LR scheduler (or list of them) of the optimizer(s), stepped once per
            real optimizer step and not for skipped steps; any object with a ``step()``.
            ``ReduceLROnPlateau`` is not accepted (it needs a metric).
        scaler: a ``torch.amp.GradScaler``; ``backward`` scales the loss with it, so pass it
            the unscaled loss.
        max_grad_norm: clip the accumulated, unscaled gradient to this total 2-norm.
        partial_window: what leaving the block with fewer than ``accumulation_steps``
            micro-batches pending does: ``"apply"`` (default) one update averaged over
            them; ``"discard"`` drops them (logged); ``"carry"`` keeps them for the next
            ``with`` block of this Accumulator.
        on_nonfinite: without an enabled scaler, a window whose gradient is not finite is
            skipped (``"skip"``, default: parameters, optimizer state and scheduler
            untouched, counted in ``skipped_steps``, a warning) or raises a ``RuntimeError``
            naming the parameters (``"raise"``). With a scaler, the scaler's skip and
            back-off apply instead.
        accumulation_dtype: the dtype in which the gradients of narrower parameters
            (bfloat16, float16) add up over a window of more than one micro-batch:
            ``torch.float32`` (default) keeps the window's sum as precise as one
            micro-batch's gradient (unscale, inf/NaN check and clipping run on it, and it
            is cast to the parameter's dtype once, just before the step); ``None``
            accumulates in each parameter's own dtype, which rounds the sum on every
            micro-batch (for bfloat16 at K = 256, 4x the error of K = 1) but holds half
            the gradient memory. float32 and float64 parameters are never touched. Needs
            ``Tensor.grad_dtype`` (torch >= 2.10) when the model has such parameters;
            under FSDP2 keep float32 sharded parameters and use
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``
            instead. See docs/precision.md.
        checkpointing: run blocks of ``model`` under non-reentrant activation
            checkpointing while the ``with`` block runs: ``True`` (or ``"full"``) for the
            model's residual blocks / transformer layers, ``"selective"`` to also keep
            the results of matmuls and attention, an ``nn.Module`` class or
            tuple of classes, a callable ``module -> bool``, or a
            [`Checkpointing`][torch_accum.Checkpointing] (blocks, mode, every n-th block).
            The wrapped blocks are listed in ``checkpointed_modules``. Default off.
            ``"auto"`` (with ``micro_batch_size="auto"`` and ``memory_budget``) lets
            [`autofit`][torch_accum.autofit] choose the checkpointing and the micro-batch
            size with the most samples per second on the first ``step_batch`` batch; the
            choice is kept in ``acc.plan``.
        sync_each_micro_batch: under DDP or FSDP2, synchronise gradients on every
            micro-batch instead of once per window. Default False.
        total_micro_batches: how many micro-batches each ``with`` block runs (e.g.
            ``len(loader)``), if known: the block's last micro-batch then ends the final
            window inside the loop (``sync_gradients`` is True there), as
            [`iterate`][torch_accum.Accumulator.iterate] does without counting. It also
            gives the progress bar its total. Under DDP/FSDP2 the ranks compare their
            counts once when the block starts (0 for a rank whose loader is empty) instead
            of before every forward.
        micro_batch_size: for [`step_batch`][torch_accum.Accumulator.step_batch]: an int,
            or ``"auto"`` to find the largest micro-batch that fits (halving and replaying
            the batch on ``torch.OutOfMemoryError``); ``max_micro_batch_size`` caps where it
            starts, ``memory_budget`` (bytes) sizes it up front from measured probes, and
            ``probe_up_after`` tries twice the size again after that many error-free batches.
        progress: a tqdm bar counting optimizer steps. ``None`` (default): only when
            stderr is a terminal and tqdm is installed.

    Examples:
        >>> import torch
        >>> from torch_accum import Accumulator
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(6)]
        >>> # Six micro-batches, three optimizer steps:
        >>> acc = Accumulator(model, optimizer, accumulation_steps=2)
        >>> with acc:
        ...     for x, y in batches:
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         acc.backward(loss)
        ...         optimizer.step()       # real only when acc.sync_gradients
        ...         optimizer.zero_grad()
        >>> acc.optimizer_steps
        3
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        accumulation_steps: int = 1,
        *,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        partial_window: PartialWindow = "apply",
        on_nonfinite: OnNonFinite = "skip",
        accumulation_dtype: torch.dtype | None = torch.float32,
        checkpointing: CheckpointPolicy | Literal["auto"] | None = False,
        sync_each_micro_batch: bool = False,
        total_micro_batches: int | None = None,
        micro_batch_size: int | Literal["auto"] | None = None,
        max_micro_batch_size: int | None = None,
        memory_budget: int | None = None,
        probe_up_after: int | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model = check_model(model)
        self.optimizers = check_optimizers(optimizer)
        self.optimizer = self.optimizers[0]
        self.schedulers = check_schedulers(scheduler, self.optimizers)
        self.scheduler = self.schedulers[0] if self.schedulers else None
        self.scaler = check_scaler(scaler)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.partial_window = check_choice("partial_window", partial_window, PARTIAL_WINDOWS)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        self.sync_each_micro_batch = check_flag("sync_each_micro_batch", sync_each_micro_batch)
        self.total_micro_batches = check_optional_count("total_micro_batches", total_micro_batches)
        self.progress = check_progress(progress)
        self.memory_budget = check_optional_positive_int("memory_budget", memory_budget)
        self._autofit = check_autofit(checkpointing, micro_batch_size, memory_budget, model)
        self._runner = _micro_batch_runner(
            check_micro_batch_size(micro_batch_size),
            check_optional_positive_int("max_micro_batch_size", max_micro_batch_size),
            self.memory_budget,
            check_optional_positive_int("probe_up_after", probe_up_after),
        )
        #: The [`Plan`][torch_accum.Plan] that ``checkpointing="auto"`` chose, once planned.
        self.plan: Plan | None = None
        self._checkpointing = (
            None
            if self._autofit or checkpointing is None or checkpointing is False
            else ActivationCheckpointing(self.model, cast(CheckpointPolicy, checkpointing))
        )
        self._run = RunState(check_accumulation_steps(accumulation_steps))
        self._precision = GradientPrecision(check_accumulation_dtype(accumulation_dtype))
        self._boundary = BoundaryUpdate(
            self.model,
            self.optimizers,
            self.schedulers,
            self.scaler,
            self.max_grad_norm,
            self.on_nonfinite,
        )
        self._interception = LoopInterception(
            self.model, self.optimizers, self.schedulers, self.scaler
        )
        self._sync = GradientSync.for_model(self.model, self.sync_each_micro_batch)
        self._precision.refusal = self._precision_refusal()
        if self._precision.refusal is not None and (
            self.accumulation_steps > 1 or self._runner is not None
        ):
            raise ValueError(self._precision.refusal)
        self._boundary.precision = self._precision
        self._driver = WindowDriver(
            self.model,
            self.optimizers,
            self._boundary,
            self._interception,
            self._run,
            self._sync,
            partial_window=self.partial_window,
            sync_each_micro_batch=self.sync_each_micro_batch,
            precision=self._precision,
        )
        self._active = False
        _keep_backward_out_of_compile()

    def _precision_refusal(self) -> str | None:
        """Why ``accumulation_dtype`` cannot apply to this model here (None: it can)."""
        params = self._boundary.parameters()
        reason = unsupported_reason(params, self._precision.dtype)
        if reason is not None or not self._precision.applies_to(params) or self._sync is None:
            return reason
        dtype = self._precision.dtype
        if not self._sync.is_ddp:
            return (
                f"accumulation_dtype={dtype} does not apply under FSDP2, which accumulates "
                "unsharded gradients itself: keep the sharded parameters in float32 with "
                "fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                "reduce_dtype=torch.float32)), or pass accumulation_dtype=None"
            )
        if self.sync_each_micro_batch:
            return (
                f"accumulation_dtype={dtype} with sync_each_micro_batch=True: DDP would "
                "all-reduce every micro-batch in the parameters' dtype. Pass "
                "sync_each_micro_batch=False (the window's float32 sum is then averaged once, "
                "in float32), or accumulation_dtype=None"
            )
        return None

    # ------------------------------------------------------------------ observability
    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step; a new value applies from the next window on."""
        return self._run.accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        self._run.accumulation_steps = check_accumulation_steps(value)
        window = self._run.window
        if window.state is WindowState.ACCUMULATING and window.count == 0:
            window.length = value

    @property
    def optimizer_steps(self) -> int:
        """Real optimizer steps taken."""
        return self._run.optimizer_steps

    @property
    def skipped_steps(self) -> int:
        """Windows skipped for non-finite gradients."""
        return self._run.skipped_steps

    @property
    def sync_gradients(self) -> bool:
        """Whether the current micro-batch ends the window, so that its step is real.

        True from the ``backward`` that completes a window until the next ``backward``,
        i.e. for the rest of that loop iteration: guard per-window work (hand clipping, EMA
        updates, logging ``acc.loss``) with it. The final, shorter window of a block is a
        boundary too when the block's length is known (``total_micro_batches`` or
        ``iterate``); otherwise it is applied when the block exits.
        """
        return self._driver.sync_gradients

    @property
    def micro_step(self) -> int:
        """Micro-batches accumulated since the last update (0 right after one)."""
        return self._run.window.pending

    @property
    def loss(self) -> float | None:
        """The (weighted) mean loss of the last completed window, or None before one."""
        return self._run.loss()

    @property
    def checkpointed_modules(self) -> tuple[str, ...]:
        """Qualified names of the blocks run under activation checkpointing in the block."""
        return () if self._checkpointing is None else self._checkpointing.names

    @property
    def active(self) -> bool:
        """Whether the ``with`` block is running."""
        return self._active

    @property
    def window_state(self) -> WindowState:
        """The current window's [`WindowState`][torch_accum.WindowState]."""
        return self._run.window.state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(accumulation_steps={self.accumulation_steps}, "
            f"micro_step={self.micro_step}, optimizer_steps={self.optimizer_steps}, "
            f"skipped_steps={self.skipped_steps}, sync_gradients={self.sync_gradients}, "
            f"active={self._active})"
        )

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Accumulator:
        _keep_backward_out_of_compile()
        if self._active:
            raise RuntimeError(
                "this Accumulator is already active; leave its `with` block before "
                "entering it again"
            )
        self._interception.check_free()
        try:
            self._interception.install(self._driver, owner=self)
            if self._checkpointing is not None:
                self._checkpointing.install()
            self._run.block_micro_batches = self._run.block_runner_micro_batches = 0
            if self._sync is not None:
                self._sync.enter(self._driver, self.total_micro_batches)
        except BaseException:
            self._restore()
            raise
        self._driver.block_end = self.total_micro_batches
        if self.progress:
            total = self.total_micro_batches
            self._driver.progress = ProgressBar(
                None if total is None else -(-total // self.accumulation_steps)
            )
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            # After an exception nothing is applied: the pending window stays as it is
            # (see state_dict; acc.discard() drops it) and the user decides.
            if exc_type is None:
                self._driver.finish_block()
        finally:
            self._active = False
            self._driver.block_end = None
            self._driver.items_end = False
            try:
                self._restore()
            finally:
                # A pending window keeps its float32 sums for the next block or state_dict.
                if not self._run.window.pending:
                    self._precision.narrow()

    def _restore(self) -> None:
        if self._driver.progress is not None:
            self._driver.progress.close()
            self._driver.progress = None
        try:
            if self._sync is not None:
                self._sync.exit()
        finally:
            try:
                self._interception.restore()
            finally:
                if self._checkpointing is not None:
                    self._checkpointing.restore()

    # ------------------------------------------------------------------ the loop's calls
    # Run eagerly when a compiled function calls acc.backward(loss): one graph break, as
    # for loss.backward() (which dynamo cannot trace either), instead of guards on the
    # window's counters that would recompile the caller at every micro-batch.
    def backward(
        self, loss: torch.Tensor, weight: float | int | torch.Tensor | None = None
    ) -> None:
        """Accumulate the gradient of one micro-batch's ``loss``.

        Args:
            loss: the micro-batch's scalar loss, reduced as for a full batch (e.g. a mean).
            weight: the micro-batch's share of the window, for example its number of
                tokens when ``loss`` is a mean over tokens: any real number (numpy
                scalars included) or one-element tensor. The update is then the exact
                weighted mean over the window. Defaults to 1 (all micro-batches equal).

        Examples:
            >>> import torch
            >>> from torch_accum import Accumulator
            >>> model = torch.nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> # Micro-batches of 3 and 1 samples, each loss a mean over its samples:
            >>> batches = [torch.randn(3, 2), torch.randn(1, 2)]
            >>> with Accumulator(model, optimizer, accumulation_steps=2) as acc:
            ...     for x in batches:
            ...         acc.backward(model(x).pow(2).mean(), weight=len(x))
            ...         optimizer.step()
            >>> acc.optimizer_steps
            1
        """
        self._require_active("acc.backward()")
        loss = check_loss(loss)
        weight_value = 1.0 if weight is None else check_weight(weight)
        self._driver.micro_batch(loss, weight_value, weighted=weight is not None)

    def iterate(self, iterable: Iterable[Item]) -> Iterator[Item]:
        """Yield the items of ``iterable``, looking one ahead to find the last.

        The last item's micro-batch then ends the block's final window inside the loop:
        ``acc.sync_gradients`` is True there and the loop's ``optimizer.step()`` applies
        it, so per-window code under ``if acc.sync_gradients:`` sees every window. Works
        for any iterable, with or without ``len``; one ``acc.backward`` per item (leave
        items out before it, not in the loop). A wrapper may read it ahead (a prefetcher).

        Examples:
            >>> import torch
            >>> from torch_accum import Accumulator
            >>> model = torch.nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> acc = Accumulator(model, optimizer, accumulation_steps=4)
            >>> ends = []
            >>> with acc:
            ...     for x in acc.iterate(torch.randn(6, 3, 2)):  # windows of 4 and 2
            ...         acc.backward(model(x).pow(2).mean())
            ...         optimizer.step()
            ...         ends.append(acc.sync_gradients)
            >>> ends
            [False, False, False, True, False, True]
        """
        iterator = iter(iterable)
        self._require_active("acc.iterate()")
        # One acc.backward per item: the last item's is the block's micro-batch number
        # start + items, however far ahead the loop reads (a prefetching wrapper, even in a
        # thread, or acc.iterate around acc.iterate), unlike the count when it is handed out.
        start, handed = self._run.block_micro_batches, 0
        try:
            item = next(iterator)
        except StopIteration:
            return
        for upcoming in iterator:
            yield item
            handed += 1
            item = upcoming
        self._require_active("acc.iterate()")
        self._driver.block_end = start + handed + 1
        self._driver.items_end = True
        yield item

    def discard(self) -> int:
        """Drop the pending window, gradients and counts; return its micro-batch count.

        For example after catching an error in the middle of a window, or before saving
        a checkpoint that should not hold a partial window. Works inside and outside the
        ``with`` block.
        """
        window = self._run.window
        if window.state is WindowState.APPLYING:
            raise RuntimeError("acc.discard() cannot run during the optimizer update")
        dropped = window.pending
        if dropped:
            self._driver.drop_window()
        return dropped

    # ------------------------------------------------------------------ whole batches
    @property
    def micro_batch_size(self) -> int | None:
        """The micro-batch size ``step_batch`` uses now (None before the first auto batch)."""
        return None if self._runner is None else self._runner.sizes.current

    @property
    def oom_retries(self) -> int:
        """Logical batches replayed with smaller micro-batches after out-of-memory errors."""
        return 0 if self._runner is None else self._runner.sizes.oom_retries

    def step_batch(
        self,
        batch: Any,
        compute_loss: Callable[[Any], torch.Tensor],
        *,
        weight: Callable[[Any], float | int | torch.Tensor] | None = None,
    ) -> float:
        """Train on one logical batch as one optimizer step, in micro-batches that fit.

        ``batch`` (a tensor, or tuples/lists/dicts of tensors, split along dimension 0) is
        cut into micro-batches of ``micro_batch_size``; ``compute_loss(micro_batch)``
        returns each one's mean loss, weighted by its number of samples (or by
        ``weight(micro_batch)``), so the update equals the full-batch update however the
        batch is cut. Then the real optimizer step runs. With ``micro_batch_size="auto"`` an
        out-of-memory error discards the attempt and replays the whole batch, from the same
        RNG state and buffers, with micro-batches half as large. Any other error discards
        the partial batch and propagates. Returns the batch's mean loss.

        Examples:
            >>> import torch
            >>> from torch_accum import Accumulator
            >>> model = torch.nn.Linear(3, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> acc = Accumulator(model, optimizer, micro_batch_size=8)
            >>> x, y = torch.randn(37, 3), torch.randn(37, 1)
            >>> def compute_loss(micro):
            ...     return torch.nn.functional.mse_loss(model(micro[0]), micro[1])
            >>> with acc:
            ...     loss = acc.step_batch((x, y), compute_loss)  # micro-batches 8, 8, 8, 8, 5
            >>> acc.optimizer_steps
            1
        """
        if self._runner is None:
            raise RuntimeError(
                "step_batch() needs a micro-batch size: construct the Accumulator with "
                "micro_batch_size=<int> or micro_batch_size='auto'"
            )
        self._require_active("acc.step_batch()")
        if self._run.window.pending:
            raise RuntimeError(
                f"step_batch() needs an empty window, but {self._run.window.pending} "
                "micro-batches from acc.backward() are pending; finish that window first, "
                "or drop it with acc.discard()"
            )
        if self._sync is not None and not self._sync.is_ddp:
            raise RuntimeError("step_batch() supports DDP but not FSDP2 yet; use acc.backward()")
        if self._autofit and self.plan is None:
            self.plan = plan_first_batch(
                self._driver, self._runner.sizes, batch, compute_loss, self.memory_budget
            )
            if self.plan.checkpointing is not False:
                self._checkpointing = ActivationCheckpointing(self.model, self.plan.checkpointing)
                self._checkpointing.install()
        return self._runner.step_batch(self._driver, batch, compute_loss, weight)

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        """Counters and the pending window, including its accumulated gradients.

        Save it with the model, optimizer, scheduler and scaler state dicts; after
        ``load_state_dict`` a run resumed mid-window continues exactly.

        Examples:
            >>> import torch
            >>> from torch_accum import Accumulator
            >>> model = torch.nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> acc = Accumulator(model, optimizer, 4, partial_window="carry")
            >>> with acc:
            ...     acc.backward(model(torch.randn(3, 2)).pow(2).mean())
            >>> # One micro-batch pending, saved with its gradients:
            >>> state = acc.state_dict()
            >>> resumed = Accumulator(model, optimizer, 4)
            >>> resumed.load_state_dict(state)
            >>> resumed.micro_step
            1
        """
        return self._run.state_dict(self._boundary.parameters())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved, including pending gradients."""
        if self._run.window.state is WindowState.APPLYING:
            raise RuntimeError("load_state_dict() cannot run during an optimizer update")
        driver = self._driver
        params = self._boundary.parameters()
        saved = state_dict.get("gradients") if isinstance(state_dict, Mapping) else None
        if saved is not None and any(
            g is not None and g.dtype != p.dtype for g, p in zip(saved, params, strict=False)
        ):
            # Sums saved in float32 go back into float32 gradients, bitwise.
            self._precision.widen(params)
        replaced = self._run.window
        self._run.load_state_dict(state_dict, params, driver.finite_check)
        # The scaler would refuse to unscale again what the replaced window had unscaled.
        self._interception.forget_unscale(replaced.unscaled)
        if not self._run.window.pending:
            # Saved with no window pending, so with no gradients: a rollback inside the block
            # must not keep those of the micro-batches run since (nothing else clears them).
            driver.clear_gradients()
            self._precision.narrow()
        if driver.watch is not None:
            driver.watch.record(self.optimizers)

    def __getstate__(self) -> dict[str, Any]:
        # Pickle would drop what a run depends on: a pending window's gradients live in the
        # parameters' .grad, which a pickled parameter leaves behind.
        raise TypeError(
            "an Accumulator cannot be pickled: a pickled model leaves the accumulated "
            "gradients of a pending window behind, so the copy would resume wrong. Save "
            "acc.state_dict() (next to the model, optimizer, scheduler and scaler state "
            "dicts) and restore it with acc.load_state_dict() into a new Accumulator"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Accumulator:
        """A copy of the Accumulator with its model, optimizers and pending gradients."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        # nn.Parameter's deepcopy leaves .grad behind, where a pending window lives.
        originals, copies = self._boundary.parameters(), copied._boundary.parameters()
        for original, param in zip(originals, copies, strict=True):
            if original.grad is not None and param.grad is None:
                if original.grad.dtype != param.dtype:  # a float32 sum (_precision.py)
                    param.grad_dtype = original.grad_dtype
                param.grad = copy.deepcopy(original.grad, memo)
        if copied._driver.watch is not None and copied._run.window.pending:
            copied._driver.watch.record(copied.optimizers)  # the copies' version counters
        return copied

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(
                f"{what} was called outside the `with acc:` block; put the training loop "
                "inside `with acc:`"
            )


PARTIAL_WINDOWS = ("apply", "discard", "carry")


def _micro_batch_runner(
    size: int | Literal["auto"] | None,
    max_size: int | None,
    memory_budget: int | None,
    probe_up_after: int | None,
) -> MicroBatchRunner | None:
    if size != "auto" and (memory_budget or max_size or probe_up_after):
        raise ValueError(
            "memory_budget, max_micro_batch_size and probe_up_after apply to "
            f"micro_batch_size='auto', but micro_batch_size={size!r}; pass "
            "micro_batch_size='auto' or leave them out"
        )
    if size is None:
        return None
    return MicroBatchRunner(MicroBatchSize(size, max_size, probe_up_after), memory_budget)


def _keep_backward_out_of_compile() -> None:
    """Once torch.compile is loaded, leave ``Accumulator.backward`` out of compiled graphs.

    A compiled function that calls ``acc.backward(loss)`` then breaks its graph there once
    and runs it eagerly, as dynamo does for ``loss.backward()``; traced, the window's
    counters would break the graph many times and recompile it as they change. Done when
    an Accumulator is made or entered, not at import: importing dynamo takes about as long
    as importing torch. (A function first compiled inside a ``with`` block, when nothing
    loaded dynamo before, gets this from the next ``with`` block or Accumulator on.)
    """
    if "torch._dynamo" not in sys.modules or _backward_left_to_eager:
        return
    _leave_backward_to_eager()


def _leave_backward_to_eager() -> None:
    global _backward_left_to_eager
    # torch.compiler.disable wraps with functools.wraps: the docstring and signature stay.
    Accumulator.backward = torch.compiler.disable(  # type: ignore[method-assign,no-untyped-call]
        Accumulator.backward
    )
    _backward_left_to_eager = True


_backward_left_to_eager = False
_keep_backward_out_of_compile()
