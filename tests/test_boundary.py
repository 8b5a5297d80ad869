"""The boundary update (``torch_accum/_boundary.py``, ``BoundaryUpdate``): the real update of
a complete window in its fixed order (unscale, clip, step every optimizer, schedulers,
scaler update), skips, and the rollback when a step fails.
"""

import copy

import pytest
import torch
from helpers import (
    EXACT,
    TOLERANCES,
    TwoParts,
    assert_same,
    make_batches,
    make_model,
    merge,
    mse,
    parameters_of,
    poisoned_loss,
    reference_run,
    run_window,
    sgd_failing_first_step,
    split,
    two_optimizers,
    windows_of,
)
from torch import nn

from torch_accum import Accumulator
from torch_accum._boundary import BoundaryUpdate
from torch_accum._window import Window, WindowState

S = WindowState
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


def complete_window(model, batches):
    """Gradients of the mean loss over ``batches``, as a closed window leaves them."""
    for batch in batches:
        (mse(model, batch) / len(batches)).backward()
    window = Window(len(batches))
    for batch in batches:
        window.add(1.0, mse(model, batch))
    window.move_to(S.COMPLETE)
    window.nonfinite = False
    return window


def test_apply_steps_every_optimizer_and_scheduler_once_with_clipping_over_all():
    batches = make_batches(2, 4)
    reference = make_model()
    ref_optimizers = [
        torch.optim.SGD(reference[0].parameters(), lr=0.1),
        torch.optim.Adam(reference[2].parameters(), lr=0.01),
    ]
    for batch in batches:
        (mse(reference, batch) / 2).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    for optimizer in ref_optimizers:
        optimizer.step()

    model = make_model()
    optimizers = [
        torch.optim.SGD(model[0].parameters(), lr=0.1),
        torch.optim.Adam(model[2].parameters(), lr=0.01),
    ]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in optimizers]
    boundary = BoundaryUpdate(model, optimizers, schedulers, max_grad_norm=0.05)
    window = complete_window(model, batches)
    boundary.apply(window)
    assert window.state is S.APPLIED
    assert [s.last_epoch for s in schedulers] == [1, 1]
    assert all(p.grad is not None for p in model.parameters())  # clearing is the loop's
    assert_same(model, reference)


@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_two_optimizers_and_their_schedulers_step_once_per_window_clipped_together(max_grad_norm):
    batches = make_batches(8, 4)
    reference = TwoParts()
    ref_optimizers = two_optimizers(reference)
    ref_schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in ref_optimizers]
    for window in windows_of(batches, 4):
        for optimizer in ref_optimizers:
            optimizer.zero_grad()
        mse(reference, merge(window)).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)
        for optimizer in ref_optimizers:
            optimizer.step()
        for scheduler in ref_schedulers:
            scheduler.step()

    model = TwoParts()
    optimizers = two_optimizers(model)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in optimizers]
    acc = Accumulator(model, optimizers, 4, scheduler=schedulers, max_grad_norm=max_grad_norm)
    with acc:
        for batch in batches:
            acc.backward(mse(model, batch))
            for optimizer in optimizers:
                optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            for optimizer in optimizers:
                optimizer.zero_grad()
    assert acc.optimizer_steps == 2 and [s.last_epoch for s in schedulers] == [2, 2]
    assert acc.optimizers == tuple(optimizers) and acc.optimizer is optimizers[0]
    assert_same(model, reference)


def test_an_empty_parameter_group_steps_like_any_other():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.add_param_group({"params": []})
    with Accumulator(model, optimizer, 2) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
    assert acc.optimizer_steps == 1


def test_a_tensor_learning_rate_is_never_read_back_to_the_host():
    # The learning-rate check skips tensor rates: reading one is a device sync per window
    # (on CPU too it goes through aten._local_scalar_dense, which is what this counts).
    from torch.utils._python_dispatch import TorchDispatchMode

    lr = torch.tensor(0.1, dtype=torch.float64)

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and args[0] is lr:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with Accumulator(model, optimizer, 2) as acc, CountReads():
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 2
    assert CountReads.reads == 0


def test_a_nonfinite_window_is_skipped_or_discarded():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = parameters_of(model)
    window = complete_window(model, make_batches(1, 4))
    window.nonfinite = True
    with pytest.warns(RuntimeWarning, match="optimizer step 7 skipped"):
        BoundaryUpdate(model, [optimizer]).apply(window, step_number=7)
    assert window.state is S.SKIPPED

    window = complete_window(model, make_batches(1, 4))
    window.nonfinite = True
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        BoundaryUpdate(model, [optimizer], on_nonfinite="raise").apply(window)
    assert window.state is S.DISCARDED
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(parameters_of(model), before, rtol=0, atol=0)


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


def test_a_non_finite_window_with_max_grad_norm_is_skipped():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    batches = make_batches(2, 4)
    with Accumulator(model, optimizer, 2, max_grad_norm=1.0) as acc:
        acc.backward(mse(model, batches[0]))
        acc.backward(mse(model, batches[1]) * float("inf"))
        optimizer.step()
    assert (acc.optimizer_steps, acc.skipped_steps) == (0, 1)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_skipped_steps_are_logged(caplog):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with caplog.at_level("INFO", logger="torch_accum"), pytest.warns(RuntimeWarning), acc:
        acc.backward(poisoned_loss(model, make_batches(1, 4)[0], poison=True))
        optimizer.step()
    assert "non-finite gradient in 4 parameter(s)" in caplog.text
    assert "optimizer step 1 skipped" in caplog.text


def test_skipped_windows_are_counted_and_named_by_their_step():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(3, 4)
    with Accumulator(model, optimizer, 1) as acc, pytest.warns(RuntimeWarning) as warned:
        acc.backward(mse(model, batches[0]))  # step 1 is applied
        optimizer.step()
        for batch in batches[1:]:  # steps 2 and 3 are skipped
            acc.backward(mse(model, batch) * float("inf"))
            optimizer.step()
    assert (acc.optimizer_steps, acc.skipped_steps) == (1, 2)
    assert [str(w.message)[-24:] for w in warned] == [
        "optimizer step 2 skipped",
        "optimizer step 2 skipped",  # the count of applied steps has not moved
    ]


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


def test_the_scaled_path_unscales_once_and_skips_on_inf():
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    batches = make_batches(1, 4, dtype=torch.float32)
    scaler.scale(mse(model, batches[0])).backward()
    window = Window(1)
    window.add(1.0, mse(model, batches[0]))
    window.move_to(S.COMPLETE)
    grads_scaled = [p.grad.clone() for p in model.parameters()]
    BoundaryUpdate(model, [optimizer], scaler=scaler).apply(window)
    assert window.state is S.APPLIED and window.unscaled == {0}
    for p, scaled in zip(model.parameters(), grads_scaled, strict=True):
        torch.testing.assert_close(p.grad, scaled / 8.0, rtol=0, atol=0)

    optimizer.zero_grad()
    (mse(model, batches[0]) * float("inf")).backward()
    window = Window(1)
    window.add(1.0, torch.tensor(0.0))
    window.move_to(S.COMPLETE)
    BoundaryUpdate(model, [optimizer], scaler=scaler).apply(window)
    assert window.state is S.SKIPPED and scaler.get_scale() == 4.0


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


def scaled_run(model, optimizer, scaler, batches, k, on_boundary=None):
    with Accumulator(model, optimizer, k, scaler=scaler) as acc:
        for batch in batches:
            acc.backward(mse(model, batch))
            if acc.sync_gradients and on_boundary is not None:
                on_boundary(acc)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return acc


def test_discarding_an_unscaled_window_lets_the_next_window_unscale():
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    batches = make_batches(4, 4, dtype=torch.float32)
    calls = []

    def drop_the_first(acc):
        scaler.unscale_(optimizer)
        if not calls:
            assert acc.discard() == 2
        calls.append(acc.window_state.value)

    acc = scaled_run(model, optimizer, scaler, batches, 2, drop_the_first)
    assert acc.optimizer_steps == 1 and calls == ["discarded", "unscaled"]
    reference = make_model(torch.float32)
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), [batches[2:]])
    assert_same(model, reference, TOLERANCES[torch.float32])


def test_an_error_before_any_step_leaves_the_window_complete():
    class Refusing(torch.optim.SGD):
        def step(self, closure=None):
            raise ValueError("no")

    model = make_model()
    window = complete_window(model, make_batches(1, 4))
    with pytest.raises(ValueError, match="no"):
        BoundaryUpdate(model, [Refusing(model.parameters(), lr=0.1)]).apply(window)
    assert window.state is S.COMPLETE


def test_an_error_after_the_step_leaves_the_window_applied():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class Broken:
        def step(self):
            raise ValueError("scheduler broke")

    window = complete_window(model, make_batches(1, 4))
    before = parameters_of(model)
    with pytest.raises(ValueError, match="scheduler broke"):
        BoundaryUpdate(model, [optimizer], [Broken()]).apply(window)
    assert window.state is S.APPLIED
    assert any(not torch.equal(a, b) for a, b in zip(parameters_of(model), before, strict=True))


def test_an_optimizer_error_before_its_update_leaves_the_window_for_one_retry():
    class Failing(torch.optim.SGD):
        fail = True

        def step(self, closure=None):
            if Failing.fail:
                Failing.fail = False
                raise RuntimeError("optimizer failed before updating")
            return super().step(closure)

    batches = make_batches(2, 4)
    model = make_model()
    optimizer = Failing(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2) as acc:
        for batch in batches:
            acc.backward(mse(model, batch))
        assert acc.window_state.value == "complete"
        with pytest.raises(RuntimeError, match="optimizer failed"):
            optimizer.step()
        assert acc.window_state.value == "complete" and acc.optimizer_steps == 0
        optimizer.step()  # the retry applies it, once
    assert acc.optimizer_steps == 1
    reference = make_model()
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), [batches])
    assert_same(model, reference)


def test_a_scheduler_error_at_the_boundary_never_applies_the_window_twice():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    factors = [1.0, 0.5]  # the list runs out at the second scheduler step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factors[step])
    acc = Accumulator(model, optimizer, 2, scheduler=scheduler)
    batches = make_batches(4, 4)
    with acc:
        for batch in batches[:2]:
            acc.backward(mse(model, batch))
            optimizer.step()
        for batch in batches[2:]:
            acc.backward(mse(model, batch))
            if acc.sync_gradients:
                with pytest.raises(IndexError):
                    optimizer.step()
                after_error = parameters_of(model)
                optimizer.step()  # the retry the old message asked for
                optimizer.zero_grad()
            else:
                optimizer.step()
    assert acc.optimizer_steps == 2
    torch.testing.assert_close(parameters_of(model), after_error, **EXACT)
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, lambda step: 0.5**step)
    reference_run(reference, ref_optimizer, windows_of(batches, 2), scheduler=ref_scheduler)
    assert_same(model, reference)  # each window applied exactly once


def test_an_optimizer_error_inside_scaler_step_leaves_the_window_to_retry():
    FailsOnce = sgd_failing_first_step("optimizer failed before updating")

    model = make_model(torch.float32)
    optimizer = FailsOnce(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    batches = make_batches(2, 4, dtype=torch.float32)
    with Accumulator(model, optimizer, 2, scaler=scaler) as acc:
        for batch in batches:
            acc.backward(mse(model, batch))
        with pytest.raises(RuntimeError, match="optimizer failed"):
            scaler.step(optimizer)
        assert acc.window_state.value == "unscaled" and acc.optimizer_steps == 0
        scaler.step(optimizer)  # the retry applies it, once
        scaler.update()
    assert acc.optimizer_steps == 1
    reference = make_model(torch.float32)
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), [batches])
    assert_same(model, reference, TOLERANCES[torch.float32])


def test_with_a_scaler_an_error_after_the_first_optimizer_stepped_uses_the_window_up():
    FailsOnce = sgd_failing_first_step("second optimizer failed")

    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = FailsOnce(model[1].parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    acc = Accumulator(model, [first, second], 1, scaler=scaler)
    x, y = make_batches(1, 4, torch.float32)[0]
    with acc:
        acc.backward(nn.functional.mse_loss(model(x), y))
        first_before = [p.detach().clone() for p in model[0].parameters()]
        with pytest.raises(RuntimeError, match="second optimizer failed"):
            scaler.step(first)
        # The first optimizer stepped: a retry must not step it again.
        assert acc.window_state.value == "applied"
        stepped = [p.detach().clone() for p in model[0].parameters()]
        assert not torch.equal(stepped[0], first_before[0])
        scaler.step(first)
        for got, want in zip(model[0].parameters(), stepped):
            assert torch.equal(got, want)
