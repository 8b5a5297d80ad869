"""Semantics 3: weighted normalisation, the exact token mean over ragged micro-batches."""

import pytest
import torch
from helpers import TOLERANCES
from torch import nn

from torch_accum import Accumulator

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


def merge(batches):
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
        token_mean_loss(reference, merge(window)).backward()
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
    token_mean_loss(reference, merge(window)).backward()
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
