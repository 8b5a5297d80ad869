"""How benchmarks/gpu.py runs and reports its sections: time budgets, timing, JSON, markdown.

Each section is a function ``(Context, Section) -> None`` that fills its ``Section`` with
rows (figures, the library next to the hand loop), notes and targets. ``run_section`` runs
it under a time budget (SIGALRM) and records an error or a timeout instead of raising, so
that one failure never loses the other sections; ``write`` saves what exists so far.
"""

from __future__ import annotations

import gc
import json
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class SectionTimeout(BaseException):
    """Raised by SIGALRM when a section's budget is spent (a BaseException: never swallowed)."""


@dataclass
class Section:
    name: str
    budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def row(self, **values: Any) -> None:
        self.rows.append(values)

    def target(self, name: str, value: Any, limit: str, ok: bool | None, source: str = "") -> None:
        """A check; ``ok=None``: not applicable in this run. ``source``: who set the limit."""
        entry = {"target": name, "value": value, "limit": limit, "passed": ok}
        self.targets.append({**entry, "source": source or "issue 27"})


@dataclass
class Context:
    device: torch.device
    smoke: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def size(self, gpu: Any, smoke: Any) -> Any:
        return smoke if self.smoke else gpu

    def gpu_target(self, sec: Section, name: str, value: Any, limit: str, ok: bool) -> None:
        """A target about GPU figures: checked on CUDA, "n/a" on the CPU."""
        sec.target(name, value, limit, ok if self.cuda else None)


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed(ctx: Context, fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()``: by CUDA events on CUDA, perf_counter on the CPU."""
    if not ctx.cuda:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def interleaved(ctx: Context, runs: dict[str, Callable[[], Any]], reps: int) -> dict[str, list]:
    """Time each run ``reps`` times in a rotating order, after one warm-up call each."""
    for run in runs.values():
        run()
    names, times = list(runs), {name: [] for name in runs}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(timed(ctx, runs[name]))
    return times


def ratios(times: dict[str, list[float]], name: str, reference: str) -> list[float]:
    return [a / b for a, b in zip(times[name], times[reference], strict=True)]


def run_section(ctx: Context, sec: Section, fn: Callable[[Context, Section], None]) -> None:
    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section {sec.name!r} ran past its budget of {sec.budget_s:.0f} s")

    alarm = hasattr(signal, "SIGALRM")  # not on Windows: no time limit there
    previous = signal.signal(signal.SIGALRM, on_alarm) if alarm else None
    if alarm:
        signal.setitimer(signal.ITIMER_REAL, sec.budget_s)
    start = time.perf_counter()
    try:
        fn(ctx, sec)
        sec.status = "ok"
    except SectionTimeout as error:
        sec.status, sec.error = "timeout", str(error)
    except Exception as error:
        sec.status, sec.error = "error", "".join(traceback.format_exception(error)[-6:])
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sec.seconds = time.perf_counter() - start
        if ctx.cuda:  # what a section may leave behind
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.set_sync_debug_mode(0)
        free_memory(ctx)


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# GPU acceptance run (`benchmarks/gpu.py`)",
        "",
        f"`{report['command']}` on {report['device']}: torch {report['torch']}, torch_accum "
        f"{report['torch_accum']}, Python {report['python']}, {report['started']}, "
        f"{report['seconds']:.0f} s",
    ]
    if report["smoke"]:
        lines += ["", "**CPU smoke run at tiny sizes: smoke figures, not GPU measurements.**"]
    result = {True: "pass", False: "**FAIL**", None: "n/a"}
    lines += ["", "## Targets", ""]
    lines += table([{**t, "passed": result[t["passed"]]} for t in report["targets"]])
    for name, sec in report["sections"].items():
        took = f"{sec['seconds']:.1f} s of {sec['budget_s']:.0f} s"
        lines += ["", f"## {name}: {sec['status']} ({took})", ""]
        lines += [f"- {note}" for note in sec["notes"]]
        lines += ["", "```", sec["error"].rstrip(), "```"] if sec["error"] else []
        lines += ["", *table(sec["rows"])] if sec["rows"] else []
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], sections: list[Section], out: Path) -> None:
    report["sections"] = {
        s.name: {k: v for k, v in vars(s).items() if k != "name"} for s in sections
    }
    report["targets"] = [{"section": s.name, **t} for s in sections for t in s.targets]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(report))
