"""Every Python code block in README.md and docs/ runs as written."""

import re
from pathlib import Path

import pytest

from torch_accum._precision import HAS_GRAD_DTYPE

ROOT = Path(__file__).resolve().parent.parent
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{page.relative_to(ROOT)}:{index}")
    for page in PAGES
    for index, code in enumerate(CODE_BLOCK.findall(page.read_text()))
]


def test_the_pages_have_code_blocks():
    assert len(BLOCKS) >= 3


# Pages that compare with other libraries show their code too; it runs where they are
# installed (the `bench` extra) and is skipped elsewhere.
OTHER_LIBRARIES = {"accelerate", "lightning", "torchvision"}


@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code):
    try:
        exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    except ModuleNotFoundError as error:
        if error.name not in OTHER_LIBRARIES:
            raise
        pytest.skip(f"needs {error.name}")
    except ValueError as error:
        # bfloat16 weights accumulate in float32 through Tensor.grad_dtype (torch >= 2.10).
        if HAS_GRAD_DTYPE or "Tensor.grad_dtype" not in str(error):
            raise
        pytest.skip("needs Tensor.grad_dtype")
