"""benchmarks/gpu.py --smoke runs every section on the CPU and writes its JSON and markdown.

The GPU run itself needs a GPU; this keeps its code from rotting between GPU sessions, and
pins the figures that are exact on any device (the out-of-memory replay, the GradScaler's
skip and back-off, no synchronisation per micro-batch).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _gpu_report import Context, Section, run_section, write  # noqa: E402

SECTIONS = ["tests", "syncs", "precision", "oom", "fits", "overhead", "compile", "autofit"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    command = [sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def targets(report, section):
    return {t["target"]: t for t in report["targets"] if t["section"] == section}


def test_smoke_run_writes_every_section_with_figures_and_targets(smoke):
    report, _ = smoke
    assert report["smoke"] is True
    assert report["device"].startswith("cpu")
    assert report["torch"] and report["torch_accum"]
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section["error"])
        assert section["rows"], name
        assert section["targets"], name
        assert section["seconds"] <= section["budget_s"]
    for target in report["targets"]:
        assert set(target) == {"section", "target", "value", "limit", "passed", "source"}
        assert target["passed"] in (True, False, None)
    # GPU-only targets are recorded as not applicable on the CPU, with their value.
    fits = targets(report, "fits")
    assert fits["trains within the cap: K + checkpointing=True"]["passed"] is None
    assert targets(report, "overhead")["overhead: medium GPT, K=4"]["passed"] is None


def test_smoke_run_sets_the_library_next_to_the_hand_loop(smoke):
    report, _ = smoke
    loops = {row.get("loop") for row in report["sections"]["syncs"]["rows"]}
    assert loops == {"hand", "torch_accum"}
    precision = report["sections"]["precision"]["rows"]
    assert [row["loop"] for row in precision] == ["hand", "torch_accum"] * (len(precision) // 2)
    variants = [row["variant"] for row in report["sections"]["compile"]["rows"]]
    assert variants[0] == "hand, compiled" and "torch_accum, compiled" in variants
    overhead = report["sections"]["overhead"]["rows"]
    assert [(row["model"].split()[0], row["k"]) for row in overhead] == [
        (size, k) for size in ("small", "medium") for k in (1, 4, 8)
    ]
    assert all(row["median_ratio"] > 0 for row in overhead)


def test_smoke_run_checks_what_is_exact_on_any_device(smoke):
    report, _ = smoke
    oom = targets(report, "oom")
    assert oom["out-of-memory retries"]["value"] == 2
    assert oom["parameters and buffers bitwise equal to a run without out-of-memory errors"][
        "passed"
    ]
    precision = targets(report, "precision")
    assert precision["GradScaler: the scale after every step equals the hand loop's"]["passed"]
    assert precision["the non-finite window is skipped and the scale halved"]["passed"]
    syncs = targets(report, "syncs")
    for features in ("plain", "clip", "scaler", "scaler + clip"):
        assert syncs[f"{features}: syncs per micro-batch"]["value"] == 0
    # Every synchronisation the library adds to the hand loop's is named and explained.
    for row in report["sections"]["syncs"]["rows"]:
        if row["loop"] == "torch_accum":
            assert row["extra_syncs_vs_hand"], row
            assert "not explained" not in json.dumps(row["extra_syncs_vs_hand"])
    tests = targets(report, "tests")
    assert tests["-m cuda selects the CUDA tests, which skip without CUDA"]["passed"]


def test_smoke_run_plans_with_autofit_and_trains_each_plan_within_its_budget(smoke):
    report, _ = smoke
    autofit = targets(report, "autofit")
    for budget in ("20%", "50%", "100%"):
        peak = autofit[f"{budget}: planned micro-batch peak <= budget (trained, measured again)"]
        assert peak["passed"] and 0 < peak["value"] <= 1
        # What only a GPU can tell is left to it.
        assert autofit[f"{budget}: out-of-memory errors training with the plan"]["passed"] is None
    rows = [row for row in report["sections"]["autofit"]["rows"] if "plan" in row]
    assert [row["budget"] for row in rows] == ["20%", "50%", "100%"]
    assert all(row["out_of_memory_errors"] == 0 for row in rows)


def test_smoke_markdown_has_the_targets_and_every_section(smoke):
    report, markdown = smoke
    assert "CPU smoke run at tiny sizes: smoke figures, not GPU measurements." in markdown
    assert "## Targets" in markdown
    for name in SECTIONS:
        assert f"\n## {name}: ok (" in markdown
    assert markdown.count("| pass |") == sum(t["passed"] is True for t in report["targets"])


def test_a_failing_or_slow_section_is_recorded_and_the_run_goes_on(tmp_path):
    ctx = Context(device=torch.device("cpu"), smoke=True)

    def broken(ctx, sec):
        sec.row(figure=1.0)
        raise ValueError("boom")

    def slow(ctx, sec):
        sec.row(figure=2.0)
        time.sleep(5)

    sections = [Section("broken", 10), Section("slow", 0.5)]
    run_section(ctx, sections[0], broken)
    run_section(ctx, sections[1], slow)
    write({"command": "x", "device": "cpu", "torch": "t", "torch_accum": "a", "python": "p",
           "started": "s", "seconds": 1.0, "smoke": True}, sections, tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["sections"]["broken"]["status"] == "error"
    assert "ValueError: boom" in report["sections"]["broken"]["error"]
    assert report["sections"]["broken"]["rows"] == [{"figure": 1.0}]  # kept
    assert report["sections"]["slow"]["status"] == "timeout"
    assert report["sections"]["slow"]["seconds"] < 2
    assert report["sections"]["slow"]["rows"] == [{"figure": 2.0}]
    assert "## slow: timeout" in (tmp_path / "gpu.md").read_text()
