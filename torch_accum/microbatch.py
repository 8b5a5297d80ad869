"""Splitting a logical batch into micro-batches, and choosing the micro-batch size.

A batch is a tensor, or tuples/lists/dicts of them (nested); every tensor is split along
dimension 0 and every other leaf (strings, numbers, None) goes to each micro-batch as it
is. ``MicroBatchSize`` holds the size to use: fixed, or ``"auto"``, which halves on
out-of-memory errors and can be sized up front from a memory budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, cast

import torch

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

    def after_success(self, batch_size: int) -> None:
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
