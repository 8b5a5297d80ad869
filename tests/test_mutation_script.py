"""benchmarks/mutation.py: which mutants a run skips, and when a listed equivalent is stale.

A listed equivalent is left out of the run and of the score only while mutmut's hash of its
function is the one recorded when it was judged; these tests build a tiny ``mutants/``
(mutmut's .meta files) instead of running mutmut.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mutation.py"
FUNCTION = "torch_accum.progress.xǁProgressBarǁclose"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script, pointed at a scratch repository with one function of three mutants."""
    module = load_script()
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EQUIVALENT", tmp_path / "equivalent.txt")
    monkeypatch.setattr(module, "SURVIVORS", tmp_path / "survivors.txt")
    monkeypatch.setattr(module, "RECHECK", tmp_path / "mutants" / "recheck.json")
    (tmp_path / "survivors.txt").write_text("")
    (tmp_path / "equivalent.txt").write_text("")
    write_meta(tmp_path, function_hash="aaaaaaaaaaaa")
    return module


def write_meta(root: Path, *, function_hash: str) -> None:
    meta = root / "mutants" / "torch_accum" / "progress.py.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    codes = {f"{FUNCTION}__mutmut_{i}": None for i in (1, 2, 3)}
    meta.write_text(
        json.dumps(
            {
                "exit_code_by_key": codes,
                "hash_by_function_name": {"xǁProgressBarǁclose": function_hash},
            }
        )
    )


def arguments(**given: object) -> argparse.Namespace:
    defaults = {"rerun_survivors": False, "rerun_timeouts": False, "modules": []}
    return argparse.Namespace(**{**defaults, "with_equivalents": False, **given})


def test_a_current_equivalent_is_not_run_and_a_stale_one_is(script: ModuleType) -> None:
    script.EQUIVALENT.write_text(
        "# comment\n"
        f"{FUNCTION}__mutmut_1 aaaaaaaaaaaa the text of a message nobody reads\n"
        f"{FUNCTION}__mutmut_2 bbbbbbbbbbbb judged before the function changed\n"
        f"{FUNCTION}__mutmut_3 no hash recorded yet\n"
    )
    assert script.equivalent_mutants() == {
        f"{FUNCTION}__mutmut_1": "the text of a message nobody reads"
    }
    assert script.stale() == [f"{FUNCTION}__mutmut_2", f"{FUNCTION}__mutmut_3"]
    assert script.to_run(arguments()) == [f"{FUNCTION}__mutmut_2", f"{FUNCTION}__mutmut_3"]
    assert len(script.to_run(arguments(with_equivalents=True))) == 3


def test_once_the_function_changes_no_listed_equivalent_is_skipped(script: ModuleType) -> None:
    script.EQUIVALENT.write_text(f"{FUNCTION}__mutmut_1 aaaaaaaaaaaa a reason\n")
    write_meta(script.ROOT, function_hash="cccccccccccc")
    assert script.equivalent_mutants() == {}
    assert len(script.to_run(arguments())) == 3


def test_stamping_records_the_current_hash_and_keeps_comments_and_reasons(
    script: ModuleType,
) -> None:
    script.EQUIVALENT.write_text(
        f"# why\n{FUNCTION}__mutmut_1 a reason\n{FUNCTION}__mutmut_2 bbbbbbbbbbbb another\n"
    )
    script.stamp()
    assert script.EQUIVALENT.read_text() == (
        f"# why\n{FUNCTION}__mutmut_1 aaaaaaaaaaaa a reason\n"
        f"{FUNCTION}__mutmut_2 aaaaaaaaaaaa another\n"
    )
    assert set(script.equivalent_mutants()) == {f"{FUNCTION}__mutmut_1", f"{FUNCTION}__mutmut_2"}


def test_a_survivor_is_explained_only_while_its_function_is_unchanged(script: ModuleType) -> None:
    script.SURVIVORS.write_text(f"{FUNCTION}__mutmut_3 needs a CUDA device\n")
    assert script.explained_survivors() == {}
    assert script.stale() == [f"{FUNCTION}__mutmut_3"]
    script.stamp()
    assert script.explained_survivors() == {f"{FUNCTION}__mutmut_3": "needs a CUDA device"}
    write_meta(script.ROOT, function_hash="cccccccccccc")
    assert script.explained_survivors() == {}


def test_stamping_an_unknown_mutant_names_it(script: ModuleType) -> None:
    script.EQUIVALENT.write_text("torch_accum.progress.x_gone__mutmut_1 a reason\n")
    with pytest.raises(
        SystemExit,
        match=r"no mutant torch_accum\.progress\.x_gone__mutmut_1; remove its line in equivalent\.txt",
    ):
        script.stamp()


def test_a_rerun_takes_the_survivors_but_not_the_current_equivalents(script: ModuleType) -> None:
    write_meta(script.ROOT, function_hash="aaaaaaaaaaaa")
    meta = script.ROOT / "mutants" / "torch_accum" / "progress.py.meta"
    data = json.loads(meta.read_text())
    data["exit_code_by_key"] = {name: 0 for name in data["exit_code_by_key"]}
    meta.write_text(json.dumps(data))
    script.EQUIVALENT.write_text(f"{FUNCTION}__mutmut_1 aaaaaaaaaaaa a reason\n")
    assert script.to_run(arguments(rerun_survivors=True)) == [
        f"{FUNCTION}__mutmut_2",
        f"{FUNCTION}__mutmut_3",
    ]
    assert script.to_run(arguments()) == []  # every verdict is in: nothing to go on with
