"""examples/sweep_accumulation_steps.py: the table, the plot and the exactness check."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "examples/sweep_accumulation_steps.py"


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The numeric fields of the table rows: K, micro-batch, effective batch, optimizer
    steps, samples seen, final window loss, loss on all data."""
    return [
        line.split()[-7:]
        for line in stdout.splitlines()
        if line.startswith(("(a) fixed", "(b) fixed"))
    ]


def test_default_sweep_prints_the_table_and_writes_the_plot(tmp_path):
    plot = tmp_path / "sweep.png"
    # One epoch keeps the test fast; the flags are those of the default run otherwise.
    result = run("--epochs", "1", "--plot", str(plot))
    assert result.returncode == 0, result.stderr

    rows = table_rows(result.stdout)
    assert len(rows) == 10
    fixed_micro, fixed_effective = rows[:5], rows[5:]
    assert [int(row[0]) for row in fixed_micro] == [1, 2, 4, 8, 16]
    assert [int(row[2]) for row in fixed_micro] == [16, 32, 64, 128, 256]
    assert [int(row[3]) for row in fixed_micro] == [256, 128, 64, 32, 16]
    assert [int(row[1]) for row in fixed_effective] == [128, 64, 32, 16, 8]
    assert {int(row[3]) for row in fixed_effective} == {32}
    assert {row[4] for row in rows} == {"4096"}  # every K fills whole windows of 4096
    # Identical training: the losses agree to the printed digits.
    assert len({row[5] for row in fixed_effective}) == 1
    assert len({row[6] for row in fixed_effective}) == 1

    match = re.search(
        r"^fixed effective batch: losses identical across K \(max spread (\S+), relative; "
        r"parameters (\S+);",
        result.stdout,
        re.MULTILINE,
    )
    assert match, result.stdout
    assert float(match.group(1)) < 1e-12
    assert float(match.group(2)) < 1e-12

    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install -e '.[examples]'" in result.stdout
        return
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 2_000_000
    assert f"plot written to {plot}" in result.stdout


def test_other_steps_without_plot():
    result = run(
        *("--accumulation-steps", "3", "1", "--micro-batch-size", "8"),
        *("--effective-batch-size", "96", "--epochs", "1", "--lr", "1e-2", "--no-plot"),
    )
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    # Sorted by K; regime (a) drops the 4096 % 24 = 16 samples that cannot fill a window.
    assert [(row[0], row[4]) for row in rows] == [
        ("1", "4096"),
        ("3", "4080"),
        ("1", "4032"),
        ("3", "4032"),
    ]
    assert "fixed effective batch: losses identical across K" in result.stdout
    assert "plot written" not in result.stdout


def test_bad_flags_exit_2_with_the_fix():
    result = run("--accumulation-steps", "0")
    assert result.returncode == 2
    assert "--accumulation-steps: expected a positive integer, got 0" in result.stderr
    result = run("--effective-batch-size", "100")
    assert result.returncode == 2
    assert (
        "--effective-batch-size 100 is not divisible by --accumulation-steps 8, 16; "
        "pick a multiple of every K, e.g. 112"
    ) in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--accumulation-steps", "3", "4", "--effective-batch-size", "100"], "e.g. 108"),
        (["--accumulation-steps", "2", "2"], "lists 2 more than once; give each value once"),
        (["--micro-batch-size", "512"], "lower --micro-batch-size or the largest K"),
        (["--effective-batch-size", "8192"], "pick one of at most 4096"),
        (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
        (["--lr", "nan"], "--lr: expected a positive number, got nan"),
        (["--lr", "0"], "--lr: expected a positive number, got 0.0"),
        (["--plot", "docs"], "--plot docs is a directory; give a file name"),
        (["--plot", "x.png", "--no-plot"], "not allowed with argument --plot"),
    ],
)
def test_flag_validation(args, message, capsys, monkeypatch):
    # In-process: parsing needs no subprocess, and starting one per case costs seconds.
    monkeypatch.chdir(ROOT)
    from sweep_accumulation_steps import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
