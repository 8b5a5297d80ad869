"""Optional imports for the examples: a missing extra stops the script with one line.

    with needs("torchvision", extra="examples"):
        import torchvision

prints ``image_classification.py needs torchvision (ModuleNotFoundError: No module named
'torchvision'): pip install -e '.[examples]'`` on stderr and exits with status 2, instead
of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def install_hint(extra: str) -> str:
    """The command that installs an extra of this checkout (run from the repository root)."""
    return f"pip install -e '.[{extra}]'"


def import_error(error: BaseException) -> str:
    """The error on one line, e.g. ``ModuleNotFoundError: No module named 'torchvision'``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@contextmanager
def needs(package: str, extra: str) -> Iterator[None]:
    """Around an example's optional imports; see the module docstring.

    Any exception counts, not only ImportError: a torchvision built for another torch is
    installed but fails to import with a RuntimeError (or an OSError for its C++ library).
    """
    try:
        yield
    except Exception as error:
        script = Path(sys.argv[0]).name or "this example"
        print(
            f"{script} needs {package} ({import_error(error)}): {install_hint(extra)}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
