"""Accumulated training equals full-batch training: optimizers, dtypes, sparse and complex
gradients, losses that reach a parameter through a view."""

import math

import pytest
import torch
from helpers import (
    EXACT,
    OPTIMIZERS,
    TOLERANCES,
    assert_same,
    make_batches,
    make_model,
    merge,
    mse,
    parameters_of,
    reference_run,
    split,
    train_accumulated,
    train_full_batch,
    windows_of,
)
from torch import nn

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


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32], ids=str)
def test_trains_exactly_under_a_float64_default_dtype(model_dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        batches = make_batches(8, 4, dtype=model_dtype)
        reference = make_model(model_dtype)
        reference_run(
            reference, torch.optim.Adam(reference.parameters(), lr=0.01), windows_of(batches, 4)
        )
        model = make_model(model_dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        with Accumulator(model, optimizer, 4) as acc:
            for batch in batches:
                acc.backward(mse(model, batch))
                optimizer.step()
                optimizer.zero_grad()
    finally:
        torch.set_default_dtype(previous)
    assert acc.optimizer_steps == 2
    assert_same(model, reference, TOLERANCES[model_dtype])


def accumulate(model, optimizer, k, batches, loss_of, **kwargs):
    """The accumulation loop (zero_grad after each step) with any loss function."""
    with Accumulator(model, optimizer, k, **kwargs) as acc:
        for batch in batches:
            acc.backward(loss_of(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return acc


def assert_one_window_is_skipped(model, non_finite_loss):
    """At K=1 the window of ``non_finite_loss(model)`` is skipped with a warning, nothing moves."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = parameters_of(model)
    with Accumulator(model, optimizer, 1) as acc, pytest.warns(RuntimeWarning, match="non-finite"):
        acc.backward(non_finite_loss(model))
        optimizer.step()
    assert acc.skipped_steps == 1
    torch.testing.assert_close(parameters_of(model), before, **EXACT)


class SparseBag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(20, 4, sparse=True).double()

    def forward(self, ids):
        return self.embedding(ids).sum(-1)


def sparse_batches():
    generator = torch.Generator().manual_seed(3)
    return [
        (
            torch.randint(0, 20, (3, 5), generator=generator),
            torch.randn(3, 5, dtype=torch.float64, generator=generator),
        )
        for _ in range(6)
    ]


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.SparseAdam])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_sparse_gradients_train_exactly(optimizer_class, max_grad_norm):
    batches = sparse_batches()

    def loss_of(model, batch):
        ids, target = batch
        return nn.functional.mse_loss(model(ids), target)

    reference = SparseBag()
    ref_optimizer = optimizer_class(reference.parameters(), lr=0.1)
    for window in windows_of(batches, 2):
        ref_optimizer.zero_grad()
        loss_of(reference, merge(window)).backward()
        if max_grad_norm is not None:
            grad = reference.embedding.weight.grad.coalesce()
            coefficient = min(1.0, max_grad_norm / (float(grad.values().norm()) + 1e-6))
            reference.embedding.weight.grad = grad * coefficient
        ref_optimizer.step()

    model = SparseBag()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    acc = accumulate(model, optimizer, 2, batches, loss_of, max_grad_norm=max_grad_norm)
    assert acc.optimizer_steps == 3
    assert_same(model, reference)


def test_non_finite_sparse_gradients_are_skipped():
    ids, target = sparse_batches()[0]
    assert_one_window_is_skipped(
        SparseBag(), lambda model: nn.functional.mse_loss(model(ids), target) * math.inf
    )


class ComplexLinear(nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.complex128, generator=generator))

    def forward(self, x):
        return x @ self.weight.T


def complex_batches():
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(4, 4, dtype=torch.complex128, generator=generator),
            torch.randn(4, 3, dtype=torch.complex128, generator=generator),
        )
        for _ in range(6)
    ]


def complex_loss(model, batch):
    x, y = batch
    return (model(x) - y).abs().pow(2).mean()


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_complex_parameters_train_exactly(max_grad_norm):
    batches = complex_batches()
    reference = ComplexLinear()
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    for window in windows_of(batches, 3):
        ref_optimizer.zero_grad()
        complex_loss(reference, merge(window)).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)
        ref_optimizer.step()

    model = ComplexLinear()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    acc = accumulate(model, optimizer, 3, batches, complex_loss, max_grad_norm=max_grad_norm)
    assert acc.optimizer_steps == 2
    assert_same(model, reference)


def test_non_finite_complex_gradients_are_skipped():
    assert_one_window_is_skipped(
        ComplexLinear(), lambda model: complex_loss(model, complex_batches()[0]) * math.nan
    )


class ScaledModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 3).double()
        self.bias = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


def test_a_loss_reaching_a_parameter_through_a_view_trains_exactly():
    batches = make_batches(12, 4)

    def loss_of(model, batch):
        return mse(model.net, batch) + model.bias.view(())  # the loss reaches a leaf by a view

    reference = ScaledModel()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for window in windows_of(batches, 4):
        ref_optimizer.zero_grad()
        loss_of(reference, merge(window)).backward()
        ref_optimizer.step()
    model = ScaledModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 4) as acc:
        for batch in batches:
            acc.backward(loss_of(model, batch))
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    assert acc.optimizer_steps == 3
    assert_same(model, reference)
