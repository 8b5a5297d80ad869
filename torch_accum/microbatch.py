"""Splitting a logical batch into micro-batches, and choosing the micro-batch size.

A batch is a tensor, or tuples/lists/dicts of them (nested); every tensor is split along
dimension 0 and every other leaf (strings, numbers, None) goes to each micro-batch as it
is. ``MicroBatchSize`` holds the size to use: fixed, or ``"auto"``, which halves on
out-of-memory errors and can be sized up front from a memory budget. ``MicroBatchRunner``
runs ``Accumulator.step_batch``: one logical batch as one window, replayed after an
out-of-memory error from the same RNG state and buffers, so that a replay leaves no trace.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from torch_accum._validation import check_weight
from torch_accum.distributed import Step
from torch_accum.memory import measure_activation_memory

if TYPE_CHECKING:
    from torch_accum._driver import WindowDriver

logger = logging.getLogger(__name__)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for item in batch:
            yield from _tensors(item)
    elif isinstance(batch, dict):
        for item in batch.values():
            yield from _tensors(item)


def batch_size_of(batch: Any) -> int:
    """The common size of dimension 0 of every tensor in ``batch``."""
    sizes = {t.shape[0] if t.dim() else None for t in _tensors(batch)}
    if not sizes:
        raise ValueError(
            f"batch holds no tensor to split (got {type(batch).__name__}); pass a tensor or "
            "a tuple/list/dict of tensors whose first dimension is the sample dimension"
        )
    if None in sizes or len(sizes) != 1:
        found = sorted(s for s in sizes if s is not None)
        zero_d = ", and a 0-d tensor" if None in sizes else ""
        raise ValueError(
            f"the tensors in batch disagree on the number of samples (sizes of dimension 0: "
            f"{found}{zero_d}); every tensor must have the samples along dimension 0"
        )
    return cast(int, sizes.pop())  # None was ruled out above


def _take(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_take(item, start, stop) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(item, start, stop) for item in batch)
    if isinstance(batch, dict):
        return type(batch)((key, _take(item, start, stop)) for key, item in batch.items())
    return batch


def split_batch(batch: Any, micro_batch_size: int) -> list[tuple[Any, int]]:
    """Split ``batch`` along dimension 0 into ``(micro_batch, number_of_samples)`` pairs.

    Examples:
        >>> import torch
        >>> batch = {"x": torch.zeros(37, 3), "y": torch.zeros(37), "name": "train"}
        >>> [n for _, n in split_batch(batch, 8)]
        [8, 8, 8, 8, 5]
        >>> split_batch(batch, 8)[-1][0]["name"]
        'train'
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise TypeError(
            f"micro_batch_size must be a positive int, got {micro_batch_size!r}; "
            "pass e.g. micro_batch_size=8"
        )
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    total = batch_size_of(batch)
    return [
        (
            _take(batch, start, min(start + micro_batch_size, total)),
            min(micro_batch_size, total - start),
        )
        for start in range(0, total, micro_batch_size)
    ]


class MicroBatchSize:
    """The micro-batch size in use: fixed, or adaptive (``"auto"``).

    In auto mode the size starts at ``upper_bound`` (or the whole batch), halves on every
    out-of-memory error, is kept for the following batches, and after ``probe_up_after``
    batches in a row without an error is tried twice as large again.
    """

    def __init__(self, size: int | str, upper_bound: int | None, probe_up_after: int | None):
        self.auto = size == "auto"
        self.current: int | None = None if self.auto else int(size)
        self.upper_bound = upper_bound
        self.probe_up_after = probe_up_after
        self.oom_retries = 0
        # memory_budget mode measures once, before the first batch.
        self.sized_from_budget = False
        self._successes = 0

    def for_batch(self, batch_size: int) -> int:
        if self.current is None:
            self.current = min(batch_size, self.upper_bound or batch_size)
        return min(self.current, batch_size)

    def after_oom(self, tried: int) -> int:
        """Halve after an out-of-memory error with micro-batches of ``tried`` samples."""
        self.oom_retries += 1
        self._successes = 0
        self.current = max(1, math.ceil(tried / 2))
        logger.info("out of memory with micro-batches of %d; retrying with %d", tried, self.current)
        return self.current

    def after_success(self, batch_size: int, *, retried: bool) -> None:
        """Count a finished batch; one that needed a retry is not error-free."""
        if retried:
            return
        self._successes += 1
        if (
            self.auto
            and self.probe_up_after is not None
            and self._successes >= self.probe_up_after
            and self.current is not None
            and self.current < min(batch_size, self.upper_bound or batch_size)
        ):
            self._successes = 0
            self.current = min(2 * self.current, self.upper_bound or batch_size)
            logger.info("probing micro-batches of %d again", self.current)


ComputeLoss = Callable[[Any], torch.Tensor]
WeightOf = Callable[[Any], "float | int | torch.Tensor"]


class _Snapshot:
    """The RNG states and buffers a failed attempt may have changed, to replay from."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.buffers = [b.detach().clone() for b in model.buffers()]
        self.cpu_rng = torch.random.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self.cuda_rng = torch.cuda.get_rng_state_all() if cuda else None

    def restore(self, model: torch.nn.Module) -> None:
        torch.random.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), self.buffers, strict=True):
                buffer.copy_(saved)


class MicroBatchRunner:
    """Runs one logical batch as one optimizer step, in micro-batches that fit."""

    def __init__(self, sizes: MicroBatchSize, memory_budget: int | None) -> None:
        self.sizes = sizes
        self.memory_budget = memory_budget
        self._last_logged_size: int | None = None

    def step_batch(
        self, driver: WindowDriver, batch: Any, compute_loss: ComputeLoss, weight: WeightOf | None
    ) -> float:
        sizes, sync = self.sizes, driver.sync
        total = batch_size_of(batch)
        if total == 0 and sync is None:
            raise _empty_batch_error(batch)
        # An empty batch leaves the size alone (an auto size is not sized from it).
        size = sizes.for_batch(total) if total else 0
        if total and sizes.auto and self.memory_budget is not None and not sizes.sized_from_budget:
            size = sizes.current = self._size_for_budget(driver, batch, compute_loss, total)
            sizes.sized_from_budget = True
        if sync is not None:
            # Every rank cuts alike, at the size that fits on all of them; an empty batch
            # (size 0) on any rank raises on every rank.
            agreed = sync.agree(Step.STEP_BATCH, size)
            if min(agreed) == 0:
                empty = [rank for rank, value in enumerate(agreed) if value == 0]
                raise _empty_batch_error(batch, empty)
            size = sizes.current = int(min(agreed))
        # Only an adaptive size replays; a snapshot is taken for it alone.
        snapshot = _Snapshot(driver.model) if sizes.auto else None
        retried = False
        while True:
            failure = self._attempt(driver, batch, compute_loss, weight, size)
            failed = failure is not None
            if sync is not None:
                failed = sync.any_rank(failed, step=Step.STEP_BATCH_FAILED)
            if not failed:
                break
            driver.drop_window(uncount=True)
            _release_cached_memory()
            if snapshot is None:
                raise failure or RuntimeError("another rank ran out of memory")
            if size == 1:
                raise RuntimeError(
                    "out of memory even with micro-batches of 1 sample; the model and "
                    "optimizer state alone do not fit, or compute_loss keeps tensors alive"
                ) from failure
            snapshot.restore(driver.model)
            size = sizes.after_oom(size)
            retried = True
        driver.close_window()
        driver.apply_window()
        if size != self._last_logged_size:
            logger.info(
                "batch of %d samples in micro-batches of %d (%d out-of-memory retries so far)",
                total,
                size,
                sizes.oom_retries,
            )
            self._last_logged_size = size
        sizes.after_success(total, retried=retried)
        return cast(float, driver.run.loss())

    def _attempt(
        self,
        driver: WindowDriver,
        batch: Any,
        compute_loss: ComputeLoss,
        weight: WeightOf | None,
        size: int,
    ) -> BaseException | None:
        """Accumulate the whole batch; return the out-of-memory error that stopped it.

        Any other error drops the partial batch (gradients and counts) and propagates: a
        logical batch is applied whole or not at all.
        """
        pieces = split_batch(batch, size)
        first_micro_batch, first_samples = pieces[0]
        first_weight = check_weight(first_samples if weight is None else weight(first_micro_batch))
        if driver.sync is not None:
            # A shared reference agreed before the attempt: no collective may run inside it,
            # where one rank can stop at an out-of-memory error.
            sync = driver.sync
            first_weight = sum(sync.agree(Step.REFERENCE, first_weight)) / sync.world_size
        driver.start_window(len(pieces), first_weight, True, by_runner=True)
        try:
            for micro_batch, samples in pieces:
                loss = compute_loss(micro_batch)
                micro_weight = check_weight(samples if weight is None else weight(micro_batch))
                driver.accumulate(loss, micro_weight, synchronising=False)
        except torch.OutOfMemoryError as error:
            return error
        except BaseException:
            driver.drop_window(uncount=True)
            raise
        return None

    def _size_for_budget(
        self, driver: WindowDriver, batch: Any, compute_loss: ComputeLoss, total: int
    ) -> int:
        """The largest micro-batch whose measured activation peak fits ``memory_budget``.

        A 4-sample probe gives a first guess; a bisection on measured peaks then finds the
        largest size that fits, also when part of the memory does not grow with the batch.
        """
        budget = cast(int, self.memory_budget)
        upper = min(total, self.sizes.upper_bound or total)
        probe = min(upper, 4)
        per_sample = max(1.0, self._measure_peak(driver, batch, compute_loss, probe) / probe)
        fits, too_big = 0, upper + 1  # largest size known to fit, smallest known not to
        guess = max(1, min(upper, int(budget // per_sample)))
        while fits + 1 < too_big:
            size = min(max(guess, fits + 1), too_big - 1)
            if self._measure_peak(driver, batch, compute_loss, size) <= budget:
                fits = size
                guess = min(too_big - 1, 2 * size)
            else:
                too_big = size
                guess = (fits + too_big) // 2
        size = max(1, fits)
        logger.info("memory_budget %d bytes: micro-batches of %d", budget, size)
        return size

    @staticmethod
    def _measure_peak(
        driver: WindowDriver, batch: Any, compute_loss: ComputeLoss, size: int
    ) -> int:
        """Measure one micro-batch's activation peak, leaving no trace in the model."""
        micro_batch = split_batch(batch, size)[0][0]
        snapshot = _Snapshot(driver.model)
        try:
            with driver.sync_paused():
                memory = measure_activation_memory(
                    lambda: compute_loss(micro_batch), parameters=driver.model.parameters()
                )
        finally:
            snapshot.restore(driver.model)
            driver.clear_gradients()
        return memory.peak


def _empty_batch_error(batch: Any, ranks: list[int] | None = None) -> ValueError:
    where = "" if ranks is None else f" on rank(s) {', '.join(map(str, ranks))}"
    return ValueError(
        f"acc.step_batch() got an empty batch{where} ({type(batch).__name__} whose tensors "
        "have 0 samples along dimension 0): there is nothing to train on. Skip empty "
        "batches before calling acc.step_batch()"
        + ("" if ranks is None else ", on every rank alike (drop_last=True, for example)")
    )


def _release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
