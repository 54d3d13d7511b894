"""Blocked attention: equal to a NumPy softmax attention, with memory linear in the sequence."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from edgemind.layers.attention import blocked_attention


def reference(q, k, v, keep=None, causal=False):
    """Float64 softmax attention over whole matrices, per head (GQA by repetition)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _, heads, seq_q, d = q.shape
    group = heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)  # (batch, heads, seq_q, seq_k)
    allowed = np.ones(scores.shape, bool)
    if keep is not None:
        allowed &= np.asarray(keep, bool)[:, None, None, :]
    if causal:
        offset = k.shape[2] - seq_q
        allowed &= np.arange(k.shape[2])[None, :] <= np.arange(seq_q)[:, None] + offset
    scores = np.where(allowed, scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ v


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "seq_q", "seq_k", "block", "causal", "masked"),
    [
        (2, 4, 4, 37, 37, 8, False, True),  # a ragged last block, padded keys
        (1, 4, 1, 20, 20, 128, True, False),  # one block; grouped-query, causal
        (3, 2, 2, 9, 9, 1, False, True),  # one row per block
        (1, 4, 2, 5, 12, 2, True, False),  # queries are the last 5 of 12 positions
    ],
)
def test_blocked_attention_equals_whole_matrix_attention(
    batch, heads, kv_heads, seq_q, seq_k, block, causal, masked
):
    rng = np.random.default_rng(seq_q * 100 + block)
    q = rng.standard_normal((batch, heads, seq_q, 16), np.float32)
    k = rng.standard_normal((batch, kv_heads, seq_k, 16), np.float32)
    v = rng.standard_normal((batch, kv_heads, seq_k, 16), np.float32)
    keep = None
    if masked:
        keep = np.ones((batch, seq_k), bool)
        keep[0, seq_k // 2 :] = False  # the first row's second half is padding
    fn = jax.jit(
        lambda q, k, v, keep: blocked_attention(q, k, v, keep, block_rows=block, causal=causal)
    )
    got = np.asarray(fn(q, k, v, keep))
    np.testing.assert_allclose(got, reference(q, k, v, keep, causal), rtol=2e-5, atol=2e-5)


def temp_bytes(seq: int, block: int) -> int:
    structs = [jax.ShapeDtypeStruct((4, 12, seq, 32), np.float32)] * 3
    fn = jax.jit(lambda q, k, v: blocked_attention(q, k, v, block_rows=block))
    stats = fn.lower(*structs).compile().memory_analysis()
    return stats.temp_size_in_bytes


def test_attention_temporaries_grow_linearly_with_the_sequence():
    """Doubling the sequence doubles the scratch (whole-matrix scores would quadruple),
    and the block size, not the sequence, sets the scores' share of it."""
    small, large = temp_bytes(512, 64), temp_bytes(1024, 64)
    scores_whole = 4 * 12 * 1024 * 1024 * 4  # every head's scores at 1024 tokens: 192 MiB
    assert large <= 2.2 * small
    assert large < scores_whole / 8
