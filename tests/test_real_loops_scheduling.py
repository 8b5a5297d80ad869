"""Real loops: learning-rate schedulers passed in, created inside the block, stepped by the
loop or by hand, and the ones refused with the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch.nn import functional as F

from torch_accum import Accumulator


# Scheduling ------------------------------------------------------------------------------
def loop_scheduler_arg(make_scheduler: Callable[[torch.optim.Optimizer], Any]) -> Result:
    model, optimizer = build()
    scheduler = make_scheduler(optimizer)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler)
    with acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {
        "params": snapshot(model),
        "steps": acc.optimizer_steps,
        "lr": lrs(optimizer),
        "window_loss": acc.loss,
    }


def onecyclelr(optimizer: torch.optim.Optimizer, total_steps: int = 3) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total_steps)


def cosine(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3, eta_min=1e-3)


class HalvingSchedule:
    """A hand-written schedule object with nothing but step()."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._groups = optimizer.param_groups

    def step(self) -> None:
        for group in self._groups:
            group["lr"] *= 0.5


def loop_scheduler_created_inside_block() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        lr_scheduler = halving(optimizer)  # built lazily, once the loop runs
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
    # After the block the optimizer and the scheduler work as in a plain loop.
    x, y = data(1, seed=9)[0]
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    lr_scheduler.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def reference_scheduler_created_inside_block() -> Result:
    model, optimizer = build()
    lr_scheduler = halving(optimizer)
    extra = data(1, seed=9)
    plain_loop(model, [optimizer], [*windows(data()), extra], schedulers=[lr_scheduler])
    return {"params": snapshot(model), "steps": 2, "lr": lrs(optimizer)}


def loop_manual_lr_from_optimizer_steps() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            for param_group in optimizer.param_groups:
                param_group["lr"] = nanogpt_lr(acc.optimizer_steps)
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_reduce_lr_on_plateau_raises() -> Result:
    model, optimizer = build()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    Accumulator(model, optimizer, K, scheduler=scheduler)
    return {}


def loop_scheduler_of_another_optimizer_raises() -> Result:
    model, optimizer = build()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    Accumulator(model, optimizer, K, scheduler=halving(other))
    return {}


def loop_onecyclelr_stepped_under_sync_iterate() -> Result:
    model, optimizer = build()
    scheduler = onecyclelr(optimizer)  # total_steps=3: one per window, the short one too
    acc = Accumulator(model, optimizer, K)
    with acc:
        for x, y in acc.iterate(data(N_PARTIAL)):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_unregistered_scheduler_stepped_every_micro_batch() -> Result:
    model, optimizer = build()
    scheduler = halving(optimizer)  # not passed as scheduler=
    with Accumulator(model, optimizer, K) as acc, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "scheduler before optimizer"
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": 2, "lr": lrs(optimizer)}


VARIANTS = [
    # -- scheduling
    exact(
        "lambdalr_scheduler_arg",
        "accelerate",
        P(loop_scheduler_arg, halving),
        P(reference, N_PARTIAL, scheduler=halving, window_loss=True),
    ),
    exact(
        "steplr_scheduler_arg",
        "examples-imagenet",
        P(loop_scheduler_arg, steplr),
        P(reference, N_PARTIAL, scheduler=steplr, window_loss=True),
    ),
    exact(
        "onecyclelr_scheduler_arg",
        "torch-docs",
        P(loop_scheduler_arg, onecyclelr),
        P(reference, N_PARTIAL, scheduler=onecyclelr, window_loss=True),
    ),
    exact(
        "cosine_scheduler_arg",
        "torch-docs",
        P(loop_scheduler_arg, cosine),
        P(reference, N_PARTIAL, scheduler=cosine, window_loss=True),
    ),
    exact(
        "custom_scheduler_with_only_step",
        "edge",
        P(loop_scheduler_arg, HalvingSchedule),
        P(reference, N_PARTIAL, scheduler=HalvingSchedule, window_loss=True),
    ),
    exact(
        "scheduler_created_inside_block",
        "accelerate",
        loop_scheduler_created_inside_block,
        reference_scheduler_created_inside_block,
    ),
    exact(
        "manual_lr_from_optimizer_steps",
        "examples-imagenet",
        loop_manual_lr_from_optimizer_steps,
        P(reference, N_PARTIAL, lr_schedule=nanogpt_lr),
    ),
    error(
        "onecyclelr_too_few_total_steps_raises",
        "torch-docs",
        P(loop_scheduler_arg, P(onecyclelr, total_steps=2)),
        ValueError,
        r"Tried to step",
    ),
    error(
        "reduce_lr_on_plateau_raises",
        "hf-trainer",
        loop_reduce_lr_on_plateau_raises,
        TypeError,
        r"ReduceLROnPlateau",
    ),
    error(
        "scheduler_of_another_optimizer_raises",
        "edge",
        loop_scheduler_of_another_optimizer_raises,
        ValueError,
        r"optimizer",
    ),
    # -- schedulers stepped by the loop
    exact(
        "onecyclelr_stepped_under_sync_iterate",
        "accelerate",
        loop_onecyclelr_stepped_under_sync_iterate,
        P(reference, N_PARTIAL, scheduler=onecyclelr),
    ),
    error(
        "unregistered_scheduler_stepped_every_micro_batch",
        "accelerate",
        loop_unregistered_scheduler_stepped_every_micro_batch,
        RuntimeError,
        r"learning rate.*changed.*scheduler",
    ),
]


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)


def test_scheduler_error_at_the_boundary_applies_the_update_once():
    def lr_lambda(step: int) -> float:
        if step == 2:
            raise RuntimeError("schedule exhausted")
        return 0.5**step

    model, optimizer = build("sgd_momentum")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler)
    errors = []
    with acc:
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            try:
                optimizer.step()
            except RuntimeError as error:
                errors.append(str(error))
                optimizer.step()  # a retry must not apply the window twice
    assert errors == ["schedule exhausted"]
    assert acc.optimizer_steps == 2
    assert acc.micro_step == 0

    ref_model, ref_optimizer = build("sgd_momentum")
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, lr_lambda)
    with pytest.raises(RuntimeError, match="schedule exhausted"):
        plain_loop(ref_model, [ref_optimizer], windows(data()), schedulers=[ref_scheduler])
    for got, want in zip(snapshot(model), snapshot(ref_model)):
        torch.testing.assert_close(got, want, **TOL)
