"""torch_accum: exact gradient accumulation for PyTorch, as a drop-in context manager.

>>> from torch_accum import Accumulator
"""

from torch_accum._window import WindowState
from torch_accum.accumulator import Accumulator
from torch_accum.checkpointing import Checkpointing, CheckpointPolicy
from torch_accum.memory import ActivationMemory, measure_activation_memory
from torch_accum.planner import Candidate, Plan, autofit

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "ActivationMemory",
    "Candidate",
    "CheckpointPolicy",
    "Checkpointing",
    "Plan",
    "WindowState",
    "__version__",
    "autofit",
    "measure_activation_memory",
]
