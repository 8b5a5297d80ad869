"""Bad input: a ValueError/TypeError naming the argument, the value and the fix."""

import math

import pytest
import torch
from helpers import make_batches, make_model, mse
from torch import nn

from torch_accum import Accumulator, measure_activation_memory


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"accumulation_steps must be >= 1, got 0; pass the number"),
        (-3, ValueError, r"accumulation_steps must be >= 1, got -3"),
        (2.5, TypeError, r"accumulation_steps must be a positive int, got 2\.5 \(float\)"),
        (True, TypeError, r"accumulation_steps must be a positive int, got True \(bool\)"),
        ("4", TypeError, r"accumulation_steps must be a positive int, got '4' \(str\)"),
        (None, TypeError, r"accumulation_steps must be a positive int, got None"),
    ],
)
def test_bad_accumulation_steps(model, optimizer, value, error, message):
    with pytest.raises(error, match=message):
        Accumulator(model, optimizer, accumulation_steps=value)


def test_optimizer_must_be_an_optimizer(model):
    with pytest.raises(
        TypeError, match=r"optimizer must be a torch.optim.Optimizer, got an object of type list"
    ):
        Accumulator(model, list(model.parameters()), accumulation_steps=2)


def test_model_must_be_a_module(optimizer):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got 'net' \(str\)"):
        Accumulator("net", optimizer, accumulation_steps=2)


def test_scheduler_bound_to_another_optimizer(model, optimizer):
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(
        ValueError, match=r"scheduler is bound to a different optimizer .* same optimizer"
    ):
        Accumulator(model, optimizer, 2, scheduler=scheduler)


def test_scheduler_without_step(model, optimizer):
    with pytest.raises(TypeError, match=r"scheduler must be an LR scheduler .* got 0\.1 \(float\)"):
        Accumulator(model, optimizer, 2, scheduler=0.1)


def test_reduce_lr_on_plateau_is_refused_with_the_fix(model, optimizer):
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(TypeError, match=r"ReduceLROnPlateau needs a metric.*scheduler=None"):
        Accumulator(model, optimizer, 2, scheduler=scheduler)


def test_scaler_must_be_a_grad_scaler(model, optimizer):
    with pytest.raises(
        TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got 'amp'"
    ):
        Accumulator(model, optimizer, 2, scaler="amp")


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"max_grad_norm must be a finite number > 0, got 0;"),
        (-1.0, ValueError, r"max_grad_norm must be a finite number > 0, got -1\.0"),
        (math.nan, ValueError, r"max_grad_norm must be a finite number > 0, got nan; .*None"),
        (math.inf, ValueError, r"max_grad_norm must be a finite number > 0, got inf"),
        ("1.0", TypeError, r"max_grad_norm must be a positive number or None, got '1\.0' \(str\)"),
        (True, TypeError, r"max_grad_norm must be a positive number or None, got True"),
    ],
)
def test_bad_max_grad_norm(model, optimizer, value, error, message):
    with pytest.raises(error, match=message):
        Accumulator(model, optimizer, 2, max_grad_norm=value)


def test_bad_partial_window_and_on_nonfinite(model, optimizer):
    with pytest.raises(
        ValueError, match=r"partial_window must be one of 'apply', 'discard', 'carry'; got 'keep'"
    ):
        Accumulator(model, optimizer, 2, partial_window="keep")
    with pytest.raises(
        ValueError, match=r"on_nonfinite must be one of 'skip', 'raise'; got 'warn'"
    ):
        Accumulator(model, optimizer, 2, on_nonfinite="warn")


@pytest.mark.parametrize(
    ("weight", "error", "message"),
    [
        (0, ValueError, r"weight must be a finite number > 0, got 0\.0"),
        (-2, ValueError, r"weight must be a finite number > 0, got -2\.0"),
        (math.nan, ValueError, r"weight must be a finite number > 0, got nan"),
        (torch.tensor(float("nan")), ValueError, r"weight must be a finite number > 0, got nan"),
        (torch.tensor(0), ValueError, r"weight must be a finite number > 0, got 0\.0"),
        (torch.ones(3), ValueError, r"weight must be a scalar, got a tensor of shape \(3,\)"),
        ("10", TypeError, r"weight must be a positive number or a one-element tensor, got '10'"),
        (True, TypeError, r"weight must be a positive number .* got True \(bool\)"),
        (torch.tensor(True), TypeError, r"weight must be a number, got a bool tensor"),
    ],
)
def test_bad_weight_leaves_nothing_accumulated(model, optimizer, weight, error, message):
    acc = Accumulator(model, optimizer, 2)
    with acc:
        with pytest.raises(error, match=message):
            acc.backward(mse(model, make_batches(1, 4)[0]), weight=weight)
        assert acc.micro_step == 0
        assert all(p.grad is None for p in model.parameters())


def test_bad_loss(model, optimizer):
    acc = Accumulator(model, optimizer, 2)
    with acc:
        with pytest.raises(TypeError, match=r"loss must be a torch.Tensor, got 1\.5 \(float\)"):
            acc.backward(1.5)
        with pytest.raises(
            ValueError, match=r"loss must be a scalar, got a tensor of shape \(4, 3\)"
        ):
            x, y = make_batches(1, 4)[0]
            acc.backward((model(x) - y) ** 2)
        with torch.no_grad():
            loss = mse(model, make_batches(1, 4)[0])
        with pytest.raises(ValueError, match=r"loss does not require grad"):
            acc.backward(loss)


def test_a_scheduler_listed_twice_is_refused(model, optimizer):
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(
        ValueError, match=r"scheduler lists the same scheduler twice.*pass each scheduler once"
    ):
        Accumulator(model, optimizer, 2, scheduler=[scheduler, scheduler])


class Reprs:
    """An object whose repr is exactly the text given."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("x" * 60, "got " + "x" * 60 + " (Reprs)"),  # up to 60 characters the repr is shown
        ("x" * 61, "an object of type Reprs"),  # a longer one is summarised
        ("a\nb", "an object of type Reprs"),  # as is a short one on several lines
    ],
)
def test_error_messages_show_short_one_line_reprs_only(text, shown):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    value = Reprs(text)
    with pytest.raises(TypeError) as accumulator_error:
        Accumulator(model, optimizer, value)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as memory_error:
        measure_activation_memory(value)
    for error in (accumulator_error, memory_error):
        assert shown in str(error.value)
        assert "\n" not in str(error.value)


def test_parameters_shared_by_several_optimizers_are_refused_with_their_count():
    a, b, c = (nn.Parameter(torch.ones(1)) for _ in range(3))
    first = torch.optim.SGD([a, b], lr=0.1)
    second = torch.optim.SGD([a], lr=0.1)
    third = torch.optim.SGD([b, c], lr=0.1)
    model = nn.Module()
    with pytest.raises(
        ValueError, match=r"optimizer: 2 parameter\(s\) belong to more than one of the optimizers"
    ):
        Accumulator(model, [first, second, third])


@pytest.mark.parametrize(
    "argument", ["micro_batch_size", "total_micro_batches", "probe_up_after", "memory_budget"]
)
def test_counts_refuse_booleans(argument):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = {"micro_batch_size": "auto"} if argument in ("probe_up_after", "memory_budget") else {}
    with pytest.raises(ValueError, match=rf"{argument} must be .*got True \(bool\)"):
        Accumulator(model, optimizer, **extra, **{argument: True})


def test_sizing_arguments_without_auto_are_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"max_micro_batch_size"):
        Accumulator(model, optimizer, micro_batch_size=4, max_micro_batch_size=8)


@pytest.mark.parametrize("name", ["memory_budget", "probe_up_after", "max_micro_batch_size"])
def test_zero_is_refused_for_auto_sizing_arguments(name):
    # check_optional_positive_int refuses 0, not only negative values.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=rf"{name} must be a positive int or None, got 0 \(int\); pass e.g."
    ):
        Accumulator(model, optimizer, micro_batch_size="auto", **{name: 0})


def test_negative_total_micro_batches_is_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"total_micro_batches must be .*got -1 \(int\)"):
        Accumulator(model, optimizer, 2, total_micro_batches=-1)
