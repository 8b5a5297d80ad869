"""Whole-model gradient passes (``torch_accum/_gradients.py``): the inf/NaN check and the
parameters it names, the norm and clipping of the accumulated gradient, and the cached
backward seeds.
"""

import pytest
import torch
from helpers import (
    TOLERANCES,
    assert_same,
    make_batches,
    make_model,
    mse,
    parameters_of,
    poisoned_loss,
    run_window,
    split,
)
from torch import nn

from torch_accum import Accumulator

TOL64 = TOLERANCES[torch.float64]


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
    assert_same(model, reference)


def test_max_grad_norm_with_no_gradient_in_the_optimizer_steps_nothing():
    # The optimizer holds a head the loss does not reach: nothing to clip, nothing changes.
    model, head = make_model(), nn.Linear(3, 3).double()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    before = [p.detach().clone() for p in head.parameters()]
    with Accumulator(model, optimizer, 1, max_grad_norm=1.0) as acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        optimizer.step()
    assert acc.optimizer_steps == 1
    for p, b in zip(head.parameters(), before, strict=True):
        assert torch.equal(p, b)


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


class Wide(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.unused = nn.Linear(2, 2)  # no gradient at all, listed first
        self.ok = nn.Linear(2, 2)  # finite gradient
        self.layers = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
        out = self.ok(x).sum()
        for layer in self.layers:
            out = out + (layer(x) * poison).sum()
        return out


@pytest.mark.parametrize(
    ("layers", "listed"),
    [
        (
            5,
            "5 parameter(s): layers.0.weight, layers.1.weight, layers.2.weight, "
            "layers.3.weight, layers.4.weight; the update",
        ),
        (
            6,
            "6 parameter(s): layers.0.weight, layers.1.weight, layers.2.weight, "
            "layers.3.weight, layers.4.weight ...; the update",
        ),
    ],
)
def test_non_finite_error_names_the_first_five_parameters(layers, listed):
    model = Wide(layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1, on_nonfinite="raise")
    with acc, pytest.raises(RuntimeError) as error:
        acc.backward(model(torch.ones(1, 2), torch.tensor(float("inf"))))
        optimizer.step()
    assert f"non-finite gradient in {listed}" in str(error.value)


def test_non_finite_warning_shows_the_shape_of_a_parameter_outside_the_model():
    model = make_model()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with acc, pytest.warns(RuntimeWarning) as warned:
        x, y = make_batches(1, 4)[0]
        acc.backward(mse(model, (x, y)) + (extra * float("inf")).sum())
        optimizer.step()
    assert str(warned[0].message) == (
        "non-finite gradient in 1 parameter(s): <parameter of shape (3,)>: optimizer step 1 skipped"
    )


def test_the_default_dtype_does_not_reach_the_gradient_check():
    # float32 gradients are scaled by a float32 factor (the kernel's), whatever the default.
    def trained(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Accumulator(model, optimizer, 2) as acc:
            for weight, batch in enumerate(make_batches(2, 4, torch.float32), start=1):
                acc.backward(mse(model, batch), weight=weight)
                optimizer.step()
        return [p.detach() for p in model.parameters()]

    expected = trained(make_model(torch.float32))
    model = make_model(torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = trained(model)
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_backward_seed_per_factor_is_reused_across_micro_batches(monkeypatch):
    # Seeding backward with the factor saves an allocation per micro-batch only if the seed
    # is kept: every micro-batch of a K=4 run starts backward from the same tensor.
    seeds = []
    backward = torch.autograd.backward

    def recording(tensors, grad_tensors=None, *args, **kwargs):
        seeds.append(grad_tensors)
        return backward(tensors, grad_tensors, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", recording)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 4) as acc:
        for batch in make_batches(8, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert len(seeds) == 8
    assert all(seed is seeds[0] for seed in seeds)
    assert seeds[0].item() == 0.25 and seeds[0]._version == 0


def test_a_seed_that_is_not_the_cached_one_is_left_alone():
    from torch_accum._gradients import BackwardSeeds

    seeds = BackwardSeeds()
    loss = torch.tensor(2.0, dtype=torch.float64)
    seeds.release(torch.full_like(loss, 0.5), 0.5)  # nothing cached yet: nothing to forget
    cached = seeds.get(loss, 0.5)
    stranger = torch.full_like(loss, 0.5)
    stranger.add_(0)  # changed, as a seed autograd adopted would be
    seeds.release(stranger, 0.5)
    assert seeds.get(loss, 0.5) is cached
    cached.add_(0)
    seeds.release(cached, 0.5)  # the cached seed changed: a new one from now on
    assert seeds.get(loss, 0.5) is not cached
