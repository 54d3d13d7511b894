"""BERT encoder layer kinds: embeddings, the encoder block, and the mean-pool exit head.

Three kinds, registered on import, each a pure jax.numpy ``apply`` and an independent
NumPy ``reference`` (float64 accumulation) with the same numerics as Hugging Face's
``BertModel`` (post-LN blocks, exact erf GELU, biased-variance layer norm) followed by
sentence-transformers' mean pooling and L2 normalisation:

- ``bert_embeddings``: word + position + token-type (type 0) embeddings, then layer
  norm. Its ``word_embeddings`` parameter is **gathered**: the runtime reads only the
  rows of the request's tokens, so ``apply`` receives ``(batch * seq, hidden)`` rows in
  token order (row ``i`` is ``table[input_ids.flat[i]]``, see :func:`gathered_rows`),
  never the whole table. The layer config lists such tensors under ``"gathered"``;
  :func:`edgemind.layers.cost.param_structs` gives what a request actually loads, and
  :func:`gather_params` does the gather for in-memory callers.
- ``bert_encoder``: masked multi-head self-attention, add & norm, GELU feed-forward,
  add & norm. The mask (``ctx["attention_mask"]``, 1 = token, 0 = padding) hides
  padded keys, so padding never changes what the real tokens compute.
- ``mean_pool_l2``: the mean of the unmasked positions, L2-normalised: the exit head
  after every encoder block, so an exit at level k is a sentence embedding of k blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgemind.errors import InputError
from edgemind.layers.attention import BLOCK_ROWS, blocked_attention
from edgemind.layers.quant import dequantize_params, dequantize_params_numpy
from edgemind.layers.registry import Context, LayerKind, Params, register

EMBEDDING_TENSORS = (
    "word_embeddings",  # gathered: (batch * seq, hidden), one row per token
    "position_embeddings",  # (max_positions, hidden)
    "token_type_embeddings",  # (type_vocab, hidden); only type 0 is used
    "ln_gamma",  # (hidden,)
    "ln_beta",  # (hidden,)
)
ENCODER_TENSORS = (
    "q_weight",  # (hidden, hidden), stored (in, out)
    "q_bias",
    "k_weight",
    "k_bias",
    "v_weight",
    "v_bias",
    "o_weight",
    "o_bias",
    "ln1_gamma",
    "ln1_beta",
    "ffn_in_weight",  # (hidden, intermediate)
    "ffn_in_bias",
    "ffn_out_weight",  # (intermediate, hidden)
    "ffn_out_bias",
    "ln2_gamma",
    "ln2_beta",
)
POOL_EPS = 1e-12  # torch.nn.functional.normalize's default, as sentence-transformers uses
MASK_COUNT_MIN = 1e-9  # sentence-transformers clamps the token count to this


# ------------------------------------------------------------------ gathered rows


def gathered_rows(input_ids: Any) -> np.ndarray:
    """The table rows a request needs, in order: row ``i`` of the gathered tensor.

    >>> gathered_rows(np.array([[101, 7592, 102], [101, 102, 0]])).tolist()
    [101, 7592, 102, 101, 102, 0]
    """
    return np.asarray(input_ids).reshape(-1).astype(np.int64)


def gather_params(params: Params, input_ids: Any, gathered: Sequence[str]) -> dict[str, Any]:
    """``params`` with each gathered table replaced by the rows of ``input_ids``.

    For callers that hold whole tables in memory (tests, the reference path); the
    runtime reads the rows straight from disk instead.
    """
    rows = gathered_rows(input_ids)
    out = dict(params)
    for name in gathered:
        table = np.asarray(params[name])
        if rows.size and (rows.min() < 0 or rows.max() >= table.shape[0]):
            raise InputError(
                f"token id out of range for {name!r}: ids must lie in [0, {table.shape[0]})"
            )
        out[name] = table[rows]
    return out


# ------------------------------------------------------------------ jax.numpy kinds


def _layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * gamma + beta


def _check_rows(words: Any, ids_shape: tuple[int, ...], max_positions: int) -> None:
    # Shapes are static under jit: these checks run once per trace, not per call.
    batch, seq = ids_shape
    if words.ndim != 2 or words.shape[0] != batch * seq:
        raise ValueError(
            f"bert_embeddings: word_embeddings must be the gathered rows, shape "
            f"(batch * seq, hidden) = ({batch * seq}, hidden), got {tuple(words.shape)}"
        )
    if seq > max_positions:
        raise InputError(f"sequence of {seq} tokens exceeds the {max_positions} positions")


def embeddings_apply(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    hidden: int = 0,
    eps: float = 1e-12,
    gathered: Sequence[str] = ("word_embeddings",),
    vocab_size: int = 0,
    max_position_embeddings: int = 0,
    type_vocab_size: int = 0,
) -> jax.Array:
    """input_ids (batch, seq) int -> (batch, seq, hidden): summed embeddings, layer-normed."""
    del ctx, hidden, gathered, vocab_size, max_position_embeddings, type_vocab_size
    words, positions = params["word_embeddings"], params["position_embeddings"]
    _check_rows(words, tuple(x.shape), positions.shape[0])
    batch, seq = x.shape
    h = words.reshape(batch, seq, words.shape[-1])
    h = h + positions[:seq][None] + params["token_type_embeddings"][0]
    return _layer_norm(h, params["ln_gamma"], params["ln_beta"], eps)


def encoder_apply(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    heads: int,
    eps: float = 1e-12,
    hidden: int = 0,
    intermediate: int = 0,
    attention_block: int = BLOCK_ROWS,
    storage: Any = (),
) -> jax.Array:
    """One post-LN BERT block: (batch, seq, hidden) -> (batch, seq, hidden).

    Attention runs a head and ``attention_block`` query rows at a time
    (:func:`edgemind.layers.attention.blocked_attention`), so its temporaries grow
    linearly with the sequence; the numbers are those of whole-matrix attention.
    ``storage`` names the weights stored as quantized blocks (``edgemind convert
    --quantize``): they are dequantized here, inside the same jit as the matmuls.
    """
    del hidden, intermediate
    p = dequantize_params(params, storage)
    batch, seq, width = x.shape
    head_dim = width // heads

    def split(t: jax.Array) -> jax.Array:  # (batch, seq, width) -> (batch, heads, seq, head_dim)
        return t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    q = split(x @ p["q_weight"] + p["q_bias"])
    k = split(x @ p["k_weight"] + p["k_bias"])
    v = split(x @ p["v_weight"] + p["v_bias"])
    keep = ctx["attention_mask"] > 0  # (batch, seq): padded keys are hidden
    attended = blocked_attention(q, k, v, keep, block_rows=attention_block)
    attended = attended.transpose(0, 2, 1, 3).reshape(batch, seq, width)
    h = _layer_norm(attended @ p["o_weight"] + p["o_bias"] + x, p["ln1_gamma"], p["ln1_beta"], eps)
    rows = h.reshape(batch * seq, width)  # 2-D matmuls: XLA's CPU plan needs less scratch
    ffn = jax.nn.gelu(rows @ p["ffn_in_weight"] + p["ffn_in_bias"], approximate=False)
    out = (ffn @ p["ffn_out_weight"]).reshape(batch, seq, width) + p["ffn_out_bias"] + h
    return _layer_norm(out, p["ln2_gamma"], p["ln2_beta"], eps)


def mean_pool_apply(params: Params, x: Any, ctx: Context, *, eps: float = POOL_EPS) -> jax.Array:
    """(batch, seq, hidden) -> (batch, hidden): masked mean over seq, L2-normalised."""
    del params
    mask = ctx["attention_mask"].astype(x.dtype)[:, :, None]  # (batch, seq, 1)
    summed = jnp.sum(x * mask, axis=1)
    pooled = summed / jnp.maximum(jnp.sum(mask, axis=1), MASK_COUNT_MIN)
    norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
    return pooled / jnp.maximum(norm, eps)


# ------------------------------------------------------------------ NumPy references


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _layer_norm_ref(x: np.ndarray, gamma: Any, beta: Any, eps: float) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    var = (centred**2).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * _f64(gamma) + _f64(beta)


def _gelu_ref(y: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))


def embeddings_reference(params: Params, x: Any, ctx: Context, **config: Any) -> np.ndarray:
    """NumPy ``bert_embeddings`` (gathered word rows), float64 inside, float32 out."""
    del ctx
    eps = float(config.get("eps", 1e-12))
    ids = np.asarray(x)
    batch, seq = ids.shape
    words = _f64(params["word_embeddings"])
    if words.shape[0] != batch * seq:
        raise ValueError(f"word_embeddings must hold {batch * seq} gathered rows")
    h = np.empty((batch, seq, words.shape[1]))
    for b in range(batch):
        for s in range(seq):
            h[b, s] = (
                words[b * seq + s]
                + _f64(params["position_embeddings"])[s]
                + _f64(params["token_type_embeddings"])[0]
            )
    return _layer_norm_ref(h, params["ln_gamma"], params["ln_beta"], eps).astype(np.float32)


def encoder_reference(
    params: Params,
    x: Any,
    ctx: Context,
    *,
    heads: int,
    eps: float = 1e-12,
    storage: Any = (),
    **_: Any,
) -> np.ndarray:  # attention_block changes how, not what: the reference ignores it
    """NumPy ``bert_encoder``: per-head loops, a max-shifted softmax over unmasked keys."""
    p = {name: _f64(a) for name, a in dequantize_params_numpy(params, storage).items()}
    h0 = _f64(x)
    batch, _, width = h0.shape
    d = width // heads
    q = h0 @ p["q_weight"] + p["q_bias"]
    k = h0 @ p["k_weight"] + p["k_bias"]
    v = h0 @ p["v_weight"] + p["v_bias"]
    mask = np.asarray(ctx["attention_mask"]) > 0
    attended = np.zeros_like(h0)
    for b in range(batch):
        keys = np.flatnonzero(mask[b])
        for i in range(heads):
            cols = slice(i * d, (i + 1) * d)
            scores = q[b, :, cols] @ k[b, keys, cols].T / math.sqrt(d)  # (seq, n_keys)
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attended[b, :, cols] = (e / e.sum(axis=-1, keepdims=True)) @ v[b, keys, cols]
    h1 = _layer_norm_ref(
        attended @ p["o_weight"] + p["o_bias"] + h0, p["ln1_gamma"], p["ln1_beta"], eps
    )
    ffn = _gelu_ref(h1 @ p["ffn_in_weight"] + p["ffn_in_bias"])
    out = ffn @ p["ffn_out_weight"] + p["ffn_out_bias"] + h1
    return _layer_norm_ref(out, p["ln2_gamma"], p["ln2_beta"], eps).astype(np.float32)


def mean_pool_reference(
    params: Params, x: Any, ctx: Context, *, eps: float = POOL_EPS
) -> np.ndarray:
    """NumPy ``mean_pool_l2``: the mean over each row's real tokens, then unit length."""
    del params
    h = _f64(x)
    mask = np.asarray(ctx["attention_mask"]) > 0
    out = np.zeros((h.shape[0], h.shape[2]))
    for b in range(h.shape[0]):
        pooled = h[b, mask[b]].sum(axis=0) / max(int(mask[b].sum()), MASK_COUNT_MIN)
        out[b] = pooled / max(float(np.linalg.norm(pooled)), eps)
    return out.astype(np.float32)


BERT_EMBEDDINGS = register(
    LayerKind("bert_embeddings", embeddings_apply, embeddings_reference, EMBEDDING_TENSORS)
)
BERT_ENCODER = register(
    LayerKind("bert_encoder", encoder_apply, encoder_reference, ENCODER_TENSORS)
)
MEAN_POOL_L2 = register(LayerKind("mean_pool_l2", mean_pool_apply, mean_pool_reference))


def kind_configs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The edgemind layer configs of each kind, from a Hugging Face BERT ``config.json``."""
    hidden = int(config["hidden_size"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    return {
        "bert_embeddings": {
            "hidden": hidden,
            "eps": eps,
            "gathered": ["word_embeddings"],
            "vocab_size": int(config["vocab_size"]),
            "max_position_embeddings": int(config["max_position_embeddings"]),
            "type_vocab_size": int(config.get("type_vocab_size", 2)),
        },
        "bert_encoder": {
            "hidden": hidden,
            "heads": int(config["num_attention_heads"]),
            "intermediate": int(config["intermediate_size"]),
            "eps": eps,
        },
        "mean_pool_l2": {"eps": POOL_EPS},
    }
