"""Resume in a fresh process: a run stopped mid-window and resumed from state_dict() in a
new process is bitwise identical (runs resume_worker.py; in-process state_dict tests:
test_run_state.py).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_model

from torch_accum import Accumulator

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(*args: str) -> None:
    subprocess.run([sys.executable, str(WORKER), *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted") / "result.pt"
    run_worker(str(path))
    return torch.load(path)


@pytest.mark.parametrize("stop_after", [6, 1])
def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path, uninterrupted, stop_after):
    checkpoint = tmp_path / "checkpoint.pt"
    resumed = tmp_path / "resumed.pt"
    run_worker(str(checkpoint), "--stop-after", str(stop_after))
    run_worker(str(resumed), "--resume", str(checkpoint))

    expected = uninterrupted
    got = torch.load(resumed)
    assert got["counters"] == expected["counters"]
    assert got["counters"][0] == 3  # windows of 4, 4 and a partial 3
    for a, b in zip(got["params"], expected["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("optimizers", [[], ["--two-optimizers"]], ids=["one", "two"])
def test_resume_between_the_completing_backward_and_the_scaler_step(tmp_path, optimizers):
    # Saved after the 4th acc.backward completed the window, before scaler.step: in the
    # fresh process the scaler has never scaled a loss when the window is applied.
    flags = ["--scaler", *optimizers]
    checkpoint, resumed, expected = (tmp_path / name for name in ("c.pt", "r.pt", "e.pt"))
    run_worker(str(expected), *flags)
    run_worker(str(checkpoint), "--stop-after", "4", "--before-step", *flags)
    assert torch.load(checkpoint)["accumulator"]["window"]["state"] == "complete"
    run_worker(str(resumed), "--resume", str(checkpoint), *flags)

    got, want = torch.load(resumed), torch.load(expected)
    assert got["counters"] == want["counters"]
    assert got["counters"][:2] == (3, 0)  # windows of 4, 4 and a partial 3, none skipped
    for a, b in zip(got["params"], want["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_without_the_accumulator_state_would_differ(tmp_path, uninterrupted):
    # The control: dropping the pending gradients changes the result.
    checkpoint = tmp_path / "checkpoint.pt"
    run_worker(str(checkpoint), "--stop-after", "6")
    state = torch.load(checkpoint)
    state["accumulator"]["gradients"] = None
    state["accumulator"]["window"] = Accumulator(
        make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1), 4
    ).state_dict()["window"]
    torch.save(state, checkpoint)
    run_worker(str(tmp_path / "resumed.pt"), "--resume", str(checkpoint))
    got = torch.load(tmp_path / "resumed.pt")["params"]
    expected = uninterrupted["params"]
    assert any(not torch.equal(a, b) for a, b in zip(got, expected))
