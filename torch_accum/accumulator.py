"""The Accumulator: exact gradient accumulation around an unchanged training loop."""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, cast

import torch
from torch.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

from torch_accum._gradients import FiniteCheck
from torch_accum._patching import MethodPatches, patch_owner
from torch_accum._validation import (
    check_accumulation_steps,
    check_choice,
    check_flag,
    check_loss,
    check_max_grad_norm,
    check_micro_batch_size,
    check_model,
    check_optimizer,
    check_optional_positive_int,
    check_scaler,
    check_scheduler,
    check_weight,
)
from torch_accum._window import Window
from torch_accum.checkpointing import ActivationCheckpointing, CheckpointPolicy
from torch_accum.distributed import GradientSync
from torch_accum.memory import measure_activation_memory
from torch_accum.microbatch import MicroBatchSize, batch_size_of, split_batch
from torch_accum.progress import ProgressBar, check_progress

logger = logging.getLogger(__name__)

PartialWindow = Literal["apply", "discard", "carry"]
OnNonFinite = Literal["skip", "raise"]

_PARTIAL_WINDOW_CHOICES = ("apply", "discard", "carry")
_ON_NONFINITE_CHOICES = ("skip", "raise")


class Accumulator:
    """Exact gradient accumulation as a context manager around your own training loop.

    Inside ``with acc:`` the loop keeps its ``optimizer.step()``, ``optimizer.zero_grad()``
    and ``scheduler.step()`` calls (and the AMP calls ``scaler.step(optimizer)``,
    ``scaler.update()``, ``scaler.unscale_(optimizer)``); they take effect only at the
    accumulation boundary, every ``accumulation_steps`` calls of :meth:`backward`. There
    the Accumulator performs the real update, in this order: unscale (scaler), non-finite
    check, clipping to ``max_grad_norm``, optimizer step, scaler update, scheduler step,
    zero_grad. Leaving the block restores every patched method, also on an exception.

    The update equals ``sum(w_i * grad(loss_i)) / sum(w_i)`` over the micro-batches of the
    window, with ``w_i = 1`` unless :meth:`backward` is given a ``weight``. So K micro-batches
    with mean-reduced losses give the full-batch mean gradient, a short final window is
    averaged over its own length, and ``weight=n_tokens`` gives the exact token mean.

    Args:
        model: the module being trained.
        optimizer: the optimizer that updates it.
        accumulation_steps: micro-batches per optimizer step (1 disables accumulation).
        scheduler: LR scheduler of ``optimizer``, stepped once per real optimizer step and
            not for skipped steps. ``ReduceLROnPlateau`` is not accepted (it needs a metric).
        scaler: a ``torch.amp.GradScaler``; :meth:`backward` scales the loss with it, so
            pass it the unscaled loss.
        max_grad_norm: clip the accumulated, unscaled gradient to this total 2-norm.
        partial_window: what leaving the block with fewer than ``accumulation_steps``
            micro-batches pending does: ``"apply"`` (default) one update averaged over
            them; ``"discard"`` drops them (logged); ``"carry"`` keeps them for the next
            ``with`` block of this Accumulator.
        on_nonfinite: without an enabled scaler, a window whose gradient is not finite is
            skipped (``"skip"``, default: parameters, optimizer state and scheduler
            untouched, gradients cleared, counted in ``skipped_steps``, a warning) or raises
            a ``RuntimeError`` naming the parameters (``"raise"``). With a scaler, the
            scaler's skip and back-off apply instead.
        checkpointing: run blocks of ``model`` under non-reentrant activation
            checkpointing while the ``with`` block runs, trading a recomputed forward for
            memory: ``True`` for the repeated blocks (same-class modules in an
            ``nn.ModuleList``/``nn.Sequential``, e.g. transformer blocks), an ``nn.Module``
            class or tuple of classes, or a callable ``module -> bool``. The wrapped blocks
            are listed in :attr:`checkpointed_modules`. Default off.
        sync_each_micro_batch: under DDP or FSDP2 (detected from ``model``), synchronise
            gradients on every micro-batch instead of once per window: K times the
            communication, but FSDP2 then keeps only sharded gradients. Default False.
        total_micro_batches: how many micro-batches each ``with`` block runs (e.g.
            ``len(loader)``), if known. Under DDP/FSDP2 the block's last micro-batch then
            synchronises in its backward even when it ends a partial window; without it
            DDP all-reduces a pending partial window on exit, and FSDP2 cannot (it raises).
            It also gives the progress bar its total.
        micro_batch_size: for :meth:`step_batch`: an int, or ``"auto"`` to find the
            largest micro-batch that fits (halving and replaying the batch on
            ``torch.OutOfMemoryError``); ``max_micro_batch_size`` caps where it starts,
            ``memory_budget`` (bytes) sizes it up front from a measured probe on any
            device, and ``probe_up_after`` tries twice the size again after that many
            batches without an error.
        progress: a tqdm bar counting optimizer steps, with the micro-batch in the
            window, the window's loss, the learning rate and skipped steps. ``None``
            (default): only when stderr is a terminal and tqdm is installed.

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
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int = 1,
        *,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        partial_window: PartialWindow = "apply",
        on_nonfinite: OnNonFinite = "skip",
        checkpointing: CheckpointPolicy | None = False,
        sync_each_micro_batch: bool = False,
        total_micro_batches: int | None = None,
        micro_batch_size: int | Literal["auto"] | None = None,
        max_micro_batch_size: int | None = None,
        memory_budget: int | None = None,
        probe_up_after: int | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model = check_model(model)
        self.optimizer = check_optimizer(optimizer)
        self.accumulation_steps = check_accumulation_steps(accumulation_steps)
        self.scheduler = check_scheduler(scheduler, self.optimizer)
        self.scaler = check_scaler(scaler)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.partial_window = check_choice(
            "partial_window", partial_window, _PARTIAL_WINDOW_CHOICES
        )
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, _ON_NONFINITE_CHOICES)
        self.sync_each_micro_batch = check_flag("sync_each_micro_batch", sync_each_micro_batch)
        self.total_micro_batches = check_optional_positive_int(
            "total_micro_batches", total_micro_batches
        )
        self._sync = GradientSync.for_model(self.model, self.sync_each_micro_batch)
        self.progress = check_progress(progress)
        self._progress: ProgressBar | None = None
        micro_batch_size = check_micro_batch_size(micro_batch_size)
        max_micro_batch_size = check_optional_positive_int(
            "max_micro_batch_size", max_micro_batch_size
        )
        self.memory_budget = check_optional_positive_int("memory_budget", memory_budget)
        probe_up_after = check_optional_positive_int("probe_up_after", probe_up_after)
        if micro_batch_size != "auto" and (memory_budget or max_micro_batch_size or probe_up_after):
            raise ValueError(
                "memory_budget, max_micro_batch_size and probe_up_after apply to "
                f"micro_batch_size='auto', but micro_batch_size={micro_batch_size!r}; pass "
                "micro_batch_size='auto' or leave them out"
            )
        self._checkpointing = (
            None
            if checkpointing is None or checkpointing is False
            else ActivationCheckpointing(self.model, checkpointing)
        )

        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._window = Window()
        self._last_window: Window | None = None
        self._last_loss: float | None = None
        # The window is complete and normalised; the next optimizer.step() applies it.
        self._window_ready = False
        # The latest backward() ended a window; cleared by the next backward().
        self._ended_window = False
        self._unscaled = False
        # Whether the ready window holds inf/NaN, when _close_window checked it.
        self._window_nonfinite = False
        # The micro-batches of the window so far were synchronised across ranks.
        self._window_synced = False
        self._block_micro_batches = 0
        # The boundary has just cleared the gradients; the loop's zero_grad() can skip it.
        self._grads_cleared = False
        # True while the real update runs, so the patched methods pass calls through.
        self._in_update = False
        self._active = False
        self._patches = MethodPatches()
        self._finite_check = FiniteCheck()
        # Micro-batches per window: accumulation_steps, or the split of step_batch().
        self._window_length = self.accumulation_steps
        self._in_step_batch = False
        self._last_micro_batch_size: int | None = None
        self._micro_batch_size = (
            None
            if micro_batch_size is None
            else MicroBatchSize(micro_batch_size, max_micro_batch_size, probe_up_after)
        )
        self._seed_cache: dict[
            tuple[float, torch.dtype, torch.device, torch.Size], torch.Tensor
        ] = {}

    # ------------------------------------------------------------------ observability
    @property
    def sync_gradients(self) -> bool:
        """Whether the current micro-batch ends the window, so that its step is real.

        True from the :meth:`backward` that completes a window until the next
        :meth:`backward`, i.e. for the rest of that loop iteration: guard per-window work
        (logging ``acc.loss``, inspecting gradients) with it. A final partial window is
        not known to be final until the block exits, so it reads False there.
        """
        if self._window_ready or self._ended_window:
            return True
        # Before the first backward of a window only K=1 is known to end it.
        return self._window.count == 0 and self.accumulation_steps == 1

    @property
    def micro_step(self) -> int:
        """Micro-batches accumulated since the last update (0 right after one)."""
        return self._window.count

    @property
    def loss(self) -> float | None:
        """The (weighted) mean loss of the last completed window, or None before one."""
        if self._last_window is None:
            return None
        if self._last_loss is None:
            self._last_loss = self._last_window.mean_loss()
        return self._last_loss

    @property
    def checkpointed_modules(self) -> tuple[str, ...]:
        """Qualified names of the blocks run under activation checkpointing in the block."""
        return () if self._checkpointing is None else self._checkpointing.names

    @property
    def active(self) -> bool:
        """Whether the ``with`` block is running."""
        return self._active

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(accumulation_steps={self.accumulation_steps}, "
            f"micro_step={self.micro_step}, optimizer_steps={self.optimizer_steps}, "
            f"skipped_steps={self.skipped_steps}, sync_gradients={self.sync_gradients}, "
            f"active={self._active})"
        )

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Accumulator:
        if self._active:
            raise RuntimeError(
                "this Accumulator is already active; leave its `with` block before "
                "entering it again"
            )
        if patch_owner(self.optimizer.step) is not None:
            raise RuntimeError(
                "the optimizer is already driven by another active Accumulator; use one "
                "Accumulator per optimizer, or leave the other's `with` block first"
            )
        try:
            self._install_patches()
            if self._sync is not None:
                self._sync.enter(self._next_is_last)
        except BaseException:
            self._restore()
            raise
        self._block_micro_batches = 0
        if self.progress:
            total = self.total_micro_batches
            self._progress = ProgressBar(
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
            # (see state_dict) and the user decides.
            if exc_type is None:
                self._finish_pending_window()
        finally:
            self._active = False
            self._restore()

    def _restore(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        try:
            if self._sync is not None:
                self._sync.exit()
        finally:
            self._patches.restore()

    def _install_patches(self) -> None:
        replace = self._patches.replace
        optimizer = self.optimizer
        self._real_step = replace(optimizer, "step", self._on_optimizer_step, self)
        self._real_zero_grad = replace(optimizer, "zero_grad", self._on_zero_grad, self)
        if self.scheduler is not None:
            self._real_scheduler_step = replace(
                self.scheduler, "step", self._on_scheduler_step, self
            )
            self._real_scheduler_state_dict = replace(
                self.scheduler, "state_dict", self._on_scheduler_state_dict, self
            )
        if self.scaler is not None:
            scaler = self.scaler
            self._real_scaler_step = replace(scaler, "step", self._on_scaler_step, self)
            self._real_scaler_update = replace(scaler, "update", self._on_scaler_update, self)
            self._real_unscale = replace(scaler, "unscale_", self._on_unscale, self)
        if self._checkpointing is not None:
            self._checkpointing.install(self._patches, self)

    # ------------------------------------------------------------------ the loop's calls
    def backward(
        self, loss: torch.Tensor, weight: float | int | torch.Tensor | None = None
    ) -> None:
        """Accumulate the gradient of one micro-batch's ``loss``.

        Args:
            loss: the micro-batch's scalar loss, reduced as for a full batch (e.g. a mean).
            weight: the micro-batch's share of the window, for example its number of
                tokens when ``loss`` is a mean over tokens. The update is then the exact
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
        if not self._active:
            raise RuntimeError(
                "acc.backward() was called outside the `with acc:` block; put the "
                "training loop inside `with acc:`"
            )
        if self._window_ready:
            raise RuntimeError(
                "the previous window is complete but its update was not applied: call "
                "optimizer.step() (or scaler.step(optimizer)) after every acc.backward()"
            )
        loss = check_loss(loss)
        weight_value = 1.0 if weight is None else check_weight(weight)
        window = self._window
        if window.count == 0 and not self._in_step_batch:  # step_batch() sets its reference
            window.weighted = weight is not None
            window.reference_weight = self._reference_weight(weight_value, window.weighted)
        relative_weight = window.relative_weight(weight_value)
        # Weighting the loss costs nothing in backward; the boundary corrects for what the
        # weights of later micro-batches turn out to be (see _window.py).
        factor = relative_weight / self._window_length
        scaler = self.scaler if self._scaler_enabled else None
        loss_to_backward = loss if scaler is None else scaler.scale(loss)
        synchronising = self._next_is_last() or self.sync_each_micro_batch
        if self._sync is not None:
            self._sync.before_backward(synchronising)
        self._ended_window = False
        self._grads_cleared = False
        loss_to_backward.backward(self._backward_seed(loss_to_backward, factor))  # type: ignore[no-untyped-call]
        window.add(relative_weight, loss)
        if self._progress is not None:
            self._progress.micro_batch(window.count, self._window_length)
        self._window_synced = synchronising
        self._block_micro_batches += 1
        if window.count == self._window_length and not self._in_step_batch:
            self._close_window()

    # ------------------------------------------------------------------ whole batches
    @property
    def micro_batch_size(self) -> int | None:
        """The micro-batch size :meth:`step_batch` uses now (None before the first auto batch)."""
        return None if self._micro_batch_size is None else self._micro_batch_size.current

    @property
    def oom_retries(self) -> int:
        """Logical batches replayed with smaller micro-batches after out-of-memory errors."""
        return 0 if self._micro_batch_size is None else self._micro_batch_size.oom_retries

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
        out-of-memory error discards the attempt's gradients and replays the whole batch
        with micro-batches half as large. Returns the batch's mean loss.

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
        sizes = self._micro_batch_size
        if sizes is None:
            raise RuntimeError(
                "step_batch() needs a micro-batch size: construct the Accumulator with "
                "micro_batch_size=<int> or micro_batch_size='auto'"
            )
        if not self._active:
            raise RuntimeError("acc.step_batch() was called outside the `with acc:` block")
        if self._window.count or self._window_ready:
            raise RuntimeError(
                f"step_batch() needs an empty window, but {self._window.count} micro-batches "
                "from acc.backward() are pending; finish that window first"
            )
        if self._sync is not None and not self._sync.is_ddp:
            raise RuntimeError("step_batch() supports DDP but not FSDP2 yet; use acc.backward()")
        total = batch_size_of(batch)
        size = sizes.for_batch(total)
        if sizes.auto and self.memory_budget is not None and not sizes.sized_from_budget:
            size = sizes.current = self._size_for_budget(batch, compute_loss, total)
            sizes.sized_from_budget = True
        if self._sync is not None:
            size = sizes.current = self._sync.agree_min(size)  # every rank cuts alike
        while True:
            failure = self._attempt(batch, compute_loss, weight, size)
            failed = failure is not None
            if self._sync is not None:
                failed = self._sync.any_rank(failed, always=True)
            if not failed:
                break
            self._discard_window()
            if not sizes.auto:
                raise failure or RuntimeError("another rank ran out of memory")
            if size == 1:
                raise RuntimeError(
                    "out of memory even with micro-batches of 1 sample; the model and "
                    "optimizer state alone do not fit, or compute_loss keeps tensors alive"
                ) from failure
            size = sizes.after_oom(size)
        self._close_window()
        self._apply_update()
        if size != self._last_micro_batch_size:
            logger.info(
                "batch of %d samples in micro-batches of %d (%d out-of-memory retries so far)",
                total,
                size,
                sizes.oom_retries,
            )
            self._last_micro_batch_size = size
        sizes.after_success(total)
        return cast(float, self.loss)

    def _attempt(
        self,
        batch: Any,
        compute_loss: Callable[[Any], torch.Tensor],
        weight: Callable[[Any], float | int | torch.Tensor] | None,
        size: int,
    ) -> BaseException | None:
        """Accumulate the whole batch; return the out-of-memory error that stopped it."""
        pieces = split_batch(batch, size)
        first_micro_batch, first_samples = pieces[0]
        first_weight = check_weight(first_samples if weight is None else weight(first_micro_batch))
        if self._sync is not None:
            # A shared reference agreed before the attempt: no collective may run inside it,
            # where one rank can stop at an out-of-memory error.
            first_weight = self._sync.global_sum(first_weight) / self._sync.world_size
        self._window.weighted, self._window.reference_weight = True, first_weight
        self._window_length, self._in_step_batch = len(pieces), True
        try:
            for micro_batch, samples in pieces:
                self.backward(
                    compute_loss(micro_batch),
                    weight=samples if weight is None else weight(micro_batch),
                )
        except torch.OutOfMemoryError as error:
            return error
        finally:
            self._in_step_batch = False
        return None

    def _discard_window(self) -> None:
        """Drop a failed attempt: gradients, counts, and cached allocator memory."""
        self._real_zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        self._block_micro_batches -= self._window.count
        self._window = Window()
        self._window_length = self.accumulation_steps
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _size_for_budget(
        self, batch: Any, compute_loss: Callable[[Any], torch.Tensor], total: int
    ) -> int:
        """The largest micro-batch whose measured activation peak fits memory_budget."""
        budget = cast(int, self.memory_budget)
        upper = min(total, self._micro_batch_size.upper_bound or total)  # type: ignore[union-attr]
        probe = min(upper, 4)
        per_sample = self._measure_peak(batch, compute_loss, probe) / probe
        size = max(1, min(upper, int(budget // per_sample)))
        while size > 1 and self._measure_peak(batch, compute_loss, size) > budget:
            size = max(1, size * 3 // 4)
        logger.info("memory_budget %d bytes: micro-batches of %d", budget, size)
        return size

    def _measure_peak(
        self, batch: Any, compute_loss: Callable[[Any], torch.Tensor], size: int
    ) -> int:
        """Measure one micro-batch's activation peak, leaving no trace in the model."""
        micro_batch = split_batch(batch, size)[0][0]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng = torch.random.get_rng_state()
        self._in_step_batch = True  # no gradient synchronisation while probing
        try:
            memory = measure_activation_memory(
                lambda: compute_loss(micro_batch), parameters=self.model.parameters()
            )
        finally:
            self._in_step_batch = False
            torch.random.set_rng_state(rng)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            self._real_zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)
        return memory.peak

    def _next_is_last(self) -> bool:
        """Whether the next micro-batch ends a window (or the block, when its length is known)."""
        if self._in_step_batch:
            return False  # step_batch() synchronises explicitly, after the ranks agree
        return self._window.count + 1 == self._window_length or (
            self.total_micro_batches is not None
            and self._block_micro_batches + 1 == self.total_micro_batches
        )

    def _reference_weight(self, first_weight: float, weighted: bool) -> float:
        if self._sync is None:
            return first_weight
        # Across ranks the relative weights must share one reference (distributed.py).
        return self._sync.shared_reference(first_weight) if weighted else 1.0

    def _backward_seed(self, loss: torch.Tensor, factor: float) -> torch.Tensor | None:
        """The gradient to start backward from: ``factor`` instead of 1.

        Seeding backward with the factor, rather than multiplying the loss by it, adds no
        node to the graph; on a small model that is faster than the hand-written
        ``(loss / K).backward()``. The equal-weight seed is cached; a leaf loss gets a fresh
        one, since backward may adopt it as the leaf's .grad and accumulate into it.
        """
        if factor == 1.0:
            return None
        if factor != 1.0 / self._window_length or loss.grad_fn is None:
            return torch.full_like(loss, factor)
        key = (factor, loss.dtype, loss.device, loss.shape)
        seed = self._seed_cache.get(key)
        if seed is None:
            seed = self._seed_cache[key] = torch.full_like(loss, factor)
        return seed

    def _on_optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._in_update:
            return self._real_step(*args, **kwargs)
        if args or kwargs.get("closure") is not None:
            raise TypeError(
                "optimizer.step(closure) is not supported inside an Accumulator: a "
                "closure re-evaluates the loss, which defeats accumulation; call "
                "optimizer.step() without a closure"
            )
        if self._window_ready:
            self._apply_update()
        return None

    def _on_zero_grad(self, set_to_none: bool = True) -> None:
        # Clearing is harmless only while nothing is accumulated (top-of-loop zero_grad),
        # and needless right after the boundary cleared the gradients itself.
        if self._in_update or (self._window.count == 0 and not self._grads_cleared):
            self._real_zero_grad(set_to_none=set_to_none)

    def _on_scheduler_step(self, *args: Any, **kwargs: Any) -> None:
        if self._in_update:
            self._real_scheduler_step(*args, **kwargs)

    def _on_scheduler_state_dict(self) -> dict[str, Any]:
        return self._patches.scrub(self.scheduler, self._real_scheduler_state_dict())

    def _on_scaler_step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if self._in_update or optimizer is not self.optimizer:
            return self._real_scaler_step(optimizer, *args, **kwargs)
        return self._on_optimizer_step(*args, **kwargs)

    def _on_scaler_update(self, *args: Any, **kwargs: Any) -> None:
        if self._in_update:
            self._real_scaler_update(*args, **kwargs)

    def _on_unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self._in_update or optimizer is not self.optimizer:
            self._real_unscale(optimizer)
        elif self._window_ready and not self._unscaled:
            # The user unscales to clip or inspect the finished window themselves.
            self._real_unscale(optimizer)
            self._unscaled = True

    # ------------------------------------------------------------------ the boundary
    @property
    def _scaler_enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params() if p.grad is not None]

    def _close_window(self) -> None:
        # The losses were scaled by r_i / K; this turns the sum into sum(r_i g_i) / sum(r_i).
        # It is exactly 1 for a full window of equal weights.
        correction = self._window_length / self._window.relative_weight_sum
        grads = self._grads()
        if self._sync is not None:
            correction = self._synchronise_window(grads)
        if self._checks_gradients_itself:
            # Correct and look for inf/NaN in one pass; the update reads the verdict.
            nonfinite = bool(grads) and self._finite_check(grads, correction)
            self._window_nonfinite = (
                nonfinite if self._sync is None else self._sync.any_rank(nonfinite)
            )
        elif correction != 1.0 and grads:
            torch._foreach_mul_(grads, correction)
        self._window_ready = True
        self._ended_window = True

    def _synchronise_window(self, grads: list[torch.Tensor]) -> float:
        """Average a window that ended unsynchronised; return the uniform correction."""
        sync = cast(GradientSync, self._sync)
        window = self._window
        if not self._window_synced:
            sync.average_pending(grads)
            self._window_synced = True
        if not window.weighted:
            # Every rank ran the same count (checked by sync.agree): K / count everywhere.
            return self._window_length / window.count
        # Averaged over R ranks the gradient is sum(w g) / (R K w_ref); make it sum(w g) / W.
        total = sync.global_sum(window.weight_sum)
        sync.shared_reference_weight = total / (sync.world_size * window.count)
        return self._window_length * window.reference_weight * sync.world_size / total

    @property
    def _checks_gradients_itself(self) -> bool:
        # A scaler checks for inf/NaN itself, and clipping computes the total norm anyway.
        return not self._scaler_enabled and self.max_grad_norm is None

    def _apply_update(self) -> None:
        self._in_update = True
        try:
            skipped = self._scaled_update() if self._scaler_enabled else self._plain_update()
            if skipped:
                self.skipped_steps += 1
            else:
                self.optimizer_steps += 1
                if self.scheduler is not None:
                    self.scheduler.step()
            self._real_zero_grad(set_to_none=True)
            self._grads_cleared = True
        finally:
            self._in_update = False
        self._end_window()
        if self._progress is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
            self._progress.optimizer_step(self.loss, lr, self.skipped_steps)

    def _end_window(self) -> None:
        self._last_window = self._window
        self._last_loss = None
        self._window = Window()
        self._window_length = self.accumulation_steps  # step_batch() may have changed it
        self._window_ready = False
        self._window_nonfinite = False
        self._unscaled = False

    def _plain_update(self) -> bool:
        """Check, clip and step without a scaler; return whether the step was skipped."""
        params = [p for p in self._params() if p.grad is not None]
        total_norm = None
        if self.max_grad_norm is not None and params:
            total_norm = get_total_norm([p.grad for p in params])  # type: ignore[misc]
            nonfinite = not bool(torch.isfinite(total_norm))
        else:
            nonfinite = self._window_nonfinite
        if nonfinite:
            self._reject_nonfinite(params)
            return True
        if total_norm is not None:
            clip_grads_with_norm_(params, cast(float, self.max_grad_norm), total_norm)
        self._real_step()
        return False

    def _reject_nonfinite(self, params: list[torch.Tensor]) -> None:
        names = self._nonfinite_parameter_names(params)
        where = (
            f"{len(names)} parameter(s): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        )
        if self.on_nonfinite == "raise":
            self._real_zero_grad(set_to_none=True)
            self._end_window()
            raise RuntimeError(
                f"non-finite gradient in {where}; the update was not applied and the "
                "gradients were cleared. Lower the learning rate, check the inputs, or "
                "pass on_nonfinite='skip'"
            )
        message = (
            f"non-finite gradient in {where}: optimizer step {self.optimizer_steps + 1} "
            f"skipped, gradients cleared ({self.skipped_steps + 1} skipped so far)"
        )
        # A warning for the person at the terminal, a log record for the training logs.
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _nonfinite_parameter_names(self, params: list[torch.Tensor]) -> list[str]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [
            names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
            for p in params
            if not torch.isfinite(p.grad).all()  # type: ignore[arg-type]
        ]

    def _scaled_update(self) -> bool:
        """Unscale, clip and step through the GradScaler; return whether it skipped."""
        scaler = cast(torch.amp.GradScaler, self.scaler)  # only called when enabled
        if not self._unscaled:
            self._real_unscale(self.optimizer)
        if self.max_grad_norm is not None:
            # Non-finite gradients turn into NaN here; the scaler then skips the step.
            clip_grad_norm_(self._params(), self.max_grad_norm)
        scale_before = scaler.get_scale()
        self._real_scaler_step(self.optimizer)
        self._real_scaler_update()
        # GradScaler backs the scale off exactly when it found infs and skipped the step.
        skipped = scaler.get_scale() < scale_before
        if skipped:
            logger.info(
                "GradScaler found inf/NaN gradients and skipped the step; scale %s -> %s",
                scale_before,
                scaler.get_scale(),
            )
        return skipped

    def _finish_pending_window(self) -> None:
        if self._sync is not None:
            self._sync.agree(finishing=True, pending=self._window.count)
        if self._window_ready:
            self._apply_update()
            return
        pending = self._window.count
        if pending == 0:
            return
        if self.partial_window == "apply":
            logger.debug("applying a partial window of %d micro-batches", pending)
            self._close_window()
            self._apply_update()
        elif self.partial_window == "discard":
            logger.info("discarding a partial window of %d micro-batches", pending)
            self._real_zero_grad(set_to_none=True)
            self._window = Window()
        else:
            logger.debug("carrying a partial window of %d micro-batches over", pending)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Counters and the pending window, including its accumulated gradients.

        Save it with the model, optimizer, scheduler and scaler state dicts; after
        :meth:`load_state_dict` a run resumed mid-window continues exactly.

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
        if self._unscaled:
            raise RuntimeError(
                "state_dict() was called between scaler.unscale_() and the step; call it "
                "after acc.backward() or after optimizer.step()"
            )
        gradients = None
        if self._window.count:
            gradients = [
                None if p.grad is None else p.grad.detach().clone() for p in self._params()
            ]
        return {
            "accumulation_steps": self.accumulation_steps,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "window": self._window.state_dict(),
            "window_ready": self._window_ready,
            "last_window": None if self._last_window is None else self._last_window.state_dict(),
            "gradients": gradients,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, including pending gradients."""
        if self._in_update:
            raise RuntimeError("load_state_dict() cannot run during an optimizer update")
        window = Window.from_state_dict(state_dict["window"])
        saved_steps = state_dict["accumulation_steps"]
        if window.count and saved_steps != self.accumulation_steps:
            raise ValueError(
                f"state_dict holds a pending window of accumulation_steps={saved_steps}, "
                f"but this Accumulator has accumulation_steps={self.accumulation_steps}; "
                "construct it with the saved value to resume mid-window"
            )
        gradients = state_dict["gradients"]
        if gradients is not None:
            self._load_gradients(gradients)
        self.optimizer_steps = int(state_dict["optimizer_steps"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self._window = window
        self._window_ready = bool(state_dict["window_ready"])
        grads = self._grads()
        # The verdict is not saved: it is a function of the restored gradients.
        self._window_nonfinite = self._window_ready and bool(grads) and self._finite_check(grads)
        last = state_dict["last_window"]
        self._last_window = None if last is None else Window.from_state_dict(last)
        self._last_loss = None

    def _load_gradients(self, gradients: list[torch.Tensor | None]) -> None:
        params = self._params()
        if len(gradients) != len(params):
            raise ValueError(
                f"state_dict['gradients'] has {len(gradients)} entries but the optimizer "
                f"has {len(params)} parameters; load it into the same model and optimizer"
            )
        for index, (param, grad) in enumerate(zip(params, gradients, strict=True)):
            if grad is not None and grad.shape != param.shape:
                raise ValueError(
                    f"state_dict['gradients'][{index}] has shape {tuple(grad.shape)} but "
                    f"the parameter has shape {tuple(param.shape)}; load it into the same "
                    "model and optimizer"
                )
        for param, grad in zip(params, gradients, strict=True):
            param.grad = (
                None if grad is None else grad.to(device=param.device, dtype=param.dtype, copy=True)
            )
