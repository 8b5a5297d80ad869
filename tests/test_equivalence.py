"""Semantics 1 and 8: accumulated training equals full-batch training."""

import pytest
import torch
from helpers import (
    OPTIMIZERS,
    TOLERANCES,
    make_batches,
    make_model,
    mse,
    parameters_of,
    split,
    train_accumulated,
    train_full_batch,
)

from torch_accum import Accumulator


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("accumulation_steps", [2, 4, 8])
def test_k_micro_batches_equal_one_full_batch(dtype, optimizer_name, accumulation_steps):
    batches = make_batches(count=4, batch_size=16, dtype=dtype)
    reference = make_model(dtype)
    train_full_batch(reference, OPTIMIZERS[optimizer_name](reference.parameters()), batches)

    model = make_model(dtype)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    micro_batches = [mb for batch in batches for mb in split(batch, accumulation_steps)]
    acc = train_accumulated(model, optimizer, micro_batches, accumulation_steps)

    assert acc.optimizer_steps == len(batches)
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_accumulation_differs_from_stepping_every_micro_batch():
    # Guards the test above against passing vacuously: K real steps per batch do differ.
    batches = make_batches(count=2, batch_size=16)
    reference = make_model()
    train_full_batch(reference, OPTIMIZERS["adam"](reference.parameters()), batches)
    model = make_model()
    micro_batches = [mb for batch in batches for mb in split(batch, 4)]
    train_full_batch(model, OPTIMIZERS["adam"](model.parameters()), micro_batches)
    difference = max(
        (a - b).abs().max().item() for a, b in zip(parameters_of(model), parameters_of(reference))
    )
    assert difference > 1e-3


class CountingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_steps = 0

    def step(self, closure=None):
        self.real_steps += 1
        return super().step(closure)


def test_no_update_before_the_boundary():
    model = make_model()
    optimizer = CountingSGD(model.parameters(), lr=0.1, momentum=0.9)
    before = parameters_of(model)
    micro_batches = make_batches(count=4, batch_size=4)
    with Accumulator(model, optimizer, accumulation_steps=4) as acc:
        for index, batch in enumerate(micro_batches[:3]):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
            assert acc.micro_step == index + 1
            assert optimizer.real_steps == 0
            assert optimizer.state == {}
            for got, expected in zip(parameters_of(model), before):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
            # Gradients keep accumulating across the no-op zero_grad().
            assert all(p.grad is not None for p in model.parameters())
        acc.backward(mse(model, micro_batches[3]))
        optimizer.step()
        assert optimizer.real_steps == 1
    changed = [not torch.equal(a, b) for a, b in zip(parameters_of(model), before)]
    assert all(changed)


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_one_step_accumulation_is_the_plain_loop_bitwise(optimizer_name):
    batches = make_batches(count=5, batch_size=8, dtype=torch.float32)
    reference = make_model(torch.float32)
    train_full_batch(reference, OPTIMIZERS[optimizer_name](reference.parameters()), batches)
    model = make_model(torch.float32)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    acc = train_accumulated(model, optimizer, batches, accumulation_steps=1)
    assert acc.optimizer_steps == 5
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_top_of_loop_zero_grad_style_is_equivalent():
    batches = make_batches(count=3, batch_size=16)
    reference = make_model()
    train_full_batch(reference, OPTIMIZERS["sgd_momentum"](reference.parameters()), batches)
    model = make_model()
    optimizer = OPTIMIZERS["sgd_momentum"](model.parameters())
    with Accumulator(model, optimizer, accumulation_steps=4) as acc:
        for batch in [mb for b in batches for mb in split(b, 4)]:
            optimizer.zero_grad()
            acc.backward(mse(model, batch))
            optimizer.step()
    for got, expected in zip(parameters_of(model), parameters_of(reference)):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])
