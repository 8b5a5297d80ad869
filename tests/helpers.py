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


# --- shared by the test modules of several concepts
TOL64 = TOLERANCES[torch.float64]
EXACT = {"rtol": 0.0, "atol": 0.0}


def merge(
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batches concatenated into the one batch they split."""
    micro_batches = list(micro_batches)
    return torch.cat([x for x, _ in micro_batches]), torch.cat([y for _, y in micro_batches])


def windows_of(micro_batches: list[Any], k: int) -> list[list[Any]]:
    """The windows of ``k`` micro-batches (the last one shorter) a loop would make."""
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
    model: nn.Module,
    reference: nn.Module,
    tolerance: dict[str, float] = TOLERANCES[torch.float64],
) -> None:
    """Every parameter of ``model`` equals the reference's within ``tolerance``."""
    for got, expected in zip(parameters_of(model), parameters_of(reference), strict=True):
        torch.testing.assert_close(got, expected, **tolerance)


def clipped_reference_run(
    batches: list[tuple[torch.Tensor, torch.Tensor]], k: int, *, max_grad_norm: float
) -> nn.Module:
    """``make_model()`` trained by the plain loop, SGD(lr=0.1), clipped, on windows of ``k``."""
    reference = make_model()
    reference_run(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.1),
        windows_of(batches, k),
        max_grad_norm=max_grad_norm,
    )
    return reference


def run_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    acc: Accumulator,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    scaler: Any = None,
    scheduler: Any = None,
) -> None:
    """The user's loop over ``micro_batches`` inside ``with acc:``, with an optional scaler."""
    with acc:
        for batch in micro_batches:
            acc.backward(mse(model, batch))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()


class TwoParts(nn.Module):
    """A body and a head, for one optimizer each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16).double()
        self.head = nn.Linear(16, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def two_optimizers(model: TwoParts) -> list[torch.optim.Optimizer]:
    """SGD with momentum on the body, AdamW on the head."""
    return [
        torch.optim.SGD(model.body.parameters(), lr=0.1, momentum=0.9),
        torch.optim.AdamW(model.head.parameters(), lr=0.01),
    ]


def poisoned_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], poison: bool
) -> torch.Tensor:
    """The mean squared error, made NaN when ``poison``."""
    loss = mse(model, batch)
    return loss * float("nan") if poison else loss


def sync_gradients_after_each_backward(
    acc: Accumulator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[bool]:
    """``acc.sync_gradients`` after each ``acc.backward`` of a plain loop over ``batches``."""
    ends = []
    for batch in batches:
        acc.backward(mse(model, batch))
        ends.append(acc.sync_gradients)
        optimizer.step()
    return ends
