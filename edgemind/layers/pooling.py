"""Sentence pooling heads: token states to one vector per sequence, as sentence-transformers.

The ``bert_pool`` kind is the exit head of a converted encoder whose checkpoint names its
pooling (``modules.json`` + ``1_Pooling/config.json``): ``mode`` is one of
:data:`POOLING_MODES`, ``normalize`` adds the ``Normalize`` module (unit length). Every
mode reads ``ctx["attention_mask"]`` (1 = token, 0 = padding), so padding never changes
a sequence's vector. (``mean_pool_l2`` in :mod:`edgemind.layers.bert` is ``mode: mean,
normalize: true``, kept for models converted before this kind existed.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgemind.errors import ModelFormatError
from edgemind.layers.bert import MASK_COUNT_MIN, POOL_EPS
from edgemind.layers.registry import Context, LayerKind, Params, register

# sentence-transformers' names: cls_token, mean_tokens, max_tokens, mean_sqrt_len_tokens
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len")
MASKED_OUT = -1e9  # what sentence-transformers puts at padded positions before a max


def _check(mode: str, normalize: bool) -> None:
    if mode not in POOLING_MODES:
        raise ModelFormatError(
            f"bert_pool mode {mode!r} is not supported; expected one of {', '.join(POOLING_MODES)}"
        )
    if not isinstance(normalize, bool):
        raise ModelFormatError(f"bert_pool normalize must be true or false, got {normalize!r}")


def pool_apply(
    params: Params, x: Any, ctx: Context, *, mode: str, normalize: bool, eps: float = POOL_EPS
) -> jax.Array:
    """(batch, seq, hidden) -> (batch, hidden): pooled over the real tokens, per ``mode``."""
    del params
    _check(mode, normalize)
    mask = ctx["attention_mask"].astype(x.dtype)[:, :, None]  # (batch, seq, 1)
    if mode == "cls":
        pooled = x[:, 0]
    elif mode == "max":
        pooled = jnp.max(jnp.where(mask > 0, x, MASKED_OUT), axis=1)
    else:
        count = jnp.maximum(jnp.sum(mask, axis=1), MASK_COUNT_MIN)  # (batch, 1)
        pooled = jnp.sum(x * mask, axis=1) / (count if mode == "mean" else jnp.sqrt(count))
    if normalize:
        norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
        pooled = pooled / jnp.maximum(norm, eps)
    return pooled


def pool_reference(
    params: Params, x: Any, ctx: Context, *, mode: str, normalize: bool, eps: float = POOL_EPS
) -> np.ndarray:
    """NumPy ``bert_pool``, row by row over each sequence's real tokens (float64)."""
    del params
    _check(mode, normalize)
    h = np.asarray(x, dtype=np.float64)
    mask = np.asarray(ctx["attention_mask"]) > 0
    out = np.zeros((h.shape[0], h.shape[2]))
    for b in range(h.shape[0]):
        real = h[b, mask[b]]
        count = max(float(mask[b].sum()), MASK_COUNT_MIN)
        if mode == "cls":
            out[b] = h[b, 0]
        elif mode == "max":
            out[b] = real.max(axis=0) if len(real) else MASKED_OUT
        else:
            out[b] = real.sum(axis=0) / (count if mode == "mean" else np.sqrt(count))
        if normalize:
            out[b] /= max(float(np.linalg.norm(out[b])), eps)
    return out.astype(np.float32)


BERT_POOL = register(LayerKind("bert_pool", pool_apply, pool_reference))
