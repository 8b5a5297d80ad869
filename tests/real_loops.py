"""Shared code of the real-loop matrix (tests/test_real_loops*.py): tiny float64 models and data,
the plain-PyTorch reference loop, and the Variant records each family file lists.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import OPTIMIZERS, TOLERANCES, make_batches, make_model, mse
from torch import nn

__all__ = [
    "BITWISE",
    "CLIP",
    "F64",
    "N_FULL",
    "N_PARTIAL",
    "PARTIAL_REF",
    "RAGGED10",
    "RAGGED_SIZES",
    "SOURCES",
    "TOL",
    "Batch",
    "K",
    "P",
    "PlainRun",
    "Result",
    "Variant",
    "WindowLoss",
    "assert_same",
    "build",
    "cat",
    "data",
    "error",
    "exact",
    "finite_gradients",
    "full_batch",
    "halving",
    "lrs",
    "matrix",
    "mean_of_micro_losses",
    "nanogpt_lr",
    "plain_loop",
    "ragged",
    "reference",
    "run_variant",
    "snapshot",
    "split_optimizers",
    "steplr",
    "windows",
]

K = 4
N_FULL = 8  # two full windows
N_PARTIAL = 10  # windows of 4, 4 and a final 2
CLIP = 0.05  # small enough that clipping is active on every window of these models
TOL = TOLERANCES[torch.float64]  # rtol=1e-10, atol=1e-12
BITWISE = {"rtol": 0.0, "atol": 0.0}
F64 = torch.float64
Batch = tuple[torch.Tensor, ...]
Result = dict[str, Any]
WindowLoss = Callable[[nn.Module, Sequence[Any]], torch.Tensor]


def data(count: int = N_FULL, seed: int = 1) -> list[Batch]:
    """Equal micro-batches of 4 samples (float64)."""
    return make_batches(count, 4, seed=seed)


RAGGED_SIZES = (3, 7, 2, 5, 4, 6, 1, 8)


def ragged(sizes: Sequence[int] = RAGGED_SIZES, seed: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 6, generator=generator, dtype=F64),
            torch.randn(n, 3, generator=generator, dtype=F64),
        )
        for n in sizes
    ]


def windows(items: Sequence[Any], k: int = K) -> list[list[Any]]:
    return [list(items[i : i + k]) for i in range(0, len(items), k)]


def cat(window: Sequence[Batch]) -> Batch:
    return tuple(torch.cat(parts) for parts in zip(*window))


def build(optimizer: str = "adamw") -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, OPTIMIZERS[optimizer](model.parameters())


def full_batch(micro_loss: Callable[[nn.Module, Batch], torch.Tensor] = mse) -> WindowLoss:
    """The window's loss on the concatenation of its micro-batches (one batch at K=1)."""

    def loss(model: nn.Module, window: Sequence[Batch]) -> torch.Tensor:
        return micro_loss(model, window[0] if len(window) == 1 else cat(window))

    return loss


def mean_of_micro_losses(micro_loss: Callable[[nn.Module, Any], torch.Tensor]) -> WindowLoss:
    """For windows whose micro-batches differ in kind (e.g. which head they use)."""

    def loss(model: nn.Module, window: Sequence[Any]) -> torch.Tensor:
        return sum(micro_loss(model, item) for item in window) / len(window)

    return loss


@dataclass
class PlainRun:
    losses: list[float]  # one per real step
    ran: list[bool]  # per window: stepped (True) or skipped as non-finite (False)

    @property
    def steps(self) -> int:
        return len(self.losses)


def finite_gradients(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def plain_loop(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    groups: Iterable[Sequence[Any]],
    *,
    loss: WindowLoss | None = None,
    schedulers: Sequence[Any] = (),
    clip: float | None = None,
    set_to_none: bool = True,
    skip_nonfinite: bool = False,
    lr_schedule: Callable[[int], float] | None = None,
    after_step: Callable[[], None] | None = None,
) -> PlainRun:
    """The reference: plain PyTorch, one optimizer step per window on its full batch."""
    loss = full_batch() if loss is None else loss
    run = PlainRun([], [])
    for window in groups:
        if lr_schedule is not None:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule(run.steps)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)
        value = loss(model, window)
        value.backward()
        if skip_nonfinite and not finite_gradients(model):
            run.ran.append(False)
            continue
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        run.losses.append(value.item())
        run.ran.append(True)
        if after_step is not None:
            after_step()
    return run


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def lrs(*optimizers: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for optimizer in optimizers for group in optimizer.param_groups]


def reference(
    count: int = N_FULL,
    *,
    k: int = K,
    optimizer: str = "adamw",
    setup: Callable[[], tuple[nn.Module, torch.optim.Optimizer]] | None = None,
    batches: Callable[[], list[Any]] | None = None,
    groups: Callable[[list[Any]], list[list[Any]]] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    loss: WindowLoss | None = None,
    clip: float | None = None,
    set_to_none: bool = True,
    skip_nonfinite: bool = False,
    window_loss: bool = False,
    **extra: Any,
) -> Result:
    """Run the plain loop and describe its outcome the way the variants describe theirs."""
    model, opt = build(optimizer) if setup is None else setup()
    sched = None if scheduler is None else scheduler(opt)
    items = data(count) if batches is None else batches()
    run = plain_loop(
        model,
        [opt],
        windows(items, k) if groups is None else groups(items),
        loss=loss,
        schedulers=[] if sched is None else [sched],
        clip=clip,
        set_to_none=set_to_none,
        skip_nonfinite=skip_nonfinite,
        lr_schedule=lr_schedule,
    )
    result: Result = {"params": snapshot(model), "steps": run.steps, **extra}
    if scheduler is not None or lr_schedule is not None:
        result["lr"] = lrs(opt)
    if window_loss:
        result["window_loss"] = run.losses[-1]
    return result


def assert_same(got: Result, expected: Result, tolerance: dict[str, float]) -> None:
    assert set(got) == set(expected), f"variant reports {sorted(got)}, reference {sorted(expected)}"
    for key, want in expected.items():
        have = got[key]
        if isinstance(want, list) and want and isinstance(want[0], torch.Tensor):
            assert len(have) == len(want), key
            for index, (a, b) in enumerate(zip(have, want)):
                torch.testing.assert_close(
                    a, b, **tolerance, msg=lambda m, key=key, i=index: f"{key}[{i}]: {m}"
                )
        elif isinstance(want, float) or (
            isinstance(want, list) and want and isinstance(want[0], float)
        ):
            torch.testing.assert_close(
                torch.tensor(have, dtype=F64),
                torch.tensor(want, dtype=F64),
                **tolerance,
                msg=lambda m, key=key: f"{key}: {m}",
            )
        else:
            assert have == want, f"{key}: variant {have!r}, reference {want!r}"


def nanogpt_lr(it: int, base: float = 1e-2, min_lr: float = 1e-3) -> float:
    warmup_iters, lr_decay_iters = 1, 3
    if it < warmup_iters:
        return base * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (base - min_lr)


def halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)


def steplr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


# Several optimizers ----------------------------------------------------------------------
def split_optimizers(model: nn.Module) -> tuple[list[Any], list[Any]]:
    body = torch.optim.AdamW(model[0].parameters(), lr=1e-2, weight_decay=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    return [body, head], [halving(body), steplr(head)]


RAGGED10 = (*RAGGED_SIZES, 2, 9)


@dataclass(frozen=True)
class Variant:
    id: str
    source: str  # a key of SOURCES
    loop: Callable[[], Result]
    reference: Callable[[], Result] | None = None  # "exact": compare with this plain loop
    raises: type[BaseException] | None = None  # or: must raise this, matching `match`
    match: str | None = None
    bitwise: bool = False
    marks: tuple[Any, ...] = ()


SOURCES = {
    "examples-imagenet": "pytorch/examples imagenet/main.py",
    "examples-wlm": "pytorch/examples word_language_model/main.py",
    "nanogpt": "karpathy/nanoGPT train.py",
    "timm": "huggingface/pytorch-image-models train.py, timm/utils/cuda.py",
    "hf-trainer": "huggingface/transformers src/transformers/trainer.py",
    "accelerate": "huggingface/accelerate examples/by_feature/gradient_accumulation*.py, "
    "docs/source/usage_guides/gradient_accumulation.md, test_utils/scripts/test_sync.py",
    "lightning": "Lightning docs model/manual_optimization.rst, common/optimization.rst",
    "torchtitan": "pytorch/torchtitan torchtitan/train.py",
    "amp-docs": "PyTorch docs notes/amp_examples.rst",
    "torch-docs": "PyTorch docs torch.optim, nn.Embedding",
    "edge": "patterns not tied to one file",
}


def exact(
    id: str,
    source: str,
    loop: Callable[[], Result],
    ref: Callable[[], Result],
    *,
    bitwise: bool = False,
    marks: tuple[Any, ...] = (),
) -> Variant:
    return Variant(id, source, loop, ref, bitwise=bitwise, marks=marks)


def error(
    id: str,
    source: str,
    loop: Callable[[], Result],
    raises: type[BaseException],
    match: str,
    *,
    marks: tuple[Any, ...] = (),
) -> Variant:
    return Variant(id, source, loop, raises=raises, match=match, marks=marks)


P = functools.partial
PARTIAL_REF = P(reference, N_PARTIAL)


def matrix(variants: list[Variant]) -> list[Any]:
    """The variants as pytest parameters, each with its id and marks."""
    return [pytest.param(v, id=v.id, marks=v.marks) for v in variants]


def run_variant(variant: Variant) -> None:
    """Run one variant: it raises the error it names, or matches its plain-loop reference."""
    if variant.raises is not None:
        with pytest.raises(variant.raises, match=variant.match):
            variant.loop()
        return
    assert variant.reference is not None
    got = variant.loop()
    expected = variant.reference()
    assert_same(got, expected, BITWISE if variant.bitwise else TOL)
