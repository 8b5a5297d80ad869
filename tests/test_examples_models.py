"""The model examples (ResNet-18 image classification, character-level GPT) run as documented.

The image example needs torchvision; its tests are skipped where it does not import.
"""

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import torchvision  # noqa: F401
except Exception:  # a torchvision built for another torch fails with more than ImportError
    HAS_TORCHVISION = False
else:
    HAS_TORCHVISION = True
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision does not import")
HAS_TQDM = importlib.util.find_spec("tqdm") is not None

LOSS_LINE = re.compile(
    r"^loss (\d+\.\d+) -> (\d+\.\d+) over (\d+) optimizer steps "
    r"\(token-weighted, (\d+) micro-batches per step\)$",
    re.MULTILINE,
)
DONE_LINE = re.compile(
    r"^done: (\d+) optimizer steps of (\d+) images \((\d+) x (\d+)\), "
    r"last window loss (\d+\.\d+), checkpointed (\d+) blocks, \d+\.\d s$",
    re.MULTILINE,
)


def run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # One thread per process: these models are too small to gain from more, and when the
    # suite runs beside other jobs, oversubscribed threads make the runs several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def assert_usage_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def usage_error(main: Callable[[list[str]], int], argv: list[str], capsys) -> str:
    """What ``main(argv)`` prints when it exits as argparse does on a bad flag (status 2).

    In-process: the flags are checked before any model is built, and a subprocess would
    spend seconds importing torch for each case.
    """
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- language model
def test_language_model_loss_goes_down():
    result = run("language_model.py", "--steps", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    match = LOSS_LINE.search(result.stdout)
    assert match, result.stdout
    first, last, steps, per_step = match.groups()
    assert float(last) < float(first)
    assert (int(steps), int(per_step)) == (12, 4)
    # The default micro-batches differ in size: the case that token weights exist for.
    low, high = re.search(r"held (\d+) to (\d+) tokens", result.stdout).groups()
    assert int(low) < int(high)


def test_language_model_with_checkpointing_and_other_flags():
    result = run(
        "language_model.py",
        "--checkpointing",
        "--steps",
        "6",
        "--accumulation-steps",
        "3",
        "--micro-batch-size",
        "4",
        "--lr",
        "5e-3",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpointed 2 blocks" in result.stdout
    match = LOSS_LINE.search(result.stdout)
    assert match, result.stdout
    first, last, steps, per_step = match.groups()
    assert float(last) < float(first)
    assert (int(steps), int(per_step)) == (6, 3)


def test_language_model_trains_on_a_given_text(tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(["abc abc abc.", "ab ab.", "", "a b c a b c a b c."] * 3))
    result = run(
        "language_model.py", "--text", str(text), "--steps", "3", "--micro-batch-size", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "9 sentences of 6 to 18 characters" in result.stdout
    assert LOSS_LINE.search(result.stdout), result.stdout


def test_language_model_rejects_bad_flags_with_the_fix():
    result = run("language_model.py", "--accumulation-steps", "0", timeout=60)
    assert_usage_error(result, "--accumulation-steps: expected a positive integer, got 0")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-0.1"], "--lr: expected a positive number, got -0.1"),
        (["--steps", "1.5"], "--steps: expected a positive integer, got '1.5'"),
        (
            ["--micro-batch-size", "500"],
            "has 87 non-blank lines, fewer than --micro-batch-size 500; pass a smaller",
        ),
        (["--text", "no/such/file.txt"], "--text no/such/file.txt: cannot read it"),
    ],
)
def test_language_model_flag_errors(flags, message, capsys):
    import language_model

    assert message in usage_error(language_model.main, flags, capsys)


@pytest.mark.skipif(HAS_TQDM, reason="tqdm is installed")
def test_progress_without_tqdm_says_how_to_get_it(capsys):
    import language_model

    error = usage_error(language_model.main, ["--progress"], capsys)
    assert "--progress needs tqdm: pip install tqdm, or leave out --progress" in error


@pytest.mark.skipif(not HAS_TQDM, reason="tqdm is not installed")
def test_progress_bar_counts_optimizer_steps():
    result = run("language_model.py", "--progress", "--steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3/3" in result.stderr
    # The bar shows the loss, so the per-step lines are left out.
    assert "step 3/3" not in result.stdout
    assert LOSS_LINE.search(result.stdout), result.stdout


# ---------------------------------------------------------------- image classification
@needs_torchvision
def test_image_classification_on_fake_data():
    result = run("image_classification.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ResNet-18 on FakeData (96 synthetic images)" in result.stdout
    match = DONE_LINE.search(result.stdout)
    assert match, result.stdout
    steps, images, accumulation, micro, loss, blocks = match.groups()
    assert (int(steps), int(images), int(accumulation), int(micro), int(blocks)) == (
        3,
        32,
        4,
        8,
        0,
    )
    assert 0 < float(loss) < 10  # 10 random classes: about ln 10 = 2.3
    assert "step 3/3: loss" in result.stdout


@needs_torchvision
def test_image_classification_checkpoints_the_resnet_blocks():
    result = run(
        "image_classification.py",
        "--checkpointing",
        "--steps",
        "2",
        "--accumulation-steps",
        "2",
        "--micro-batch-size",
        "4",
        "--max-grad-norm",
        "0.5",
        "--lr",
        "0.01",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = DONE_LINE.search(result.stdout)
    assert match, result.stdout
    # torchvision's ResNet-18 has two BasicBlocks in each of layer1 to layer4.
    assert match.groups()[:4] == ("2", "8", "2", "4")
    assert match.group(6) == "8"


@needs_torchvision
def test_image_classification_rejects_bad_flags_with_the_fix():
    result = run("image_classification.py", "--accumulation-steps", "0", timeout=60)
    assert_usage_error(result, "--accumulation-steps: expected a positive integer, got 0")


@needs_torchvision
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-1"], "--lr: expected a positive number, got -1.0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm: expected a positive number, got nan"),
        (["--micro-batch-size", "0"], "--micro-batch-size: expected a positive integer, got 0"),
        (["--workers", "-1"], "--workers: expected an integer >= 0, got -1"),
    ],
)
def test_image_classification_flag_errors(flags, message, capsys):
    import image_classification

    assert message in usage_error(image_classification.main, flags, capsys)


@needs_torchvision
def test_image_classification_says_where_the_cifar_files_go(tmp_path, capsys):
    import image_classification

    error = usage_error(image_classification.main, ["--data-dir", str(tmp_path)], capsys)
    folder = tmp_path / "cifar-10-batches-py"
    assert f"--data-dir {tmp_path}: the CIFAR-10 files must be in {folder}" in error
    assert "leave out --data-dir to train on synthetic FakeData" in error
    folder.mkdir()
    (folder / "data_batch_1").touch()
    error = usage_error(image_classification.main, ["--data-dir", str(folder)], capsys)
    assert "pass its parent folder" in error
    error = usage_error(image_classification.main, ["--data-dir", str(tmp_path)], capsys)
    assert "data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, " in error


@needs_torchvision
def test_autofit_example_plans_and_trains_a_resnet_within_its_budget():
    result = run("autofit.py", "--model", "resnet", "--steps", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(
        r"^resnet18: 2 steps of 16 images in micro-batches of (\d+) x (\d+), checkpointing "
        r"[\w ,]+, peak (\d+\.\d) of (\d+\.\d) MiB",
        result.stdout,
        re.MULTILINE,
    )
    assert match, result.stdout
    micro, steps, peak, budget = match.groups()
    assert int(micro) * int(steps) >= 16 and int(steps) > 1
    assert float(peak) <= float(budget)
