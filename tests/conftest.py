import json
import os
import sys
from pathlib import Path

import pytest
import torch

# Test modules import the shared helpers next to them, and the example models
# (examples/gpt.py), as users would copy them.
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` without a CUDA device; under mutmut, fastest first.

    ``pytest -m cuda`` selects the tests that need CUDA (benchmarks/gpu.py runs them).
    mutmut stops at a mutant's first failing test (``-x``) but passes the tests in no
    particular order: a killed mutant should not wait for the slow tests it does not need.
    """
    if not torch.cuda.is_available():
        needs_cuda = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(needs_cuda)
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from mutants/
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", "") or not stats.exists():
        return
    duration = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: duration.get(item.nodeid, 0.0))
