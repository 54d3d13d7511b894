"""edgemind: run neural networks under a hard memory budget by streaming weights.

The public API, declared here once. Names resolve lazily, so importing a pure part
(``edgemind.planner``, ``edgemind.policy``) does not import JAX.

>>> import edgemind
>>> edgemind.Policy().arena_capacity_bytes
52428800
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from edgemind.xla_env import apply_bound_settings

apply_bound_settings()  # before JAX starts its backend: see edgemind/xla_env.py

try:
    __version__ = version("edgemind-runtime")  # PyPI's "edgemind" is another project
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "EdgemindError": "edgemind.errors",
    "ModelFormatError": "edgemind.errors",
    "ChecksumError": "edgemind.errors",
    "PolicyError": "edgemind.errors",
    "InputError": "edgemind.errors",
    "PlanError": "edgemind.errors",
    "ConversionError": "edgemind.errors",
    "MetricsError": "edgemind.errors",
    "MissingExtraError": "edgemind.errors",
    "MemoryQuotaExceeded": "edgemind.errors",
    "MemoryBoundExceeded": "edgemind.errors",
    "MemoryBoundWarning": "edgemind.errors",
    "BOUND_ALLOWANCE_BYTES": "edgemind.runtime.memory",
    "Policy": "edgemind.policy",
    "load_policy": "edgemind.policy",
    "Manifest": "edgemind.weights.manifest",
    "load_manifest": "edgemind.weights.manifest",
    "ModelWriter": "edgemind.weights.writer",
    "TensorSource": "edgemind.weights.writer",
    "Plan": "edgemind.planner.plan",
    "CostTable": "edgemind.planner.plan",
    "make_plan": "edgemind.planner.schedule",
    "verify_plan": "edgemind.planner.verify",
    "save_plan": "edgemind.planner.planfile",
    "load_plan": "edgemind.planner.planfile",
    "cost_table": "edgemind.layers.cost",
    "Runtime": "edgemind.runtime.runtime",
    "run_model": "edgemind.runtime.runtime",
    "InMemoryModel": "edgemind.runtime.reference",
    "Result": "edgemind.runtime.report",
    "RunReport": "edgemind.runtime.report",
    "LayerTiming": "edgemind.runtime.report",
    "embed": "edgemind.embedding",
    "Embeddings": "edgemind.embedding",
    "SamplingParams": "edgemind.sampling",
    "Sampler": "edgemind.sampling",
    "StopMatcher": "edgemind.sampling",
    "Tokenizer": "edgemind.tokenizer",
    "Generation": "edgemind.runtime.generation",
    "GenerationReport": "edgemind.runtime.generation",
    "ContextTooLarge": "edgemind.runtime.generation",
    "generate_text": "edgemind.textgen",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgemind' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from edgemind.embedding import Embeddings, embed
    from edgemind.errors import (
        ChecksumError,
        ConversionError,
        EdgemindError,
        InputError,
        MemoryBoundExceeded,
        MemoryBoundWarning,
        MemoryQuotaExceeded,
        MetricsError,
        MissingExtraError,
        ModelFormatError,
        PlanError,
        PolicyError,
    )
    from edgemind.layers.cost import cost_table
    from edgemind.planner.plan import CostTable, Plan
    from edgemind.planner.planfile import load_plan, save_plan
    from edgemind.planner.schedule import make_plan
    from edgemind.planner.verify import verify_plan
    from edgemind.policy import Policy, load_policy
    from edgemind.runtime.generation import ContextTooLarge, Generation, GenerationReport
    from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES
    from edgemind.runtime.reference import InMemoryModel
    from edgemind.runtime.report import LayerTiming, Result, RunReport
    from edgemind.runtime.runtime import Runtime, run_model
    from edgemind.sampling import Sampler, SamplingParams, StopMatcher
    from edgemind.textgen import generate_text
    from edgemind.tokenizer import Tokenizer
    from edgemind.weights.manifest import Manifest, load_manifest
    from edgemind.weights.writer import ModelWriter, TensorSource
