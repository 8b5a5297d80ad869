"""Behaviours that hand-made mutants of torch_accum showed no test pinned (issue 15).

Each test names the mutant it kills; docs/testing.md lists them with the mutation score.
"""

import sys

import pytest
import torch
from helpers import make_batches, make_model, mse
from torch import nn

from torch_accum import Accumulator, measure_activation_memory


# ----------------------------------------------------------------------------- progress bar
def test_progress_total_is_the_ceiling_of_micro_batches_over_k(capsys):
    # Mutant: total_micro_batches // K. 10 micro-batches at K=4 are windows of 4, 4 and 2.
    pytest.importorskip("tqdm")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = Accumulator(model, optimizer, 4, total_micro_batches=10, progress=True)
    with acc:
        for batch in make_batches(10, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    err = capsys.readouterr().err
    assert acc.optimizer_steps == 3
    assert "3/3" in err
    assert "/2 " not in err and "3/2" not in err


# ----------------------------------------------------------------------------- memory_budget
def bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)
    ).double()


def run_step_batches(batches, **kwargs):
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
    # Mutants: the probe's snapshot.restore() dropped (dropout masks of the real batch
    # change, BatchNorm counts the probes: num_batches_tracked 4 instead of 2).
    batches = make_batches(2, 16)
    probed, acc, rng_probed = run_step_batches(
        batches, micro_batch_size="auto", max_micro_batch_size=8, memory_budget=10**9
    )
    assert acc.micro_batch_size == 8  # the budget fits the cap: 2 micro-batches per batch
    plain, _, rng_plain = run_step_batches(batches, micro_batch_size=8)
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


# ----------------------------------------------------------------------------- checkpointing
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Net(nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_checkpointing_true_needs_two_blocks_of_a_kind():
    # Mutant: a container of one block counts as repeated (len(parent) < 1).
    model = Net(blocks=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"checkpointing=True found no repeated blocks in Net"):
        Accumulator(model, optimizer, 2, checkpointing=True)
    two = Net(blocks=2)
    acc = Accumulator(two, torch.optim.SGD(two.parameters(), lr=0.1), 2, checkpointing=True)
    assert acc.checkpointed_modules == ("blocks.0", "blocks.1")


# ----------------------------------------------------------------------------- zero values
@pytest.mark.parametrize("name", ["memory_budget", "probe_up_after", "max_micro_batch_size"])
def test_zero_is_rejected_for_auto_sizing_arguments(name):
    # Mutant: check_optional_positive_int accepting 0 (value < 0).
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=rf"{name} must be a positive int or None, got 0 \(int\); pass e.g."
    ):
        Accumulator(model, optimizer, micro_batch_size="auto", **{name: 0})


def test_negative_total_micro_batches_is_rejected():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"total_micro_batches must be .*got -1 \(int\)"):
        Accumulator(model, optimizer, 2, total_micro_batches=-1)


def test_zero_total_micro_batches_declares_an_empty_block():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(model, optimizer, 2, total_micro_batches=0)
    with acc:
        pass
    assert acc.optimizer_steps == 0
    for got, expected in zip(model.parameters(), before):
        assert torch.equal(got, expected)
    with acc, pytest.raises(RuntimeError, match=r"more often than the 0 micro-batches"):
        acc.backward(mse(model, make_batches(1, 4)[0]))


def test_progress_is_not_shown_when_not_asked(capsys):
    assert not sys.stderr.isatty()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2, total_micro_batches=2, progress=False) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
    assert capsys.readouterr().err == ""


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
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size="auto",
        memory_budget=budget,
        probe_up_after=2,
    )
    sizes = []
    with acc:
        for _ in range(3):
            acc.step_batch((x, y), compute_loss)
            sizes.append(acc.micro_batch_size)
    sized = sizes[0]
    assert sized < 32
    assert sizes == [sized, 2 * sized, 2 * sized]
