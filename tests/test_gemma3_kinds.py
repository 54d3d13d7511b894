"""The Gemma 3 kinds on small random configs: JAX apply against the NumPy reference.

The block keeps a KV cache (ring buffers for sliding layers): the tests drive the state
through several steps of different chunk sizes, with left padding, and check every
step's output and the cache against the float64 reference, which attends with an
explicit loop over the visible keys. The real model's parity with transformers is in
``test_gemma3_generate.py``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from edgemind.layers import gemma3
from edgemind.layers.registry import STATE_PREFIX, get_kind, jitted, state_layout

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 16, 4, 1, 8, 24


def block_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {
        "attn_norm": (HIDDEN,),
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_q_norm": (HEAD_DIM,),
        "attn_k_norm": (HEAD_DIM,),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "post_attention_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
        "post_ffw_norm": (HIDDEN,),
    }
    params = {}
    for name, shape in shapes.items():
        scale = 1.0 if len(shape) == 1 else 0.3
        base = 1.0 if len(shape) == 1 else 0.0  # norm weights near 1, as the GGUF stores
        params[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return params


def config(attention: str, window: int) -> dict:
    return {
        "hidden": HIDDEN,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "ffn": FFN,
        "eps": 1e-6,
        "attention": attention,
        "window": window,
        "rope_base": 10_000.0,
    }


def empty_state(cfg: dict, batch: int, context: int) -> dict[str, np.ndarray]:
    layout = state_layout(get_kind("gemma3_block"), {"batch": batch, "context": context}, cfg)
    return {name: np.zeros(shape, np.float32) for name, _, shape, _ in layout}


def run_steps(cfg, params, x, pads, chunks, context, use_reference, fresh=False):
    """Feed ``x`` (batch, seq, hidden) in chunks; returns the concatenated outputs.
    ``fresh``: trace the block again (after a test changed a module constant)."""
    state = empty_state(cfg, x.shape[0], context)
    if use_reference:
        fn = lambda p, h, c: gemma3.block_reference(p, h, c, **cfg)  # noqa: E731
    elif fresh:
        fn = jax.jit(lambda p, h, c: gemma3.block_apply(p, h, c, **cfg))
    else:
        fn = jitted("gemma3_block", cfg)
    outs, start = [], 0
    for size in chunks:
        ctx = {
            "start": np.array([start], np.int32),
            "pad": pads,
            **{STATE_PREFIX + k: v.copy() for k, v in state.items()},
        }
        out, k_new, v_new = fn(params, x[:, start : start + size], ctx)
        gemma3.write_kv(state, (k_new, v_new), ctx)
        outs.append(np.asarray(out))
        start += size
    return np.concatenate(outs, axis=1), state


@pytest.mark.parametrize(
    ("attention", "window", "context", "chunks"),
    [
        ("full", 0, 12, (4, 4, 1, 1, 1, 1)),
        ("sliding", 3, 12, (4, 4, 1, 1, 1, 1)),  # ring of 3 < chunk: keeps the last 3
        ("sliding", 5, 12, (1,) * 12),
        ("sliding", 5, 12, (12,)),  # one chunk: only the window's mask at work
    ],
)
def test_block_matches_the_reference_step_by_step(attention, window, context, chunks):
    rng = np.random.default_rng(7)
    params = block_params(rng)
    cfg = config(attention, window)
    x = rng.standard_normal((2, sum(chunks), HIDDEN)).astype(np.float32)
    pads = np.array([0, 3], np.int32)  # row 1 starts with three padding positions
    got, state = run_steps(cfg, params, x, pads, chunks, context, use_reference=False)
    want, ref_state = run_steps(cfg, params, x, pads, chunks, context, use_reference=True)
    real = np.ones(got.shape[:2], bool)
    real[1, :3] = False  # padding positions compute garbage nobody reads
    np.testing.assert_allclose(got[real], want[real], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(state["k"], ref_state["k"], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("key_block", [2, 3])
def test_key_blocks_fold_in_exactly(monkeypatch, key_block):
    """Keys in blocks smaller than the cache and the chunk (a loop, and a remainder):
    the online softmax gives the reference's result."""
    monkeypatch.setattr(gemma3, "KEY_BLOCK", key_block)
    rng = np.random.default_rng(11)
    params, cfg = block_params(rng), config("full", 0)
    x = rng.standard_normal((2, 9, HIDDEN)).astype(np.float32)
    pads = np.array([1, 0], np.int32)
    got, _ = run_steps(cfg, params, x, pads, (5, 3, 1), 10, False, fresh=True)
    want, _ = run_steps(cfg, params, x, pads, (5, 3, 1), 10, True)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=2e-4, atol=2e-4)


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(3)
    params, cfg = block_params(rng), config("sliding", 4)
    x = rng.standard_normal((1, 10, HIDDEN)).astype(np.float32)
    pads = np.zeros(1, np.int32)
    whole, _ = run_steps(cfg, params, x, pads, (10,), 16, use_reference=False)
    steps, _ = run_steps(cfg, params, x, pads, (3, 3, 2, 1, 1), 16, use_reference=False)
    tokens, _ = run_steps(cfg, params, x, pads, (1,) * 10, 16, use_reference=False)
    np.testing.assert_allclose(steps, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens, whole, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_a_row():
    """A left-padded row computes what it computes alone: padding is masked and RoPE
    positions start after it."""
    rng = np.random.default_rng(5)
    params, cfg = block_params(rng), config("full", 0)
    x = rng.standard_normal((1, 6, HIDDEN)).astype(np.float32)
    alone, _ = run_steps(cfg, params, x, np.zeros(1, np.int32), (6,), 8, use_reference=False)
    padded_x = np.concatenate([rng.standard_normal((1, 2, HIDDEN)).astype(np.float32), x], 1)
    padded, _ = run_steps(cfg, params, padded_x, np.array([2], np.int32), (8,), 8, False)
    np.testing.assert_allclose(padded[:, 2:], alone, rtol=1e-5, atol=1e-5)


def test_ring_slots_hold_the_latest_positions():
    # before a chunk at 7 with a ring of 4: slots 0..3 hold positions 4, 5, 6, 3
    assert list(np.asarray(gemma3.slot_indices(7, 4))) == [4, 5, 6, 3]
    assert list(np.asarray(gemma3.slot_indices(0, 3))) == [-3, -2, -1]  # nothing written


def test_state_is_sized_by_context_window_and_kv_bits():
    kind = get_kind("gemma3_block")
    sliding, full = config("sliding", 5), config("full", 0)
    dims = {"batch": 2, "context": 12}
    assert [s for _, _, s, _ in state_layout(kind, dims, sliding)] == [(2, 5, 8), (2, 5, 8)]
    assert [s for _, _, s, _ in state_layout(kind, dims, full)] == [(2, 12, 8), (2, 12, 8)]
    half = state_layout(kind, {**dims, "kv_bits": 16}, full)
    assert {d for *_, d in half} == {"bfloat16"}


def test_embedding_and_final_norm_match_their_references():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((6, HIDDEN)).astype(np.float32)
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    cfg = {"hidden": HIDDEN, "scale": float(np.sqrt(HIDDEN)), "gathered": ["weight"]}
    got = jitted("gemma3_embed", cfg)({"weight": rows}, ids, {})
    want = gemma3.embed_reference({"weight": rows}, ids, {}, **cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    w = {"weight": rng.standard_normal(HIDDEN).astype(np.float32)}
    x = rng.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    got = jax.device_get(jitted("rms_norm", {"eps": 1e-6, "last": True})(w, x, {}))
    assert got.shape == (2, 1, HIDDEN)
    np.testing.assert_allclose(got, gemma3.norm_reference(w, x, {}, eps=1e-6, last=True), 1e-5)
