"""The run's state (``torch_accum/_state.py``, ``RunState``): counters, sync_gradients,
repr, and state_dict()/load_state_dict() within one process (resuming in a fresh
process: test_resume.py).
"""

import copy

import pytest
import torch
from helpers import make_batches, make_model, mse
from torch import nn

from torch_accum import Accumulator


def test_counters_and_sync_gradients_through_a_loop():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, accumulation_steps=3)
    seen = []
    with acc:
        for batch in make_batches(7, 4):
            acc.backward(mse(model, batch))
            before_step = acc.sync_gradients
            optimizer.step()
            optimizer.zero_grad()
            seen.append((before_step, acc.sync_gradients, acc.micro_step, acc.optimizer_steps))
    assert seen == [
        (False, False, 1, 0),
        (False, False, 2, 0),
        (True, True, 0, 1),
        (False, False, 1, 1),
        (False, False, 2, 1),
        (True, True, 0, 2),
        (False, False, 1, 2),  # the partial window: applied on exit
    ]
    assert (acc.optimizer_steps, acc.skipped_steps, acc.micro_step) == (3, 0, 0)


def test_sync_gradients_is_always_true_without_accumulation():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, accumulation_steps=1)
    assert acc.sync_gradients
    with acc:
        for batch in make_batches(2, 4):
            assert acc.sync_gradients
            acc.backward(mse(model, batch))
            assert acc.sync_gradients
            optimizer.step()


def test_repr_shows_the_state():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, accumulation_steps=4)
    assert repr(acc) == (
        "Accumulator(accumulation_steps=4, micro_step=0, optimizer_steps=0, "
        "skipped_steps=0, sync_gradients=False, active=False)"
    )
    with acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        assert "micro_step=1" in repr(acc)
        assert "active=True" in repr(acc)


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


def test_state_dict_survives_a_round_trip_unchanged():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    batches = make_batches(4, 4)
    with acc:
        for batch, weight in zip(batches, [1.0, 2.0, 3.0, 4.0]):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
        # K changes between windows: the pending window keeps its own length of 3.
        acc.accumulation_steps = 2
        state = acc.state_dict()
    assert state["window"]["length"] == 3 and state["accumulation_steps"] == 2
    assert state["window"]["weighted"] is True and state["last_window"]["weighted"] is True
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again.keys() == state.keys()
    for key in ("accumulation_steps", "optimizer_steps", "skipped_steps", "window_ready"):
        assert again[key] == state[key], key
    for part in ("window", "last_window"):
        for key, value in state[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again[part][key], value), (part, key)
            else:
                assert again[part][key] == value, (part, key)
    # The resumed window still needs two more micro-batches to reach its length of 3.
    ends = []
    with other:
        for batch in make_batches(2, 4, seed=3):
            other.backward(mse(other_model, batch))
            ends.append(other.sync_gradients)
            other_model.zero_grad()
    assert ends == [False, True]


def test_state_dict_of_a_pending_window_keeps_parameters_without_gradient():
    model = nn.ModuleDict({"used": nn.Linear(6, 3), "unused": nn.Linear(6, 3)}).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    x, y = make_batches(1, 4)[0]
    with acc:
        acc.backward(nn.functional.mse_loss(model["used"](x), y))
        state = acc.state_dict()
    assert [g is None for g in state["gradients"]] == [False, False, True, True]
    other_model = nn.ModuleDict({"used": nn.Linear(6, 3), "unused": nn.Linear(6, 3)}).double()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    other.load_state_dict(state)
    assert other_model["unused"].weight.grad is None
    torch.testing.assert_close(
        other_model["used"].weight.grad, state["gradients"][0], rtol=0, atol=0
    )


def test_state_dict_after_discard_saves_a_fresh_window():
    # The dropped window is finished: resuming from here starts a new one, as a new run would.
    def saved_window(micro_batches, discard):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = Accumulator(model, optimizer, 3)
        with acc:
            for batch in make_batches(micro_batches, 4):
                acc.backward(mse(model, batch))
                optimizer.step()
            if discard:
                acc.discard()
            window = acc.state_dict()["window"]
        assert window.pop("losses").numel() == 0
        return window

    assert saved_window(2, discard=True) == saved_window(0, discard=False)


def test_load_state_dict_restores_the_skipped_steps():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with acc, pytest.warns(RuntimeWarning):
        x, y = make_batches(1, 4)[0]
        acc.backward(mse(model, (x * float("nan"), y)))
        optimizer.step()
    state = acc.state_dict()
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 1)
    other.load_state_dict(state)
    assert (other.skipped_steps, other.optimizer_steps) == (1, 0)


def saved_with_one_window_finished_and_one_pending():
    """The state_dict and loss of an Accumulator after 3 micro-batches at K=2."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    with acc:
        for batch in make_batches(3, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
        return acc.state_dict(), acc.loss


def test_load_state_dict_restores_the_last_window_loss():
    state, loss_at_save = saved_with_one_window_finished_and_one_pending()
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    assert other.loss is None
    other.load_state_dict(state)
    assert isinstance(other.loss, float)
    assert other.loss == loss_at_save


def pending_state(k=3, micro_batches=1, weight=None, dtype=torch.float64):
    model = make_model(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, k)
    with acc:
        for batch in make_batches(micro_batches, 4, dtype):
            acc.backward(mse(model, batch), weight=weight)
            if acc.sync_gradients:
                break
        state = acc.state_dict()
    return model, acc, state


def test_loaded_gradients_take_the_parameters_dtype_and_are_copies():
    _, _, state = pending_state(dtype=torch.float32)
    model = make_model(torch.float64)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    acc.load_state_dict(state)
    for param, saved in zip(model.parameters(), state["gradients"]):
        assert param.grad.dtype == torch.float64 and param.grad.device == param.device
        torch.testing.assert_close(param.grad, saved.double(), rtol=0, atol=0)
    # Accumulating further must not write into the checkpoint's tensors.
    saved_copy = [g.clone() for g in state["gradients"]]
    same = make_model(torch.float32)
    acc32 = Accumulator(same, torch.optim.SGD(same.parameters(), lr=0.1), 3)
    acc32.load_state_dict(state)
    with acc32:
        acc32.backward(mse(same, make_batches(1, 4, torch.float32, seed=9)[0]))
    for saved, before in zip(state["gradients"], saved_copy):
        assert torch.equal(saved, before)


def test_loaded_gradients_move_to_the_parameters_device():
    # A checkpoint saved on one device and loaded on another (here: onto the meta device).
    _, _, state = pending_state()
    model = make_model().to("meta")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    acc.load_state_dict(state)
    for param in model.parameters():
        assert param.grad.device.type == "meta"


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


def test_load_state_dict_rejects_a_gradient_of_the_wrong_shape():
    _, _, state = pending_state()
    state["gradients"][0] = torch.zeros(2, 2, dtype=torch.float64)
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    with pytest.raises(
        ValueError,
        match=r"state_dict\['gradients'\]\[0\] has shape \(2, 2\) but the parameter has shape \(16, 6\)",
    ):
        acc.load_state_dict(state)


def test_a_state_dict_from_before_explicit_window_states_still_loads():
    # Older checkpoints saved no window "state", "length" or "weighted"; a complete window
    # was marked by window_ready alone. Such a window must still be applied on resume.
    _, _, state = pending_state(k=2, micro_batches=2)
    assert state["window_ready"] and state["window"]["state"] == "complete"
    for key in ("state", "length", "weighted"):
        del state["window"][key]
        if state["last_window"] is not None:
            del state["last_window"][key]
    expected = make_model()
    expected_optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    for p, saved in zip(expected.parameters(), state["gradients"]):
        p.grad = saved.clone()
    expected_optimizer.step()

    resumed_model = make_model()
    optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    acc = Accumulator(resumed_model, optimizer, 2)
    acc.load_state_dict(state)
    assert acc.window_state.value == "complete" and acc.micro_step == 2
    with acc:
        optimizer.step()  # the loop's step after the backward that completed the window
    assert acc.optimizer_steps == 1
    for got, want in zip(resumed_model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_old_pending_window_resumes_with_the_saved_length():
    _, _, state = pending_state(k=3, micro_batches=1)
    for key in ("state", "length", "weighted"):
        del state["window"][key]
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    acc.load_state_dict(state)
    assert acc.window_state.value == "accumulating"
    assert acc.state_dict()["window"]["weighted"] is False  # unweighted unless saved so
    ends = []
    with acc:
        for batch in make_batches(2, 4, seed=7):
            acc.backward(mse(model, batch))
            ends.append(acc.sync_gradients)
            optimizer.step()
    assert ends == [False, True]  # two more micro-batches complete the window of 3
    assert acc.optimizer_steps == 1


def test_an_old_state_dict_with_a_finished_window_restores_its_loss():
    state, loss_at_save = saved_with_one_window_finished_and_one_pending()
    for key in ("state", "length", "weighted"):
        del state["last_window"][key]
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    other.load_state_dict(state)
    assert other.loss == loss_at_save


def test_a_complete_window_resumed_with_non_finite_gradients_is_skipped():
    _, _, state = pending_state(k=2, micro_batches=2)
    state["gradients"][0][0, 0] = float("nan")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(model, optimizer, 2)
    acc.load_state_dict(state)
    with acc, pytest.warns(RuntimeWarning, match="non-finite gradient in 1 parameter"):
        optimizer.step()
    assert (acc.optimizer_steps, acc.skipped_steps) == (0, 1)
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)


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


def test_loading_a_state_dict_into_a_running_window_continues_from_it():
    # Rolling back to a checkpoint mid-window: the loaded gradients replace the pending
    # ones, and the next acc.backward must not mistake them for a foreign write.
    batches = make_batches(4, 4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 3) as acc:
        acc.backward(mse(model, batches[0]))
        state = acc.state_dict()
        acc.backward(mse(model, batches[1]))
        acc.load_state_dict(state)  # back to one micro-batch pending
        for batch in batches[2:]:
            acc.backward(mse(model, batch))
            optimizer.step()
    assert acc.optimizer_steps == 1
    kept = [batches[0], *batches[2:]]
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    mse(reference, (torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept]))).backward()
    ref_optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def assert_rollback_changes_nothing(train):
    """``train(rollback=True)`` ends bitwise where ``train(rollback=False)`` does."""
    model, acc = train(rollback=True)
    expected, expected_acc = train(rollback=False)
    assert acc.optimizer_steps == expected_acc.optimizer_steps == 3
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
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
