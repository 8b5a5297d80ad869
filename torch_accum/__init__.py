"""torch_accum: exact gradient accumulation for PyTorch, as a drop-in context manager.

>>> from torch_accum import Accumulator
"""

from torch_accum.accumulator import Accumulator

__version__ = "0.1.0"

__all__ = ["Accumulator", "__version__"]
