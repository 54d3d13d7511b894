"""Gemma 3 decoder kinds: token embedding, the decoder block with its KV cache, final norm.

Registered on import, each a pure jax.numpy ``apply`` and an independent NumPy
``reference`` (float64, weights dequantized by the ``gguf`` package). The arithmetic is
the one ``docs/gemma3.md`` documents and checks against transformers and llama.cpp:

- ``gemma3_embed``: rows of the (block-quantized) token table, **gathered** by the
  runtime (one row per token id, never the whole table), dequantized and scaled by
  ``sqrt(hidden)`` rounded to float32.
- ``gemma3_block``: RMSNorm (weights multiplied as stored: the GGUF's already include
  Gemma's +1), q/k/v projections, per-head q/k RMSNorm, RoPE (rotate-half pairing),
  grouped-query attention over the KV cache and the chunk's own keys (causal, and for
  sliding layers only the ``window`` latest positions), output projection and its post
  norm, then the GeGLU feed-forward (tanh GELU) between its pre and post norms.
- ``rms_norm``: the final norm; with ``last`` it keeps only each row's last position
  (the one whose logits a generation step needs).

**The KV cache is planned state.** A block's state is ``k`` and ``v``, each
``(batch, ring, kv_heads * head_dim)``: ``ring`` is ``min(window, context)`` for sliding
layers (a ring buffer of the latest positions) and ``context`` for full-attention
layers, where ``context`` (a dim of the request shape) is the most positions a session
holds. A step takes a chunk of ``seq`` tokens whose first token is at sequence index
``ctx["start"]``; rows are left-padded (``ctx["pad"][b]`` leading positions of row
``b`` are padding, masked out, and a token's RoPE position is its index minus the
padding). ``apply`` reads the cache, attends over it and the chunk's keys, and returns
``(output, k_new, v_new)``; :func:`write_kv` then stores the chunk's keys and values at
ring slots ``index % ring``. Slot ``s`` of a ring holds, before a chunk starting at
index ``t``, the latest index ``i < t`` with ``i % ring == s``: that is all the mask
needs, so nothing but the arrays themselves is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgemind.dtypes import storage_type
from edgemind.layers.quant import dequantize, dequantize_params_numpy, storage_map, stored_matmul
from edgemind.layers.registry import (
    STATE_PREFIX,
    Context,
    LayerKind,
    Params,
    StateKind,
    StateShapes,
    register,
)

BLOCK_TENSORS = (
    "attn_norm",  # (hidden,) float32, every norm weight as stored (the +1 included)
    "attn_q",  # (heads * head_dim, hidden), blocks along hidden
    "attn_k",  # (kv_heads * head_dim, hidden)
    "attn_v",  # (kv_heads * head_dim, hidden)
    "attn_q_norm",  # (head_dim,)
    "attn_k_norm",  # (head_dim,)
    "attn_output",  # (hidden, heads * head_dim)
    "post_attention_norm",  # (hidden,)
    "ffn_norm",  # (hidden,)
    "ffn_gate",  # (ffn, hidden)
    "ffn_up",  # (ffn, hidden)
    "ffn_down",  # (hidden, ffn)
    "post_ffw_norm",  # (hidden,)
)
START = "start"  # ctx: (1,) int32, the sequence index of the chunk's first token
PAD = "pad"  # ctx: (batch,) int32, leading padding positions of each row
KV_DTYPES = {32: "float32", 16: "bfloat16"}  # dims["kv_bits"] -> the cache's dtype
QUERY_BLOCK = 128  # query rows whose scores exist at once (bounded attention)
KEY_BLOCK = 512  # keys whose scores exist at once, folded in by an online softmax
_MASKED = float(np.finfo(np.float32).min)  # the score of a key a query may not see


# ---------------------------------------------------------------------- shared pieces


def _rms_norm(x: jax.Array, w: Any, eps: float) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _linear(x: jax.Array, params: Params, name: str, storage: Mapping[str, str], out: int):
    """x (..., in) @ w.T for a weight stored dense or in blocks (dequantized in the jit)."""
    return stored_matmul(x, storage.get(name, "float32"), params[name], (out, x.shape[-1]))


def _inv_freq(head_dim: int, base: float) -> np.ndarray:
    """RoPE's inverse frequencies as transformers computes them (in float32)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate-half RoPE: x (batch, seq, heads, dim), positions (batch, seq)."""
    dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(_inv_freq(dim, base))
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (batch, seq, 1, dim)
    half = dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)


def ring_size(attention: str, window: int, context: int) -> int:
    """Cache positions a layer keeps: the window (sliding layers) or the whole context."""
    return min(window, context) if attention == "sliding" and window > 0 else context


def slot_indices(start: Any, ring: int, xp: Any = jnp) -> Any:
    """Sequence index held by each ring slot before a chunk starting at ``start``
    (negative: never written)."""
    slots = xp.arange(ring)
    return start - 1 - xp.mod(start - 1 - slots, ring)


# ---------------------------------------------------------------------- embedding


def embed_apply(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    hidden: int,
    vocab_size: int = 0,
    scale: float = 1.0,
    gathered: Any = (),
    storage: Any = (),
) -> jax.Array:
    """Token ids (batch, seq) -> (batch, seq, hidden): the gathered rows, dequantized."""
    del ctx, vocab_size, gathered
    rows = params["weight"]
    kind = storage_map(storage).get("weight", "float32")
    if not storage_type(kind).quantized:
        table = jnp.asarray(rows, jnp.float32)
    else:
        table = dequantize(kind, rows, (rows.shape[0], hidden))
    return table.reshape(*x.shape, hidden) * jnp.float32(scale)


def embed_reference(
    params: Params, x: Any, ctx: Context, *, hidden: int, scale: float = 1.0, storage: Any = (), **_
) -> np.ndarray:
    del ctx
    rows = dequantize_params_numpy(params, storage)["weight"]
    table = np.asarray(rows, np.float32).reshape(-1, hidden)
    return (table * np.float32(scale)).reshape(*np.shape(x), hidden)


# ---------------------------------------------------------------------- decoder block


def kv_shapes(
    dims: Mapping[str, int],
    *,
    kv_heads: int,
    head_dim: int,
    attention: str = "full",
    window: int = 0,
    **_: Any,
) -> StateShapes:
    """The block's cache for a request shape: k and v, (batch, ring, kv_heads * head_dim)."""
    context = int(dims.get("context", dims.get("seq", 1)))
    ring = ring_size(attention, window, context)
    dtype = KV_DTYPES.get(int(dims.get("kv_bits", 32)), "float32")
    shape = (int(dims["batch"]), ring, kv_heads * head_dim)
    return {"k": (shape, dtype), "v": (shape, dtype)}


def write_kv(state: Mapping[str, np.ndarray], updates: Any, ctx: Context, **_: Any) -> None:
    """Store a chunk's keys and values (batch, seq, kv) at ring slots ``index % ring``."""
    k_new, v_new = (np.asarray(u) for u in updates)
    ring, seq = state["k"].shape[1], k_new.shape[1]
    start = int(np.asarray(ctx[START]).reshape(-1)[0])
    keep = min(seq, ring)  # a chunk longer than the ring leaves only its last ``ring``
    slots = (start + seq - keep + np.arange(keep)) % ring
    state["k"][:, slots] = k_new[:, seq - keep :].astype(state["k"].dtype)
    state["v"][:, slots] = v_new[:, seq - keep :].astype(state["v"].dtype)


KeyPart = tuple[jax.Array, jax.Array, jax.Array]  # keys, values (batch, n, kv_heads, d), index (n,)


def _attention(q, parts: list[KeyPart], q_index, pad, window: int, scale: float) -> jax.Array:
    """q (batch, seq, heads, d) over the keys of ``parts`` (the cache, then the chunk's
    own), each key with its sequence index.

    A key is visible to a query when it is not padding, not later than the query and,
    with a window, among the ``window`` latest positions. Scores exist for
    :data:`QUERY_BLOCK` queries x :data:`KEY_BLOCK` keys at a time: key blocks are folded
    in with an online softmax (a running max and sum, as FlashAttention does), so the
    working set does not grow with the context and the cache is never copied whole.
    """
    batch, seq, heads, d = q.shape
    kv_heads = parts[0][0].shape[2]
    group = heads // kv_heads
    # (batch, kv_heads, group, seq, d): the query heads that share a key head together
    qg = q.reshape(batch, seq, kv_heads, group, d).transpose(0, 2, 3, 1, 4)

    def queries(qb: jax.Array, qi: jax.Array) -> jax.Array:
        rows = qb.shape[3]
        carry = (
            jnp.full((batch, kv_heads, group, rows), _MASKED, jnp.float32),
            jnp.zeros((batch, kv_heads, group, rows), jnp.float32),
            jnp.zeros((batch, kv_heads, group, rows, d), jnp.float32),
        )

        def absorb(carry, kb: jax.Array, vb: jax.Array, ib: jax.Array):
            top, total, acc = carry
            scores = jnp.einsum("bhgqd,bnhd->bhgqn", qb, kb.astype(jnp.float32)) * scale
            seen = (ib[None, None, :] >= pad[:, None, None]) & (ib[None, None, :] <= qi[..., None])
            if window > 0:
                seen = seen & (qi[..., None] - ib[None, None, :] < window)
            seen = seen[:, None, None]  # (batch, 1, 1, rows, keys)
            scores = jnp.where(seen, scores, _MASKED)
            new_top = jnp.maximum(top, scores.max(axis=-1))
            p = jnp.where(seen, jnp.exp(scores - new_top[..., None]), 0.0)
            fade = jnp.exp(top - new_top)
            acc = acc * fade[..., None] + jnp.einsum("bhgqn,bnhd->bhgqd", p, vb.astype(jnp.float32))
            return new_top, total * fade + p.sum(axis=-1), acc

        for keys, values, index in parts:
            n = keys.shape[1]
            whole = n // KEY_BLOCK if n > KEY_BLOCK else 0
            if whole:

                def body(i, c, keys=keys, values=values, index=index):
                    at = i * KEY_BLOCK
                    return absorb(
                        c,
                        jax.lax.dynamic_slice_in_dim(keys, at, KEY_BLOCK, axis=1),
                        jax.lax.dynamic_slice_in_dim(values, at, KEY_BLOCK, axis=1),
                        jax.lax.dynamic_slice_in_dim(index, at, KEY_BLOCK),
                    )

                carry = jax.lax.fori_loop(0, whole, body, carry)
            rest = whole * KEY_BLOCK
            if rest < n:
                carry = absorb(carry, keys[:, rest:], values[:, rest:], index[rest:])
        _, total, acc = carry
        # a padding query sees nothing: 0, never read (and never NaN)
        return acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]

    if seq <= QUERY_BLOCK:
        out = queries(qg, q_index)
    else:
        blocks = -(-seq // QUERY_BLOCK)
        padded = blocks * QUERY_BLOCK - seq
        qp = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, padded), (0, 0)))
        ip = jnp.pad(q_index, ((0, 0), (0, padded)), mode="edge")
        qs = qp.reshape(batch, kv_heads, group, blocks, QUERY_BLOCK, d).transpose(3, 0, 1, 2, 4, 5)
        iss = ip.reshape(batch, blocks, QUERY_BLOCK).transpose(1, 0, 2)
        out = jax.lax.map(lambda args: queries(*args), (qs, iss))  # (blocks, b, kvh, g, r, d)
        out = out.transpose(1, 2, 3, 0, 4, 5).reshape(batch, kv_heads, group, -1, d)[:, :, :, :seq]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads * d)


def block_apply(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ffn: int,
    eps: float,
    attention: str = "full",
    window: int = 0,
    rope_base: float = 10_000.0,
    storage: Any = (),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(batch, seq, hidden) -> (output, this chunk's k, v); see the module docstring."""
    types = storage_map(storage)
    x = jnp.asarray(x, jnp.float32)
    batch, seq, _ = x.shape
    start = jnp.asarray(ctx[START]).reshape(-1)[0].astype(jnp.int32)
    pad = jnp.asarray(ctx[PAD]).astype(jnp.int32)
    index = start + jnp.arange(seq, dtype=jnp.int32)  # sequence index of each chunk token
    q_index = jnp.broadcast_to(index, (batch, seq))
    positions = q_index - pad[:, None]  # RoPE positions: padding does not count

    h = _rms_norm(x, params["attn_norm"], eps)
    q = _linear(h, params, "attn_q", types, heads * head_dim)
    k = _linear(h, params, "attn_k", types, kv_heads * head_dim)
    v = _linear(h, params, "attn_v", types, kv_heads * head_dim)
    q = _rms_norm(q.reshape(batch, seq, heads, head_dim), params["attn_q_norm"], eps)
    k = _rms_norm(k.reshape(batch, seq, kv_heads, head_dim), params["attn_k_norm"], eps)
    q, k = _rope(q, positions, rope_base), _rope(k, positions, rope_base)
    v = v.reshape(batch, seq, kv_heads, head_dim)

    cache_k = jnp.asarray(ctx[STATE_PREFIX + "k"])  # the cache's dtype, cast per key block
    cache_v = jnp.asarray(ctx[STATE_PREFIX + "v"])
    ring = cache_k.shape[1]
    cached = (
        cache_k.reshape(batch, ring, kv_heads, head_dim),
        cache_v.reshape(batch, ring, kv_heads, head_dim),
        slot_indices(start, ring),
    )
    win = window if attention == "sliding" else 0
    a = _attention(q, [cached, (k, v, index)], q_index, pad, win, head_dim**-0.5)

    o = _linear(a, params, "attn_output", types, hidden)
    x = x + _rms_norm(o, params["post_attention_norm"], eps)
    h = _rms_norm(x, params["ffn_norm"], eps)
    gate = jax.nn.gelu(_linear(h, params, "ffn_gate", types, ffn), approximate=True)
    up = _linear(h, params, "ffn_up", types, ffn)
    down = _linear(gate * up, params, "ffn_down", types, hidden)
    out = x + _rms_norm(down, params["post_ffw_norm"], eps)
    kv = kv_heads * head_dim
    return out, k.reshape(batch, seq, kv), v.reshape(batch, seq, kv)


# ------------------------------------------------------------- NumPy reference (float64)


def _np_norm(x: np.ndarray, w: Any, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def _np_rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    dim = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions[..., None].astype(np.float64) * inv
    angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
    half = dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def block_reference(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    eps: float,
    attention: str = "full",
    window: int = 0,
    rope_base: float = 10_000.0,
    storage: Any = (),
    **_: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block in float64 with an explicit loop over queries and visible keys."""
    p = {k: np.asarray(v, np.float64) for k, v in dequantize_params_numpy(params, storage).items()}
    x = np.asarray(x, np.float64)
    batch, seq, _ = x.shape
    start = int(np.asarray(ctx[START]).reshape(-1)[0])
    pad = np.asarray(ctx[PAD]).astype(np.int64)
    index = start + np.arange(seq)
    positions = index[None, :] - pad[:, None]
    h = _np_norm(x, p["attn_norm"], eps)
    q = (h @ p["attn_q"].T).reshape(batch, seq, heads, head_dim)
    k = (h @ p["attn_k"].T).reshape(batch, seq, kv_heads, head_dim)
    v = (h @ p["attn_v"].T).reshape(batch, seq, kv_heads, head_dim)
    q = _np_rope(_np_norm(q, p["attn_q_norm"], eps), positions, rope_base)
    k = _np_rope(_np_norm(k, p["attn_k_norm"], eps), positions, rope_base)
    cache_k = np.asarray(ctx[STATE_PREFIX + "k"], np.float64)
    cache_v = np.asarray(ctx[STATE_PREFIX + "v"], np.float64)
    ring = cache_k.shape[1]
    keys = np.concatenate([cache_k.reshape(batch, ring, kv_heads, head_dim), k], axis=1)
    values = np.concatenate([cache_v.reshape(batch, ring, kv_heads, head_dim), v], axis=1)
    k_index = np.concatenate([slot_indices(start, ring, np), index])
    a = np.zeros((batch, seq, heads, head_dim))
    group = heads // kv_heads
    for b in range(batch):
        for i in range(seq):
            visible = (k_index >= pad[b]) & (k_index <= index[i])
            if attention == "sliding" and window > 0:
                visible &= index[i] - k_index < window
            if not visible.any():  # a padding position: nothing to attend to, never read
                continue
            for hd in range(heads):
                s = keys[b, visible, hd // group] @ q[b, i, hd] / math.sqrt(head_dim)
                w = np.exp(s - s.max())
                a[b, i, hd] = (w / w.sum()) @ values[b, visible, hd // group]
    o = a.reshape(batch, seq, heads * head_dim) @ p["attn_output"].T
    x = x + _np_norm(o, p["post_attention_norm"], eps)
    h = _np_norm(x, p["ffn_norm"], eps)
    g = h @ p["ffn_gate"].T
    gelu = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    down = (gelu * (h @ p["ffn_up"].T)) @ p["ffn_down"].T
    out = x + _np_norm(down, p["post_ffw_norm"], eps)
    kv = kv_heads * head_dim
    return (
        out.astype(np.float32),
        k.reshape(batch, seq, kv).astype(np.float32),
        v.reshape(batch, seq, kv).astype(np.float32),
    )


# ---------------------------------------------------------------------- final norm


def norm_apply(params: Params, x: Any, ctx: Context, *, eps: float, last: bool = False):
    """RMSNorm times the stored weight; ``last`` keeps only the last position of each row."""
    del ctx
    x = jnp.asarray(x, jnp.float32)
    return _rms_norm(x[:, -1:] if last else x, params["weight"], eps)


def norm_reference(params: Params, x: Any, ctx: Context, *, eps: float, last: bool = False):
    del ctx
    x = np.asarray(x, np.float64)
    return _np_norm(x[:, -1:] if last else x, params["weight"], eps).astype(np.float32)


EMBED = register(LayerKind("gemma3_embed", embed_apply, embed_reference, ("weight",)))
BLOCK = register(
    LayerKind(
        "gemma3_block",
        block_apply,
        block_reference,
        BLOCK_TENSORS,
        state=StateKind(kv_shapes, write_kv),
    )
)
RMS_NORM = register(LayerKind("rms_norm", norm_apply, norm_reference, ("weight",)))
