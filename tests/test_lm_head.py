"""The LM head kind: a (262144 x 640) Q8_0 vocabulary, 170 MiB, run in tiles in a 16 MiB
arena, equal to the float64 product of gguf's dequantized weights."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

from edgemind.layers.registry import jitted, reference
from edgemind.runtime import Runtime
from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES
from edgemind.units import MIB
from edgemind.weights import ModelWriter, TensorSource
from edgemind.weights.manifest import InputSpec

VOCAB, HIDDEN = 262144, 640
ROW_BYTES = HIDDEN // 32 * 34  # Q8_0: 20 blocks of 34 bytes per vocabulary row


def random_q8_0(rows: int, seed: int = 0) -> np.ndarray:
    """Random Q8_0 rows (uint8 (rows, ROW_BYTES)) with small finite f16 scales."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, HIDDEN // 32, 34), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (rows, HIDDEN // 32)).astype("<f2")
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, HIDDEN // 32, 2)
    return blocks.reshape(rows, ROW_BYTES)


def dequantized_logits(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ W.T in float64, W dequantized by gguf's NumPy code, 16384 rows at a time."""
    out = []
    for start in range(0, weight.shape[0], 16384):
        w = gguf.quants.dequantize(weight[start : start + 16384], gguf.GGMLQuantizationType.Q8_0)
        out.append(x.astype(np.float64) @ w.astype(np.float64).T)
    return np.concatenate(out, axis=-1)


def test_the_jitted_kind_matches_its_reference_on_small_vocabularies():
    weight, x = random_q8_0(300, seed=1), np.random.default_rng(2).standard_normal((3, HIDDEN))
    x = x.astype(np.float32)
    config = {"storage": "q8_0", "hidden": HIDDEN, "vocab": 300}
    got = np.asarray(jax.jit(jitted("lm_head", config))({"weight": weight}, x, {}))
    want = reference("lm_head", config)({"weight": weight}, x, {})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def head_model(tmp_path_factory):
    weight = random_q8_0(VOCAB)
    out = tmp_path_factory.mktemp("lm") / "head"
    with ModelWriter(out, "lm-head-170mib", [InputSpec("x", "float32", ("batch", HIDDEN))]) as w:
        source = TensorSource("weight", "q8_0", (VOCAB, HIDDEN), lambda: weight)
        w.add_layer("lm_head", "lm_head", {"storage": "q8_0", "hidden": HIDDEN, "vocab": VOCAB},
                    [source])  # fmt: skip
    return out, weight


@pytest.mark.slow
def test_a_170_mib_q8_0_head_runs_in_tiles_in_16_mib(head_model):
    model, weight = head_model
    x = np.random.default_rng(3).standard_normal((1, HIDDEN)).astype(np.float32)
    with Runtime.open(model, arena_capacity_bytes=16 * MIB, tiling="auto") as rt:
        plan = rt.plan(batch=1)
        assert plan.complete and plan.peak_bytes <= 16 * MIB
        tiles = [s for s in plan.steps if s.action == "run"]
        assert len(tiles) >= 10 and all(s.tile is not None for s in tiles)
        assert tiles[-1].tile == (tiles[-1].tile[0], VOCAB)
        result = rt.run(x)
    assert result.output.shape == (1, VOCAB)
    np.testing.assert_allclose(result.output, dequantized_logits(weight, x), rtol=1e-4, atol=1e-4)
    report = result.report
    assert report.bytes_read == VOCAB * ROW_BYTES  # 170 MiB streamed through 16 MiB
    assert report.observed_peak_bytes <= report.plan_peak_bytes + BOUND_ALLOWANCE_BYTES
