"""Issue 11's reproduced loop variants: each trains exactly or raises an error naming the fix.

One test (or a small group) per item of the issue, named ``test_item<N>_...``; each fails on
the release before the fix (crash, or a parameter difference far above the tolerance).
"""

from __future__ import annotations

import math
from queue import Queue
from threading import Thread

import numpy as np
import pytest
import torch
from helpers import (
    TOLERANCES,
    make_batches,
    make_model,
    mse,
    parameters_of,
    sgd_failing_first_step,
)
from torch import nn

from torch_accum import Accumulator

TOL64 = TOLERANCES[torch.float64]
EXACT = {"rtol": 0.0, "atol": 0.0}


def merge(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def reference_run(model, optimizer, windows, *, max_grad_norm=None, scheduler=None):
    """The plain loop: one optimizer step per window, on the concatenated window."""
    for window in windows:
        optimizer.zero_grad()
        mse(model, merge(window)).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same(model, reference, tolerance=TOL64):
    for got, expected in zip(parameters_of(model), parameters_of(reference), strict=True):
        torch.testing.assert_close(got, expected, **tolerance)


def windows_of(micro_batches, k):
    return [micro_batches[i : i + k] for i in range(0, len(micro_batches), k)]


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32], ids=str)
def test_item1_default_dtype_float64_trains_exactly(model_dtype):
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


# ----------------------------------------------------------------------------- item 2
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
def test_item2_sparse_gradients_train_exactly(optimizer_class, max_grad_norm):
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
    with Accumulator(model, optimizer, 2, max_grad_norm=max_grad_norm) as acc:
        for batch in batches:
            acc.backward(loss_of(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 3
    assert_same(model, reference)


def test_item2_sparse_nonfinite_gradients_are_skipped():
    model = SparseBag()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = parameters_of(model)
    ids, target = sparse_batches()[0]
    with Accumulator(model, optimizer, 1) as acc, pytest.warns(RuntimeWarning, match="non-finite"):
        acc.backward(nn.functional.mse_loss(model(ids), target) * math.inf)
        optimizer.step()
    assert acc.skipped_steps == 1
    torch.testing.assert_close(parameters_of(model), before, **EXACT)


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
def test_item2_complex_parameters_train_exactly(max_grad_norm):
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
    with Accumulator(model, optimizer, 3, max_grad_norm=max_grad_norm) as acc:
        for batch in batches:
            acc.backward(complex_loss(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 2
    assert_same(model, reference)


def test_item2_complex_nonfinite_gradients_are_skipped():
    model = ComplexLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = parameters_of(model)
    with Accumulator(model, optimizer, 1) as acc, pytest.warns(RuntimeWarning, match="non-finite"):
        acc.backward(complex_loss(model, complex_batches()[0]) * math.nan)
        optimizer.step()
    assert acc.skipped_steps == 1
    torch.testing.assert_close(parameters_of(model), before, **EXACT)


# ----------------------------------------------------------------------------- item 3
def test_item3_scheduler_created_inside_the_block():
    batches = make_batches(8, 4)
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, lambda step: 0.5**step)
    reference_run(reference, ref_optimizer, windows_of(batches, 2), scheduler=ref_scheduler)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2) as acc:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        for batch in batches:
            acc.backward(mse(model, batch))
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 4 and scheduler.last_epoch == 4
    assert_same(model, reference)


def test_item3_unknown_scheduler_stepped_per_micro_batch_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with (
        pytest.raises(RuntimeError, match=r"learning rate .* changed in the middle .* scheduler="),
        Accumulator(model, optimizer, 2) as acc,
    ):
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            scheduler.step()  # per micro-batch, unknown to the Accumulator


class StepOnly:
    """A hand-written schedule with nothing but step()."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.steps = 0

    def step(self):
        self.steps += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5


def test_item3_scheduler_with_only_step():
    batches = make_batches(6, 4)
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference_run(
        reference, ref_optimizer, windows_of(batches, 3), scheduler=StepOnly(ref_optimizer)
    )
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = StepOnly(optimizer)
    with Accumulator(model, optimizer, 3, scheduler=scheduler) as acc:
        for batch in batches:
            acc.backward(mse(model, batch))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert scheduler.steps == 2 and acc.optimizer_steps == 2
    assert "step" not in vars(scheduler)
    assert_same(model, reference)


# ----------------------------------------------------------------------------- item 4
@pytest.mark.parametrize(
    "convert", [np.int64, np.float32, np.float64, int], ids=lambda c: c.__name__
)
def test_item4_numpy_scalar_weights(convert):
    batches = [(x[:n], y[:n]) for (x, y), n in zip(make_batches(4, 4), (1, 4, 2, 3))]

    def train(to_weight):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Accumulator(model, optimizer, 4) as acc:
            for batch in batches:
                acc.backward(mse(model, batch), weight=to_weight(len(batch[0])))
                optimizer.step()
        return model

    assert_same(train(convert), train(float), EXACT)


# ----------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("clear", ["model", "submodule", "model_top_of_loop"])
def test_item5_model_zero_grad_is_accumulation_aware(clear):
    batches = make_batches(8, 4)
    reference = make_model()
    reference_run(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), windows_of(batches, 4)
    )
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 4) as acc:
        for batch in batches:
            if clear == "model_top_of_loop":
                model.zero_grad()
            acc.backward(mse(model, batch))
            optimizer.step()
            if clear == "model":
                model.zero_grad()
            elif clear == "submodule":
                model[0].zero_grad()
                model[2].zero_grad()
    assert acc.optimizer_steps == 2
    assert_same(model, reference)
    assert "zero_grad" not in vars(model) and "zero_grad" not in vars(model[0])


# ----------------------------------------------------------------------------- item 6
class TwoHeads(nn.Module):
    """A trunk and two heads; the second head is used only on some steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 8).double()
        self.head_a = nn.Linear(8, 3).double()
        self.head_b = nn.Linear(8, 3).double()

    def forward(self, x, use_b):
        h = torch.tanh(self.trunk(x))
        return self.head_b(h) if use_b else self.head_a(h)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("where", ["after_step", "top_of_loop"])
def test_item6_k1_equals_the_plain_loop_bitwise_for_both_set_to_none(set_to_none, where):
    batches = make_batches(6, 4)
    uses_b = [True, False, False, True, False, False]

    def run(accumulate):
        model = TwoHeads()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        acc = Accumulator(model, optimizer, 1)
        with acc if accumulate else _nothing():
            for (x, y), use_b in zip(batches, uses_b):
                if where == "top_of_loop":
                    optimizer.zero_grad(set_to_none=set_to_none)
                loss = nn.functional.mse_loss(model(x, use_b), y)
                acc.backward(loss) if accumulate else loss.backward()
                optimizer.step()
                if where == "after_step":
                    optimizer.zero_grad(set_to_none=set_to_none)
        return model

    assert_same(run(True), run(False), EXACT)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_item6_set_to_none_false_keeps_updating_unused_parameters():
    # The negative control: with set_to_none=False the unused head still moves (momentum).
    model = TwoHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = make_batches(4, 4)
    with Accumulator(model, optimizer, 2) as acc:
        for index, (x, y) in enumerate(batches):
            acc.backward(nn.functional.mse_loss(model(x, index < 2), y))
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    after_first_window = model.head_b.weight.detach().clone()
    assert model.head_b.weight.grad is not None and not model.head_b.weight.grad.any()
    assert acc.optimizer_steps == 2
    assert not torch.equal(after_first_window, TwoHeads().head_b.weight)


# ----------------------------------------------------------------------------- item 7
def test_item7_loss_backward_instead_of_acc_backward_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match=r"no acc.backward\(\) ran .* acc.backward\(loss\)"),
        Accumulator(model, optimizer, 4),
    ):
        for batch in make_batches(4, 4):
            mse(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_item7_loss_backward_in_the_middle_of_a_window_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(4, 4)
    first = r"parameter\(s\) \(e.g. 0.weight\) changed between two acc.backward\(\) calls"
    with (
        pytest.raises(RuntimeError, match=first),
        Accumulator(model, optimizer, 4) as acc,
    ):
        acc.backward(mse(model, batches[0]))
        mse(model, batches[1]).backward()
        acc.backward(mse(model, batches[2]))


# ----------------------------------------------------------------------------- item 8
class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16).double()
        self.head = nn.Linear(16, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def two_optimizers(model):
    return [
        torch.optim.SGD(model.body.parameters(), lr=0.1, momentum=0.9),
        torch.optim.AdamW(model.head.parameters(), lr=0.01),
    ]


@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_item8_two_optimizers_and_schedulers_in_one_accumulator(max_grad_norm):
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


def test_item8_one_accumulator_per_optimizer_on_one_loss_raises():
    model = TwoParts()
    body_optimizer, head_optimizer = two_optimizers(model)
    with (
        pytest.raises(RuntimeError, match=r"Accumulator\(model, \[optimizer_a, optimizer_b\]\)"),
        Accumulator(model, body_optimizer, 2) as acc,
        Accumulator(model.head, head_optimizer, 2),
    ):
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            body_optimizer.step()
            head_optimizer.step()


def test_item8_gan_style_accumulators_that_pollute_each_other_raise():
    generator, discriminator = nn.Linear(4, 6).double(), nn.Linear(6, 1).double()
    g_optimizer = torch.optim.SGD(generator.parameters(), lr=0.1)
    d_optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    acc_g = Accumulator(generator, g_optimizer, 2)
    acc_d = Accumulator(discriminator, d_optimizer, 2)
    real = torch.randn(8, 6, dtype=torch.float64)
    with (
        pytest.raises(RuntimeError, match=r"changed between two acc.backward\(\) calls"),
        acc_g,
        acc_d,
    ):
        for _ in range(2):
            fake = generator(torch.randn(8, 4, dtype=torch.float64))
            d_loss = discriminator(real).mean() - discriminator(fake.detach()).mean()
            acc_d.backward(d_loss)
            d_optimizer.step()
            g_loss = discriminator(fake).mean()  # reaches the discriminator's parameters
            acc_g.backward(g_loss)
            g_optimizer.step()


def test_item8_overlapping_optimizers_are_refused():
    model = make_model()
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"2 parameter\(s\) belong to more than one"):
        Accumulator(model, [first, second], 2)


# ----------------------------------------------------------------------------- item 9
def test_item9_scheduler_error_at_the_boundary_never_applies_twice():
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


def test_item9_optimizer_error_before_the_step_leaves_the_window_complete():
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


# ----------------------------------------------------------------------------- item 10
class ScaledModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 3).double()
        self.bias = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


def test_item10_a_loss_that_is_a_view_of_a_parameter_trains_exactly():
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


# ----------------------------------------------------------------------------- item 12
def test_item12_accumulation_steps_set_between_blocks_applies_to_the_next_window():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    ends = []
    for steps, count in ((1, 2), (2, 6), (3, 6)):
        acc.accumulation_steps = steps
        with acc:
            for batch in make_batches(count, 4):
                acc.backward(mse(model, batch))
                optimizer.step()
                ends.append(acc.sync_gradients)
    assert ends == [True, True] + [False, True] * 3 + [False, False, True] * 2
    assert acc.optimizer_steps == 2 + 3 + 2
    with pytest.raises(ValueError, match=r"accumulation_steps must be >= 1, got 0"):
        acc.accumulation_steps = 0


# ----------------------------------------------------------------------------- item 13
def hand_clipped_run(batches, k, **accumulator_kwargs):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, k, **accumulator_kwargs)
    seen_boundaries = 0
    with acc:
        iterable = (
            acc.iterate(iter(batches))
            if "total_micro_batches" not in accumulator_kwargs
            else batches
        )
        for batch in iterable:
            acc.backward(mse(model, batch))
            if acc.sync_gradients:  # the docs' hand-clipping recipe
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                seen_boundaries += 1
            optimizer.step()
            optimizer.zero_grad()
    return model, acc, seen_boundaries


@pytest.mark.parametrize("how", ["iterate", "total_micro_batches"])
def test_item13_the_final_short_window_is_a_boundary_inside_the_loop(how):
    batches = make_batches(10, 4)  # windows of 4, 4 and 2
    reference = make_model()
    reference_run(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.1),
        windows_of(batches, 4),
        max_grad_norm=0.05,
    )
    kwargs = {"total_micro_batches": 10} if how == "total_micro_batches" else {}
    model, acc, seen = hand_clipped_run(batches, 4, **kwargs)
    assert seen == 3 and acc.optimizer_steps == 3
    assert_same(model, reference)


def read_one_ahead(items):
    """A prefetching wrapper: fetches the next item before handing out the current one."""
    iterator = iter(items)
    current = next(iterator, None)
    for upcoming in iterator:
        yield current
        current = upcoming
    if current is not None:
        yield current


def read_ahead_in_a_thread(items, depth=2):
    """A background prefetcher: a thread pulls up to ``depth`` items ahead of the loop."""
    queue, done = Queue(maxsize=depth), object()

    def pull():
        for item in items:
            queue.put(item)
        queue.put(done)

    thread = Thread(target=pull, daemon=True)
    thread.start()
    while (item := queue.get()) is not done:
        yield item
    thread.join()


@pytest.mark.parametrize(
    "layout",
    [
        lambda acc, loader: read_one_ahead(acc.iterate(loader)),
        lambda acc, loader: acc.iterate(acc.iterate(loader)),
        lambda acc, loader: read_ahead_in_a_thread(acc.iterate(loader)),
        lambda acc, loader: acc.iterate(read_one_ahead(loader)),
    ],
    ids=["prefetch_around_iterate", "iterate_around_iterate", "thread", "prefetch_inside"],
)
def test_iterate_read_ahead_ends_every_window_where_the_plain_loop_does(layout):
    # 10 items at K=4: windows of 4, 4 and 2 (a loop reading one item ahead got 4, 4, 1, 1).
    batches = make_batches(10, 4)
    reference = make_model()
    reference_run(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.1),
        windows_of(batches, 4),
        max_grad_norm=0.05,
    )
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 4)
    ends = []
    with acc:
        for batch in layout(acc, iter(batches)):
            acc.backward(mse(model, batch))
            ends.append(acc.sync_gradients)
            if acc.sync_gradients:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
            optimizer.zero_grad()
    assert ends == [False, False, False, True] * 2 + [False, True]
    assert acc.optimizer_steps == 3
    assert_same(model, reference)


def test_a_loop_running_fewer_backwards_than_iterate_items_is_warned():
    # Items left out inside the loop: the final window ends at the block's exit (the
    # numbers are right, but per-window code did not see it); the warning names the fix.
    batches = make_batches(10, 4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 4)
    ends = []
    with (
        pytest.warns(
            RuntimeWarning,
            match=r"acc.iterate\(\) handed out 1 more item\(s\) than acc.backward\(\) ran for.*"
            r"acc.iterate\(b for b in loader if keep\(b\)\)",
        ),
        acc,
    ):
        for index, batch in enumerate(acc.iterate(batches)):
            if index == 5:
                continue
            acc.backward(mse(model, batch))
            ends.append(acc.sync_gradients)
            optimizer.step()
    assert ends == [False, False, False, True, False, False, False, True, False]
    assert acc.optimizer_steps == 3  # windows of 4, 4 and 1, the last applied at exit
    reference = make_model()
    kept = batches[:5] + batches[6:]
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), windows_of(kept, 4))
    assert_same(model, reference)


def test_item13_iterate_on_an_empty_iterable_and_outside_the_block():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    with acc:
        assert list(acc.iterate([])) == []
    with pytest.raises(RuntimeError, match=r"acc.iterate\(\) was called outside the `with acc:`"):
        list(acc.iterate([1, 2]))


def test_item13_more_micro_batches_than_declared_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match=r"more often than the 3 micro-batches"),
        Accumulator(model, optimizer, 2, total_micro_batches=3) as acc,
    ):
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            optimizer.step()


# ----------------------------------------------------------------------------- item 14
def test_item14_an_interrupted_step_batch_is_discarded_completely():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, micro_batch_size=2)
    bad, good = make_batches(2, 6)
    calls = []

    def compute_loss(micro):
        calls.append(len(micro[0]))
        if len(calls) == 2:
            raise ValueError("bad sample")
        return mse(model, micro)

    with acc:
        with pytest.raises(ValueError, match="bad sample"):
            acc.step_batch(bad, compute_loss)
        assert acc.micro_step == 0 and all(p.grad is None for p in model.parameters())
        acc.step_batch(good, compute_loss)
    assert acc.optimizer_steps == 1
    reference = make_model()
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), [[good]])
    assert_same(model, reference)


def test_item14_discard_drops_a_pending_window():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 4)
    batches = make_batches(6, 4)
    with pytest.raises(KeyError), acc:
        for batch in batches[:2]:
            acc.backward(mse(model, batch))
        raise KeyError("interrupted")
    assert acc.discard() == 2
    assert acc.micro_step == 0 and all(p.grad is None for p in model.parameters())
    assert acc.discard() == 0
    with acc:
        for batch in batches[2:]:
            acc.backward(mse(model, batch))
            optimizer.step()
    reference = make_model()
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), [batches[2:]])
    assert_same(model, reference)


# ----------------------------------------------------------------------------- items 15, 16
class OutOfMemoryAbove(nn.Module):
    """A model with BatchNorm and dropout that 'runs out of memory' above a micro-batch size."""

    def __init__(self, limit):
        super().__init__()
        torch.manual_seed(0)
        self.limit = limit
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
        ).double()

    def forward(self, x):
        if x.shape[0] > self.limit:
            _ = self.net(x)  # the attempt gets partway: statistics and RNG move
            raise torch.OutOfMemoryError(f"injected above {self.limit}")
        return self.net(x)


def auto_run(limit, micro_batch_size, batches, **kwargs):
    model = OutOfMemoryAbove(limit)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = Accumulator(model, optimizer, micro_batch_size=micro_batch_size, **kwargs)
    torch.manual_seed(7)
    with acc:
        for batch in batches:
            acc.step_batch(batch, lambda m: mse(model, m))
    return model, acc


def test_item15_out_of_memory_replays_are_invisible_with_batchnorm_and_dropout():
    batches = make_batches(3, 16)
    replayed, acc = auto_run(4, "auto", batches)
    plain, _ = auto_run(10**6, 4, batches)
    assert acc.oom_retries == 2 and acc.micro_batch_size == 4
    bn, plain_bn = replayed.net[1], plain.net[1]
    assert int(bn.num_batches_tracked) == int(plain_bn.num_batches_tracked) == 12
    torch.testing.assert_close(bn.running_var, plain_bn.running_var, **EXACT)
    torch.testing.assert_close(bn.running_mean, plain_bn.running_mean, **EXACT)
    torch.testing.assert_close(parameters_of(replayed), parameters_of(plain), **EXACT)


def test_item16_the_batch_that_hit_out_of_memory_is_not_error_free():
    batches = make_batches(6, 8)
    _, acc = auto_run(4, "auto", batches, probe_up_after=1)
    # 8 -> 4 on the first batch; after one clean batch at 4, probing 8 fails again, and so
    # on: every other batch replays (counting the failed batch as clean replays them all).
    assert acc.oom_retries == 3


def test_item16_memory_budget_finds_the_largest_size_that_fits():
    from torch_accum import measure_activation_memory

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    fixed = torch.randn(256, 256)  # memory that does not grow with the micro-batch

    def compute_loss(micro):
        constant = (fixed * 2).sum() * 0  # a 256 KiB activation whatever the size
        return nn.functional.mse_loss(model(micro[0]), micro[1]) + constant

    def peak(size):
        return measure_activation_memory(
            lambda: compute_loss((x[:size], y[:size])), parameters=model.parameters()
        ).peak

    budget = peak(25)
    largest = max(s for s in range(1, 65) if peak(s) <= budget)
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size="auto",
        memory_budget=budget,
    )
    with acc:
        acc.step_batch((x, y), compute_loss)
    assert acc.micro_batch_size == largest >= 25


# ----------------------------------------------------------------------------- scaler edges
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


def test_an_unknown_scheduler_stepped_before_the_boundary_step_is_named():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match=r"or before optimizer.step\(\)"),
        Accumulator(model, optimizer, 2) as acc,
    ):
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            if acc.sync_gradients:
                scheduler.step()  # before optimizer.step(): the step would use the new rate
            optimizer.step()
