"""Dequantizers through jax.jit, bit for bit against gguf's NumPy ``dequantize``.

gguf.quants is an independent implementation (bit-identical to ggml's C code); every
comparison is of float32 bit patterns, not a tolerance.
"""

from __future__ import annotations

import functools

import gguf
import jax
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from edgemind import dtypes
from edgemind.errors import ModelFormatError
from edgemind.layers.quant import (
    DEQUANTIZABLE,
    DOT_CHUNK_BYTES,
    KERNELS,
    dequantize,
    quant_matmul,
)

# where each quantized type keeps its f16 scales, in bytes from the block's start
_F16_OFFSETS = {"q4_0": (0,), "q5_0": (0,), "q8_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}

jit_dequantize = jax.jit(dequantize, static_argnums=(0, 2))
jit_quant_matmul = jax.jit(quant_matmul, static_argnums=(1, 3))


def _gguf_type(name: str) -> GGMLQuantizationType:
    number = dtypes.storage_type(name).gguf_type
    assert number is not None
    return GGMLQuantizationType(number)


def _reference(name: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(-1, dtypes.row_nbytes(name, shape[-1]))
    return gguf.quants.dequantize(rows, _gguf_type(name)).reshape(shape)


def _assert_bitwise_equal(got, expected) -> None:
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def _random_blocks(rng, name: str, n_rows: int, row_elements: int) -> np.ndarray:
    """Random bytes (n_rows, row_bytes) with every f16 scale finite: normal, subnormal,
    zero and negative scales all occur."""
    t = dtypes.storage_type(name)
    raw = rng.integers(0, 256, (n_rows, row_elements // t.block_elements, t.block_bytes))
    raw = raw.astype(np.uint8)
    for offset in _F16_OFFSETS[name]:
        bits = rng.integers(0, 1 << 16, raw.shape[:-1]).astype(np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits ^ 0x4000, bits)  # no inf / nan
        bits.flat[:4] = [0x0000, 0x8000, 0x0001, 0x83FF]  # +-0 and subnormals for sure
        raw[..., offset : offset + 2] = bits.astype("<u2")[..., None].view(np.uint8)
    return raw.reshape(n_rows, -1)


@pytest.mark.parametrize("name", dtypes.QUANTIZED_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_bitwise_equal(name, seed):
    rng = np.random.default_rng(seed)
    cols = dtypes.storage_type(name).block_elements * 5
    raw = _random_blocks(rng, name, 48, cols)
    expected = _reference(name, raw, (48, cols))
    _assert_bitwise_equal(jit_dequantize(name, raw, (48, cols)), expected)
    # the same bytes flat, or as a 3-d tensor, give the same values
    _assert_bitwise_equal(jit_dequantize(name, raw.ravel(), (48, cols)), expected)
    shape3 = (6, 8, cols)
    _assert_bitwise_equal(jit_dequantize(name, raw, shape3), expected.reshape(shape3))


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
def test_gguf_quantized_weights_bitwise_equal(name):
    """Blocks as gguf's quantizer writes them from Gaussian weights (realistic scales)."""
    w = np.random.default_rng(5).normal(0, 0.05, (96, 640)).astype(np.float32)
    raw = gguf.quants.quantize(w, _gguf_type(name))
    assert raw.nbytes == dtypes.nbytes(name, w.shape)
    expected = _reference(name, raw, w.shape)
    _assert_bitwise_equal(jit_dequantize(name, raw, w.shape), expected)
    assert np.abs(expected - w).max() < 0.05 * 6 / 8  # it is a quantization of w


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_dense_bytes(name):
    np_dtype = np.dtype(name) if name != "bfloat16" else np.dtype(jax.numpy.bfloat16)
    values = np.random.default_rng(3).normal(0, 100, (7, 5)).astype(np_dtype)
    got = jit_dequantize(name, values.view(np.uint8), (7, 5))
    _assert_bitwise_equal(got, values.astype(np.float32))


def test_bad_inputs():
    with pytest.raises(ModelFormatError, match="needs 68 uint8 bytes; got uint8 \\(67,\\)"):
        dequantize("q8_0", np.zeros(67, np.uint8), (2, 32))
    with pytest.raises(ModelFormatError, match="got int8"):
        dequantize("q8_0", np.zeros(68, np.int8), (2, 32))
    with pytest.raises(ModelFormatError, match="multiple of 32"):
        dequantize("q8_0", np.zeros(68, np.uint8), (4, 16))
    with pytest.raises(ModelFormatError, match="cannot dequantize storage type 'int8'"):
        dequantize("int8", np.zeros(4, np.uint8), (4,))
    with pytest.raises(ModelFormatError, match="unknown storage type 'q2_k'"):
        dequantize("q2_k", np.zeros(84, np.uint8), (256,))
    with pytest.raises(ModelFormatError, match="2-d weight"):
        quant_matmul(np.zeros(32), "q8_0", np.zeros(68, np.uint8), (68 // 34 * 32,))
    assert set(dtypes.QUANTIZED_NAMES) <= set(DEQUANTIZABLE)


@pytest.mark.parametrize("name", dtypes.QUANTIZED_NAMES)
@pytest.mark.parametrize("chunk_rows", [None, 7, 8, 40])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_shape", [(3, 2), (1,)])
def test_quant_matmul(name, chunk_rows, kernel, x_shape):
    """``x @ w.T`` with w (out, in): against float64 NumPy on gguf's dequantized w, for
    the whole weight at once and in row chunks (7 leaves a tail, 8 divides 40), for one
    row of x (the fused matrix-vector path) and several."""
    rng = np.random.default_rng(11)
    in_features = dtypes.storage_type(name).block_elements * 3
    if name in ("q4_k", "q6_k"):  # gguf's NumPy quantizer lacks K types: random blocks
        raw = _random_blocks(rng, name, 40, in_features)
    else:
        w = rng.normal(0, 1, (40, in_features)).astype(np.float32)
        raw = gguf.quants.quantize(w, _gguf_type(name))
    w_ref = _reference(name, raw, (40, in_features)).astype(np.float64)
    x = rng.normal(0, 1, (*x_shape, in_features)).astype(np.float32)
    chunk_bytes = None if chunk_rows is None else chunk_rows * 4 * in_features
    options = {"chunk_bytes": chunk_bytes, "kernel": kernel}
    fn = jax.jit(functools.partial(quant_matmul, **options), static_argnums=(1, 3))
    got = np.asarray(fn(x, name, raw, (40, in_features)))
    assert got.shape == (*x_shape, 40) and got.dtype == np.float32
    expected = x.astype(np.float64) @ w_ref.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w_ref).T
    assert np.all(np.abs(got - expected) <= 1e-5 * scale + 1e-30)


def _temp_bytes(shape, batch, **options):
    x = jax.ShapeDtypeStruct((batch, shape[1]), np.float32)
    raw = jax.ShapeDtypeStruct((dtypes.nbytes("q8_0", shape),), np.uint8)
    fn = jax.jit(lambda x, b: quant_matmul(x, "q8_0", b, shape, **options))
    return fn.lower(x, raw).compile().memory_analysis().temp_size_in_bytes


def test_quant_matmul_chunks_bound_xla_temporaries():
    """A (4096, 640) q8_0 weight: whole, the baseline's temporaries hold its 10 MiB of
    float32; in 1 MiB chunks they hold about one chunk."""
    shape = (4096, 640)
    assert _temp_bytes(shape, 1, chunk_bytes=None, kernel="dequantize") >= 4 * 4096 * 640
    assert _temp_bytes(shape, 1, chunk_bytes=1 << 20, kernel="dequantize") <= (1 << 20) + (64 << 10)


@pytest.mark.parametrize("rows", [4096, 65536])
def test_scaled_kernel_temporaries_do_not_grow_with_the_weight(rows):
    """One row of x: no float32 weight at all; more rows: two chunks of bytes and scales,
    and one of float32 (at most DOT_CHUNK_BYTES), whatever the weight's size."""
    shape = (rows, 640)
    assert _temp_bytes(shape, 1) <= 64 << 10
    bound = DOT_CHUNK_BYTES * (1 + 2 * 36 / 128) + (64 << 10)  # f32 chunk + 2 q8_0 chunks
    for batch in (2, 8, 64):
        assert _temp_bytes(shape, batch) <= bound + 4 * batch * rows  # + the output


def test_kernels_agree_on_gaussian_weights():
    """The two kernels: the same dot products to float32 rounding, on every type."""
    rng = np.random.default_rng(4)
    for name in ("q4_0", "q5_0", "q8_0"):
        w = rng.normal(0, 0.05, (300, 640)).astype(np.float32)
        raw = gguf.quants.quantize(w, _gguf_type(name))
        x = rng.normal(0, 1, (5, 640)).astype(np.float32)
        ys = [
            np.asarray(quant_matmul(x, name, raw, w.shape, kernel=k, chunk_bytes=64 << 10))
            for k in KERNELS
        ]
        np.testing.assert_allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5 * np.abs(ys[1]).max())


def test_quant_matmul_zero_rows_and_bad_x():
    raw = np.zeros(0, np.uint8)
    assert quant_matmul(np.ones((2, 32)), "q8_0", raw, (0, 32)).shape == (2, 0)
    with pytest.raises(ModelFormatError, match="must end in in_features = 64"):
        quant_matmul(np.ones((2, 32)), "q8_0", np.zeros(68, np.uint8), (1, 64))
    with pytest.raises(ModelFormatError, match="unknown kernel 'fast'"):
        quant_matmul(np.ones((2, 32)), "q8_0", np.zeros(34, np.uint8), (1, 32), kernel="fast")


# ------------------------------------------------------- real tensors: Gemma 3 270M GGUF


@pytest.fixture(scope="session")
def gemma_gguf(gemma_gguf_path):
    """The Gemma 3 270M Q4_K_M GGUF, read once."""
    return gguf.GGUFReader(gemma_gguf_path)  # ~9 s: it parses the 262,144-token vocabulary


_MAX_ROWS = 2048  # of the tied 262,144-row embedding, the first rows are enough


def _tensors_by_type(reader) -> dict[str, list]:
    found: dict[str, list] = {}
    for tensor in reader.tensors:
        name = dtypes.from_gguf_type(int(tensor.tensor_type)).name
        found.setdefault(name, []).append(tensor)
    return found


@pytest.mark.slow
def test_gemma_tensors_bitwise_equal(gemma_gguf):
    by_type = _tensors_by_type(gemma_gguf)
    # what Q4_K_M is made of: q4_0 is edgemind's own, checked on random and gguf blocks
    assert set(by_type) == {"float32", "q5_0", "q8_0", "q4_k", "q6_k"}
    checked = {}
    for name, tensors in by_type.items():
        # three per type, differently shaped where the file has them, and the embedding
        picks = list({tuple(t.shape): t for t in tensors}.values())[:3]
        for tensor in picks:
            shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims inner first
            shape = (min(shape[0], _MAX_ROWS), *shape[1:]) if len(shape) > 1 else shape
            raw = np.ascontiguousarray(tensor.data[: shape[0]]).view(np.uint8)
            expected = gguf.quants.dequantize(raw, tensor.tensor_type).reshape(shape)
            _assert_bitwise_equal(jit_dequantize(name, raw, shape), expected)
            checked.setdefault(name, []).append(tensor.name)
    assert "token_embd.weight" in checked["q8_0"]
    assert all(len(v) >= 1 for v in checked.values())


@pytest.mark.slow
def test_gemma_lm_head_rows_matmul(gemma_gguf):
    """The tied embedding as an LM head: logits of a few rows equal gguf's, to f32 rounding."""
    embd = next(t for t in gemma_gguf.tensors if t.name == "token_embd.weight")
    raw = np.ascontiguousarray(embd.data[:_MAX_ROWS])  # (rows, 680) bytes of q8_0
    w = gguf.quants.dequantize(raw, embd.tensor_type).astype(np.float64)  # (rows, 640)
    x = np.random.default_rng(2).normal(0, 1, (1, 640)).astype(np.float32)
    got = np.asarray(jit_quant_matmul(x, "q8_0", raw, (_MAX_ROWS, 640)))
    expected = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
