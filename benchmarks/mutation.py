"""Mutation testing of torch_accum with mutmut: run it, then print the score per module.

mutmut (configured in setup.cfg, [mutmut]) copies the package to ``mutants/``, makes every
mutant it can (flipped comparisons, changed numbers, dropped arguments, ...), records in one
run of the suite which tests call which function, and runs each mutant against those tests
only, fastest first. Too slow for CI (docs/testing.md has the time of the latest run; it can
be stopped and run again, and goes on where it stopped): run it before a release and record
the score in docs/testing.md, which also says what the numbers mean.

    pip install -e ".[dev,mutation]"
    python benchmarks/mutation.py --from-scratch         # everything, timed (docs/testing.md)
    python benchmarks/mutation.py                        # the mutants with no verdict yet
    python benchmarks/mutation.py torch_accum.progress   # one module (or several), again
    python benchmarks/mutation.py --report               # only print the last results
    python benchmarks/mutation.py --rerun-survivors      # after adding tests: run them again
    python benchmarks/mutation.py --rerun-timeouts       # timed out on a busy machine? again
    python benchmarks/mutation.py --recheck tests/test_window.py  # quicker: only these files
    python benchmarks/mutation.py torch_accum.distributed --recheck tests/test_distributed.py
    python benchmarks/mutation.py --stamp                # after judging survivors

Mutants listed in benchmarks/mutation_equivalent.txt (``mutant_name function_hash reason``)
are not run: a survivor by construction, each would run every test that reaches it, a third
of the whole run. The hash is mutmut's hash of the function's source when the mutant was
judged; once the function changes, mutmut numbers its mutants afresh, so the entry is stale:
the mutant runs and counts like any other until it is judged again and stamped
(``--with-equivalents`` runs the current ones too, to see that they still survive). The
survivors explained in benchmarks/mutation_survivors.txt carry the same hash: an
explanation holds only for the mutant it was written for.

``--recheck FILES`` runs each survivor against the tests in FILES that call its function
(found the way mutmut finds them), in one process; a kill found so is recorded in
``mutants/recheck.json`` and counted. The score counts a mutant as killed when a test failed
(or timed out) on it, and divides by all mutants that ran except the current equivalents:
survivors and mutants no test reaches count against it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.txt")
SURVIVORS = Path(__file__).with_name("mutation_survivors.txt")
# mutmut's exit codes (mutmut/stats.py): 1 and 3 a failing test, 36 and the SIGXCPU codes
# a timeout, 37 caught by the type checker; 0 survived; 5 and 33 no test calls the function.
TIMEOUTS = {36, -24, 24, 152}
KILLED = {1, 3, 37, 255} | TIMEOUTS
RECHECK = ROOT / "mutants" / "recheck.json"
SURVIVED = {0}
TIMED_OUT = "timed out"
NO_TESTS = {5, 33}
FUNCTION_HASH = re.compile(r"[0-9a-f]{12}")


class Listed(NamedTuple):
    reason: str
    function_hash: str  # "" where the line has none


def listed(path: Path) -> dict[str, Listed]:
    """``mutant name -> Listed`` from a mutation_*.txt file (``#`` starts a comment line)."""
    found: dict[str, Listed] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.strip().partition(" ")
            first, _, after = rest.partition(" ")
            if FUNCTION_HASH.fullmatch(first):
                found[name] = Listed(after.strip(), first)
            else:
                found[name] = Listed(rest.strip(), "")
    return found


def function_hashes() -> dict[str, str]:
    """mutmut's hash of each function's source, by the function part of a mutant's name."""
    hashes: dict[str, str] = {}
    for meta in sorted((ROOT / "mutants" / "torch_accum").glob("*.py.meta")):
        module = f"torch_accum.{meta.name.removesuffix('.py.meta')}"
        for function, digest in json.loads(meta.read_text())["hash_by_function_name"].items():
            hashes[f"{module}.{function}"] = digest
    return hashes


def function_of(mutant: str) -> str:
    # torch_accum.progress.xǁProgressBarǁclose__mutmut_1 -> torch_accum.progress.xǁProgressBarǁclose
    return mutant.rpartition("__mutmut_")[0]


def current(path: Path) -> dict[str, str]:
    """``mutant name -> reason`` of the entries of ``path`` whose function is unchanged."""
    hashes = function_hashes()
    return {
        name: entry.reason
        for name, entry in listed(path).items()
        if entry.function_hash and hashes.get(function_of(name)) == entry.function_hash
    }


def equivalent_mutants() -> dict[str, str]:
    """The listed equivalents that still hold: not run, and left out of the score."""
    return current(EQUIVALENT)


def explained_survivors() -> dict[str, str]:
    """``mutant name -> why no test here kills it`` from mutation_survivors.txt.

    These are not equivalent and count against the score: they need hardware the run does
    not have (a CUDA device), or their one observable effect is not pinned yet.
    """
    return current(SURVIVORS)


def stale() -> list[str]:
    """Listed mutants whose function changed since (or that have no hash): judge again."""
    return sorted(
        name for path in (EQUIVALENT, SURVIVORS) for name in set(listed(path)) - set(current(path))
    )


def stamp() -> None:
    """Write the current function hash into every entry of both lists."""
    hashes = function_hashes()
    for path in (EQUIVALENT, SURVIVORS):
        entries, lines = listed(path), []
        for line in path.read_text().splitlines():
            name = line.strip().partition(" ")[0]
            entry = None if line.lstrip().startswith("#") else entries.get(name)
            if entry is not None:
                if function_of(name) not in hashes:
                    raise SystemExit(f"--stamp: no mutant {name}; remove its line in {path.name}")
                line = f"{name} {hashes[function_of(name)]} {entry.reason}"
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")


def results() -> dict[str, int | None]:
    """Every mutant's exit code (None: not run yet), from mutmut's ``mutants/**/*.meta``."""
    codes: dict[str, int | None] = {}
    for meta in sorted((ROOT / "mutants" / "torch_accum").glob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    for name, (code, _) in rechecked().items():  # kills found by --recheck
        if code == 1 and codes.get(name) in SURVIVED | NO_TESTS:
            codes[name] = 1
    return codes


def rechecked() -> dict[str, tuple[int, str]]:
    """``mutant -> (pytest exit code, the test that failed)`` from ``--recheck`` runs."""
    if not RECHECK.exists():
        return {}
    found = json.loads(RECHECK.read_text())
    return {name: (v, "") if isinstance(v, int) else tuple(v) for name, v in found.items()}


def recheck(files: list[str], modules: list[str]) -> None:
    """Run every survivor (of ``modules``, if any) against the tests in ``files`` that reach
    its function."""
    equivalent = equivalent_mutants()
    names = [
        name
        for name, code in results().items()
        if code in SURVIVED
        and name not in equivalent
        and (not modules or module_of(name) in modules)
    ]
    # mutants/ holds a copy of tests/ from the start of the run: bring all of it up to date,
    # helpers included, so that the tests run here are the ones in the repository.
    shutil.copytree(ROOT / "tests", ROOT / "mutants" / "tests", dirs_exist_ok=True)
    command = [sys.executable, __file__, "--recheck-worker", json.dumps(names), *files]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "mutants")}
    subprocess.run(["nice", "-n", "19", *command], cwd=ROOT / "mutants", env=env, check=True)


def recheck_worker(names: list[str], files: list[str]) -> None:
    """In mutants/: find the tests that call each function, then run each mutant on them."""
    import signal
    from collections import defaultdict

    import pytest
    from mutmut.state import state

    covering: dict[str, list[str]] = defaultdict(list)

    failed: list[str] = []

    class FirstFailure:
        def pytest_runtest_logreport(self, report: Any) -> None:
            if report.failed:
                failed.append(report.nodeid)
                # Ranks that are threads give up after seconds; on a busy machine that is
                # the machine, not the mutant (check it with `mutmut apply` on a quiet one).
                if "ranks still running after" in report.longreprtext:
                    failed.append(TIMED_OUT)

    class Coverage:
        def pytest_runtest_teardown(self, item: Any, nextitem: Any) -> None:
            for function in state()._stats:
                covering[function].append(item.nodeid)
            state()._stats.clear()

    # Ranks that are processes run outside this process, where no mutant is seen.
    quiet = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--no-header", "-rN"]
    quiet += ["-k", "not processes"]
    os.environ["MUTANT_UNDER_TEST"] = "stats"
    if pytest.main([*quiet, *files], plugins=[Coverage()]) != 0:
        # A test that fails without a mutant would count every mutant it reaches as killed.
        raise SystemExit("--recheck: the tests fail on the unmutated package; fix them first")

    def too_slow(*_: Any) -> None:
        raise TimeoutError("mutant ran too long")

    signal.signal(signal.SIGALRM, too_slow)
    found = {name: list(value) for name, value in rechecked().items()}
    for name in names:
        tests = covering.get(name.partition("__mutmut_")[0], [])
        if not tests:
            continue
        os.environ["MUTANT_UNDER_TEST"] = name
        failed.clear()
        signal.alarm(120)
        code = int(pytest.main(["-x", *quiet, *tests], plugins=[FirstFailure()]))
        signal.alarm(0)
        if TIMED_OUT in failed:
            print(f"timed out, not counted: {name} {failed[0]}", flush=True)
            continue
        found[name] = [code, failed[0] if failed else ""]
        print(f"{'killed' if code else 'survived'}: {name} {found[name][1]}", flush=True)
        RECHECK.write_text(json.dumps(found, indent=1))


def module_of(mutant: str) -> str:
    # torch_accum.progress.xǁProgressBarǁclose__mutmut_1 -> torch_accum.progress
    return mutant.split(".x")[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]


def report(selected: list[str]) -> int:
    """Print the table and the unexplained survivors; 0 if the score is at least 95%."""
    equivalent, explained = equivalent_mutants(), explained_survivors()
    known = results()
    for name in sorted((set(equivalent) | set(explained)) - set(known)):
        print(f"a mutant listed in benchmarks/mutation_*.txt is unknown: {name}")
    for name in stale():
        print(
            f"listed, but its function changed since it was judged: {name} (counted as it "
            "ran; see it with `mutmut show`, fix or remove its line, then --stamp)"
        )
    codes = {
        name: code
        for name, code in known.items()
        if not selected or any(module_of(name) == s for s in selected)
    }
    rows: dict[str, Counter[str]] = {}
    unexplained: list[str] = []
    for name, code in codes.items():
        row = rows.setdefault(module_of(name), Counter())
        row["mutants"] += 1
        if code in KILLED:
            row["killed"] += 1
            row["timed out"] += code in TIMEOUTS
            if name in equivalent or name in explained:  # killed: the reason is stale
                print(f"listed as equivalent or surviving but killed: {name}")
        elif name in equivalent:
            row["equivalent"] += 1
        elif code is None:
            row["not run"] += 1
        else:
            row["no tests" if code in NO_TESTS else "survived"] += 1
            if name not in explained:
                unexplained.append(f"{name}  ({'no tests' if code in NO_TESTS else code})")
    columns = ["mutants", "killed", "equivalent", "survived", "no tests", "not run"]
    print(f"{'module':32}" + "".join(f"{c:>11}" for c in columns) + f"{'score':>9}")
    total: Counter[str] = Counter()
    for module, row in sorted(rows.items()):
        total.update(row)
        print(f"{module:32}" + "".join(f"{row[c]:>11}" for c in columns) + score(row))
    print(f"{'all':32}" + "".join(f"{total[c]:>11}" for c in columns) + score(total))
    if total["timed out"]:
        timed_out = total["timed out"]
        print(f"\n{timed_out} of the killed timed out (on a quiet machine: --rerun-timeouts)")
    if unexplained:
        print(f"\n{len(unexplained)} mutants neither killed nor explained (mutation_*.txt):")
        print("\n".join(f"  {line}" for line in sorted(unexplained)))
        print("see one with: mutmut show <name>")
    run = total["mutants"] - total["equivalent"] - total["not run"]
    return 0 if run and total["killed"] >= 0.95 * run else 1


def markdown() -> None:
    """The tables of docs/testing.md: score per module, and what became of each survivor."""
    equivalent = equivalent_mutants()
    rows: dict[str, Counter[str]] = {}
    for name, code in results().items():
        row = rows.setdefault(module_of(name), Counter())
        row["mutants"] += 1
        status = (
            "killed"
            if code in KILLED
            else "equivalent"
            if name in equivalent
            else "not run"
            if code is None
            else "no tests"
            if code in NO_TESTS
            else "survived"
        )
        row[status] += 1
    columns = ["mutants", "killed", "equivalent", "survived", "no tests", "not run"]
    print("| module | " + " | ".join(columns) + " | score |")
    print("| --- " * (len(columns) + 2) + "|")
    total: Counter[str] = Counter()
    for module, row in [*sorted(rows.items()), ("all", total)]:
        if module != "all":
            total.update(row)
        counts = " | ".join(str(row[c]) for c in columns)
        print(f"| {module} | {counts} | {score(row).strip()} |")
    killed_later = [(name, test) for name, (code, test) in sorted(rechecked().items()) if code == 1]
    if killed_later:  # by --recheck, after mutmut's run
        print("\n| mutant | killed by |\n| --- | --- |")
        for name, test in killed_later:
            print(f"| `{name}` | `{test}` |")
    print("\n| surviving mutant | why no test here kills it |\n| --- | --- |")
    for name, reason in explained_survivors().items():
        print(f"| `{name}` | {reason} |")
    print("\n| mutant | equivalent because |\n| --- | --- |")
    for name, reason in equivalent.items():
        print(f"| `{name}` | {reason} |")


def score(row: Counter[str]) -> str:
    run = row["mutants"] - row["equivalent"] - row["not run"]
    return f"{100 * row['killed'] / run:8.1f}%" if run else f"{'-':>9}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="e.g. torch_accum.progress (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutants")
    parser.add_argument("--report", action="store_true", help="print the last results only")
    parser.add_argument(
        "--rerun-survivors", action="store_true", help="run the surviving mutants again"
    )
    parser.add_argument(
        "--rerun-timeouts",
        action="store_true",
        help="run the mutants that timed out again (on a busy machine a test can time out)",
    )
    parser.add_argument("--recheck", nargs="+", metavar="FILE", help="test files, see above")
    parser.add_argument("--markdown", action="store_true", help="the tables for the docs")
    parser.add_argument(
        "--from-scratch", action="store_true", help="delete mutants/ first, then run all"
    )
    parser.add_argument(
        "--with-equivalents", action="store_true", help="run the listed equivalents too"
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help="record the current function hash of every listed equivalent and survivor",
    )
    parser.add_argument("--recheck-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recheck_worker:
        recheck_worker(json.loads(args.recheck_worker), args.modules)
        return 0
    if args.markdown:
        markdown()
        return 0
    if args.stamp:
        stamp()
        return report([])
    if args.recheck:
        recheck(args.recheck, args.modules)
    elif not args.report:
        if args.from_scratch:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        started = time.monotonic()
        generate_mutants(args.max_children)
        names = to_run(args)
        if names:
            code = run_mutmut(names, args.max_children)
            minutes = (time.monotonic() - started) / 60
            if code:
                print(f"\nmutmut stopped with exit code {code} after {minutes:.1f} min")
                return code
            print(f"\nran {len(names)} mutants in {minutes:.1f} min, generation and stats included")
    return report(args.modules)


def generate_mutants(max_children: int) -> None:
    """mutmut's first step alone: write mutants/ and the names of this source's mutants.

    Which mutants to run is decided from those names (a changed function's mutants are
    numbered afresh), so they must exist before ``mutmut run`` is given the list.
    """
    step = (
        "from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, "
        "setup_source_paths, store_lines_covered_by_tests\n"
        "copy_src_dir(); copy_also_copy_files(); setup_source_paths()\n"
        f"store_lines_covered_by_tests(); create_mutants({max_children})\n"
    )
    (ROOT / "mutants").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", step], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def to_run(args: argparse.Namespace) -> list[str]:
    """The mutants this command runs, the current equivalents left out."""
    codes = results()
    if args.rerun_survivors or args.rerun_timeouts:
        rerun = (SURVIVED if args.rerun_survivors else set()) | (
            TIMEOUTS if args.rerun_timeouts else set()
        )
        names = [name for name, code in codes.items() if code in rerun]
    elif args.modules:
        names = [name for name in codes if module_of(name) in args.modules]
    else:  # mutmut keeps every verdict until the function changes: go on where it stopped
        names = [name for name, code in codes.items() if code is None]
    skipped = set() if args.with_equivalents else set(equivalent_mutants())
    return [name for name in names if name not in skipped]


def run_mutmut(names: list[str], max_children: int) -> int:
    """``mutmut run`` on these mutants, at low priority, one torch thread each."""
    mutmut = Path(sys.executable).with_name("mutmut")
    # nice: the run takes every core it is given; the machine stays usable meanwhile.
    command = ["nice", "-n", "19", str(mutmut), "run", "--max-children", str(max_children)]
    # One torch thread per mutant and as many mutants as cores: more threads than cores
    # make OpenMP spin against the other mutant (tests time out, runs take hours).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ""  # import torch_accum from mutants/ only
    with subprocess.Popen(
        [*command, *names], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as run:
        output = run.stdout
        if output is None:
            raise RuntimeError("mutmut's output is not piped")
        relaying = True
        # Named mutants end mutmut's output with one line per mutant; the report says more.
        for chunk in iter(lambda: os.read(output.fileno(), 4096), b""):
            if relaying:
                shown, found, _ = chunk.partition(b"Mutant results")
                sys.stdout.buffer.write(shown)
                sys.stdout.flush()
                relaying = not found
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
