"""Semantics 7: state_dict() / load_state_dict() resume a run mid-window exactly."""

import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_batches, make_model, mse

from torch_accum import Accumulator

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(*args: str) -> None:
    subprocess.run([sys.executable, str(WORKER), *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted") / "result.pt"
    run_worker(str(path))
    return torch.load(path)


@pytest.mark.parametrize("stop_after", [6, 1])
def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path, uninterrupted, stop_after):
    checkpoint = tmp_path / "checkpoint.pt"
    resumed = tmp_path / "resumed.pt"
    run_worker(str(checkpoint), "--stop-after", str(stop_after))
    run_worker(str(resumed), "--resume", str(checkpoint))

    expected = uninterrupted
    got = torch.load(resumed)
    assert got["counters"] == expected["counters"]
    assert got["counters"][0] == 3  # windows of 4, 4 and a partial 3
    for a, b in zip(got["params"], expected["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("optimizers", [[], ["--two-optimizers"]], ids=["one", "two"])
def test_resume_between_the_completing_backward_and_the_scaler_step(tmp_path, optimizers):
    # Saved after the 4th acc.backward completed the window, before scaler.step: in the
    # fresh process the scaler has never scaled a loss when the window is applied.
    flags = ["--scaler", *optimizers]
    checkpoint, resumed, expected = (tmp_path / name for name in ("c.pt", "r.pt", "e.pt"))
    run_worker(str(expected), *flags)
    run_worker(str(checkpoint), "--stop-after", "4", "--before-step", *flags)
    assert torch.load(checkpoint)["accumulator"]["window"]["state"] == "complete"
    run_worker(str(resumed), "--resume", str(checkpoint), *flags)

    got, want = torch.load(resumed), torch.load(expected)
    assert got["counters"] == want["counters"]
    assert got["counters"][:2] == (3, 0)  # windows of 4, 4 and a partial 3, none skipped
    for a, b in zip(got["params"], want["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_without_the_accumulator_state_would_differ(tmp_path, uninterrupted):
    # The control: dropping the pending gradients changes the result.
    checkpoint = tmp_path / "checkpoint.pt"
    run_worker(str(checkpoint), "--stop-after", "6")
    state = torch.load(checkpoint)
    state["accumulator"]["gradients"] = None
    state["accumulator"]["window"] = Accumulator(
        make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1), 4
    ).state_dict()["window"]
    torch.save(state, checkpoint)
    run_worker(str(tmp_path / "resumed.pt"), "--resume", str(checkpoint))
    got = torch.load(tmp_path / "resumed.pt")["params"]
    expected = uninterrupted["params"]
    assert any(not torch.equal(a, b) for a, b in zip(got, expected))


def test_state_dict_round_trip_in_process():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    with acc:
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch), weight=2.0)
            optimizer.step()
    state = acc.state_dict()
    assert acc.micro_step == 0 and state["gradients"] is None

    with acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        state = acc.state_dict()
        loss_at_save = acc.loss
        grads = [p.grad.clone() for p in model.parameters()]
        acc.backward(mse(model, make_batches(1, 4, seed=5)[0]))  # state holds copies
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 3)
    other.load_state_dict(state)
    assert (other.micro_step, other.optimizer_steps, other.loss) == (1, 2, loss_at_save)
    for param, grad in zip(other_model.parameters(), grads):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)


def test_load_state_dict_rejects_a_mismatch():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    with acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        state = acc.state_dict()
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 5)
    with pytest.raises(
        ValueError,
        match=r"pending window of accumulation_steps=3, but this Accumulator has accumulation_steps=5",
    ):
        other.load_state_dict(state)
    small = torch.nn.Linear(6, 3).double()
    other = Accumulator(small, torch.optim.SGD(small.parameters(), lr=0.1), 3)
    with pytest.raises(
        ValueError, match=r"state_dict\['gradients'\] has 4 entries but the optimizer has 2"
    ):
        other.load_state_dict(state)


def test_load_state_dict_of_another_objects_state_names_the_dict_it_expects():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    with pytest.raises(
        ValueError,
        match=r"expects the dict returned by acc.state_dict\(\) \(keys accumulation_steps, .*"
        r"lacks 'accumulation_steps', .* \(its keys: '0.weight', .*model's or the optimizer's",
    ):
        acc.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"lacks .*\(its keys: 'state', 'param_groups'\)"):
        acc.load_state_dict(optimizer.state_dict())
    with pytest.raises(
        TypeError, match=r"expects the dict returned by acc.state_dict\(\), got .* list"
    ):
        acc.load_state_dict([])
    assert acc.micro_step == 0 and acc.optimizer_steps == 0


def test_a_loop_unscaling_a_resumed_complete_window_with_a_fresh_scaler():
    # The loop's own scaler.unscale_ (to clip by hand) is the first use of a scaler that
    # has only loaded its state: it has no scale tensor yet.
    def setup():
        model = make_model(torch.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        return model, optimizer, scaler, Accumulator(model, optimizer, 2, scaler=scaler)

    def finish(model, optimizer, scaler):
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    model, optimizer, scaler, acc = setup()
    with acc:
        for batch in make_batches(2, 4, dtype=torch.float32):
            acc.backward(mse(model, batch))
        saved = copy.deepcopy(
            [model.state_dict(), optimizer.state_dict(), scaler.state_dict(), acc.state_dict()]
        )
        finish(model, optimizer, scaler)

    fresh_model, fresh_optimizer, fresh_scaler, fresh = setup()
    fresh_model.load_state_dict(saved[0])
    fresh_optimizer.load_state_dict(saved[1])
    fresh_scaler.load_state_dict(saved[2])
    fresh.load_state_dict(saved[3])
    with fresh:
        finish(fresh_model, fresh_optimizer, fresh_scaler)
    assert fresh.optimizer_steps == acc.optimizer_steps == 1
    assert fresh_scaler.get_scale() == scaler.get_scale()
    for got, want in zip(fresh_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pickling_an_accumulator_is_refused_with_state_dict_as_the_way():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    acc = Accumulator(model, optimizer, 3, scheduler=scheduler, partial_window="carry")
    with acc:
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
    with pytest.raises(
        TypeError,
        match=r"an Accumulator cannot be pickled: .*gradients of a pending window.*"
        r"Save acc.state_dict\(\) .*acc.load_state_dict\(\)",
    ):
        pickle.dumps(acc)
    with pytest.raises(TypeError, match=r"an Accumulator cannot be pickled"), acc:
        torch.save(acc, io.BytesIO())


def test_a_deep_copy_of_an_accumulator_continues_its_pending_window():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = Accumulator(model, optimizer, 4, scheduler=scheduler, partial_window="carry")
    batches = make_batches(8, 4)
    with acc:
        for batch in batches[:7]:
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    copied = copy.deepcopy(acc)
    assert copied.micro_step == acc.micro_step == 3
    assert copied.scheduler.optimizer is copied.optimizer is not optimizer
    for run in (acc, copied):
        with run:
            run.backward(mse(run.model, batches[7]))
            run.optimizer.step()
            run.optimizer.zero_grad()
        assert (run.optimizer_steps, run.scheduler.last_epoch) == (2, 2)
    for got, want in zip(copied.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pending_at_checkpoint", [0, 2])
def test_rolling_back_inside_the_block_drops_the_abandoned_micro_batches(pending_at_checkpoint):
    # A checkpoint, then micro-batches of a window that is abandoned, then a rollback to the
    # checkpoint and on as the uninterrupted run: the abandoned gradients must not leak in
    # (the README's loop clears after the step, so nothing else clears them).
    batches = make_batches(12, 4)
    abandoned = make_batches(3, 4, seed=9)

    def train(rollback):
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        acc = Accumulator(model, optimizer, 4)
        with acc:
            for index, batch in enumerate(batches):
                if rollback and index == 4 + pending_at_checkpoint:
                    saved = copy.deepcopy(
                        [model.state_dict(), optimizer.state_dict(), acc.state_dict()]
                    )
                    for extra in abandoned:
                        acc.backward(mse(model, extra))
                        optimizer.step()
                        optimizer.zero_grad()
                    model.load_state_dict(saved[0])
                    optimizer.load_state_dict(saved[1])
                    acc.load_state_dict(saved[2])
                    assert acc.micro_step == pending_at_checkpoint
                acc.backward(mse(model, batch))
                optimizer.step()
                optimizer.zero_grad()
        return model, acc

    assert_rollback_changes_nothing(train)


def test_rolling_back_a_window_the_loop_had_unscaled_lets_the_scaler_unscale_again():
    def train(rollback):
        model = make_model(torch.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        acc = Accumulator(model, optimizer, 2, scaler=scaler)
        batches = make_batches(6, 4, dtype=torch.float32)
        with acc:
            saved = copy.deepcopy(
                [model.state_dict(), optimizer.state_dict(), scaler.state_dict(), acc.state_dict()]
            )
            if rollback:  # a window unscaled to clip by hand, then abandoned
                for batch in make_batches(2, 4, dtype=torch.float32, seed=9):
                    acc.backward(mse(model, batch))
                scaler.unscale_(optimizer)
                model.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
                scaler.load_state_dict(saved[2])
                acc.load_state_dict(saved[3])
            for batch in batches:
                acc.backward(mse(model, batch))
                if acc.sync_gradients:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
        return model, acc

    assert_rollback_changes_nothing(train)


def assert_rollback_changes_nothing(train):
    """``train(rollback=True)`` ends bitwise where ``train(rollback=False)`` does."""
    model, acc = train(rollback=True)
    expected, expected_acc = train(rollback=False)
    assert acc.optimizer_steps == expected_acc.optimizer_steps == 3
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
