"""Small models, data and reference loops shared by the tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_accum import Accumulator

# Explicit tolerances per dtype for "accumulated equals full batch": the two runs sum the
# same per-sample gradients in a different order, so only rounding separates them.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
}

OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """An MLP without batch-dependent layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def make_batches(
    count: int, batch_size: int, dtype: torch.dtype = torch.float64, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 6, generator=generator, dtype=dtype),
            torch.randn(batch_size, 3, generator=generator, dtype=dtype),
        )
        for _ in range(count)
    ]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def train_full_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """The reference: one optimizer step per (full) batch, mean-reduced loss."""
    for batch in batches:
        optimizer.zero_grad()
        mse(model, batch).backward()
        optimizer.step()


def split(
    batch: tuple[torch.Tensor, torch.Tensor], parts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = batch
    return list(zip(x.chunk(parts), y.chunk(parts)))


def train_accumulated(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    accumulation_steps: int,
    **accumulator_kwargs: object,
) -> Accumulator:
    """The user's loop, unchanged, inside ``with acc:``."""
    acc = Accumulator(model, optimizer, accumulation_steps, **accumulator_kwargs)
    with acc:
        for batch in micro_batches:
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return acc


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def sgd_failing_first_step(message: str) -> type[torch.optim.SGD]:
    """An SGD class whose first ``step()`` (over all its instances) raises ``message``."""

    class FailsOnce(torch.optim.SGD):
        failed = False

        def step(self, closure: Any = None) -> Any:
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError(message)
            return super().step(closure)

    return FailsOnce


# --- i28b
TOL64 = TOLERANCES[torch.float64]
EXACT = {"rtol": 0.0, "atol": 0.0}


def merge(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches of one window as one batch."""
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def windows_of(micro_batches: list[Any], k: int) -> list[list[Any]]:
    """The micro-batches cut into windows of ``k`` (the last one may be shorter)."""
    return [micro_batches[i : i + k] for i in range(0, len(micro_batches), k)]


def reference_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: list[list[tuple[torch.Tensor, torch.Tensor]]],
    *,
    max_grad_norm: float | None = None,
    scheduler: Any = None,
) -> None:
    """The plain loop: one optimizer step per window, on the concatenated window."""
    for window in windows:
        optimizer.zero_grad()
        mse(model, merge(window)).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same(
    model: nn.Module, reference: nn.Module, tolerance: dict[str, float] = TOL64
) -> None:
    """Every parameter of ``model`` equals ``reference``'s within ``tolerance``."""
    for got, expected in zip(parameters_of(model), parameters_of(reference), strict=True):
        torch.testing.assert_close(got, expected, **tolerance)
