"""benchmarks/peers.py --smoke runs and prints the comparison table with exact torch_accum rows.

Needs the `bench` extra (accelerate, lightning); skipped where they are not importable, as in
the default test environment.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["full batch (ref)", "hand-written", "torch_accum", "Accelerate", "Lightning"]
ROWS = ["1", "2", "3", "4", "5a", "5b", "6a", "6b"]


def run_peers(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/peers.py", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smoke() -> subprocess.CompletedProcess:
    return run_peers("--smoke")


def table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in stdout.splitlines() if " | " in line]
    header = [cell.strip() for cell in lines[0].split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.split("|")]
        rows[cells[0].split(".")[0]] = cells[1:]
    return header, rows


def test_smoke_prints_the_table(smoke):
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert smoke.stdout.startswith("command: python benchmarks/peers.py --smoke")
    versions = next(line for line in smoke.stdout.splitlines() if line.startswith("versions:"))
    for name in ("torch", "torch_accum", "accelerate", "lightning", "Python"):
        assert f"{name} " in versions
    header, rows = table(smoke.stdout)
    assert header == ["row", *COLUMNS]
    assert list(rows) == ROWS
    assert all(len(cells) == len(COLUMNS) for cells in rows.values())
    assert "run time:" in smoke.stdout


def test_smoke_torch_accum_is_exact(smoke):
    _, rows = table(smoke.stdout)
    column = COLUMNS.index("torch_accum")
    for row in ("1", "2", "3"):
        assert rows[row][0] == "0 (ref)"
        assert float(rows[row][column].split()[0]) <= 1e-10, (row, rows[row])
    # The full-batch reference and torch_accum: 3 scheduler and 3 optimizer steps for 10
    # micro-batches with K=4; the hand-written loop drops the last, partial window.
    assert rows["4"][0] == rows["4"][column] == "3 / 3"
    assert rows["4"][COLUMNS.index("hand-written")] == "2 / 2"
    assert "row 1: float64 difference" in smoke.stdout
    assert smoke.stdout.count(": met") >= 3


def test_smoke_timing_and_memory_rows_are_numbers(smoke):
    _, rows = table(smoke.stdout)
    for row in ("5a", "5b"):
        ratios = [float(cell.split()[0]) for cell in rows[row][2:]]
        assert all(ratio > 0 for ratio in ratios), rows[row]
    without = [float(cell.split()[0]) for cell in rows["6a"]]
    assert all(value > 0 for value in without), rows["6a"]
    # Checkpointing lowers torch_accum's peak; the peers offer no one-flag equivalent.
    column = COLUMNS.index("torch_accum")
    assert float(rows["6b"][column]) < without[column]
    assert rows["6b"][COLUMNS.index("Accelerate")].startswith("n/a")


def test_bad_flags_say_what_to_do():
    result = run_peers("--epoch-micro-batches", "8")
    assert result.returncode == 2
    assert "--epoch-micro-batches 8 must be larger than and not a multiple of" in result.stderr
    result = run_peers("--mlp-micro-batches", "30")
    assert result.returncode == 2
    assert "--mlp-micro-batches 30 must be a multiple of --accumulation-steps 4" in result.stderr
    result = run_peers("--gpt-repetitions", "0")
    assert result.returncode == 2
    assert "expected a positive integer, got 0" in result.stderr
