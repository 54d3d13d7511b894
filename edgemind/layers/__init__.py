"""Layer kinds: a pure jax.numpy apply and a NumPy reference per kind, and their costs.

Importing this package registers every built-in kind. A new family of kinds lives in
its own module (``dense.py``, ``bert.py``) that calls
:func:`~edgemind.layers.registry.register` on import, and is imported below.
"""

from __future__ import annotations

from edgemind.layers import bert as bert
from edgemind.layers import dense as dense
from edgemind.layers import gemma3 as gemma3
from edgemind.layers import lm_head as lm_head
from edgemind.layers import pooling as pooling
from edgemind.layers.cost import (
    cost_table,
    gathered_tensors,
    input_structs,
    param_structs,
    struct_nbytes,
    unit_cost,
)
from edgemind.layers.registry import (
    TRACE_COUNTS,
    LayerKind,
    get_kind,
    jitted,
    known_kinds,
    reference,
    register,
)

__all__ = [
    "TRACE_COUNTS",
    "LayerKind",
    "cost_table",
    "gathered_tensors",
    "get_kind",
    "input_structs",
    "jitted",
    "known_kinds",
    "param_structs",
    "reference",
    "register",
    "struct_nbytes",
    "unit_cost",
]
