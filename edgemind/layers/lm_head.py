"""The LM head: logits = x @ weight.T over the vocabulary, dense or block-quantized.

``weight`` is ``(vocab, hidden)`` (GGUF's layout: blocks along ``hidden``), stored as
``storage`` (config): a dense float type, or quantized blocks that reach ``apply`` as
raw ``uint8`` rows and are dequantized inside the same jit
(:func:`edgemind.layers.quant.quant_matmul`). The vocabulary is usually the largest
tensor of a language model (Gemma 3 270M: 262,144 x 640 Q8_0, 170 MiB), so the kind runs
in **tiles** of vocabulary rows: each tile writes its rows' logits into the accumulator
(``concat``).

The NumPy reference dequantizes with the ``gguf`` package (an independent
implementation, bit-identical to ggml) and multiplies in float64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgemind.dtypes import storage_type
from edgemind.layers.quant import stored_matmul
from edgemind.layers.registry import Context, LayerKind, Params, TileKind, register


def _logits(w: Any, x: Any, storage: str, hidden: int) -> jax.Array:
    """x (..., hidden) @ w.T -> (..., rows of w), float32."""
    return stored_matmul(x, storage, w, (w.shape[0], hidden))


def lm_head_apply(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    storage: str = "float32",
    hidden: int = 0,
    vocab: int = 0,
) -> jax.Array:
    """(..., hidden) -> (..., vocab) logits. (``vocab`` sizes the tiles' accumulator.)"""
    del ctx, vocab
    return _logits(params["weight"], x, storage, hidden or x.shape[-1])


def lm_head_tile(
    params: Params,
    x: Any,
    acc: Any,
    start: Any,
    ctx: Context,
    *,
    first: bool,
    last: bool,
    storage: str = "float32",
    hidden: int = 0,
    vocab: int = 0,
) -> jax.Array:
    """One tile: the logits of vocabulary rows ``start..start + rows``, written into the
    accumulator (zeros before the first tile)."""
    del ctx, last
    part = _logits(params["weight"], x, storage, hidden or x.shape[-1])  # (..., rows)
    if first:
        acc = jnp.zeros((*part.shape[:-1], vocab), jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(acc, part, start, axis=-1)


def lm_head_reference(
    params: Params, x: Any, ctx: Context, *, storage: str = "float32", hidden: int = 0, **_: Any
) -> np.ndarray:
    """NumPy: ``gguf.quants.dequantize`` (or the dense values), then a float64 matmul."""
    del ctx
    w = np.asarray(params["weight"])
    if storage_type(storage).quantized:
        import gguf

        number = storage_type(storage).gguf_type
        assert number is not None  # every quantized storage type is GGUF's
        qtype = gguf.GGMLQuantizationType(number)
        w = gguf.quants.dequantize(w, qtype)
    w64 = np.asarray(w, np.float64).reshape(w.shape[0], -1)
    return (np.asarray(x, np.float64) @ w64.T).astype(np.float32)


LM_HEAD = register(
    LayerKind(
        "lm_head",
        lm_head_apply,
        lm_head_reference,
        ("weight",),
        TileKind("weight", lm_head_tile, mode="concat"),
    )
)
