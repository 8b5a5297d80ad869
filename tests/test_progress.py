"""The tqdm progress bar: optimizer steps, no line per micro-batch, off when not asked."""

import sys

import pytest
import torch
from helpers import make_batches, make_model, mse

from torch_accum import Accumulator

pytest.importorskip("tqdm")


def train(progress, micro_batches=12, **kwargs):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = Accumulator(model, optimizer, 4, progress=progress, **kwargs)
    with acc:
        for batch in make_batches(micro_batches, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return acc


def test_the_bar_counts_optimizer_steps_with_loss_and_lr(capsys):
    acc = train(True, total_micro_batches=12)
    err = capsys.readouterr().err
    assert "optimizer steps" in err
    assert "3/3" in err  # steps, not the 12 micro-batches
    assert f"loss={acc.loss:.4g}" in err
    assert "lr=0.05" in err
    assert "12/" not in err
    # One line for the whole run (tqdm redraws with carriage returns), not one per micro-batch.
    assert err.count("\n") <= 2


def test_off_by_default_when_stderr_is_not_a_terminal(capsys):
    assert not sys.stderr.isatty()
    acc = train(None)
    assert acc.progress is False
    assert capsys.readouterr().err == ""


def test_bad_progress_values(monkeypatch):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"progress must be True, False or None, got 'yes' \(str\)"):
        Accumulator(model, optimizer, 2, progress="yes")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"progress=True needs tqdm.*torch_accum\[progress\]"):
        Accumulator(model, optimizer, 2, progress=True)
    assert Accumulator(model, optimizer, 2, progress=None).progress is False
