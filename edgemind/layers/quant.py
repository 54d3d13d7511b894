"""Dequantizers: raw ``uint8`` blocks of a storage type to float32, inside a jitted layer.

Each block-quantized type of :mod:`edgemind.dtypes` has a decoder from blocks
``(n_blocks, block_bytes)`` to values ``(n_blocks, block_elements)``, written as
reshapes, shifts, masks and broadcast scales so that XLA fuses it into one loop (a
per-block ``einsum`` was ~70x slower here). The arithmetic repeats ggml's, operation
for operation and in the same order, so the float32 values are bit-identical to
``gguf.quants.dequantize`` (``tests/test_layers_quant.py`` checks every type on
random blocks and on the Gemma 3 270M GGUF's tensors). Two things could break that and
do not: XLA on CPU does not contract ``a * b - c`` into a fused multiply-add (q4_k's
formula), and no intermediate can be a float32 subnormal that flush-to-zero would
change (the smallest nonzero f16 scale is 2**-24).

Layout: a weight ``w`` of logical shape ``(out_features, in_features)`` is stored as
GGUF stores it, row-major with blocks along ``in_features`` (GGUF lists the dims the
other way round, ``ne = [in_features, out_features]``), so a linear layer is
``x @ w.T``; :func:`quant_matmul` does that.

>>> import numpy as np
>>> block = np.zeros(34, np.uint8)
>>> block[:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)  # the scale d
>>> block[2:] = np.arange(32, dtype=np.int8).view(np.uint8)  # the values q
>>> dequantize("q8_0", block, (32,))[:4].tolist()
[0.0, 0.5, 1.0, 1.5]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgemind import dtypes
from edgemind.errors import ModelFormatError

_F32 = jnp.float32


def _f16(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Little-endian f16 bytes ``(lo, hi)`` (uint8) to float32 values (exact)."""
    bits = lo.astype(jnp.uint16) | (hi.astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(_F32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """Bytes ``(..., k)`` to 4-bit values ``(..., 2k)``: low nibbles first, then high."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(b: jax.Array) -> jax.Array:
    d = _f16(b[:, 0], b[:, 1])[:, None]  # (n, 1)
    q = jax.lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(_F32)  # (n, 32)
    return q * d


def _q4_0(b: jax.Array) -> jax.Array:
    d = _f16(b[:, 0], b[:, 1])[:, None]
    q = _nibbles(b[:, 2:18]).astype(jnp.int8) - 8  # element j: byte j low, j+16: high
    return d * q.astype(_F32)


def _q5_0(b: jax.Array) -> jax.Array:
    d = _f16(b[:, 0], b[:, 1])[:, None]
    # bit j of the little-endian uint32 mask (byte j // 8, bit j % 8) is element j's 5th bit
    shifts = jnp.arange(8, dtype=jnp.uint8)
    high = ((b[:, 2:6, None] >> shifts) & 1).reshape(-1, 32)
    q = (_nibbles(b[:, 6:22]) | (high << 4)).astype(jnp.int8) - 16
    return d * q.astype(_F32)


def _q4_k_scales(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Twelve bytes ``(n, 12)`` to eight 6-bit scales and eight 6-bit mins, each ``(n, 8)``.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7
    the same for the mins; bytes 8-11 the low 4 bits of scale (low nibble) and min (high
    nibble) 4-7.
    """
    s = s.reshape(-1, 3, 4)
    sc_lo, m_lo, mixed = s[:, 0], s[:, 1], s[:, 2]
    sc = jnp.concatenate([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)], axis=-1)
    m = jnp.concatenate([m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 2) & 0x30)], axis=-1)
    return sc, m


def _q4_k(b: jax.Array) -> jax.Array:
    d = _f16(b[:, 0], b[:, 1])[:, None]
    dmin = _f16(b[:, 2], b[:, 3])[:, None]
    sc, m = _q4_k_scales(b[:, 4:16])
    d_sc = (d * sc.astype(_F32))[:, :, None]  # (n, 8, 1): one scale per 32 values
    dmin_m = (dmin * m.astype(_F32))[:, :, None]
    # 4 chunks of 32 bytes: sub-block 2i is chunk i's low nibbles, 2i+1 its high nibbles
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32).astype(_F32)
    return (d_sc * q - dmin_m).reshape(-1, 256)


def _q6_k(b: jax.Array) -> jax.Array:
    scales = jax.lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(_F32)  # (n, 16)
    d = _f16(b[:, 208], b[:, 209])[:, None]
    d_sc = (d * scales)[:, :, None]  # (n, 16, 1): one scale per 16 values
    # two halves of 128 values; in each, 64 bytes of low nibbles give 4 runs of 32
    # (low nibbles of bytes 0-31, of 32-63, then high nibbles of 0-31, of 32-63) ...
    low = b[:, 0:128].reshape(-1, 2, 1, 64) >> jnp.array([0, 4], jnp.uint8)[:, None]
    low = (low & 0x0F).reshape(-1, 8, 32)
    # ... and 32 bytes of 2-bit fields give the same 4 runs, at shifts 0, 2, 4, 6
    high = b[:, 128:192].reshape(-1, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
    high = (high & 0x03).reshape(-1, 8, 32)
    q = ((low | (high << 4)).astype(jnp.int8) - 32).reshape(-1, 16, 16).astype(_F32)
    return (d_sc * q).reshape(-1, 256)


def _dense(dtype: Any) -> Callable[[jax.Array], jax.Array]:
    def decode(b: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(b, dtype).astype(_F32)

    return decode


_DECODERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "q4_0": _q4_0,
    "q5_0": _q5_0,
    "q8_0": _q8_0,
    "q4_k": _q4_k,
    "q6_k": _q6_k,
    # raw bytes of a float tensor (GGUF's F32 norms, say) decode the same way
    "float32": _dense(jnp.float32),
    "float16": _dense(jnp.float16),
    "bfloat16": _dense(jnp.bfloat16),
}
CHUNK_BYTES = 4 << 20
"""Float32 weight bytes :func:`quant_matmul` dequantizes at a time: this bounds what XLA
allocates beside the arena (chunks of 1 to 80 MiB ran no faster here)."""

DEQUANTIZABLE: tuple[str, ...] = tuple(_DECODERS)
"""The storage types :func:`dequantize` reads: every quantized type, and the float dtypes."""


def _check_bytes(t: dtypes.StorageType, blocks: jax.Array, shape: tuple[int, ...]) -> None:
    expected = dtypes.nbytes(t, shape)
    if blocks.dtype != jnp.uint8 or blocks.size != expected:
        raise ModelFormatError(
            f"{t.name} tensor of shape {shape} needs {expected} uint8 bytes; got "
            f"{blocks.dtype} {tuple(blocks.shape)} ({blocks.size} elements)"
        )


def dequantize(type_name: str, blocks: Any, shape: Sequence[int]) -> jax.Array:
    """Float32 values ``shape`` from the raw ``uint8`` bytes of a tensor of ``type_name``.

    ``blocks`` is ``(..., row_bytes)`` or flat: any shape holding exactly
    ``dtypes.nbytes(type_name, shape)`` bytes in storage order. ``type_name`` and
    ``shape`` are static (Python values); call it inside ``jax.jit``.

    >>> import numpy as np
    >>> raw = np.frombuffer(np.float16([1.5, -2.0]).tobytes(), np.uint8)
    >>> dequantize("float16", raw, (2,)).tolist()
    [1.5, -2.0]
    """
    t = dtypes.storage_type(type_name)
    decode = _DECODERS.get(t.name)
    if decode is None:
        raise ModelFormatError(
            f"cannot dequantize storage type {t.name!r}; expected one of {', '.join(DEQUANTIZABLE)}"
        )
    shape = tuple(shape)
    blocks = jnp.asarray(blocks)
    _check_bytes(t, blocks, shape)
    # a quantized block, or a dense element's bytes, per row of the decoder's input
    return decode(blocks.reshape(-1, t.block_bytes)).reshape(shape)


def quant_matmul(
    x: Any,
    type_name: str,
    blocks: Any,
    shape: Sequence[int],
    *,
    chunk_bytes: int | None = CHUNK_BYTES,
) -> jax.Array:
    """``x @ w.T`` for a weight ``w`` of logical ``shape`` (out_features, in_features).

    ``w`` is stored as ``type_name`` with blocks along ``in_features`` (GGUF's layout);
    x is (..., in_features), the result (..., out_features) in float32. Each output is
    a float32 dot product of x with a row of ``dequantize(type_name, blocks, shape)``.

    The weight is dequantized ``chunk_bytes`` of float32 rows at a time (a ``fori_loop``
    over row chunks), so XLA's temporaries stay about one chunk whatever the weight's size;
    ``None`` dequantizes it whole (a temporary of ``4 * out_features * in_features``
    bytes). ``type_name``, ``shape`` and ``chunk_bytes`` are static.

    >>> import numpy as np
    >>> w = np.arange(64, dtype=np.float32).reshape(2, 32)
    >>> y = quant_matmul(np.ones((1, 32), np.float32), "float32", w.view(np.uint8), (2, 32))
    >>> y.tolist()
    [[496.0, 1520.0]]
    """
    shape = tuple(shape)
    if len(shape) != 2:
        raise ModelFormatError(
            f"quant_matmul needs a 2-d weight (out_features, in_features); got shape {shape}"
        )
    out_features, in_features = shape
    x = jnp.asarray(x, _F32)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ModelFormatError(
            f"quant_matmul: x {tuple(x.shape)} must end in in_features = {in_features} "
            f"(weight {shape})"
        )
    t = dtypes.storage_type(type_name)
    _check_bytes(t, jnp.asarray(blocks), shape)
    batch = x.reshape(-1, in_features)  # (b, in_features)

    def rows_times_x(part: jax.Array) -> jax.Array:  # (r, row_bytes) -> (b, r)
        w = dequantize(type_name, part, (part.shape[0], in_features))
        # Unfenced, XLA fuses the dequantization into a loop-emitted dot (about 2x slower
        # here than this fence plus the library's row-major matrix-vector kernel).
        return (jax.lax.optimization_barrier(w) @ batch.T).T

    rows = out_features
    if chunk_bytes is not None and in_features > 0:
        rows = min(out_features, max(1, chunk_bytes // (4 * in_features)))
    row_bytes = dtypes.row_nbytes(t, in_features)
    blocks = jnp.asarray(blocks).reshape(out_features, row_bytes)
    y = _by_row_chunks(rows_times_x, blocks, rows, batch.shape[0])
    return y.reshape(*x.shape[:-1], out_features)


def _by_row_chunks(
    rows_times_x: Callable[[jax.Array], jax.Array], blocks: jax.Array, rows: int, batch: int
) -> jax.Array:
    """``rows_times_x`` over ``rows``-row chunks of ``blocks``, concatenated: (batch, out)."""
    out_features = blocks.shape[0]
    if rows in (0, out_features):
        return rows_times_x(blocks)
    n_full = out_features // rows

    def step(i: jax.Array, y: jax.Array) -> jax.Array:
        # read in place: slicing then reshaping into (n, rows, row_bytes) copied the weight
        part = jax.lax.dynamic_slice_in_dim(blocks, i * rows, rows)
        return jax.lax.dynamic_update_slice_in_dim(y, rows_times_x(part), i * rows, axis=1)

    y = jax.lax.fori_loop(0, n_full, step, jnp.zeros((batch, out_features), _F32))
    if out_features % rows:
        y = y.at[:, n_full * rows :].set(rows_times_x(blocks[n_full * rows :]))
    return y


def storage_map(storage: Any) -> dict[str, str]:
    """A layer config's ``storage`` (tensor -> storage type) as a dict: configs arrive
    frozen, so a mapping may come as a tuple of (name, type) pairs."""
    if isinstance(storage, Mapping):
        return {str(k): str(v) for k, v in storage.items()}
    return {str(k): str(v) for k, v in storage}


def logical_shape(type_name: str, stored_shape: Sequence[int]) -> tuple[int, ...]:
    """The dequantized shape of blocks stored as uint8 rows ``(..., bytes per row)``."""
    t = dtypes.storage_type(type_name)
    *rows, row_bytes = stored_shape
    return (*rows, row_bytes // t.block_bytes * t.block_elements)


def dequantize_params(params: Mapping[str, Any], storage: Any) -> dict[str, Any]:
    """``params`` with every tensor that ``storage`` names dequantized to float32 (inside
    the caller's jit); the others as they are."""
    types = storage_map(storage)
    out = dict(params)
    for name, type_name in types.items():
        if name in out and dtypes.storage_type(type_name).quantized:
            blocks = out[name]
            out[name] = dequantize(type_name, blocks, logical_shape(type_name, blocks.shape))
    return out


def dequantize_params_numpy(params: Mapping[str, Any], storage: Any) -> dict[str, Any]:
    """The NumPy reference of :func:`dequantize_params`: the ``gguf`` package's own
    dequantizer (bit-identical to ggml's C), an implementation independent of ours."""
    import gguf

    out = dict(params)
    for name, type_name in storage_map(storage).items():
        t = dtypes.storage_type(type_name)
        if name in out and t.quantized:
            assert t.gguf_type is not None
            blocks = np.asarray(out[name], np.uint8)
            out[name] = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(t.gguf_type))
    return out
