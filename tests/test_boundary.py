"""Semantics 4 and 5: the work at the accumulation boundary and non-finite gradients."""

import copy

import pytest
import torch
from helpers import (
    TOLERANCES,
    make_batches,
    make_model,
    mse,
    parameters_of,
    split,
)

from torch_accum import Accumulator

TOL64 = TOLERANCES[torch.float64]


def total_norm(model):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))


class Recorder:
    """Spy subclasses log the real calls that reach the classes' methods."""

    def __init__(self):
        self.events = []

    def optimizer(self, model, **kwargs):
        events = self.events

        class SpySGD(torch.optim.SGD):
            def step(self, closure=None):
                events.append(("optimizer.step", total_norm(model).item()))
                return super().step(closure)

            def zero_grad(self, set_to_none=True):
                events.append("zero_grad")
                super().zero_grad(set_to_none)

        return SpySGD(model.parameters(), **kwargs)

    def scheduler(self, optimizer):
        events = self.events

        class SpyLR(torch.optim.lr_scheduler.StepLR):
            def step(self, *args, **kwargs):
                events.append("scheduler.step")
                super().step(*args, **kwargs)

        return SpyLR(optimizer, step_size=1, gamma=0.5)

    def scaler(self):
        events = self.events

        class SpyScaler(torch.amp.GradScaler):
            def unscale_(self, optimizer):
                events.append("scaler.unscale_")
                super().unscale_(optimizer)

            def step(self, optimizer, *args, **kwargs):
                events.append("scaler.step")
                return super().step(optimizer, *args, **kwargs)

            def update(self, new_scale=None):
                events.append("scaler.update")
                super().update(new_scale)

        return SpyScaler("cpu", init_scale=1024.0)


def run_window(model, optimizer, acc, micro_batches, scaler=None, scheduler=None):
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


def test_boundary_order_with_a_grad_scaler():
    recorder = Recorder()
    model = make_model()
    optimizer = recorder.optimizer(model, lr=0.1)
    scheduler = recorder.scheduler(optimizer)
    scaler = recorder.scaler()
    acc = Accumulator(model, optimizer, 2, scheduler=scheduler, scaler=scaler, max_grad_norm=0.01)
    recorder.events.clear()  # the scheduler's constructor steps once
    run_window(model, optimizer, acc, make_batches(2, 4), scaler, scheduler)
    names = [e if isinstance(e, str) else e[0] for e in recorder.events]
    assert names == [
        "scaler.unscale_",
        "scaler.step",
        "optimizer.step",
        "scaler.update",
        "scheduler.step",
        "zero_grad",  # the boundary's own; the loop's call after it has nothing to clear
    ]
    # The step saw the unscaled, clipped gradient (scaled by 1024 it would be far larger).
    step_norm = recorder.events[2][1]
    assert step_norm == pytest.approx(0.01, rel=1e-4)  # clip adds eps=1e-6


def test_boundary_order_without_a_scaler():
    recorder = Recorder()
    model = make_model()
    optimizer = recorder.optimizer(model, lr=0.1)
    scheduler = recorder.scheduler(optimizer)
    acc = Accumulator(model, optimizer, 3, scheduler=scheduler, max_grad_norm=0.01)
    recorder.events.clear()  # the scheduler's constructor steps once
    run_window(model, optimizer, acc, make_batches(3, 4), scheduler=scheduler)
    names = [e if isinstance(e, str) else e[0] for e in recorder.events]
    assert names == ["optimizer.step", "scheduler.step", "zero_grad"]
    assert recorder.events[0][1] == pytest.approx(0.01, rel=1e-4)  # clip adds eps=1e-6


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6])
def test_clipping_applies_to_the_accumulated_gradient(max_grad_norm):
    batches = make_batches(3, 16)
    reference = make_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
        optimizer.zero_grad()
        mse(reference, batch).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)
        optimizer.step()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = Accumulator(model, optimizer, 4, max_grad_norm=max_grad_norm)
    run_window(model, optimizer, acc, [mb for b in batches for mb in split(b, 4)])
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOL64)


def test_grad_scaler_run_equals_the_full_batch_run():
    batches = make_batches(3, 16, dtype=torch.float32)
    reference = make_model(torch.float32)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for batch in batches:
        optimizer.zero_grad()
        mse(reference, batch).backward()
        optimizer.step()
    model = make_model(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, optimizer, 4, scaler=scaler)
    run_window(model, optimizer, acc, [mb for b in batches for mb in split(b, 4)], scaler)
    assert acc.optimizer_steps == 3
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def test_user_unscale_and_clip_at_the_boundary_is_not_unscaled_twice():
    batches = make_batches(2, 16, dtype=torch.float32)
    reference = make_model(torch.float32)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches:
        optimizer.zero_grad()
        mse(reference, batch).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        optimizer.step()
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with Accumulator(model, optimizer, 2, scaler=scaler) as acc:
        for batch in [mb for b in batches for mb in split(b, 2)]:
            acc.backward(mse(model, batch))
            scaler.unscale_(optimizer)  # a no-op until the window is complete
            if acc.sync_gradients:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def poisoned_loss(model, batch, poison):
    loss = mse(model, batch)
    return loss * float("nan") if poison else loss


def test_nonfinite_window_is_skipped_without_touching_state():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    micro_batches = make_batches(6, 4)
    acc = Accumulator(model, optimizer, 2, scheduler=scheduler)
    with acc, pytest.warns(RuntimeWarning, match="non-finite gradient .* skipped"):
        for index, batch in enumerate(micro_batches[:2]):
            acc.backward(poisoned_loss(model, batch, poison=index == 1))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert acc.skipped_steps == 1
    assert acc.optimizer_steps == 0
    assert optimizer.state == {}
    assert scheduler.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(parameters_of(model), parameters_of(make_model()), rtol=0, atol=0)

    # Training goes on normally afterwards: two clean windows, two real steps.
    run_window(model, optimizer, acc, micro_batches[2:], scheduler=scheduler)
    assert (acc.optimizer_steps, acc.skipped_steps, scheduler.last_epoch) == (2, 1, 2)


def test_nonfinite_window_raises_when_asked_and_names_the_parameters():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1, on_nonfinite="raise")
    with pytest.raises(RuntimeError, match=r"non-finite gradient .* 0\.weight"), acc:
        acc.backward(poisoned_loss(model, make_batches(1, 4)[0], poison=True))
        optimizer.step()
    assert acc.optimizer_steps == 0
    assert "step" not in vars(optimizer)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(parameters_of(model), parameters_of(make_model()), rtol=0, atol=0)


def test_skipped_steps_are_logged(caplog):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with caplog.at_level("INFO", logger="torch_accum"), pytest.warns(RuntimeWarning), acc:
        acc.backward(poisoned_loss(model, make_batches(1, 4)[0], poison=True))
        optimizer.step()
    assert "non-finite gradient in 4 parameter(s)" in caplog.text
    assert "optimizer step 1 skipped" in caplog.text


def test_grad_scaler_skip_backs_off_and_does_not_step_the_scheduler():
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    micro_batches = make_batches(4, 4, dtype=torch.float32)
    acc = Accumulator(model, optimizer, 2, scheduler=scheduler, scaler=scaler)
    with acc:
        for index, batch in enumerate(micro_batches):
            acc.backward(poisoned_loss(model, batch, poison=index == 0))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad()
    assert (acc.skipped_steps, acc.optimizer_steps) == (1, 1)
    assert scaler.get_scale() == 2.0**9
    assert scheduler.last_epoch == 1


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("poisoned", ["body", "head"])
def test_a_grad_scaler_skip_in_one_optimizer_skips_the_window_for_all(poisoned, max_grad_norm):
    # The scaler alone skips only the optimizer whose gradients hold the inf, and joint
    # clipping zeroes the other's, on which momentum and weight decay would still move it.
    model = make_model(torch.float32)
    body, head = model[0], model[2]
    optimizers = [
        torch.optim.SGD(body.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
        torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=0.1),
    ]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in optimizers]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(
        model, optimizers, 2, scheduler=schedulers, scaler=scaler, max_grad_norm=max_grad_norm
    )
    target = {"body": body.bias, "head": head.bias}[poisoned]

    def run(batches, poison):
        for index, batch in enumerate(batches):
            loss = mse(model, batch)
            if poison and index == 1:
                loss = loss + target.sum() * float("inf")  # inf in one optimizer's grads only
            acc.backward(loss)
            for optimizer in optimizers:
                scaler.step(optimizer)
            scaler.update()
            for scheduler in schedulers:
                scheduler.step()
            for optimizer in optimizers:
                optimizer.zero_grad()

    batches = make_batches(6, 4, dtype=torch.float32)
    with acc:
        run(batches[:2], poison=False)  # optimizer state to keep
        params = [p.detach().clone() for p in model.parameters()]
        states = [copy.deepcopy(o.state_dict()) for o in optimizers]
        run(batches[2:4], poison=True)
        assert (acc.optimizer_steps, acc.skipped_steps) == (1, 1)
        assert scaler.get_scale() == 2.0**9
        assert [s.last_epoch for s in schedulers] == [1, 1]
        for got, expected in zip(model.parameters(), params, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for optimizer, expected in zip(optimizers, states, strict=True):
            torch.testing.assert_close(optimizer.state_dict(), expected, rtol=0, atol=0)
        run(batches[4:], poison=False)  # training goes on: both step again
    assert (acc.optimizer_steps, acc.skipped_steps) == (2, 1)
    assert [s.last_epoch for s in schedulers] == [2, 2]
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
