"""Semantics 2: what leaving the block with a partial window pending does."""

import logging

import pytest
import torch
from helpers import (
    TOLERANCES,
    make_batches,
    make_model,
    mse,
    parameters_of,
    train_accumulated,
    train_full_batch,
)

from torch_accum import Accumulator

TOL = TOLERANCES[torch.float64]


def merge(micro_batches):
    return torch.cat([x for x, _ in micro_batches]), torch.cat([y for _, y in micro_batches])


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_apply_averages_the_last_window_over_its_own_length():
    # 10 micro-batches with K=4: windows of 4, 4 and 2.
    micro_batches = make_batches(count=10, batch_size=4)
    reference = make_model()
    windows = [micro_batches[0:4], micro_batches[4:8], micro_batches[8:10]]
    train_full_batch(reference, sgd(reference), [merge(w) for w in windows])

    model = make_model()
    scheduler_optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(scheduler_optimizer, step_size=1, gamma=0.5)
    acc = train_accumulated(
        model, scheduler_optimizer, micro_batches, accumulation_steps=4, scheduler=scheduler
    )
    assert acc.optimizer_steps == 3
    assert scheduler.last_epoch == 3
    assert acc.micro_step == 0
    assert all(p.grad is None for p in model.parameters())

    # Reference with the same schedule: lr 0.1, 0.05, 0.025.
    reference = make_model()
    optimizer = sgd(reference)
    reference_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for window in windows:
        optimizer.zero_grad()
        mse(reference, merge(window)).backward()
        optimizer.step()
        reference_scheduler.step()
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOL)


def test_dividing_the_partial_window_by_k_would_be_detected():
    # The mean over 2 pending micro-batches, not their sum / 4: the two differ visibly.
    micro_batches = make_batches(count=2, batch_size=4)
    model = make_model()
    train_accumulated(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batches, 4)
    wrong = make_model()
    optimizer = torch.optim.SGD(wrong.parameters(), lr=0.1)
    (mse(wrong, merge(micro_batches)) * 2 / 4).backward()
    optimizer.step()
    right = make_model()
    optimizer = torch.optim.SGD(right.parameters(), lr=0.1)
    mse(right, merge(micro_batches)).backward()
    optimizer.step()
    for got, expected, bad in zip(parameters_of(model), parameters_of(right), parameters_of(wrong)):
        torch.testing.assert_close(got, expected, **TOL)
        assert not torch.allclose(got, bad, rtol=1e-6, atol=1e-8)


def test_discard_drops_the_partial_window_and_logs_it(caplog):
    micro_batches = make_batches(count=6, batch_size=4)
    reference = make_model()
    train_full_batch(reference, sgd(reference), [merge(micro_batches[:4])])
    model = make_model()
    with caplog.at_level(logging.INFO, logger="torch_accum"):
        acc = train_accumulated(model, sgd(model), micro_batches, 4, partial_window="discard")
    assert "discarding a partial window of 2 micro-batches" in caplog.text
    assert acc.optimizer_steps == 1
    assert acc.micro_step == 0
    assert all(p.grad is None for p in model.parameters())
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOL)


def test_carry_continues_the_window_in_the_next_block():
    micro_batches = make_batches(count=8, batch_size=4)
    reference = make_model()
    train_full_batch(
        reference, sgd(reference), [merge(micro_batches[:4]), merge(micro_batches[4:])]
    )

    model = make_model()
    optimizer = sgd(model)
    acc = Accumulator(model, optimizer, accumulation_steps=4, partial_window="carry")
    for chunk in (micro_batches[:3], micro_batches[3:6], micro_batches[6:]):
        with acc:
            for batch in chunk:
                acc.backward(mse(model, batch))
                optimizer.step()
                optimizer.zero_grad()
    assert acc.optimizer_steps == 2
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOL)


def test_carry_keeps_gradients_pending_between_blocks():
    model = make_model()
    optimizer = sgd(model)
    acc = Accumulator(model, optimizer, accumulation_steps=4, partial_window="carry")
    before = parameters_of(model)
    with acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
    assert acc.micro_step == 1
    assert all(p.grad is not None for p in model.parameters())
    for got, expected in zip(parameters_of(model), before):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_complete_window_without_step_is_applied_on_exit():
    micro_batches = make_batches(count=4, batch_size=4)
    reference = make_model()
    train_full_batch(reference, sgd(reference), [merge(micro_batches)])
    model = make_model()
    optimizer = sgd(model)
    with Accumulator(model, optimizer, 4, partial_window="discard") as acc:
        for batch in micro_batches:
            acc.backward(mse(model, batch))
    assert acc.optimizer_steps == 1
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOL)


def test_nothing_is_applied_when_the_body_raises():
    model = make_model()
    optimizer = sgd(model)
    before = parameters_of(model)
    acc = Accumulator(model, optimizer, accumulation_steps=4)
    with pytest.raises(KeyError), acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        raise KeyError("boom")
    assert acc.optimizer_steps == 0
    assert acc.micro_step == 1  # kept: state_dict() can still save it
    for got, expected in zip(parameters_of(model), before):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
