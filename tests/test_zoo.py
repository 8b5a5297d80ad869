"""`checkpointing=True` on the real models of benchmarks/zoo.py --smoke (issue 13).

One model per family whose structure once defeated it: timm's convnext_atto (blocks inside
same-class stages), torchvision's densenet121 (no container of repeated blocks; its dense
layers append to the list they are passed) and a Hugging Face Llama trained on a padded
batch (the KV cache its config switches on by default). Each must run without error, give
bit-identical gradients, and reach an activation peak within 10% of the best explicit
per-class policy. Needs the `zoo` extra; a model whose library does not import is skipped.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("zoo", ROOT / "benchmarks" / "zoo.py")
zoo = importlib.util.module_from_spec(spec)
sys.modules["zoo"] = zoo  # dataclasses look their module up by name
spec.loader.exec_module(zoo)

SMOKE = [case for case in zoo.CASES if case.smoke]


def needs(library: str) -> None:
    try:
        importlib.import_module(library)
    except Exception as error:  # a torchvision built for another torch fails with more
        pytest.skip(f"{library} does not import: {error}")


@pytest.fixture(scope="module")
def rows() -> dict:
    """The smoke models measured once (one timed repetition: the times are not checked)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs; more threads only add noise here
    try:
        measured = {}
        for case in SMOKE:
            try:
                importlib.import_module(case.library)
            except Exception:
                continue
            measured[case.name] = zoo.measure(case, repetitions=1)
        return measured
    finally:
        torch.set_num_threads(threads)


def test_smoke_covers_the_three_families():
    assert {case.library for case in SMOKE} == {"torchvision", "timm", "transformers"}
    assert len(zoo.CASES) >= 20
    assert len({case.name for case in zoo.CASES}) == len(zoo.CASES)


@pytest.mark.parametrize("case", SMOKE, ids=[case.name for case in SMOKE])
def test_checkpointing_true_runs_exactly_and_picks_the_blocks(case, rows):
    needs(case.library)
    row = rows[case.name]
    assert row.errors == [], "\n".join(row.errors)
    assert row.blocks, row
    # Bit-identical: float32, same seed, same input, dropout seeded the same before each run.
    assert row.grad_diff == 0.0, row
    assert row.noise == 0.0, "the model is not deterministic even without checkpointing"
    assert row.inexact_classes == {}, "explicit classes must be exact too"
    for mode, result in row.modes.items():
        assert result.status in ("ok", "n/a"), (mode, result)
        assert not result.grad_diff, (mode, result)
    assert row.best_peak is not None and row.peak is not None, row
    assert row.peak <= zoo.TARGET_BEST_POLICY * row.best_peak, (
        f"{case.name}: checkpointing=True wraps {row.blocks} for a peak ratio of "
        f"{row.peak:.3f}; checkpointing={row.best_class} reaches {row.best_peak:.3f}"
    )
    assert row.peak < 1.0 and row.retained < 1.0, row


def test_markdown_table_has_one_row_per_model(rows):
    if not rows:
        pytest.skip("none of torchvision, timm, transformers imports")
    table = zoo.markdown(list(rows.values())).splitlines()
    assert table[0] == "| " + " | ".join(zoo.COLUMNS) + " |"
    assert len(table) == 2 + len(rows)
    for line, name in zip(table[2:], rows):
        assert line.startswith(f"| {name} | ")
        assert line.count(" | ") == len(zoo.COLUMNS) - 1


def test_a_failure_is_a_row_that_says_so():
    def build():
        raise RuntimeError("no such model")

    row = zoo.measure(zoo.Case("tv/broken", build, "a model that cannot be built"))
    assert row.errors == ["build: RuntimeError: no such model"]
    assert zoo.cells(row)[-1] == "build: RuntimeError: no such model"
    assert zoo.cells(row, markdown=True)[-1] == "**build: RuntimeError: no such model**"
    assert "errors: 1 (tv/broken)" in zoo.summary([row])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "tv/resnet18,nope"], "unknown --models nope; known: tv/resnet18,"),
        (["--models", ","], "unknown --models ','; known: tv/resnet18,"),
        (["--repetitions", "0"], "--repetitions must be at least 1, got 0"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
    ],
)
def test_command_line_rejects_bad_flags_before_building_anything(argv, message, capsys):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exit_info:
        zoo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert torch.get_num_threads() == threads


def test_list_names_every_model(capsys):
    assert zoo.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [case.name for case in zoo.CASES]
