import sys
from pathlib import Path

# Test modules import the shared helpers next to them, and the example models
# (examples/gpt.py), as users would copy them.
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
