"""One window (``torch_accum/_window.py``): its states and transitions, relative weights
and token-weighted windows, the window loss, and what leaving the block does with a
partial window (``partial_window``: apply, discard, carry).
"""

import logging

import numpy as np
import pytest
import torch
from helpers import (
    EXACT,
    TOLERANCES,
    assert_same,
    clipped_reference_run,
    make_batches,
    make_model,
    merge,
    mse,
    parameters_of,
    train_accumulated,
    train_full_batch,
)
from torch import nn

from torch_accum import Accumulator
from torch_accum._window import _ALLOWED, InvalidTransitionError, Window, WindowState

S = WindowState
TOL64 = TOLERANCES[torch.float64]


def test_every_state_has_its_transitions_listed():
    assert set(_ALLOWED) == set(WindowState)
    assert all(not _ALLOWED[state] for state in (S.APPLIED, S.SKIPPED, S.DISCARDED))


@pytest.mark.parametrize(
    ("path", "refused", "message"),
    [
        ([], S.APPLIED, r"a window that is accumulating cannot become applied \(doing it\)"),
        ([S.COMPLETE, S.APPLYING, S.APPLIED], S.APPLYING, r"applied cannot become applying"),
        ([S.DISCARDED], S.COMPLETE, r"discarded cannot become complete"),
        ([S.COMPLETE, S.UNSCALED], S.COMPLETE, r"unscaled cannot become complete"),
    ],
)
def test_invalid_transitions_are_refused_with_what_was_done(path, refused, message):
    window = Window(4)
    for state in path:
        window.move_to(state)
    with pytest.raises(InvalidTransitionError, match=message):
        window.move_to(refused, "doing it")
    assert window.state is (path[-1] if path else S.ACCUMULATING)


def test_a_terminal_window_takes_no_micro_batch():
    window = Window(2)
    window.move_to(S.DISCARDED)
    with pytest.raises(InvalidTransitionError, match="a window that is discarded takes no"):
        window.add(1.0, torch.tensor(0.5))
    assert window.pending == 0


def test_a_micro_batch_weighing_twice_the_mean_of_its_window():
    # K=2, weights 1 and 4: the second loss is scaled by 4 / 2 = 2 in backward.
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(2, 4)
    with Accumulator(model, optimizer, 2) as acc:
        for weight, batch in zip((1, 4), batches, strict=True):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
    ((mse(reference, batches[0]) + 4 * mse(reference, batches[1])) / 5).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "convert", [np.int64, np.float32, np.float64, int], ids=lambda c: c.__name__
)
def test_numpy_and_int_weights_weigh_exactly_like_floats(convert):
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


PAD = 0


VOCAB = 12


class TinyLM(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCAB, 8, dtype=dtype)
        self.head = nn.Linear(8, VOCAB, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embedding(tokens)))


def ragged_batch(
    lengths: list[int], max_length: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token and target rows; padding targets are PAD (ignored)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), max_length), PAD)
    targets = torch.full((len(lengths), max_length), PAD)
    for row, length in enumerate(lengths):
        tokens[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        targets[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
    return tokens, targets


def token_mean_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, targets = batch
    logits = model(tokens)
    return nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=PAD
    )


def n_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (batch[1] != PAD).sum()


# Micro-batches of very different token counts and padding widths.
WINDOWS = [
    [([3, 1], 5), ([9, 8, 7], 9), ([2], 2), ([6, 6, 1, 4], 7)],
    [([1], 3), ([12, 2], 12), ([5, 5, 5], 6)],  # the last, shorter window
]


def pad_and_merge(batches):
    width = max(tokens.shape[1] for tokens, _ in batches)
    tokens = torch.cat(
        [nn.functional.pad(t, (0, width - t.shape[1]), value=PAD) for t, _ in batches]
    )
    targets = torch.cat(
        [nn.functional.pad(t, (0, width - t.shape[1]), value=PAD) for _, t in batches]
    )
    return tokens, targets


def windows_of_batches():
    seed = 0
    windows = []
    for window in WINDOWS:
        batches = []
        for lengths, width in window:
            seed += 1
            batches.append(ragged_batch(lengths, width, seed))
        windows.append(batches)
    return windows


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_token_weighted_equals_full_batch_token_mean(optimizer_class):
    windows = windows_of_batches()
    reference = TinyLM()
    optimizer = optimizer_class(reference.parameters(), lr=0.1)
    for window in windows:
        optimizer.zero_grad()
        token_mean_loss(reference, pad_and_merge(window)).backward()
        optimizer.step()

    model = TinyLM()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, accumulation_steps=4) as acc:
        for batch in [b for window in windows for b in window]:
            acc.backward(token_mean_loss(model, batch), weight=n_tokens(batch))
            optimizer.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 2
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


def test_unweighted_mean_of_means_differs_from_the_token_mean():
    # The reason for weight=: without it the update is a mean of per-micro-batch means.
    window = windows_of_batches()[0]
    reference = TinyLM()
    token_mean_loss(reference, pad_and_merge(window)).backward()
    model = TinyLM()
    with Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), 4) as acc:
        for batch in window:
            acc.backward(token_mean_loss(model, batch))
            if acc.sync_gradients:
                got = model.head.weight.grad.clone()
    difference = (got - reference.head.weight.grad).abs().max().item()
    assert difference > 1e-3


def test_weights_of_a_window_give_the_weighted_gradient():
    # update = sum(w_i * grad_i) / sum(w_i) for arbitrary positive weights.
    torch.manual_seed(3)
    parameter = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    targets = [torch.randn(3, dtype=torch.float64) for _ in range(3)]
    weights = [0.5, 7, torch.tensor(2.25)]
    expected = sum(float(w) * (parameter.detach() - t) for w, t in zip(weights, targets))
    expected = expected / sum(float(w) for w in weights)
    module = nn.Module()
    module.parameter = parameter
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    with Accumulator(module, optimizer, accumulation_steps=3) as acc:
        for weight, target in zip(weights, targets):
            acc.backward(0.5 * ((parameter - target) ** 2).sum(), weight=weight)
            if acc.sync_gradients:
                torch.testing.assert_close(parameter.grad, expected, rtol=1e-12, atol=1e-14)
            optimizer.step()
    torch.testing.assert_close(parameter.detach(), -expected, rtol=1e-12, atol=1e-14)


class HalfPrecisionLM(nn.Module):
    """float32 parameters, float16 activations under CPU autocast."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return self.head(self.embedding(tokens))


def half_precision_loss(model, tokens, targets):
    logits = model(tokens)
    assert logits.dtype == torch.float16  # the test needs float16 activation gradients
    return nn.functional.cross_entropy(logits.float().reshape(-1, 16), targets.reshape(-1))


def test_token_weights_of_1e5_do_not_overflow_float16_with_a_grad_scaler():
    generator = torch.Generator().manual_seed(0)
    counts = [100_000, 131_072, 90_000]
    batches = [
        (
            torch.randint(0, 16, (n,), generator=generator),
            torch.randint(0, 16, (n,), generator=generator),
        )
        for n in counts
    ]
    model = HalfPrecisionLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=10**6)
    with Accumulator(model, optimizer, accumulation_steps=3, scaler=scaler) as acc:
        for tokens, targets in batches:
            acc.backward(half_precision_loss(model, tokens, targets), weight=tokens.numel())
            scaler.step(optimizer)
            scaler.update()
    assert acc.skipped_steps == 0
    assert acc.optimizer_steps == 1
    assert scaler.get_scale() == 2.0**16

    # The same update in float32 without autocast: the token mean over all 321,072 tokens.
    reference = HalfPrecisionLM()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    tokens = torch.cat([t for t, _ in batches])
    targets = torch.cat([t for _, t in batches])
    logits = reference.head(reference.embedding(tokens))
    nn.functional.cross_entropy(logits, targets).backward()
    reference_optimizer.step()
    # float16 activations: agreement to float16 precision.
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-4)


def test_multiplying_the_loss_by_the_raw_token_count_does_overflow():
    # The control for the test above: the naive weighting overflows at these counts.
    model = HalfPrecisionLM()
    tokens = torch.randint(0, 16, (100_000,), generator=torch.Generator().manual_seed(0))
    loss = half_precision_loss(model, tokens, tokens.flip(0))
    (loss * tokens.numel() * 2.0**16).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())


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


def test_window_loss_weights_are_exact_in_float64():
    # Relative weights such as 0.1 are not float32 numbers: the mean must not round them.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = make_batches(3, 4)
    weights = [1.0, 0.1, 0.7]
    losses = [mse(model, b).item() for b in batches]
    with Accumulator(model, optimizer, 3) as acc:
        for batch, weight in zip(batches, weights):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
    expected = sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)
    assert acc.loss == pytest.approx(expected, rel=1e-13, abs=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_default_device_does_not_reach_the_windows_loss(dtype):
    # Internal tensors name their device: a default device set by the user (here the meta
    # device, where no tensor holds data) must not pull the window's loss weights (or the
    # gradient check's buffers) onto it.
    model = make_model(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(2, 4, dtype)
    losses = [mse(model, batch).item() for batch in batches]
    with Accumulator(model, optimizer, 2) as acc, torch.device("meta"):
        for index, batch in enumerate(batches):
            acc.backward(mse(model, batch), weight=index + 1)
            optimizer.step()
        loss = acc.loss  # computed here, under the default device
    torch.testing.assert_close(loss, (losses[0] + 2 * losses[1]) / 3, rtol=1e-6, atol=0)


def test_one_element_losses_of_several_shapes_mix_in_a_window():
    # Losses of shape (1,) and (1, 1) between scalar ones: the same update as all scalars.
    def trained(shaped):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Accumulator(model, optimizer, 4) as acc:
            for index, batch in enumerate(make_batches(4, 4)):
                loss = mse(model, batch)
                shape = [(), (1,), (1, 1), (1,)][index] if shaped else ()
                acc_loss = loss.reshape(shape)
                acc.backward(acc_loss)
                optimizer.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(trained(True), trained(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
    assert_same(model, reference)


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
        torch.testing.assert_close(got, expected, **TOL64)
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
    assert_same(model, reference)


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
    assert_same(model, reference)


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
    assert_same(model, reference)


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
def test_the_final_short_window_is_a_boundary_inside_the_loop(how):
    batches = make_batches(10, 4)  # windows of 4, 4 and 2
    reference = clipped_reference_run(batches, 4, max_grad_norm=0.05)
    kwargs = {"total_micro_batches": 10} if how == "total_micro_batches" else {}
    model, acc, seen = hand_clipped_run(batches, 4, **kwargs)
    assert seen == 3 and acc.optimizer_steps == 3
    assert_same(model, reference)
