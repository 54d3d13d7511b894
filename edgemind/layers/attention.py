"""Attention whose memory grows linearly with the sequence: one head and one block of
queries at a time.

All heads' scores at once are ``batch * heads * seq_q * seq_k`` floats: 48 MiB for
MiniLM at batch 16 x 256 tokens, and growing with the square of the sequence. Here a
``lax.map`` walks the heads and, inside each, the query blocks of
:data:`BLOCK_ROWS` rows, so the largest temporary is one block's scores,
``batch * block * seq_k`` floats (2 MiB at batch 16, 256 keys, 128 rows), linear in
the sequence. The block size is part of the layer's config, so the compiled unit and
its measured working set are those of that block size. The arithmetic per row is the
same as the unblocked softmax (each query row's softmax is over all its keys), so
results equal the previous kernel's to float rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BLOCK_ROWS = 128  # query rows per block: the default, stated in docs/design.md


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keep: jax.Array | None = None,
    *,
    block_rows: int = BLOCK_ROWS,
    causal: bool = False,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention, a head and a query block at a time.

    q: (batch, heads, seq_q, d); k, v: (batch, kv_heads, seq_k, d) with ``heads`` a
    multiple of ``kv_heads`` (grouped-query attention shares a key/value head among
    ``heads // kv_heads`` query heads); keep: (batch, seq_k) booleans, False for padded
    keys; ``causal`` hides key j from query i when j > i + (seq_k - seq_q) (the queries
    are the last ``seq_q`` positions). Returns (batch, heads, seq_q, d).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 5, 4), np.float32) for _ in range(3))
    >>> a = blocked_attention(q, k, v, block_rows=2)
    >>> b = blocked_attention(q, k, v, block_rows=8)
    >>> bool(np.allclose(a, b, atol=1e-6))
    True
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)  # NumPy in: jax arrays to index
    batch, heads, seq_q, d = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if block_rows < 1 or heads % kv_heads:
        raise ValueError(
            f"attention: block_rows must be >= 1 ({block_rows}) and heads ({heads}) a "
            f"multiple of kv_heads ({kv_heads})"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = min(block_rows, seq_q)
    blocks = -(-seq_q // rows)
    padded = jnp.pad(q, ((0, 0), (0, 0), (0, blocks * rows - seq_q), (0, 0)))
    # (heads, blocks, batch, rows, d): the map's leading axes
    qb = padded.reshape(batch, heads, blocks, rows, d).transpose(1, 2, 0, 3, 4)
    starts = jnp.arange(blocks) * rows
    group = heads // kv_heads
    k_heads = k.transpose(1, 0, 2, 3)  # (kv_heads, batch, seq_k, d)
    v_heads = v.transpose(1, 0, 2, 3)

    def one_head(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        q_head, h = args  # (blocks, batch, rows, d), head index
        kh, vh = k_heads[h // group], v_heads[h // group]  # (batch, seq_k, d)

        def one_block(block: tuple[jax.Array, jax.Array]) -> jax.Array:
            qi, start = block  # (batch, rows, d), first query row
            scores = (qi @ kh.transpose(0, 2, 1)) * scale  # (batch, rows, seq_k)
            allowed = jnp.ones((1, 1, seq_k), bool) if keep is None else keep[:, None, :]
            if causal:
                query = start + jnp.arange(rows)[:, None] + (seq_k - seq_q)
                allowed = allowed & (jnp.arange(seq_k)[None, :] <= query)[None]
            scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
            return jax.nn.softmax(scores, axis=-1) @ vh  # (batch, rows, d)

        return jax.lax.map(one_block, (q_head, starts))

    out = jax.lax.map(one_head, (qb, jnp.arange(heads)))  # (heads, blocks, batch, rows, d)
    out = out.transpose(2, 0, 1, 3, 4).reshape(batch, heads, blocks * rows, d)
    return out[:, :, :seq_q]
