"""The examples and benchmarks run as documented and print a checkable result."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_quickstart_prints_match():
    result = run("examples/quickstart.py")
    assert result.returncode == 0, result.stderr
    assert "MATCH: accumulated run vs full-batch run" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]) == 10


def test_quickstart_float32_with_other_flags():
    result = run(
        "examples/quickstart.py",
        "--dtype",
        "float32",
        "--accumulation-steps",
        "8",
        "--batch-size",
        "64",
        "--steps",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "MATCH" in result.stdout


def test_quickstart_rejects_bad_flags_with_the_fix():
    result = run("examples/quickstart.py", "--accumulation-steps", "0")
    assert result.returncode == 2
    assert "--accumulation-steps: expected a positive integer, got 0" in result.stderr
    result = run("examples/quickstart.py", "--batch-size", "30")
    assert result.returncode == 2
    assert "--batch-size 30 is not divisible by --accumulation-steps 4" in result.stderr


def test_overhead_benchmark_smoke():
    result = run("benchmarks/overhead.py", "--smoke")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "4", "8"]
    assert all(float(row[3]) > 0 for row in rows)


def test_memory_benchmark_smoke():
    result = run("benchmarks/memory.py", "--smoke")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows[:2]] == ["1", "2"]
    # Checkpointing lowers the peak even at these tiny sizes (field 7: the peak ratio).
    assert all(0 < float(row[7]) < 1 for row in rows)


def test_compile_benchmark_smoke():
    result = run("benchmarks/compile.py", "--smoke", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| gpt ")]
    assert len(rows) == 1
    # hand-written and torch_accum: no graph break, one graph, no recompilation.
    cells = [cell.strip() for cell in rows[0].split("|")]
    assert cells[4:6] == ["0 · 1 · 0", "0 · 1 · 0"], rows[0]
    # aot_eager gives the same bits: the library and a second hand run equal the hand run.
    assert cells[6:8] == ["0.0e+00", "0.0e+00"], rows[0]


def test_ddp_example_under_torchrun_with_two_ranks():
    result = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "examples/ddp.py",
        "--epochs",
        "1",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    assert "epoch 1: 16 optimizer steps" in result.stdout
    assert "OK: parameters identical on all 2 rank(s)" in result.stdout


def test_ddp_example_rejects_bad_flags():
    result = run("examples/ddp.py", "--micro-batch-size", "0")
    assert result.returncode == 2
    assert "--micro-batch-size: expected a positive integer, got 0" in result.stderr


def test_ddp_benchmark_smoke():
    result = run("benchmarks/ddp.py", "--smoke", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "4"]
    # The count ratio (field 10) is exactly K.
    assert [float(row[10]) for row in rows] == [1.0, 4.0]


def test_auto_microbatch_example_matches_whole_batches():
    result = run("examples/auto_microbatch.py")
    assert result.returncode == 0, result.stderr
    assert "out-of-memory above 16: 2 replayed batch(es), then micro-batches of 16" in result.stdout
    assert "MATCH: both runs equal training on whole batches" in result.stdout
    result = run("examples/auto_microbatch.py", "--memory-budget-mib", "-1")
    assert result.returncode == 2
    assert "--memory-budget-mib: expected a positive number, got -1.0" in result.stderr


# ---------------------------------------------------------------- examples that need an extra
# Each stops with one line on stderr that names what to install, and exit status 2, instead
# of a traceback: when the package is missing, and when it is installed but fails to import
# (a torchvision built for another torch raises RuntimeError or OSError, not ImportError).
NEEDS_AN_EXTRA = [
    ("image_classification.py", "torchvision", "examples"),
    ("huggingface_causal_lm.py", "transformers", "hf"),
]


def run_example(script: str, *args: str, pythonpath: Path | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        # Before site-packages: a package there shadows an installed one.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def fake_package(folder: Path, name: str, error: str) -> Path:
    """A package ``name`` in ``folder`` whose import raises ``error`` (Python source)."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(f"raise {error}\n")
    return folder


@pytest.mark.parametrize(("script", "package", "extra"), NEEDS_AN_EXTRA)
def test_example_without_its_extra_says_what_to_install(script, package, extra):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    result = run_example(script)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"{script} needs {package} (ModuleNotFoundError: No module named '{package}'): "
        f"pip install -e '.[{extra}]'"
    ]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("script", "package", "extra", "error", "shown"),
    [
        (
            "image_classification.py",
            "torchvision",
            "examples",
            'RuntimeError("operator torchvision::nms does not exist")',
            "RuntimeError: operator torchvision::nms does not exist",
        ),
        (
            "huggingface_causal_lm.py",
            "transformers",
            "hf",
            'OSError("libtorch_cpu.so: cannot open shared object file\\nmore detail")',
            "OSError: libtorch_cpu.so: cannot open shared object file",
        ),
    ],
)
def test_example_with_a_broken_extra_says_what_to_install(
    script, package, extra, error, shown, tmp_path
):
    result = run_example(script, pythonpath=fake_package(tmp_path, package, error))
    assert result.returncode == 2, result.stderr[-3000:]
    # One line, even where the error's message has several.
    assert result.stderr.splitlines() == [
        f"{script} needs {package} ({shown}): pip install -e '.[{extra}]'"
    ]
    assert "Traceback" not in result.stderr


def test_sweep_without_a_working_matplotlib_skips_only_the_plot(tmp_path):
    # The plot is optional there: the table and the exactness check still run.
    # A matplotlib built for another numpy fails with more than ImportError.
    site = fake_package(tmp_path / "site", "matplotlib", 'AttributeError("_ARRAY_API not found")')
    plot = tmp_path / "sweep.png"
    result = run_example(
        "sweep_accumulation_steps.py",
        *("--accumulation-steps", "1", "2", "--effective-batch-size", "64", "--epochs", "1"),
        *("--plot", str(plot)),
        pythonpath=site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "(plot skipped: matplotlib does not import (AttributeError: _ARRAY_API not found); "
        "pip install -e '.[examples]', or pass --no-plot)"
    ) in result.stdout
    assert "fixed effective batch: losses identical across K" in result.stdout
    assert not plot.exists()
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="needs Tensor.grad_dtype")
def test_precision_benchmark_smoke():
    result = run("benchmarks/precision.py", "--smoke", timeout=240)
    assert result.returncode == 0, result.stderr
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("| MLP") or line.startswith("| GPT")
    ]
    assert len(rows) == 12  # 2 models x 2 dtypes x K in {1, 3, 4}
    assert "float32 / param dtype" in result.stdout


def test_autofit_example_trains_the_gpt_with_the_plan_exactly():
    result = run("examples/autofit.py", "--model", "gpt", "--budget-fraction", "0.3", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MATCH: 3 steps with the plan (micro-batches of" in result.stdout
    assert result.stdout.count("\n* ") == 1  # one chosen row in the printed table
    result = run("examples/autofit.py", "--budget-fraction", "1.5")
    assert result.returncode == 2
    assert "--budget-fraction: expected a number in (0, 1], got 1.5" in result.stderr


def test_autofit_benchmark_smoke():
    result = run("benchmarks/autofit.py", "--smoke", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| GPT")]
    assert [row.split("|")[2].strip().split()[0] for row in rows] == ["20%", "35%", "50%", "100%"]
    assert "OVER" not in result.stdout


def test_autofit_example_for_the_resnet_without_torchvision_says_what_to_install():
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    result = run_example("autofit.py", "--model", "resnet")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "autofit.py needs torchvision (ModuleNotFoundError: No module named 'torchvision'): "
        "pip install -e '.[examples]'"
    ]
