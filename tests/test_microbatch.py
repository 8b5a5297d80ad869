"""Micro-batching (step_batch): exact splitting and weights, memory-budget sizing and
probing, out-of-memory replays."""

from collections import namedtuple

import pytest
import torch
from helpers import (
    EXACT,
    assert_same,
    make_batches,
    mse,
    parameters_of,
    reference_run,
    sync_gradients_after_each_backward,
)
from helpers import make_model as make_mlp
from torch import nn

from torch_accum import Accumulator, measure_activation_memory
from torch_accum.microbatch import batch_size_of, split_batch

TOL = {"rtol": 1e-10, "atol": 1e-12}
Pair = namedtuple("Pair", ["x", "y"])


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def data(n=37, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    return x, torch.randn(n, 1, generator=generator, dtype=torch.float64)


def full_batch_reference(batches, lr=0.1):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return list(model.parameters())


# ----------------------------------------------------------------------------- splitting
def test_split_nested_batches_and_pass_other_leaves_through():
    x, y = data()
    batch = {"inputs": (x, [y, "tag"]), "pair": Pair(x, y), "meta": None}
    pieces = split_batch(batch, 8)
    assert [n for _, n in pieces] == [8, 8, 8, 8, 5]
    last = pieces[-1][0]
    assert torch.equal(last["inputs"][0], x[32:])
    assert torch.equal(last["inputs"][1][0], y[32:])
    assert last["inputs"][1][1] == "tag" and last["meta"] is None
    assert isinstance(last["pair"], Pair) and torch.equal(last["pair"].y, y[32:])
    assert torch.equal(torch.cat([p[0]["inputs"][0] for p in pieces]), x)


def test_split_errors_name_the_problem():
    x, y = data()
    with pytest.raises(ValueError, match=r"disagree on the number of samples .*\[10, 37\]"):
        batch_size_of((x, y[:10]))
    with pytest.raises(ValueError, match=r"batch holds no tensor to split \(got str\)"):
        batch_size_of("text")
    with pytest.raises(ValueError, match=r"micro_batch_size must be >= 1, got 0"):
        split_batch(x, 0)
    with pytest.raises(TypeError, match=r"micro_batch_size must be a positive int, got 2.5"):
        split_batch(x, 2.5)


# ----------------------------------------------------------------------------- exactness
def run_step_batches(batches, to_batch, compute_loss, **kwargs):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = Accumulator(model, optimizer, **kwargs)
    with acc:
        for x, y in batches:
            acc.step_batch(to_batch(x, y), lambda micro: compute_loss(model, micro))
    return model, acc


SHAPES = {
    "tensor": (
        lambda x, y: torch.cat([x, y], 1),
        lambda m, b: nn.functional.mse_loss(m(b[:, :5]), b[:, 5:]),
    ),
    "tuple": (lambda x, y: (x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])),
    "dict": (lambda x, y: {"x": x, "y": y}, lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"])),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_37_samples_in_micro_batches_of_8_equal_the_full_batch(shape):
    batches = [data(37, seed) for seed in (1, 2, 3)]
    to_batch, compute_loss = SHAPES[shape]
    model, acc = run_step_batches(batches, to_batch, compute_loss, micro_batch_size=8)
    assert acc.optimizer_steps == 3 and acc.micro_batch_size == 8
    for got, expected in zip(model.parameters(), full_batch_reference(batches), strict=True):
        torch.testing.assert_close(got, expected, **TOL)


def test_unweighted_micro_batch_means_would_differ():
    # The control: averaging the 5 micro-batch means treats the last 5 samples as 8.
    x, y = data(37)
    model = make_model()
    mean_of_means = (
        sum(nn.functional.mse_loss(model(a), b) for a, b in zip(x.split(8), y.split(8))) / 5
    )
    assert abs(mean_of_means.item() - nn.functional.mse_loss(model(x), y).item()) > 1e-4


# ----------------------------------------------------------------------------- out of memory
class MemoryLimit(nn.Module):
    """Raises torch.OutOfMemoryError when a micro-batch's cost exceeds a limit.

    The cost of a micro-batch is its size times the largest sample "length" in it (the
    last input column), so an early micro-batch can fit and a later one not: halfway.
    """

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit = model, limit
        self.seen = []  # (attempt, sample ids) of each forward that ran to its end

    def forward(self, x, ids):
        cost = x.shape[0] * int(x[:, -1].max())
        if cost > self.limit:
            self.seen.append(("oom", None))
            raise torch.OutOfMemoryError(f"injected: cost {cost} > {self.limit}")
        self.seen.append(("ok", ids.tolist()))
        return self.model(x)


def lengths_batch(n=64, seed=1):
    x, y = data(n, seed)
    lengths = torch.ones(n, 1, dtype=torch.float64)
    lengths[n // 2 :] = 4  # the second half is 4x as costly
    return torch.cat([x[:, :4], lengths], 1), y, torch.arange(n)


class CountingSGD(torch.optim.SGD):
    real_steps = 0

    def step(self, closure=None):
        self.real_steps += 1
        return super().step(closure)


def test_oom_halfway_through_a_batch_replays_it_exactly():
    batches = [lengths_batch(64, seed) for seed in (1, 2)]
    reference = full_batch_reference([(x, y) for x, y, _ in batches])
    model = make_model()
    limited = MemoryLimit(model, limit=100)
    optimizer = CountingSGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    acc = Accumulator(model, optimizer, micro_batch_size="auto", scheduler=scheduler)
    with acc:
        for x, y, ids in batches:
            limited.seen.clear()
            acc.step_batch((x, y, ids), lambda m: nn.functional.mse_loss(limited(m[0], m[2]), m[1]))
            if len(optimizer.state) == 0 or acc.optimizer_steps == 1:
                first_batch_log = list(limited.seen)
    # 64 -> OOM; 32: the first micro-batch (short samples) fits, the second does not; 16 fits.
    assert [kind for kind, _ in first_batch_log] == ["oom", "ok", "oom", "ok", "ok", "ok", "ok"]
    successful = [i for kind, ids in first_batch_log[3:] for i in ids]
    assert sorted(successful) == list(range(64))  # every sample once in the successful pass
    assert acc.micro_batch_size == 16 and acc.oom_retries == 2
    assert [kind for kind, _ in limited.seen] == ["ok"] * 4  # the size is kept
    assert optimizer.real_steps == 2 and acc.optimizer_steps == 2
    assert scheduler.last_epoch == 2
    for got, expected in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    ("batch_size", "limit", "chosen"), [(37, 10, 10), (64, 40, 32), (64, 7, 4)]
)
def test_the_size_found_is_the_largest_halving_under_the_limit(batch_size, limit, chosen):
    x, y = data(batch_size)
    x = torch.cat([x[:, :4], torch.ones(batch_size, 1, dtype=torch.float64)], 1)
    model = make_model()
    limited = MemoryLimit(model, limit=limit)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size="auto")
    with acc:
        acc.step_batch(
            (x, y, torch.arange(batch_size)),
            lambda m: nn.functional.mse_loss(limited(m[0], m[2]), m[1]),
        )
    assert acc.micro_batch_size == chosen


def test_the_chosen_size_is_logged(caplog):
    x, y, ids = lengths_batch(64)
    model = make_model()
    limited = MemoryLimit(model, limit=100)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size="auto")
    with caplog.at_level("INFO", logger="torch_accum"), acc:
        for _ in range(2):
            acc.step_batch((x, y, ids), lambda m: nn.functional.mse_loss(limited(m[0], m[2]), m[1]))
    assert (
        caplog.text.count(
            "batch of 64 samples in micro-batches of 16 (2 out-of-memory retries so far)"
        )
        == 1
    )
    assert "out of memory with micro-batches of 32; retrying with 16" in caplog.text


def test_probing_upward_after_successful_batches():
    x, y, ids = lengths_batch(64)
    x[:, -1] = 1
    model = make_model()
    limited = MemoryLimit(model, limit=16)
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size="auto",
        probe_up_after=2,
    )
    sizes = []
    with acc:
        for step in range(6):
            if step == 2:
                limited.limit = 64  # memory frees up
            acc.step_batch((x, y, ids), lambda m: nn.functional.mse_loss(limited(m[0], m[2]), m[1]))
            sizes.append(acc.micro_batch_size)
    # The first batch needed two retries, so it is not one of the 2 error-free batches that
    # probing waits for: batches 2 and 3 are (issue 11, item 16).
    assert sizes == [16, 16, 32, 32, 64, 64]


def test_gives_up_when_one_sample_does_not_fit():
    x, y, ids = lengths_batch(8)
    model = make_model()
    limited = MemoryLimit(model, limit=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, micro_batch_size="auto")
    with (
        pytest.raises(RuntimeError, match=r"out of memory even with micro-batches of 1 sample"),
        acc,
    ):
        acc.step_batch((x, y, ids), lambda m: nn.functional.mse_loss(limited(m[0], m[2]), m[1]))
    assert acc.oom_retries == 3  # 8 -> 4 -> 2 -> 1
    assert all(p.grad is None for p in model.parameters()) and optimizer.state == {}


def test_a_fixed_size_does_not_retry():
    x, y, ids = lengths_batch(8)
    model = make_model()
    limited = MemoryLimit(model, limit=0)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4)
    with pytest.raises(torch.OutOfMemoryError), acc:
        acc.step_batch((x, y, ids), lambda m: nn.functional.mse_loss(limited(m[0], m[2]), m[1]))


# ----------------------------------------------------------------------------- memory budget
def wide_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1)
    )


def peak_of(size, x, y):
    model = wide_model()
    return measure_activation_memory(
        lambda: nn.functional.mse_loss(model(x[:size]), y[:size]), parameters=model.parameters()
    ).peak


def test_memory_budget_picks_a_size_that_fits_and_is_at_least_half_the_largest():
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    budget = 300_000
    largest = max(s for s in range(1, 65) if peak_of(s, x, y) <= budget)
    model = wide_model()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size="auto",
        memory_budget=budget,
    )
    with acc:
        acc.step_batch((x, y), lambda m: nn.functional.mse_loss(model(m[0]), m[1]))
    chosen = acc.micro_batch_size
    assert peak_of(chosen, x, y) <= budget
    assert largest / 2 <= chosen <= largest
    # Probing left no trace: the update equals the plain full-batch step.
    reference = wide_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.mse_loss(reference(x), y).backward()
    optimizer.step()
    for got, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_step_batch_with_checkpointing_and_a_grad_scaler():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from gpt import GPT, GPTConfig

    tokens = torch.randint(0, 64, (12, 9), generator=torch.Generator().manual_seed(0))

    def train(checkpointing, micro_batch_size):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, context=8, width=32, layers=2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        acc = Accumulator(
            model,
            optimizer,
            micro_batch_size=micro_batch_size,
            scaler=scaler,
            checkpointing=checkpointing,
        )

        def compute_loss(micro):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(micro[:, :-1])
            return nn.functional.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())

        with acc:
            acc.step_batch(tokens, compute_loss)
        return list(model.parameters())

    whole = train(False, 12)
    for got, expected in zip(train(True, 5), whole, strict=True):
        # bf16 matmuls over micro-batches of 5, 5, 2 vs one of 12: bf16 tolerance.
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_backward_windows_after_step_batch_use_accumulation_steps_again():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(10)
    acc = Accumulator(model, optimizer, 2, micro_batch_size=3)  # 3, 3, 3, 1 in step_batch
    with acc:
        acc.step_batch((x, y), lambda m: nn.functional.mse_loss(model(m[0]), m[1]))
        for index in range(4):
            acc.backward(nn.functional.mse_loss(model(x[index : index + 1]), y[index : index + 1]))
            optimizer.step()
            assert acc.sync_gradients == (index % 2 == 1)
    assert acc.optimizer_steps == 3


# ----------------------------------------------------------------------------- misuse
def test_misuse_errors():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(8)
    loss = lambda m: nn.functional.mse_loss(model(m[0]), m[1])  # noqa: E731
    with (
        pytest.raises(RuntimeError, match=r"step_batch\(\) needs a micro-batch size"),
        Accumulator(model, optimizer) as acc,
    ):
        acc.step_batch((x, y), loss)
    acc = Accumulator(model, optimizer, 4, micro_batch_size=2)
    with pytest.raises(RuntimeError, match=r"needs an empty window, but 1 micro-batches"), acc:
        acc.backward(loss((x, y)))
        acc.step_batch((x, y), loss)
    with pytest.raises(RuntimeError, match=r"outside the `with acc:` block"):
        acc.step_batch((x, y), loss)
    with pytest.raises(
        ValueError,
        match=r"memory_budget, max_micro_batch_size and probe_up_after apply to micro_batch_size='auto'",
    ):
        Accumulator(model, optimizer, micro_batch_size=4, memory_budget=10**6)
    with pytest.raises(
        ValueError, match=r"micro_batch_size must be a positive int, 'auto' or None, got 0"
    ):
        Accumulator(model, optimizer, micro_batch_size=0)


@pytest.mark.parametrize("size", [4, "auto"])
@pytest.mark.parametrize("layout", ["tensor", "tuple", "dict"])
def test_an_empty_batch_is_named_and_leaves_the_micro_batch_size_alone(size, layout):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(6)
    empty = {"tensor": x[:0], "tuple": (x[:0], y[:0]), "dict": {"x": x[:0], "y": y[:0]}}[layout]
    to_loss = {
        "tensor": lambda m: model(m).pow(2).mean(),
        "tuple": lambda m: nn.functional.mse_loss(model(m[0]), m[1]),
        "dict": lambda m: nn.functional.mse_loss(model(m["x"]), m["y"]),
    }[layout]
    full = {"tensor": x, "tuple": (x, y), "dict": {"x": x, "y": y}}[layout]
    acc = Accumulator(model, optimizer, micro_batch_size=size)
    with acc:
        with pytest.raises(
            ValueError,
            match=r"acc.step_batch\(\) got an empty batch \(\w+ whose tensors have 0 samples "
            r"along dimension 0\).*Skip empty batches",
        ):
            acc.step_batch(empty, to_loss)
        assert acc.micro_batch_size == (None if size == "auto" else size)
        assert acc.micro_step == 0 and acc.optimizer_steps == 0
        acc.step_batch(full, to_loss)  # the next batch trains as usual
    assert acc.optimizer_steps == 1 and acc.micro_batch_size == (6 if size == "auto" else 4)


@pytest.mark.cuda
def test_real_cuda_out_of_memory_is_recovered():
    device = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info()
    per_sample = free // 8  # 32 samples need 4x the free memory; 4 need half of it
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data(32)
    x, y = x.to(device), y.to(device)

    def compute_loss(micro):
        # A big activation proportional to the micro-batch, as a wide layer would make.
        big = torch.ones(micro[0].shape[0], per_sample // 8, device=device, dtype=torch.float64)
        return nn.functional.mse_loss(model(micro[0]), micro[1]) + 0 * big.sum()

    acc = Accumulator(model, optimizer, micro_batch_size="auto")
    with acc:
        acc.step_batch((x, y), compute_loss)
    assert acc.oom_retries >= 1 and acc.micro_batch_size <= 4
    reference = full_batch_reference([(x.cpu(), y.cpu())])
    for got, expected in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(got.cpu(), expected, **TOL)


def auto_sized(model, memory_budget, **kwargs):
    """An Accumulator (SGD, lr 0.1) whose micro-batch size is sized from ``memory_budget``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Accumulator(
        model, optimizer, micro_batch_size="auto", memory_budget=memory_budget, **kwargs
    )


def test_memory_budget_sizing_starts_from_a_four_sample_probe():
    # The 4-sample probe's peak per sample gives the first guess; a bisection on measured
    # peaks then settles on the largest size within the budget.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 1))
    x, y = torch.randn(64, 32), torch.randn(64, 1)

    def peak(size):
        return measure_activation_memory(
            lambda: nn.functional.mse_loss(model(x[:size]), y[:size]),
            parameters=model.parameters(),
        ).peak

    budget = peak(20)
    largest = max(s for s in range(1, 65) if peak(s) <= budget)
    sizes = []

    def compute_loss(micro):
        sizes.append(len(micro[0]))
        return nn.functional.mse_loss(model(micro[0]), micro[1])

    acc = auto_sized(model, budget)
    with acc:
        acc.step_batch((x, y), compute_loss)
    assert acc.micro_batch_size == largest
    first_guess = int(budget // (peak(4) / 4))
    assert sizes[:2] == [4, first_guess]
    probes = sizes[: -len(range(0, 64, largest))]
    assert sizes[len(probes) :] == [largest] * (64 // largest) + [64 % largest] * bool(64 % largest)
    assert len(probes) <= 8


def test_a_memory_budget_below_one_sample_falls_back_to_micro_batches_of_one():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, micro_batch_size="auto", memory_budget=1)
    with acc:
        acc.step_batch(make_batches(1, 6)[0], lambda micro: mse(model, micro))
    assert acc.micro_batch_size == 1
    assert acc.optimizer_steps == 1


def test_memory_budget_measures_only_before_the_first_batch():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def compute_loss(micro):
        calls.append(len(micro[0]))
        return mse(model, micro)

    acc = Accumulator(
        model, optimizer, micro_batch_size="auto", max_micro_batch_size=4, memory_budget=10**9
    )
    with acc:
        acc.step_batch(make_batches(1, 8)[0], compute_loss)
        assert len(calls) > 2  # the probes, then two micro-batches of 4
        calls.clear()
        acc.step_batch(make_batches(1, 8, seed=2)[0], compute_loss)
    assert calls == [4, 4]


def bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)
    ).double()


def run_bn_dropout_batches(batches, **kwargs):
    model = bn_dropout_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, **kwargs)
    # Same RNG stream for both runs from here on: probes must not consume it.
    torch.manual_seed(123)
    with acc:
        for batch in batches:
            acc.step_batch(batch, lambda micro: mse(model, micro))
    return model, acc, torch.random.get_rng_state()


def test_memory_budget_probes_leave_rng_and_buffers_as_they_were():
    # Without the probe's snapshot.restore() the dropout masks
    # of the real batch change and BatchNorm counts the probes (num_batches_tracked 4, not 2).
    batches = make_batches(2, 16)
    probed, acc, rng_probed = run_bn_dropout_batches(
        batches, micro_batch_size="auto", max_micro_batch_size=8, memory_budget=10**9
    )
    assert acc.micro_batch_size == 8  # the budget fits the cap: 2 micro-batches per batch
    plain, _, rng_plain = run_bn_dropout_batches(batches, micro_batch_size=8)
    bn_probed, bn_plain = probed[1], plain[1]
    assert int(bn_probed.num_batches_tracked) == int(bn_plain.num_batches_tracked) == 4
    for name, got in probed.state_dict().items():
        torch.testing.assert_close(got, plain.state_dict()[name], rtol=0, atol=0, msg=name)
    assert torch.equal(rng_probed, rng_plain)


def test_memory_budget_probe_of_one_batch_counts_only_the_real_micro_batches():
    model = bn_dropout_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(
        model, optimizer, micro_batch_size="auto", max_micro_batch_size=8, memory_budget=10**9
    )
    with acc:
        acc.step_batch(make_batches(1, 16)[0], lambda micro: mse(model, micro))
    assert int(model[1].num_batches_tracked) == 2


def test_memory_budget_finds_the_largest_size_that_fits():
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
    acc = auto_sized(model, budget)
    with acc:
        acc.step_batch((x, y), compute_loss)
    assert acc.micro_batch_size == largest >= 25


def test_probe_up_after_does_not_probe_at_the_cap(caplog):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(
        model, optimizer, micro_batch_size="auto", max_micro_batch_size=4, probe_up_after=1
    )
    with caplog.at_level("INFO", logger="torch_accum"), acc:
        for batch in make_batches(3, 8):
            acc.step_batch(batch, lambda micro: mse(model, micro))
    assert acc.micro_batch_size == 4
    assert "probing" not in caplog.text


def test_probe_up_after_counts_from_zero_after_memory_budget_sizing():
    # Sized from memory_budget (no out-of-memory error resets the count), the first probe
    # upward still waits for probe_up_after error-free batches, not one fewer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    def compute_loss(micro):
        return nn.functional.mse_loss(model(micro[0]), micro[1])

    budget = measure_activation_memory(
        lambda: compute_loss((x[:8], y[:8])), parameters=model.parameters()
    ).peak
    acc = auto_sized(model, budget, probe_up_after=2)
    sizes = []
    with acc:
        for _ in range(3):
            acc.step_batch((x, y), compute_loss)
            sizes.append(acc.micro_batch_size)
    sized = sizes[0]
    assert sized < 32
    assert sizes == [sized, 2 * sized, 2 * sized]


def test_an_out_of_memory_replay_counts_the_replayed_micro_batches_once():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def compute_loss(micro):
        calls.append(len(micro[0]))
        if len(calls) == 2:  # the second micro-batch of the first attempt
            raise torch.OutOfMemoryError("simulated")
        return mse(model, micro)

    acc = Accumulator(
        model,
        optimizer,
        micro_batch_size="auto",
        max_micro_batch_size=2,
        total_micro_batches=5,
    )
    with acc:
        acc.step_batch(make_batches(1, 4)[0], compute_loss)
        assert calls == [2, 2, 1, 1, 1, 1] and acc.oom_retries == 1
        # 4 micro-batches counted, not 5: one more acc.backward ends the block.
        acc.backward(mse(model, make_batches(1, 4, seed=3)[0]))
        assert acc.sync_gradients
        optimizer.step()


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


def test_out_of_memory_replays_are_invisible_with_batchnorm_and_dropout():
    batches = make_batches(3, 16)
    replayed, acc = auto_run(4, "auto", batches)
    plain, _ = auto_run(10**6, 4, batches)
    assert acc.oom_retries == 2 and acc.micro_batch_size == 4
    bn, plain_bn = replayed.net[1], plain.net[1]
    assert int(bn.num_batches_tracked) == int(plain_bn.num_batches_tracked) == 12
    torch.testing.assert_close(bn.running_var, plain_bn.running_var, **EXACT)
    torch.testing.assert_close(bn.running_mean, plain_bn.running_mean, **EXACT)
    torch.testing.assert_close(parameters_of(replayed), parameters_of(plain), **EXACT)


def test_the_batch_that_hit_out_of_memory_does_not_count_towards_probe_up_after():
    batches = make_batches(6, 8)
    _, acc = auto_run(4, "auto", batches, probe_up_after=1)
    # 8 -> 4 on the first batch; after one clean batch at 4, probing 8 fails again, and so
    # on: every other batch replays (counting the failed batch as clean replays them all).
    assert acc.oom_retries == 3


def test_a_replayed_batch_restores_the_cuda_random_state_when_cuda_is_in_use(monkeypatch):
    # CI has no GPU: a stand-in CUDA RNG shows that its state is saved before a batch and
    # put back before the batch is replayed in smaller micro-batches.
    states = {"cuda": [torch.tensor([1])]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states["cuda"]))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: states.update(cuda=new))
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, micro_batch_size="auto")

    def compute_loss(micro):
        if micro[0].shape[0] > 2:
            states["cuda"] = [torch.tensor([99])]  # the failed attempt drew random numbers
            raise torch.OutOfMemoryError("injected")
        return mse(model, micro)

    with acc:
        acc.step_batch(make_batches(1, 8)[0], compute_loss)
    assert acc.micro_batch_size == 2
    assert [t.item() for t in states["cuda"]] == [1]


def test_a_failed_step_batch_leaves_the_blocks_count_as_it_was():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(3, 4)
    calls = []

    def failing(micro):
        calls.append(len(micro[0]))
        if len(calls) == 2:
            raise ValueError("bad sample")
        return mse(model, micro)

    acc = Accumulator(model, optimizer, 2, micro_batch_size=2, total_micro_batches=2)
    with acc:
        with pytest.raises(ValueError, match="bad sample"):
            acc.step_batch(batches[0], failing)
        ends = sync_gradients_after_each_backward(acc, model, optimizer, batches[1:])
    assert ends == [False, True]


def test_an_interrupted_step_batch_is_discarded_completely():
    model = make_mlp()
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
    reference = make_mlp()
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1), [[good]])
    assert_same(model, reference)


def test_step_batch_weighs_micro_batches_by_the_weight_function():
    # A loss that is a mean over tokens, with a different number of tokens per micro-batch:
    # weighted by tokens, the update is the mean over all tokens of the batch.
    torch.manual_seed(0)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1], [1, 1, 1]])
    mask = mask.bool()

    def token_mean(model, x, y, mask):
        return ((model(x) - y) ** 2)[mask].mean()

    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, micro_batch_size=2) as acc:
        acc.step_batch(
            (x, y, mask),
            lambda micro: token_mean(model, *micro),
            weight=lambda micro: micro[2].sum(),
        )
    reference = make_mlp()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    token_mean(reference, x, y, mask).backward()
    ref_optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_step_batch_returns_the_batch_mean_loss():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batches(1, 6)[0]
    with Accumulator(model, optimizer, micro_batch_size=4) as acc:
        loss = acc.step_batch(batch, lambda micro: mse(model, micro))
    assert loss == acc.loss
    assert loss == pytest.approx(mse(model, batch).item(), rel=1e-12)


def test_step_batch_outside_the_block_names_itself():
    model = make_mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    with pytest.raises(RuntimeError, match=r"^acc.step_batch\(\) was called outside the `with"):
        acc.step_batch(make_batches(1, 4)[0], lambda micro: mse(model, micro))


def test_step_batch_splits_named_tuples():
    from collections import namedtuple

    Batch = namedtuple("Batch", ["x", "y"])
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def compute_loss(micro):
        seen.append((type(micro), len(micro.x), len(micro.y)))
        return mse(model, micro)

    with Accumulator(model, optimizer, micro_batch_size=4) as acc:
        acc.step_batch(Batch(*make_batches(1, 10)[0]), compute_loss)
    assert seen == [(Batch, 4, 4), (Batch, 4, 4), (Batch, 2, 2)]


def test_batches_whose_tensors_disagree_are_refused_naming_the_sizes():
    model = make_mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    x, y = make_batches(1, 4)[0]
    with acc:
        with pytest.raises(
            ValueError, match=r"\(sizes of dimension 0: \[3, 4\]\); every tensor must have"
        ):
            acc.step_batch((x, y[:3]), lambda micro: mse(model, micro))
        with pytest.raises(
            ValueError, match=r"\(sizes of dimension 0: \[4\], and a 0-d tensor\); every tensor"
        ):
            acc.step_batch((x, y, torch.tensor(1.0)), lambda micro: mse(model, micro[:2]))


def test_micro_batches_of_one_sample_train_like_the_full_batch():
    model, reference = make_mlp(), make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batches(1, 3)[0]
    with Accumulator(model, optimizer, micro_batch_size=1) as acc:
        acc.step_batch(batch, lambda micro: mse(model, micro))
    mse(reference, batch).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
