"""Low-precision weights: gradients add up in float32, seeds carry no rounding bias.

The reference is float64: the same bfloat16 (or float16) weights and inputs, cast to
float64, through the whole batch at once. Errors are relative (norm of the difference over
the norm of the reference), bias is the projection of the gradient on the reference minus 1.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import torch_accum._precision as precision
from torch_accum import Accumulator

needs_grad_dtype = pytest.mark.skipif(
    not precision.HAS_GRAD_DTYPE, reason="float32 accumulation needs Tensor.grad_dtype"
)

MICRO = 64  # samples per micro-batch: a power of two, so the loss's own mean is exact


def mlp(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)


def data(count: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 64, generator=generator, dtype=torch.float64)
    y = torch.randn(count, 1, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.to(torch.float64).flatten() for p in model.parameters()])


def reference_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full-batch gradient in float64 of ``model``'s weights as they are."""
    wide = mlp(torch.float64)
    wide.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    nn.functional.mse_loss(wide(x.double()), y.double()).backward()
    return flat_grad(wide)


def window_grad(
    k: int, dtype: torch.dtype, accumulation_dtype: torch.dtype | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient one window of ``k`` micro-batches hands the optimizer, and the reference."""
    model = mlp(dtype, seed)
    x, y = data(k * MICRO, dtype, seed + 1)
    reference = reference_grad(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    acc = Accumulator(model, optimizer, k, accumulation_dtype=accumulation_dtype)
    with acc:
        for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            if acc.sync_gradients:
                seen.append(flat_grad(model))
            optimizer.step()
            optimizer.zero_grad()
    (got,) = seen
    return got, reference


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).norm() / reference.norm())


def scale_bias(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float(got @ reference / (reference @ reference)) - 1.0


@needs_grad_dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_accumulation_keeps_k_256_as_precise_as_one_micro_batch(dtype):
    errors = {
        k: sum(relative_error(*window_grad(k, dtype, torch.float32, seed)) for seed in range(2))
        for k in (1, 256)
    }
    assert errors[256] <= 1.2 * errors[1], errors


def test_parameter_dtype_accumulation_loses_precision_as_the_window_grows():
    # Why float32 is the default: the same window summed in bfloat16.
    errors = {k: relative_error(*window_grad(k, torch.bfloat16, None)) for k in (1, 256)}
    assert errors[256] > 2.5 * errors[1], errors


@pytest.mark.parametrize(
    "accumulation_dtype",
    [
        pytest.param(torch.float32, marks=needs_grad_dtype, id="float32"),
        pytest.param(None, id="parameter_dtype"),
    ],
)
@pytest.mark.parametrize("k", [3, 5, 12])
def test_a_bfloat16_seed_of_one_over_k_adds_no_scale_bias(k, accumulation_dtype):
    # A bfloat16 1/3 is 0.333984, 0.2% too large; hand-written, every K not a power of two
    # biases the gradient by about +2e-3. Averaged over seeds to see the bias, not noise.
    def bias(k_: int) -> float:
        runs = [window_grad(k_, torch.bfloat16, accumulation_dtype, s) for s in range(3)]
        return sum(scale_bias(*run) for run in runs) / len(runs)

    assert abs(bias(k) - bias(1)) < 1e-3, (bias(k), bias(1))


@needs_grad_dtype
def test_gradients_are_float32_in_the_window_and_the_parameters_dtype_at_the_step():
    model = mlp(torch.bfloat16)
    x, y = data(4 * MICRO, torch.bfloat16)
    dtypes_at_step = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            dtypes_at_step.append({p.grad.dtype for p in model.parameters()})
            return super().step(closure)

    optimizer = Recording(model.parameters(), lr=1e-3)
    in_window = []
    with Accumulator(model, optimizer, 4) as acc:
        for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            in_window.append({p.grad.dtype for p in model.parameters()})
            optimizer.step()
            optimizer.zero_grad()
    assert in_window == [{torch.float32}] * 4
    assert dtypes_at_step == [{torch.bfloat16}]
    assert acc.optimizer_steps == 1
    assert all(p.grad is None and p.grad_dtype == torch.bfloat16 for p in model.parameters())


@needs_grad_dtype
def test_a_parameter_set_to_accumulate_in_float32_keeps_it_and_the_others_still_widen():
    model = mlp(torch.bfloat16)
    first, *others = model.parameters()
    first.grad_dtype = torch.float32  # the user's own choice, before the Accumulator
    x, y = data(2 * MICRO, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    in_window = []
    with Accumulator(model, optimizer, 2) as acc:
        for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            in_window.append([p.grad.dtype for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
    assert in_window == [[torch.float32] * 4] * 2
    assert acc.optimizer_steps == 1
    assert first.grad_dtype == torch.float32  # left as the user set it
    assert [p.grad_dtype for p in others] == [torch.bfloat16] * 3


def test_accumulation_dtype_none_keeps_the_parameters_dtype():
    model = mlp(torch.bfloat16)
    x, y = data(2 * MICRO, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2, accumulation_dtype=None) as acc:
        acc.backward(nn.functional.mse_loss(model(x[:MICRO]), y[:MICRO]))
        assert {p.grad.dtype for p in model.parameters()} == {torch.bfloat16}


@needs_grad_dtype
def test_one_micro_batch_per_window_and_float32_parameters_are_left_alone():
    for model, k in ((mlp(torch.bfloat16), 1), (mlp(torch.float32), 4)):
        x, y = data(MICRO, next(model.parameters()).dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Accumulator(model, optimizer, k) as acc:
            acc.backward(nn.functional.mse_loss(model(x), y))
            assert {p.grad.dtype for p in model.parameters()} == {next(model.parameters()).dtype}
            assert all(p.grad_dtype == p.dtype for p in model.parameters())


def hand_float32_sum(model: nn.Module, batches, k: int) -> list[torch.Tensor]:
    """The window's gradient summed by hand in float32 (each micro-batch's loss / k)."""
    total = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for xb, yb in batches:
        model.zero_grad()
        (nn.functional.mse_loss(model(xb), yb) / k).backward()
        for t, p in zip(total, model.parameters(), strict=True):
            t += p.grad.float()
    model.zero_grad(set_to_none=True)
    return total


def sgd_setup(
    dtype: torch.dtype, k: int, lr: float
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """A model, its k micro-batches, and its parameters after SGD on their float32 sum."""
    model = mlp(dtype)
    x, y = data(k * MICRO, dtype)
    batches = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    return model, batches, sgd_step(model, hand_float32_sum(model, batches, k), lr)


def sgd_step(model: nn.Module, summed: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """The parameters after plain SGD on the float32 sums, each cast once to its dtype."""
    return [
        p.detach() - (lr * g).to(p.dtype) for p, g in zip(model.parameters(), summed, strict=True)
    ]


@needs_grad_dtype
def test_clipping_runs_on_the_float32_sum_before_the_cast():
    model = mlp(torch.bfloat16)
    x, y = data(4 * MICRO, torch.bfloat16)
    batches = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    summed = hand_float32_sum(model, batches, 4)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in summed]))
    max_norm = float(norm) / 3  # clipping must bite
    expected = [
        p.detach() - 0.5 * (g * (max_norm / (norm + 1e-6))).to(torch.bfloat16)
        for p, g in zip(model.parameters(), summed, strict=True)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with Accumulator(model, optimizer, 4, max_grad_norm=max_norm) as acc:
        for xb, yb in batches:
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            optimizer.step()
            optimizer.zero_grad()
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


@needs_grad_dtype
def test_non_finite_float32_sum_skips_the_step_and_leaves_the_parameters():
    model = mlp(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data(2 * MICRO, torch.bfloat16)
    y[0, 0] = float("inf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    acc = Accumulator(model, optimizer, 2)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"), acc:
        for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            optimizer.step()
            optimizer.zero_grad()
    assert (acc.skipped_steps, acc.optimizer_steps) == (1, 0)
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert all(p.grad_dtype == torch.bfloat16 for p in model.parameters())


@needs_grad_dtype
def test_float16_weights_train_with_a_grad_scaler():
    # Accumulated in float16, GradScaler refuses: "Attempting to unscale FP16 gradients".
    model, batches, expected = sgd_setup(torch.float16, 4, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with Accumulator(model, optimizer, 4, scaler=scaler) as acc:
        for xb, yb in batches:
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 1
    for p, e in zip(model.parameters(), expected, strict=True):
        # Scaled by 2**10 and back: float16 rounding of the scaled gradients only.
        torch.testing.assert_close(p.detach(), e, rtol=2e-3, atol=2e-4)


@needs_grad_dtype
def test_float16_weights_with_a_scaler_back_off_and_skip_on_overflow():
    model = mlp(torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data(2 * MICRO, torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the scaled loss overflows
    with Accumulator(model, optimizer, 2, scaler=scaler) as acc:
        for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert (acc.skipped_steps, scaler.get_scale()) == (1, 2.0**39)
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


@needs_grad_dtype
def test_token_weights_stay_exact_with_float32_sums():
    model = mlp(torch.bfloat16)
    x, y = data(7 * 16, torch.bfloat16)
    sizes = [16, 48, 32, 16]  # weights 1, 3, 2, 1: not powers of two relative to each other
    reference = reference_grad(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with Accumulator(model, optimizer, 4) as acc:
        for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
            acc.backward(nn.functional.mse_loss(model(xb), yb), weight=len(xb))
            if acc.sync_gradients:
                got = flat_grad(model)
            optimizer.step()
    # bfloat16 forward and backward per micro-batch; the sum and the weights exact.
    assert relative_error(got, reference) < 1e-2
    assert abs(scale_bias(got, reference)) < 2e-3


@needs_grad_dtype
def test_a_window_resumed_mid_way_continues_bitwise_from_its_float32_sums():
    x, y = data(8 * MICRO, torch.bfloat16)
    batches = list(zip(x.split(MICRO), y.split(MICRO), strict=True))

    def train(model, optimizer, acc, part):
        with acc:
            for xb, yb in part:
                acc.backward(nn.functional.mse_loss(model(xb), yb))
                optimizer.step()
                optimizer.zero_grad()

    model = mlp(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, Accumulator(model, optimizer, 4), batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = mlp(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accumulator(model, optimizer, 4, partial_window="carry")
    train(model, optimizer, acc, batches[:6])
    saved = pickle.loads(
        pickle.dumps((model.state_dict(), optimizer.state_dict(), acc.state_dict()))
    )
    assert {g.dtype for g in saved[2]["gradients"]} == {torch.float32}

    model = mlp(torch.bfloat16, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    acc = Accumulator(model, optimizer, 4)
    acc.load_state_dict(saved[2])
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    train(model, optimizer, acc, batches[6:])
    for p, u in zip(model.parameters(), uninterrupted, strict=True):
        torch.testing.assert_close(p.detach(), u, rtol=0, atol=0)


@needs_grad_dtype
def test_a_pending_window_keeps_its_float32_sums_across_blocks_and_discard_restores():
    model = mlp(torch.bfloat16)
    x, y = data(2 * MICRO, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 4, partial_window="carry")
    with acc:
        acc.backward(nn.functional.mse_loss(model(x[:MICRO]), y[:MICRO]))
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert acc.discard() == 1
    assert all(p.grad is None and p.grad_dtype == torch.bfloat16 for p in model.parameters())


@needs_grad_dtype
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_choice_is_honoured_across_windows(set_to_none):
    model = mlp(torch.bfloat16)
    x, y = data(8 * MICRO, torch.bfloat16)
    batches = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    reference = mlp(torch.bfloat16)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for start in (0, 4):
        summed = hand_float32_sum(reference, batches[start : start + 4], 4)
        for p, g in zip(reference.parameters(), summed, strict=True):
            p.grad = g.to(torch.bfloat16)
        ref_opt.step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with Accumulator(model, optimizer, 4) as acc:
        for xb, yb in batches:
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=0)
    grads = {None if p.grad is None else p.grad.dtype for p in model.parameters()}
    assert grads == ({None} if set_to_none else {torch.bfloat16})


@needs_grad_dtype
def test_step_batch_cuts_a_batch_into_float32_sums():
    model = mlp(torch.bfloat16)
    x, y = data(4 * MICRO, torch.bfloat16)
    summed = hand_float32_sum(model, zip(x.split(MICRO), y.split(MICRO), strict=True), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.extend(p.grad.clone() for p in model.parameters())
    )
    with Accumulator(model, optimizer, micro_batch_size=MICRO) as acc:
        acc.step_batch((x, y), lambda b: nn.functional.mse_loss(model(b[0]), b[1]))
    for got, s in zip(seen, summed, strict=True):
        torch.testing.assert_close(got, s.to(torch.bfloat16), rtol=0, atol=0)


def test_accumulation_dtype_must_be_a_wide_floating_dtype():
    model = mlp(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"accumulation_dtype must be a floating torch\.dtype"):
        Accumulator(model, optimizer, 2, accumulation_dtype="float32")
    with pytest.raises(TypeError, match=r"accumulation_dtype must be a floating torch\.dtype"):
        Accumulator(model, optimizer, 2, accumulation_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"at least 32 bits, got torch\.bfloat16"):
        Accumulator(model, optimizer, 2, accumulation_dtype=torch.bfloat16)


def test_a_torch_without_grad_dtype_is_refused_naming_the_version_and_the_alternative(
    monkeypatch,
):
    monkeypatch.setattr(precision, "HAS_GRAD_DTYPE", False)
    model = mlp(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"torch 2.10 or newer.*accumulation_dtype=None"):
        Accumulator(model, optimizer, 4)
    # Nothing to add up, or nothing narrower than float32: nothing to refuse.
    Accumulator(model, optimizer, 1)
    Accumulator(mlp(torch.float32), torch.optim.SGD(mlp(torch.float32).parameters()), 4)
    acc = Accumulator(model, optimizer, 4, accumulation_dtype=None)
    assert acc.accumulation_steps == 4
    # Raised at the first window when accumulation is switched on later.
    acc = Accumulator(model, optimizer, 1)
    acc.accumulation_steps = 2
    x, y = data(MICRO, torch.bfloat16)
    with acc, pytest.raises(ValueError, match=r"torch 2\.10 or newer"):
        acc.backward(nn.functional.mse_loss(model(x), y))


def test_the_old_torch_refusal_counts_the_low_precision_parameters_and_names_their_dtype(
    monkeypatch,
):
    monkeypatch.setattr(precision, "HAS_GRAD_DTYPE", False)
    model = nn.Linear(4, 1, bias=False).to(torch.float16)  # one parameter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"accumulation_dtype=torch.float32 needs Tensor.grad_dtype \(torch 2.10 or newer\), "
        r"but torch .* lacks it and 1 parameter\(s\) are torch.float16. Upgrade torch, or pass "
        r"accumulation_dtype=None to accumulate in the parameters' own dtype \(less precise as "
        r"the window grows: docs/precision.md\)$",
    ):
        Accumulator(model, optimizer, 2)


class RunsOutOfMemoryAbove(nn.Module):
    """Raises torch.OutOfMemoryError for micro-batches larger than ``limit`` samples."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"injected: {len(x)} > {self.limit}")
        return self.model(x)


@needs_grad_dtype
def test_an_out_of_memory_replay_starts_again_from_clean_float32_sums():
    x, y = data(4 * MICRO, torch.bfloat16)
    applied = []
    for limit in (4 * MICRO, MICRO):  # no replay; replays 256 -> 128 -> 64
        model = RunsOutOfMemoryAbove(mlp(torch.bfloat16), limit)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer.register_step_pre_hook(
            lambda *_, m=model: applied.append([p.grad.clone() for p in m.parameters()])
        )
        acc = Accumulator(model, optimizer, micro_batch_size="auto", max_micro_batch_size=256)
        with acc:
            acc.step_batch((x, y), lambda b, m=model: nn.functional.mse_loss(m(b[0]), b[1]))
        assert acc.oom_retries == (0 if limit > MICRO else 2)
    replayed = applied[1]
    summed = hand_float32_sum(mlp(torch.bfloat16), zip(x.split(MICRO), y.split(MICRO)), 4)
    for got, want in zip(replayed, summed, strict=True):
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)


@needs_grad_dtype
def test_two_optimizers_step_on_their_own_cast_float32_sums():
    model, batches, expected = sgd_setup(torch.bfloat16, 3, 0.5)
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    optimizers = [torch.optim.SGD(first, lr=0.5), torch.optim.SGD(second, lr=0.5)]
    with Accumulator(model, optimizers, 3) as acc:
        for xb, yb in batches:
            acc.backward(nn.functional.mse_loss(model(xb), yb))
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    # K = 3 seeds with 1 and divides the float32 sum by 3 at the close: hand_float32_sum's
    # (loss / 3) rounds 1/3 per micro-batch, so agreement is to bfloat16 rounding.
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-2, atol=1e-3)
    assert acc.optimizer_steps == 1
    assert all(p.grad is None and p.grad_dtype == torch.bfloat16 for p in model.parameters())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


@needs_grad_dtype
def test_checkpointed_blocks_give_the_same_float32_sums():
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(Residual(), Residual(), Residual(), nn.Linear(64, 1)).to(
            torch.bfloat16
        )

    x, y = data(4 * MICRO, torch.bfloat16)
    sums = []
    for checkpointing in (False, True):
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer.register_step_pre_hook(
            lambda *_, m=model: sums.append([p.grad.clone() for p in m.parameters()])
        )
        with Accumulator(model, optimizer, 4, checkpointing=checkpointing) as acc:
            for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
                acc.backward(nn.functional.mse_loss(model(xb), yb))
                optimizer.step()
        assert acc.checkpointed_modules == (("0", "1", "2") if checkpointing else ())
    for plain, checkpointed in zip(*sums, strict=True):
        assert checkpointed.dtype == torch.bfloat16
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@needs_grad_dtype
def test_a_deep_copy_continues_the_pending_float32_sums():
    model = mlp(torch.bfloat16)
    x, y = data(2 * MICRO, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2, partial_window="carry")
    with acc:
        acc.backward(nn.functional.mse_loss(model(x[:MICRO]), y[:MICRO]))
    copied = copy.deepcopy(acc)
    for original, param in zip(model.parameters(), copied.model.parameters(), strict=True):
        assert param.grad.dtype == torch.float32
        torch.testing.assert_close(param.grad, original.grad, rtol=0, atol=0)
    for a in (acc, copied):
        with a:
            a.backward(nn.functional.mse_loss(a.model(x[MICRO:]), y[MICRO:]))
            a.optimizer.step()
        assert a.optimizer_steps == 1
    for original, param in zip(model.parameters(), copied.model.parameters(), strict=True):
        torch.testing.assert_close(param, original, rtol=0, atol=0)
