"""Dense layers: the toy model's kinds, ``dense`` and the classifier ``exit_head``.

Each kind is a pure jax.numpy ``apply`` and an independently written NumPy
``reference`` (float64 accumulation), registered on import. Other families follow the
same pattern in their own module (``layers/bert.py``) imported from ``layers/__init__``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgemind.errors import ModelFormatError
from edgemind.layers.registry import Context, LayerKind, Params, TileKind, register

_JAX_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda y: jax.nn.gelu(y, approximate=False),  # erf form, as BERT uses
    "none": lambda y: y,
}
ACTIVATIONS: tuple[str, ...] = tuple(_JAX_ACTIVATIONS)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return _JAX_ACTIVATIONS[name]
    except KeyError:
        raise ModelFormatError(
            f"dense: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}"
        ) from None


def dense_apply(params: Params, x: Any, ctx: Context, *, activation: str = "none") -> jax.Array:
    """``act(x @ w + b)``: x (..., d_in), w (d_in, d_out), b (d_out,) -> (..., d_out)."""
    del ctx  # a dense layer needs no request context
    act = _activation(activation)
    return act(jnp.matmul(x, params["w"]) + params["b"])


def dense_tile(
    params: Params,
    x: Any,
    acc: Any,
    start: Any,
    ctx: Context,
    *,
    first: bool,
    last: bool,
    activation: str = "none",
) -> jax.Array:
    """One tile of ``dense``: rows ``start..start + r`` of ``w`` (input features) add
    ``x[..., start:start + r] @ w_tile`` to the accumulator; the last tile adds ``b`` and
    applies the activation. Summed over the tiles: ``dense_apply``, up to float rounding
    (the partial sums are added in another order)."""
    del ctx
    w = params["w"]  # (rows of this tile, d_out)
    part = jnp.matmul(jax.lax.dynamic_slice_in_dim(x, start, w.shape[0], axis=-1), w)
    total = part if first else acc + part
    return _activation(activation)(total + params["b"]) if last else total


def exit_head_apply(params: Params, x: Any, ctx: Context) -> jax.Array:
    """Class probabilities ``softmax(x @ w + b)`` over the last axis: (..., n_classes)."""
    del ctx
    return jax.nn.softmax(jnp.matmul(x, params["w"]) + params["b"], axis=-1)


# ------------------------------------------------------------------ NumPy references


def _affine64(params: Params, x: np.ndarray) -> np.ndarray:
    w = np.asarray(params["w"], dtype=np.float64)
    b = np.asarray(params["b"], dtype=np.float64)
    return np.asarray(x, dtype=np.float64) @ w + b


def _erf(y: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(y)


def dense_reference(
    params: Params, x: np.ndarray, ctx: Context, *, activation: str = "none"
) -> np.ndarray:
    """NumPy ``dense``: float64 accumulation, cast back to the inputs' dtype."""
    del ctx
    y = _affine64(params, x)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    elif activation == "gelu":
        y = 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
    elif activation != "none":
        raise ModelFormatError(f"dense: unknown activation {activation!r}")
    return y.astype(np.result_type(np.asarray(x).dtype, np.asarray(params["w"]).dtype))


def exit_head_reference(params: Params, x: np.ndarray, ctx: Context) -> np.ndarray:
    """NumPy ``exit_head``: a max-shifted softmax of the logits, in float64."""
    del ctx
    logits = _affine64(params, x)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p.astype(np.result_type(np.asarray(x).dtype, np.asarray(params["w"]).dtype))


DENSE = register(
    LayerKind("dense", dense_apply, dense_reference, ("w", "b"), TileKind("w", dense_tile))
)
EXIT_HEAD = register(LayerKind("exit_head", exit_head_apply, exit_head_reference, ("w", "b")))
