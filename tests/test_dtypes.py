"""Storage types: the table against the gguf package and the manifest, sizes, errors."""

from __future__ import annotations

import dataclasses
import math

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgemind import dtypes
from edgemind.errors import ModelFormatError
from edgemind.weights import manifest

# GGUF's names for edgemind's dense dtypes (the quantized ones are the same, upper-case)
_GGUF_DENSE_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int8": "I8",
    "int32": "I32",
    "int64": "I64",
}


@pytest.mark.parametrize("name", list(dtypes.STORAGE_TYPES))
def test_table_matches_gguf(name):
    t = dtypes.storage_type(name)
    if t.gguf_type is None:
        assert name == "uint8"  # GGUF has no unsigned type
        return
    qtype = GGMLQuantizationType(t.gguf_type)
    assert qtype.name == _GGUF_DENSE_NAMES.get(name, name.upper())
    assert GGML_QUANT_SIZES[qtype] == (t.block_elements, t.block_bytes)
    assert dtypes.from_gguf_type(int(qtype)) is t


def test_dense_types_are_the_manifest_dtypes():
    assert set(dtypes.DENSE_NAMES) == set(manifest.DTYPES)
    for name in manifest.DTYPES:
        assert dtypes.storage_type(name).block_bytes == manifest.dtype_itemsize(name)
        assert not dtypes.storage_type(name).quantized


def test_quantized_types():
    assert dtypes.QUANTIZED_NAMES == ("q4_0", "q5_0", "q8_0", "q4_k", "q6_k")
    sizes = {
        n: (dtypes.STORAGE_TYPES[n].block_elements, dtypes.STORAGE_TYPES[n].block_bytes)
        for n in dtypes.QUANTIZED_NAMES
    }
    assert sizes == {
        "q4_0": (32, 18),
        "q5_0": (32, 22),
        "q8_0": (32, 34),
        "q4_k": (256, 144),
        "q6_k": (256, 210),
    }


def test_storage_types_are_frozen():
    t = dtypes.storage_type("q8_0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.block_bytes = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        dtypes.STORAGE_TYPES["x"] = t  # type: ignore[index]
    assert dtypes.storage_type(t) is t


@pytest.mark.parametrize("bad", ["q3_k", "Q8_0", "", None, ["q8_0"], "x" * 1000])
def test_unknown_storage_type_lists_valid_names(bad):
    with pytest.raises(ModelFormatError) as err:
        dtypes.storage_type(bad)
    message = str(err.value)
    assert "unknown storage type" in message
    assert all(name in message for name in dtypes.STORAGE_TYPES)
    assert "\n" not in message and len(message) < 250


def test_unsupported_gguf_type():
    for qtype in GGMLQuantizationType:
        if int(qtype) not in {t.gguf_type for t in dtypes.STORAGE_TYPES.values()}:
            with pytest.raises(ModelFormatError, match=rf"GGUF tensor type {int(qtype)} is not"):
                dtypes.from_gguf_type(int(qtype))
    with pytest.raises(ModelFormatError, match="8 \\(q8_0\\)"):
        dtypes.from_gguf_type(999)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("float32", (), 4),
        ("float32", (0, 7), 0),
        ("bfloat16", (3, 5), 30),
        ("int64", (2,), 16),
        ("uint8", (9,), 9),
        ("q8_0", (262144, 640), 262144 * 20 * 34),
        ("q8_0", (0, 64), 0),
        ("q8_0", (5, 0), 0),
        ("q4_0", (32,), 18),
        ("q5_0", (2, 3, 64), 2 * 3 * 2 * 22),
        ("q4_k", (640, 1024), 640 * 4 * 144),
        ("q6_k", (640, 2048), 640 * 8 * 210),
    ],
)
def test_nbytes(name, shape, expected):
    assert dtypes.nbytes(name, shape) == expected
    assert dtypes.nbytes(dtypes.storage_type(name), list(shape)) == expected


def test_nbytes_agrees_with_gguf_on_random_shapes():
    rng = np.random.default_rng(13)
    for name in dtypes.STORAGE_TYPES:
        t = dtypes.storage_type(name)
        if t.gguf_type is None:
            continue
        for _ in range(20):
            shape = [int(d) for d in rng.integers(1, 5, rng.integers(1, 4))]
            shape[-1] *= t.block_elements
            byte_shape = gguf.quant_shape_to_byte_shape(shape, GGMLQuantizationType(t.gguf_type))
            # gguf's byte shape counts bytes along the last axis, dense types included
            assert dtypes.nbytes(t, shape) == math.prod(byte_shape)
            assert dtypes.row_nbytes(t, shape[-1]) == byte_shape[-1]


@pytest.mark.parametrize(
    ("name", "shape", "pattern"),
    [
        ("q8_0", (4, 33), "q8_0 row of 33 values is not a whole number of 32-value blocks"),
        ("q4_k", (640,), "multiple of 256"),
        ("q6_k", (), "needs at least one dimension"),
        ("float32", (2, -1), "must be a sequence of integers >= 0"),
        ("q8_0", (True, 32), "must be a sequence of integers >= 0"),
        ("int8", (2.0,), "must be a sequence of integers >= 0"),
    ],
)
def test_nbytes_errors(name, shape, pattern):
    with pytest.raises(ModelFormatError, match=pattern) as err:
        dtypes.nbytes(name, shape, where="layer_3.bin: w")
    assert str(err.value).startswith("layer_3.bin: w: ")
    assert "\n" not in str(err.value)


def test_row_nbytes():
    assert dtypes.row_nbytes("q8_0", 640) == 680
    assert dtypes.row_nbytes("q5_0", 640) == 440
    assert dtypes.row_nbytes("q4_k", 1024) == 576
    assert dtypes.row_nbytes("q6_k", 2048) == 1680
    assert dtypes.row_nbytes("float16", 3) == 6
    assert dtypes.row_nbytes("q4_0", 0) == 0
    with pytest.raises(ModelFormatError, match="multiple of 32"):
        dtypes.row_nbytes("q4_0", 48)
    for bad in (-32, 1.5, True, "32"):
        with pytest.raises(ModelFormatError, match="must be an integer >= 0"):
            dtypes.row_nbytes("q8_0", bad)  # type: ignore[arg-type]
