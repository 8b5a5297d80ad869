"""The window's life in the loop: what each call of the user's loop does to it.

``WindowDriver`` moves the current window through its states (``_window.py``) as the loop
calls in: ``acc.backward`` accumulates and closes windows, the intercepted
``optimizer.step()`` applies them through ``BoundaryUpdate``, ``zero_grad`` clears only
what is safe to clear, and the end of the block finishes a partial window. It is the
``LoopHandlers`` of ``_interception.py`` and the engine behind the ``Accumulator`` facade
and the micro-batch runner.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from torch_accum._boundary import BoundaryUpdate
from torch_accum._gradients import BackwardSeeds, FiniteCheck, has_nonzero
from torch_accum._interception import GradientWatch, LoopInterception
from torch_accum._precision import LOW_PRECISION, GradientPrecision
from torch_accum._state import RunState
from torch_accum._window import Window, WindowState
from torch_accum.distributed import GradientSync
from torch_accum.progress import ProgressBar

logger = logging.getLogger("torch_accum.accumulator")

# Windows whose micro-batch ended them with a real (or skipped) step: sync_gradients holds.
_ENDED = frozenset(
    {
        WindowState.COMPLETE,
        WindowState.UNSCALED,
        WindowState.APPLYING,
        WindowState.APPLIED,
        WindowState.SKIPPED,
    }
)


class WindowDriver:
    """Drives the current window through its states as the loop calls in."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        boundary: BoundaryUpdate,
        interception: LoopInterception,
        run: RunState,
        sync: GradientSync | None,
        *,
        partial_window: str,
        sync_each_micro_batch: bool,
        precision: GradientPrecision | None = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.boundary = boundary
        self.interception = interception
        self.run = run
        self.sync = sync
        self.partial_window = partial_window
        self.sync_each_micro_batch = sync_each_micro_batch
        self.precision = precision if precision is not None else GradientPrecision(None)
        # Gradients must not change between the micro-batches of a window (FSDP2 keeps
        # unsynchronised gradients internally, so there is nothing to watch).
        self.watch = GradientWatch() if sync is None or sync.is_ddp else None
        self.finite_check = FiniteCheck()
        self.seeds = BackwardSeeds()
        self.progress: ProgressBar | None = None
        self.probing = False
        # The block's micro-batch count when known (total_micro_batches, or iterate()), and
        # whether it counts acc.iterate()'s items.
        self.block_end: int | None = None
        self.items_end = False
        # The loop's latest zero_grad(set_to_none=...) choice, for the clearing it defers.
        self.set_to_none = True

    @property
    def sync_gradients(self) -> bool:
        window = self.run.window
        if window.state in _ENDED:
            return True
        # Before the first backward of a window only K=1 is known to end it.
        return window.pending == 0 and self.run.accumulation_steps == 1

    def micro_batch(self, loss: torch.Tensor, weight: float, weighted: bool) -> None:
        """One ``acc.backward``: accumulate, and close the window if this ends it."""
        run = self.run
        if run.window.is_ready:
            raise RuntimeError(
                "the previous window is complete but its update was not applied: call "
                "optimizer.step() (or scaler.step(optimizer)) after every acc.backward()"
            )
        if self.block_end is not None and run.block_micro_batches >= self.block_end:
            raise RuntimeError(
                f"acc.backward() was called more often than the {self.block_end} micro-batches "
                "this block was declared to run (total_micro_batches, or the items of "
                "acc.iterate(): one acc.backward() per item)"
            )
        if self.boundary.scaler is not None and self.interception.was_scaled(loss):
            raise ValueError(
                "loss was already scaled by scaler.scale(); pass the unscaled loss: "
                "acc.backward(loss) scales it with the Accumulator's scaler"
            )
        window = run.window
        if window.is_terminal or window.count == 0:
            window = self.start_window(run.accumulation_steps, weight, weighted)
        elif self.watch is not None:
            self.watch.check(self.boundary.parameter_names)
        synchronising = self.next_is_last() or self.sync_each_micro_batch
        self.accumulate(loss, weight, synchronising=synchronising)
        if window.count == window.length or self.ends_block(run.block_micro_batches):
            self.close_window()

    def finish_block(self) -> None:
        window = self.run.window
        if self.sync is not None:
            self.sync.finish_block(self.run.block_micro_batches, self.block_end)
        if self.items_end and self.block_end is not None:  # after the ranks agreed
            self._check_one_backward_per_item(self.block_end)
        if window.pending and not window.is_ready:
            if self.partial_window == "apply":
                logger.debug("applying a partial window of %d micro-batches", window.count)
                self.close_window()
            elif self.partial_window == "discard":
                logger.info("discarding a partial window of %d micro-batches", window.count)
                self.drop_window()
            else:
                logger.debug("carrying a partial window of %d micro-batches over", window.count)
        if window.is_ready:
            self.apply_window()
        self.clear_stale_gradients()

    def _check_one_backward_per_item(self, block_end: int) -> None:
        """Warn when the loop ran fewer acc.backward() than acc.iterate() handed out items."""
        missing = block_end - self.run.block_micro_batches
        if missing <= 0:
            return
        message = (
            f"acc.iterate() handed out {missing} more item(s) than acc.backward() ran for, "
            "so the final window ended at the block's exit, not in the loop, and code under "
            "`if acc.sync_gradients:` (hand clipping, EMA, logging) did not see it. Run one "
            "acc.backward() per item: leave items out before acc.iterate(), e.g. "
            "acc.iterate(b for b in loader if keep(b))"
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ the window's life
    def ends_block(self, micro_batches: int) -> bool:
        """Whether the block's ``micro_batches``-th micro-batch closes its final window."""
        return self.block_end == micro_batches and self.partial_window == "apply"

    def start_window(
        self, length: int, first_weight: float, weighted: bool, *, by_runner: bool = False
    ) -> Window:
        """Begin a window (or set up an empty one) whose first micro-batch weighs this."""
        window = self.run.window
        if window.is_terminal and self.watch is not None:
            cleared = [self.optimizers[index] for index in sorted(window.cleared_by_loop)]
            self.watch.check_cleared(cleared, self.boundary.parameter_names)
        if window.is_terminal or by_runner:
            self.clear_stale_gradients()
            window = self.run.window = Window(length)
        window.length = length
        if length > 1:  # one micro-batch adds nothing up: no wider sums needed
            self.precision.widen(self.boundary.parameters())
        if self.sync is not None:
            # DDP would reduce float32 sums in the parameters' dtype: average them here.
            self.sync.reduces_itself = self.precision.widened
        window.weighted = weighted
        window.synchronise_in_backward = not by_runner
        if by_runner or self.sync is None:
            window.reference_weight = first_weight
        else:
            # Across ranks the relative weights must share one reference (distributed.py).
            window.reference_weight = self.sync.shared_reference(first_weight) if weighted else 1.0
        # A window of one micro-batch cannot see the learning rate change in its middle.
        window.learning_rates = self.boundary.learning_rates() if length > 1 else None
        if self.sync is not None:
            self.sync.start_window()
        return window

    def accumulate(self, loss: torch.Tensor, weight: float, *, synchronising: bool) -> None:
        window = self.run.window
        relative_weight = window.relative_weight(weight)
        # Weighting the loss costs nothing in backward; the boundary corrects for what the
        # weights of later micro-batches turn out to be (see _window.py).
        factor = relative_weight / window.length
        scaler = self.boundary.scaler if self.boundary.scaler_enabled else None
        to_backward = loss if scaler is None else scaler.scale(loss)
        if self.sync is not None:
            self.sync.before_backward(synchronising)
        seed_weight = relative_weight
        if factor != 1.0 and to_backward.dtype in LOW_PRECISION:
            # A bfloat16 seed of 1/3 is 0.333984: every gradient of the window would be
            # 0.2% too large, and a correction that small rounds away in bfloat16. Seed
            # with a value the dtype holds exactly instead; the window's correction divides
            # by the seeds actually used (see BackwardSeeds.representable).
            # Float32 sums take the whole 1/K at the close: seeded with the weight alone, a
            # float16 gradient is no smaller than at K = 1 (1/256 of it would underflow).
            length = 1 if self.precision.widened else window.length
            factor = self.seeds.representable(relative_weight, length, to_backward.dtype)
            seed_weight = factor * window.length
        seed = None if factor == 1.0 else self.seeds.get(to_backward, factor)
        to_backward.backward(seed)  # type: ignore[no-untyped-call]
        if seed is not None:
            self.seeds.release(seed, factor)
        window.add(relative_weight, loss, seed_weight)
        self.run.block_micro_batches += 1
        if not window.synchronise_in_backward:
            self.run.block_runner_micro_batches += 1
        if self.watch is not None:
            if window.count < window.length:
                self.watch.record(self.optimizers)
            else:
                self.watch.forget()
        if self.progress is not None:
            self.progress.micro_batch(window.count, window.length)

    def close_window(self) -> None:
        window = self.run.window
        if self.watch is not None:
            self.watch.forget()
        grads = self.boundary.grads()
        correction = window.correction
        if self.sync is not None:
            correction = self.sync.close_window(window, grads)
        if self.boundary.checks_gradients_itself:
            # Correct and look for inf/NaN in one pass; the update reads the verdict.
            nonfinite = bool(grads) and self.finite_check(grads, correction)
            window.nonfinite = nonfinite if self.sync is None else self.sync.any_rank(nonfinite)
        elif correction != 1.0 and grads:
            torch._foreach_mul_(grads, correction)
        window.move_to(WindowState.COMPLETE, "acc.backward()")

    def apply_window(self) -> None:
        window = self.run.window
        self.boundary.check_learning_rates(window.learning_rates)
        try:
            self.boundary.apply(window, self.run.optimizer_steps + 1)
        finally:
            self.run.finish_window()
            if window.state is WindowState.DISCARDED:
                window.cleared_by_loop.update(range(len(self.optimizers)))
        if self.progress is not None:
            lr = float(self.optimizers[0].param_groups[0]["lr"])
            self.progress.optimizer_step(self.run.loss(), lr, self.run.skipped_steps)

    def drop_window(self, *, uncount: bool = False) -> None:
        """Drop the current window: gradients, counts (and block count, for a replay)."""
        window = self.run.window
        if uncount:
            self.run.block_micro_batches -= window.count
            if not window.synchronise_in_backward:
                self.run.block_runner_micro_batches -= window.count
        if not window.is_terminal:
            window.move_to(WindowState.DISCARDED, "acc.discard()")
        if self.watch is not None:
            self.watch.forget()
        self.interception.forget_unscale(window.unscaled)
        self.clear_gradients()
        self.precision.narrow()
        window.cleared_by_loop.update(range(len(self.optimizers)))

    def clear_gradients(self) -> None:
        for index in range(len(self.optimizers)):
            self.interception.real_zero_grad(index, set_to_none=True)
        nn.Module.zero_grad(self.model, set_to_none=True)

    def clear_stale_gradients(self) -> None:
        """Clear what a finished window left, where the loop has not cleared it itself."""
        window = self.run.window
        if not window.is_terminal:
            return
        for index in range(len(self.optimizers)):
            if index not in window.cleared_by_loop:
                self.interception.real_zero_grad(index, set_to_none=self.set_to_none)
                window.cleared_by_loop.add(index)

    def next_is_last(self) -> bool:
        """Whether the next micro-batch ends a window (or the block, when its end is known)."""
        window = self.run.window
        if self.synchronises_explicitly():
            return False  # step_batch() synchronises explicitly, after the ranks agree
        count, length = window.pending, window.length
        if window.is_terminal:
            length = self.run.accumulation_steps
        return count + 1 == length or self.ends_block(self.run.block_micro_batches + 1)

    def synchronises_explicitly(self) -> bool:
        """Inside acc.step_batch() (or its memory probe): no forward agrees or synchronises."""
        window = self.run.window
        return self.probing or not (window.is_terminal or window.synchronise_in_backward)

    def micro_batches(self) -> int:
        """The block's micro-batches of acc.backward(), which the ranks compare.

        Those of acc.step_batch() are left out: there ranks may cut batches of different
        sizes into different numbers of pieces (its calls are agreed on instead).
        """
        return self.run.block_micro_batches - self.run.block_runner_micro_batches

    def accumulation_steps(self) -> int:
        return self.run.accumulation_steps

    @contextlib.contextmanager
    def sync_paused(self) -> Iterator[None]:
        """No gradient synchronisation (memory probes of step_batch)."""
        self.probing = True
        try:
            yield
        finally:
            self.probing = False

    # ------------------------------------------------------------------ LoopHandlers
    def passing_through(self) -> bool:
        """Intercepted calls go straight through while the boundary update runs."""
        return self.run.window.state is WindowState.APPLYING

    def on_step(self, index: int) -> None:
        window = self.run.window
        if window.is_ready:
            self.apply_window()
        elif window.state is WindowState.ACCUMULATING and window.count == 0:
            grads = [
                p.grad
                for group in self.optimizers[index].param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if has_nonzero(grads):
                raise RuntimeError(
                    "optimizer.step() found gradients, but no acc.backward() ran in this "
                    "window, so nothing would ever be applied: replace loss.backward() by "
                    "acc.backward(loss). If a second optimizer trains on the same loss, pass "
                    "both to one Accumulator: Accumulator(model, [optimizer_a, optimizer_b])"
                )

    def on_zero_grad(self, index: int | None, set_to_none: bool) -> bool:
        """Whether the loop's zero_grad may clear now; remembers its ``set_to_none``."""
        self.set_to_none = set_to_none
        window = self.run.window
        if window.is_terminal:
            if index is not None:
                window.cleared_by_loop.add(index)
            return True
        return window.state is WindowState.ACCUMULATING and window.count == 0

    def on_unscale(self, index: int) -> bool:
        """Whether the loop's scaler.unscale_ may unscale now (once, on a complete window)."""
        window = self.run.window
        if not window.is_ready or index in window.unscaled:
            return False
        window.unscaled.add(index)
        if window.state is WindowState.COMPLETE:
            window.move_to(WindowState.UNSCALED, "scaler.unscale_(optimizer)")
        self.boundary.ready_scaler()
        return True
