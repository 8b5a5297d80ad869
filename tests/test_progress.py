"""The tqdm progress bar: optimizer steps, no line per micro-batch, off when not asked."""

import sys
from typing import ClassVar

import pytest
import torch
from helpers import make_batches, make_model, mse

from torch_accum import Accumulator

pytest.importorskip("tqdm")


def train(progress, micro_batches=12, k=4, lr=0.05, **kwargs):
    """The plain accumulation loop (zero_grad after each step) with ``progress``."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    acc = Accumulator(model, optimizer, k, progress=progress, **kwargs)
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


class RecordingBar:
    """Stands in for tqdm: records how the bar was made and every postfix and update."""

    made: ClassVar[list["RecordingBar"]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.postfixes = []
        self.updates = 0
        self.closed = False
        RecordingBar.made.append(self)

    def set_postfix(self, postfix, refresh=True):
        self.postfixes.append((dict(postfix), refresh))

    def update(self, n):
        self.updates += n

    def close(self):
        self.closed = True


@pytest.fixture
def recording_bar(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    RecordingBar.made = []
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    return RecordingBar.made


def train_with_bar(k=2, micro_batches=4, lr=0.05, **kwargs):
    return train(True, micro_batches, k=k, lr=lr, **kwargs)


def test_the_bar_in_a_log_file_redraws_rarely_at_a_fixed_width(recording_bar):
    assert not sys.stderr.isatty()
    train_with_bar(total_micro_batches=4)
    (bar,) = recording_bar
    assert bar.kwargs == {
        "total": 2,
        "desc": "optimizer steps",
        "unit": "step",
        "dynamic_ncols": False,
        "mininterval": 10.0,
    }
    assert bar.updates == 2 and bar.closed


def test_the_bar_on_a_terminal_follows_its_width_and_redraws_often(recording_bar, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train_with_bar()
    (bar,) = recording_bar
    assert bar.kwargs["total"] is None  # the block's length is not known
    assert bar.kwargs["dynamic_ncols"] is True
    assert bar.kwargs["mininterval"] == 0.1


def test_the_postfix_shows_micro_batch_loss_lr_and_skips(recording_bar):
    acc = train_with_bar(k=2, micro_batches=4, lr=0.05)
    (bar,) = recording_bar
    postfixes = [postfix for postfix, _ in bar.postfixes]
    assert all(refresh is False for _, refresh in bar.postfixes)  # tqdm redraws on its clock
    assert postfixes[0] == {"micro": "1/2"}
    assert postfixes[1] == {"micro": "2/2"}
    assert postfixes[2] == {"micro": "2/2", "loss": postfixes[2]["loss"], "lr": "0.05"}
    assert postfixes[-1]["loss"] == f"{acc.loss:.4g}"
    assert "skipped" not in postfixes[-1]
    assert len(postfixes) == 6  # 4 micro-batches + 2 steps


def test_the_bar_counts_skipped_steps(recording_bar):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = Accumulator(model, optimizer, 1, progress=True)
    with acc, pytest.warns(RuntimeWarning, match="non-finite gradient"):
        x, y = make_batches(1, 4)[0]
        acc.backward(mse(model, (x * float("nan"), y)))
        optimizer.step()
    (bar,) = recording_bar
    postfix, _ = bar.postfixes[-1]
    assert postfix["skipped"] == "1"
    assert postfix["loss"] == "nan"


def test_the_total_is_the_ceiling_of_micro_batches_over_k(capsys):
    # Not total_micro_batches // K: 10 micro-batches at K=4 are windows of 4, 4 and 2.
    pytest.importorskip("tqdm")
    acc = train(True, micro_batches=10, total_micro_batches=10)
    err = capsys.readouterr().err
    assert acc.optimizer_steps == 3
    assert "3/3" in err
    assert "/2 " not in err and "3/2" not in err


def test_no_bar_is_shown_when_progress_is_false(capsys):
    assert not sys.stderr.isatty()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2, total_micro_batches=2, progress=False) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
    assert capsys.readouterr().err == ""
