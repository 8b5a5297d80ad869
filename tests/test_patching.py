"""Misuse errors, and everything patched is restored on exit, also when the body raises."""

import pytest
import torch
from helpers import make_batches, make_model, mse

from torch_accum import Accumulator


def snapshot(*objects):
    """The instance attributes the Accumulator may shadow, by identity."""
    names = ("step", "zero_grad", "update", "unscale_")
    return [(id(o), n, vars(o).get(n)) for o in objects for n in names]


def make_everything():
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scaler = torch.amp.GradScaler("cpu")
    acc = Accumulator(model, optimizer, 2, scheduler=scheduler, scaler=scaler)
    return model, optimizer, scheduler, scaler, acc


def test_exit_restores_every_patched_method():
    model, optimizer, scheduler, scaler, acc = make_everything()
    # The scheduler already shadows optimizer.step with its own wrapper: that must come back.
    assert "step" in vars(optimizer)
    before = snapshot(optimizer, scheduler, scaler)
    with acc:
        assert snapshot(optimizer, scheduler, scaler) != before
        acc.backward(mse(model, make_batches(1, 4, dtype=torch.float32)[0]))
    assert snapshot(optimizer, scheduler, scaler) == before
    assert not acc.active


def test_exception_in_the_body_restores_every_patched_method():
    model, optimizer, scheduler, scaler, acc = make_everything()
    before = snapshot(optimizer, scheduler, scaler)
    with pytest.raises(ZeroDivisionError), acc:
        acc.backward(mse(model, make_batches(1, 4, dtype=torch.float32)[0]))
        1 / 0  # noqa: B018
    assert snapshot(optimizer, scheduler, scaler) == before
    assert not acc.active
    # Outside the block the optimizer's step is real again.
    weight = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight, model[0].weight)


@pytest.mark.parametrize("failure", ["non-finite", "learning rate"])
def test_an_error_while_leaving_the_block_restores_every_patched_method(failure):
    # The partial window is applied at the block's exit, and that raises: inf/NaN with
    # on_nonfinite="raise", or a learning rate changed in the middle of the window.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    acc = Accumulator(model, optimizer, 4, scheduler=scheduler, on_nonfinite="raise")
    watched = (optimizer, scheduler, *model.modules())
    before = snapshot(*watched)
    batches = make_batches(2, 4)
    with pytest.raises(RuntimeError, match=failure), acc:
        acc.backward(mse(model, batches[0]))
        if failure == "learning rate":
            optimizer.param_groups[0]["lr"] = 0.05
            acc.backward(mse(model, batches[1]))
        else:
            acc.backward(mse(model, batches[1]) * float("nan"))
        assert snapshot(*watched) != before
    assert snapshot(*watched) == before
    assert not acc.active
    acc.discard()  # the window refused for its learning rate is still pending
    with acc:  # entered again: nothing of the last block is left patched
        pass


def test_plain_optimizer_has_no_instance_attributes_left():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2):
        pass
    assert "step" not in vars(optimizer)
    assert "zero_grad" not in vars(optimizer)


def test_backward_outside_the_block_raises():
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    with pytest.raises(
        RuntimeError, match=r"acc.backward\(\) was called outside the `with acc:` block"
    ):
        acc.backward(mse(model, make_batches(1, 4)[0]))


def test_entering_the_same_accumulator_twice_raises_and_keeps_the_outer_block():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    with acc:
        with pytest.raises(RuntimeError, match=r"this Accumulator is already active"), acc:
            pass
        assert acc.active
        assert "step" in vars(optimizer)
    assert "step" not in vars(optimizer)


def test_two_accumulators_on_one_optimizer_raise():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Accumulator(model, optimizer, 2)
    second = Accumulator(model, optimizer, 4)
    with first:
        with pytest.raises(RuntimeError, match=r"already driven by another active Accumulator"):
            second.__enter__()
        assert first.active and not second.active
    assert "step" not in vars(optimizer)
    with second:  # fine once the first has left
        pass


def test_step_with_a_closure_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(TypeError, match=r"optimizer.step\(closure\) is not supported"),
        Accumulator(model, optimizer, 2),
    ):
        optimizer.step(lambda: mse(model, make_batches(1, 4)[0]))
    assert "step" not in vars(optimizer)


def test_backward_after_a_complete_window_without_step_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with (
        pytest.raises(RuntimeError, match=r"call optimizer.step\(\) .* after every acc.backward"),
        acc,
    ):
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))


def test_scheduler_state_dict_inside_the_block_is_clean_and_picklable(tmp_path):
    _, _, scheduler, _, acc = make_everything()
    outside = scheduler.state_dict()
    with acc:
        inside = scheduler.state_dict()
        torch.save(inside, tmp_path / "scheduler.pt")
    assert inside.keys() == outside.keys()
    assert torch.load(tmp_path / "scheduler.pt").keys() == outside.keys()
