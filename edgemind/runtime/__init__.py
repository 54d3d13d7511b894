"""The runtime: the arena, the streaming executor, and the all-in-memory reference.

The only code that touches JAX devices or does I/O on weight files.
"""

from edgemind.runtime.arena import Arena, aligned_buffer
from edgemind.runtime.reference import InMemoryModel
from edgemind.runtime.report import LayerTiming, Result, RunReport
from edgemind.runtime.runtime import Runtime, run_model

__all__ = [
    "Arena",
    "InMemoryModel",
    "LayerTiming",
    "Result",
    "RunReport",
    "Runtime",
    "aligned_buffer",
    "run_model",
]
