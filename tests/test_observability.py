"""Semantics 6: counters, sync_gradients, the window loss and repr."""

import pytest
import torch
from helpers import make_batches, make_model, mse

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


def test_loss_is_the_weighted_mean_of_the_last_completed_window():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = make_batches(5, 4)
    losses = [mse(model, b).item() for b in batches]
    weights = [1, 3, 2, 4, 5]
    acc = Accumulator(model, optimizer, accumulation_steps=2)
    assert acc.loss is None
    with acc:
        for index, (batch, weight) in enumerate(zip(batches, weights)):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
            if index == 1:
                assert acc.loss == pytest.approx((losses[0] * 1 + losses[1] * 3) / 4, rel=1e-12)
            if index == 2:  # mid-window: still the last completed window's loss
                assert acc.loss == pytest.approx((losses[0] * 1 + losses[1] * 3) / 4, rel=1e-12)
            if index == 3:
                assert acc.loss == pytest.approx((losses[2] * 2 + losses[3] * 4) / 6, rel=1e-12)
    # The partial window applied on exit is a completed window too.
    assert acc.loss == pytest.approx(losses[4], rel=1e-12)


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
