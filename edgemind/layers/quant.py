"""Dequantizers: raw ``uint8`` blocks of a storage type to float32, inside a jitted layer.

Each block-quantized type of :mod:`edgemind.dtypes` has a decoder from blocks
``(..., block_bytes)`` to values ``(..., block_elements)`` in two steps, the blocks'
float32 scales and then the values from bytes and scales, written as reshapes, shifts,
masks and broadcast scales so that XLA fuses each into one loop (a per-block ``einsum``
was ~70x slower here). The arithmetic repeats ggml's, operation for operation and in
the same order, so the float32 values are bit-identical to ``gguf.quants.dequantize``
(``tests/test_layers_quant.py`` checks every type on random blocks and on the Gemma 3
270M GGUF's tensors). Two things could break that and
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


# Nibbles by shifting a broadcast byte (not by concatenating halves): fused into a dot,
# XLA's concatenate cost q5_0 3x and q4_k 7x the time.
_LOW_HIGH = np.array([0, 4], np.uint8)[:, None]  # shifts to a byte's low, high nibble


def _nibbles(qs: jax.Array) -> jax.Array:
    """Bytes ``(..., k)`` to 4-bit values ``(..., 2k)``: low nibbles first, then high."""
    *lead, k = qs.shape
    return ((qs.reshape(*lead, 1, k) >> _LOW_HIGH) & 0x0F).reshape(*lead, 2 * k)


# A decoder is two functions of blocks ``(..., block_bytes)``: ``scales`` gives each
# block's float32 scales (a tuple of arrays ``(...)`` or ``(..., k)``), ``values`` its
# float32 values ``(..., block_elements)`` from the blocks and those scales. Split so
# that quant_matmul can decode the scales apart: fused into the values, XLA decodes a
# block's scales again for every one of its values (3x the time of the rest).
Scales = tuple[jax.Array, ...]


def _d_scale(b: jax.Array) -> Scales:
    """The one f16 scale ``d`` that opens a q4_0, q5_0 or q8_0 block, ``(...)``."""
    return (_f16(b[..., 0], b[..., 1]),)


def _q8_0(b: jax.Array, s: Scales) -> jax.Array:
    q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(_F32)  # (..., 32)
    return q * s[0][..., None]


def _q4_0(b: jax.Array, s: Scales) -> jax.Array:
    q = _nibbles(b[..., 2:18]).astype(jnp.int8) - 8  # element j: byte j low, j+16: high
    return s[0][..., None] * q.astype(_F32)


def _q5_0(b: jax.Array, s: Scales) -> jax.Array:
    lead = b.shape[:-1]
    low = _nibbles(b[..., 6:22])  # element j < 16: byte j's low nibble, j + 16: its high
    # bit j of the little-endian uint32 mask (byte j // 8, bit j % 8) is element j's 5th bit
    high = (b[..., 2:6, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    q = (low | (high.reshape(*lead, 32) << 4)).astype(jnp.int8) - 16
    return s[0][..., None] * q.astype(_F32)


def _q4_k_scales(b: jax.Array) -> Scales:
    """``d * sc`` and ``dmin * m``, each ``(..., 8)``: one per 32 values.

    Bytes 4-15 hold eight 6-bit scales sc and eight 6-bit mins m: bytes 4-7 scales 0-3
    (low 6 bits) and the top 2 bits of scales 4-7; bytes 8-11 the same for the mins;
    bytes 12-15 the low 4 bits of scale (low nibble) and min (high nibble) 4-7.
    """
    d = _f16(b[..., 0], b[..., 1])[..., None]
    dmin = _f16(b[..., 2], b[..., 3])[..., None]
    lo = b[..., 4:12].reshape(*b.shape[:-1], 2, 4)  # (..., scale or min, 4)
    hi = (b[..., None, 12:16] >> _LOW_HIGH) & 0x0F
    both = jnp.concatenate([lo & 0x3F, hi | ((lo >> 2) & 0x30)], axis=-1)  # (..., 2, 8)
    return d * both[..., 0, :].astype(_F32), dmin * both[..., 1, :].astype(_F32)


def _q4_k(b: jax.Array, s: Scales) -> jax.Array:
    lead = b.shape[:-1]
    d_sc, dmin_m = s[0][..., None], s[1][..., None]  # (..., 8, 1)
    # 4 chunks of 32 bytes: sub-block 2i is chunk i's low nibbles, 2i+1 its high nibbles
    q = _nibbles(b[..., 16:144].reshape(*lead, 4, 32)).reshape(*lead, 8, 32).astype(_F32)
    return (d_sc * q - dmin_m).reshape(*lead, 256)


def _q6_k_scales(b: jax.Array) -> Scales:
    """``d * scale``, ``(..., 16)``: one per 16 values."""
    scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(_F32)
    return (_f16(b[..., 208], b[..., 209])[..., None] * scales,)


def _q6_k(b: jax.Array, s: Scales) -> jax.Array:
    lead = b.shape[:-1]
    # two halves of 128 values; in each, 64 bytes of low nibbles give 4 runs of 32
    # (low nibbles of bytes 0-31, of 32-63, then high nibbles of 0-31, of 32-63) ...
    low = _nibbles(b[..., 0:128].reshape(*lead, 2, 64)).reshape(*lead, 8, 32)
    # ... and 32 bytes of 2-bit fields give the same 4 runs, at shifts 0, 2, 4, 6
    shifts = jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
    high = (b[..., 128:192].reshape(*lead, 2, 1, 32) >> shifts) & 0x03
    q = (low | (high.reshape(*lead, 8, 32) << 4)).astype(jnp.int8) - 32
    return (s[0][..., None] * q.reshape(*lead, 16, 16).astype(_F32)).reshape(*lead, 256)


def _no_scales(b: jax.Array) -> Scales:
    return ()


def _dense(dtype: Any) -> Callable[[jax.Array, Scales], jax.Array]:
    def decode(b: jax.Array, s: Scales) -> jax.Array:
        return jax.lax.bitcast_convert_type(b, dtype).astype(_F32)  # (...): one per block

    return decode


_DECODERS: dict[str, tuple[Callable[[jax.Array], Scales], Callable[..., jax.Array]]] = {
    "q4_0": (_d_scale, _q4_0),
    "q5_0": (_d_scale, _q5_0),
    "q8_0": (_d_scale, _q8_0),
    "q4_k": (_q4_k_scales, _q4_k),
    "q6_k": (_q6_k_scales, _q6_k),
    # raw bytes of a float tensor (GGUF's F32 norms, say) decode the same way
    "float32": (_no_scales, _dense(jnp.float32)),
    "float16": (_no_scales, _dense(jnp.float16)),
    "bfloat16": (_no_scales, _dense(jnp.bfloat16)),
}

CHUNK_BYTES = 4 << 20
"""Float32 weight bytes :func:`quant_matmul` may decode at a time (one row of x never
writes any: XLA fuses the decoding into its dot)."""

DOT_CHUNK_BYTES = 1 << 20
"""The float32 chunk, at most, that ``kernel="scaled"`` writes for a dot with more
than one row of x: small enough to stay in cache (256 KiB to 2 MiB ran alike here)."""

KERNELS = ("scaled", "dequantize")
""":func:`quant_matmul`'s kernels: the default, and the baseline it replaced."""

DEQUANTIZABLE: tuple[str, ...] = tuple(_DECODERS)
"""The storage types :func:`dequantize` reads: every quantized type, and the float dtypes."""


def _check_bytes(t: dtypes.StorageType, blocks: jax.Array, shape: tuple[int, ...]) -> None:
    expected = dtypes.nbytes(t, shape)
    if blocks.dtype != jnp.uint8 or blocks.size != expected:
        raise ModelFormatError(
            f"{t.name} tensor of shape {shape} needs {expected} uint8 bytes; got "
            f"{blocks.dtype} {tuple(blocks.shape)} ({blocks.size} elements)"
        )


def _decoder(t: dtypes.StorageType) -> tuple[Callable[[jax.Array], Scales], Callable[..., Any]]:
    decoder = _DECODERS.get(t.name)
    if decoder is None:
        raise ModelFormatError(
            f"cannot dequantize storage type {t.name!r}; expected one of {', '.join(DEQUANTIZABLE)}"
        )
    return decoder


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
    scales, values = _decoder(t)
    shape = tuple(shape)
    blocks = jnp.asarray(blocks)
    _check_bytes(t, blocks, shape)
    # a quantized block, or a dense element's bytes, per row of the decoder's input
    b = blocks.reshape(-1, t.block_bytes)
    return values(b, scales(b)).reshape(shape)


def quant_matmul(
    x: Any,
    type_name: str,
    blocks: Any,
    shape: Sequence[int],
    *,
    chunk_bytes: int | None = CHUNK_BYTES,
    kernel: str = "scaled",
) -> jax.Array:
    """``x @ w.T`` for a weight ``w`` of logical ``shape`` (out_features, in_features).

    ``w`` is stored as ``type_name`` with blocks along ``in_features`` (GGUF's layout);
    x is (..., in_features), the result (..., out_features) in float32. Each output is
    a float32 dot product of x with a row of ``dequantize(type_name, blocks, shape)``
    (the weights exact, the order of the sum XLA's).

    The weight goes by row chunks of at most ``chunk_bytes`` of float32 (a ``fori_loop``),
    so XLA's temporaries stay small whatever its size; ``None`` takes it whole.
    ``kernel="scaled"`` (the default) writes no float32 weight for one row of x (XLA
    fuses the decoding into a matrix-vector dot that reads each byte once) and, for more
    rows, chunks of at most :data:`DOT_CHUNK_BYTES`, each decoded from bytes and block
    scales a loop step ahead. ``kernel="dequantize"`` is the baseline: each chunk
    dequantized in one fusion, then a dot. ``type_name``, ``shape``, ``chunk_bytes`` and
    ``kernel`` are static.

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
    if kernel not in KERNELS:
        raise ModelFormatError(f"quant_matmul: unknown kernel {kernel!r}; expected {KERNELS}")
    out_features, in_features = shape
    x = jnp.asarray(x, _F32)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ModelFormatError(
            f"quant_matmul: x {tuple(x.shape)} must end in in_features = {in_features} "
            f"(weight {shape})"
        )
    t = dtypes.storage_type(type_name)
    decoder = _decoder(t)
    _check_bytes(t, jnp.asarray(blocks), shape)
    batch = x.reshape(-1, in_features)  # (b, in_features)
    rows = out_features
    if chunk_bytes is not None and in_features > 0:
        if kernel == "scaled" and batch.shape[0] > 1:
            chunk_bytes = min(chunk_bytes, DOT_CHUNK_BYTES)
        rows = min(out_features, max(1, chunk_bytes // (4 * in_features)))
    if kernel == "dequantize":
        blocks = jnp.asarray(blocks).reshape(out_features, dtypes.row_nbytes(t, in_features))
        y = _by_row_chunks(_dequantized_times(t.name, batch, blocks), out_features, rows, batch)
    else:
        n_blocks = in_features // t.block_elements
        blocks = jnp.asarray(blocks).reshape(out_features, n_blocks, t.block_bytes)
        y = _scaled_times(decoder, batch, blocks, rows)
    return y.reshape(*x.shape[:-1], out_features)


RowsTimesX = Callable[[Any, int], jax.Array]
"""``f(start, n)``: rows ``start:start + n`` of the weight times x, ``(b, n)``; ``start``
may be traced, ``n`` is static."""


def _dequantized_times(type_name: str, batch: jax.Array, blocks: jax.Array) -> RowsTimesX:
    """The baseline: a chunk's rows (row_bytes each) dequantized in one fusion, then a dot."""

    def rows_times_x(start: Any, n: int) -> jax.Array:
        part = jax.lax.dynamic_slice_in_dim(blocks, start, n)  # (n, row_bytes)
        w = dequantize(type_name, part, (n, batch.shape[1]))
        return (jax.lax.optimization_barrier(w) @ batch.T).T

    return rows_times_x


def _scaled_times(
    decoder: tuple[Callable[[jax.Array], Scales], Callable[..., jax.Array]],
    batch: jax.Array,
    blocks: jax.Array,
    rows: int,
) -> jax.Array:
    """batch (b, in) times the rows of ``blocks`` (out, n_blocks, block_bytes): (b, out)."""
    scales_of, values_of = decoder
    out_features, in_features = blocks.shape[0], batch.shape[1]

    def times_x(part: jax.Array, scales: Scales) -> jax.Array:  # (b, rows of part)
        return batch @ values_of(part, scales).reshape(part.shape[0], in_features).T

    if batch.shape[0] == 1:  # a matrix-vector dot: XLA fuses everything into it

        def fused(start: Any, n: int) -> jax.Array:
            part = jax.lax.dynamic_slice_in_dim(blocks, start, n)
            return times_x(part, scales_of(part))

        return _by_row_chunks(fused, out_features, rows, batch)
    if rows >= out_features:
        return times_x(blocks, scales_of(blocks))
    # A library dot needs its operand written out. Decoded from a dynamic slice of the
    # weight, each value would pay for the slice's index arithmetic (3x the time) and its
    # block's scales again: so each step decodes chunk i from bytes and scales that the
    # step before sliced and decoded, loop operands that XLA cannot fuse into it.
    n_full = out_features // rows

    def load(i: Any) -> tuple[jax.Array, Scales]:
        part = jax.lax.dynamic_slice_in_dim(blocks, i * rows, rows)
        return part, scales_of(part)

    def step(i: jax.Array, carry: tuple[jax.Array, jax.Array, Scales]) -> Any:
        y, part, scales = carry
        y = jax.lax.dynamic_update_slice_in_dim(y, times_x(part, scales), i * rows, axis=1)
        return (y, *load(jnp.minimum(i + 1, n_full - 1)))  # the last step reloads its own

    y = jnp.zeros((batch.shape[0], out_features), _F32)
    y = jax.lax.fori_loop(0, n_full, step, (y, *load(0)))[0]
    if out_features % rows:
        tail = blocks[n_full * rows :]
        y = y.at[:, n_full * rows :].set(times_x(tail, scales_of(tail)))
    return y


def _by_row_chunks(fn: RowsTimesX, out_features: int, rows: int, batch: jax.Array) -> jax.Array:
    """``fn`` over chunks of ``rows`` rows (a ``fori_loop``, then the rest), side by side:
    (b, out_features)."""
    if rows == 0 or rows >= out_features:
        return fn(0, out_features)
    n_full = out_features // rows

    def step(i: jax.Array, y: jax.Array) -> jax.Array:
        # slices read in place: reshaping into (n, rows, ...) first copied the weight
        return jax.lax.dynamic_update_slice_in_dim(y, fn(i * rows, rows), i * rows, axis=1)

    y = jnp.zeros((batch.shape[0], out_features), _F32)
    y = jax.lax.fori_loop(0, n_full, step, y)
    if out_features % rows:
        y = y.at[:, n_full * rows :].set(fn(n_full * rows, out_features % rows))
    return y


def stored_matmul(x: Any, type_name: str, w: Any, shape: Sequence[int]) -> jax.Array:
    """``x @ w.T`` in float32 for a weight of logical ``shape`` (out, in) as ``apply``
    receives it: a dense array, or the raw ``uint8`` blocks of a quantized storage type
    (then :func:`quant_matmul`)."""
    if dtypes.storage_type(type_name).quantized:
        return quant_matmul(x, type_name, w, shape)
    return jnp.matmul(jnp.asarray(x, _F32), jnp.asarray(w, _F32).T)


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
