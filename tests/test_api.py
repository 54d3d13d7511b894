"""The public surface is declared once, in edgemind/__init__.py, and pinned here."""

from __future__ import annotations

import subprocess
import sys

import edgemind

EXPECTED = {
    "__version__",
    "SamplingParams",
    "Sampler",
    "StopMatcher",
    "Tokenizer",
    "Generation",
    "GenerationReport",
    "ContextTooLarge",
    "generate_text",
    "EdgemindError",
    "ModelFormatError",
    "ChecksumError",
    "PolicyError",
    "InputError",
    "PlanError",
    "ConversionError",
    "MetricsError",
    "MissingExtraError",
    "MemoryQuotaExceeded",
    "MemoryBoundExceeded",
    "MemoryBoundWarning",
    "BOUND_ALLOWANCE_BYTES",
    "Policy",
    "load_policy",
    "Manifest",
    "load_manifest",
    "ModelWriter",
    "TensorSource",
    "Plan",
    "CostTable",
    "make_plan",
    "verify_plan",
    "save_plan",
    "load_plan",
    "cost_table",
    "Runtime",
    "run_model",
    "InMemoryModel",
    "Result",
    "RunReport",
    "LayerTiming",
    "embed",
    "Embeddings",
}


def test_public_surface_is_pinned():
    assert set(edgemind.__all__) == EXPECTED


def test_every_public_name_resolves():
    for name in edgemind.__all__:
        assert getattr(edgemind, name) is not None


def test_errors_share_one_root():
    for name in EXPECTED:
        obj = getattr(edgemind, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, edgemind.EdgemindError)


def test_planner_and_policy_import_no_jax():
    code = (
        "import sys, edgemind.planner, edgemind.planner.verify, edgemind.policy; "
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
