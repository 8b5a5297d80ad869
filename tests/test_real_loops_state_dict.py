"""Real loops: saving state_dicts and resuming mid-window or at a boundary, with scalers and
several optimizers, bit for bit with the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
from helpers import make_model
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch import nn
from torch.nn import functional as F

from torch_accum import Accumulator


# Saving and resuming -------------------------------------------------------------------
class Preempted(Exception):
    """The job is killed right after writing its checkpoint."""


def start_run() -> tuple[nn.Module, torch.optim.Optimizer, Any, Accumulator]:
    model, optimizer = build()
    scheduler = halving(optimizer)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler, max_grad_norm=0.5)
    return model, optimizer, scheduler, acc


def loop_resume(stop_after: int | None) -> Result:
    batches = data(N_PARTIAL)
    model, optimizer, scheduler, acc = start_run()
    buffer = io.BytesIO()
    start = 0
    if stop_after is not None:
        with contextlib.suppress(Preempted), acc:
            for index, (x, y) in enumerate(batches):
                acc.backward(F.mse_loss(model(x), y))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                if index + 1 == stop_after:
                    checkpoint = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "accumulator": acc.state_dict(),
                        "next_micro_batch": index + 1,
                    }
                    torch.save(checkpoint, buffer)
                    raise Preempted
        buffer.seek(0)
        checkpoint = torch.load(buffer)  # weights_only=True, the default
        model, optimizer, scheduler, acc = start_run()
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        acc.load_state_dict(checkpoint["accumulator"])
        start = checkpoint["next_micro_batch"]
    with acc:
        for x, y in batches[start:]:
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_state_dict_every_iteration() -> Result:
    model, optimizer, scheduler, acc = start_run()
    with acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "accumulator": acc.state_dict(),
                },
                io.BytesIO(),
            )
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def start_split_run() -> tuple[nn.Module, list[Any], list[Any], Accumulator]:
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    acc = Accumulator(model, optimizers, K, scheduler=lr_schedulers)
    return model, optimizers, lr_schedulers, acc


def train_split(acc: Accumulator, model: nn.Module, optimizers: list[Any], batch: Batch) -> None:
    x, y = batch
    acc.backward(F.mse_loss(model(x), y), weight=len(x))
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


def loop_resume_weighted_window_two_optimizers() -> Result:
    batches = ragged(RAGGED10)
    model, optimizers, lr_schedulers, acc = start_split_run()
    buffer = io.BytesIO()
    with contextlib.suppress(Preempted), acc:
        for batch in batches[:6]:
            train_split(acc, model, optimizers, batch)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizers": [optimizer.state_dict() for optimizer in optimizers],
                "schedulers": [scheduler.state_dict() for scheduler in lr_schedulers],
                "accumulator": acc.state_dict(),
            },
            buffer,
        )
        raise Preempted
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, optimizers, lr_schedulers, acc = start_split_run()
    model.load_state_dict(checkpoint["model"])
    for optimizer, state in zip(optimizers, checkpoint["optimizers"]):
        optimizer.load_state_dict(state)
    for scheduler, state in zip(lr_schedulers, checkpoint["schedulers"]):
        scheduler.load_state_dict(state)
    acc.load_state_dict(checkpoint["accumulator"])
    with acc:
        for batch in batches[6:]:
            train_split(acc, model, optimizers, batch)
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(*optimizers)}


def reference_weighted_two_optimizers() -> Result:
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    run = plain_loop(model, optimizers, windows(ragged(RAGGED10)), schedulers=lr_schedulers)
    return {"params": snapshot(model), "steps": run.steps, "lr": lrs(*optimizers)}


def loop_resume_mid_window_with_scaler() -> Result:
    batches = data(N_PARTIAL)

    def start() -> tuple[nn.Module, torch.optim.Optimizer, Any, Accumulator]:
        model, optimizer = build()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        return model, optimizer, scaler, Accumulator(model, optimizer, K, scaler=scaler)

    model, optimizer, scaler, acc = start()
    buffer = io.BytesIO()
    with contextlib.suppress(Preempted), acc:
        for index, (x, y) in enumerate(batches):
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if index == 5:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "accumulator": acc.state_dict(),
                    },
                    buffer,
                )
                raise Preempted
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, optimizer, scaler, acc = start()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    acc.load_state_dict(checkpoint["accumulator"])
    with acc:
        for x, y in batches[6:]:
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "scale": scaler.get_scale()}


def loop_state_dict_between_unscale_and_step() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, optimizer, K, scaler=scaler)
    with acc:
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                torch.save({"accumulator": acc.state_dict()}, io.BytesIO())  # too early
            scaler.step(optimizer)
            scaler.update()
    return {}


VARIANTS = [
    # -- saving and resuming
    exact(
        "resume_mid_window",
        "nanogpt",
        P(loop_resume, 6),
        P(reference, N_PARTIAL, scheduler=halving, clip=0.5),
    ),
    exact(
        "resume_at_boundary",
        "nanogpt",
        P(loop_resume, 8),
        P(reference, N_PARTIAL, scheduler=halving, clip=0.5),
    ),
    exact(
        "state_dict_every_iteration",
        "edge",
        loop_state_dict_every_iteration,
        P(reference, N_PARTIAL, scheduler=halving, clip=0.5),
    ),
    # -- resuming with weights, several optimizers and a scaler
    exact(
        "resume_weighted_window_two_optimizers",
        "torchtitan",
        loop_resume_weighted_window_two_optimizers,
        reference_weighted_two_optimizers,
    ),
    exact(
        "resume_mid_window_with_scaler",
        "timm",
        loop_resume_mid_window_with_scaler,
        P(reference, N_PARTIAL, scale=2.0**13),
    ),
    error(
        "state_dict_between_unscale_and_step_raises",
        "amp-docs",
        loop_state_dict_between_unscale_and_step,
        RuntimeError,
        r"unscale",
    ),
]


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)


def test_resume_is_bitwise_identical_to_the_uninterrupted_run():
    uninterrupted = loop_resume(None)
    for stop_after in (1, 6, 8):
        resumed = loop_resume(stop_after)
        assert_same(resumed, uninterrupted, BITWISE)
