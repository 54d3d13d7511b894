"""Tests of the weight file layout: padding objects, offsets, headers."""

from __future__ import annotations

import io
import math
import random

import msgpack
import numpy as np
import pytest

from edgemind.errors import ModelFormatError
from edgemind.weights.format import (
    BIN32_HEADER_BYTES,
    PLACEHOLDER_CRC32,
    WEIGHTS_MAGIC,
    check_header_matches,
    dtype_name,
    header_from_obj,
    numpy_dtype,
    pack_header,
    padding_object,
    payload_offset,
    plan_layout,
)
from edgemind.weights.manifest import DTYPES, LayerSpec, TensorSpec


@pytest.mark.parametrize("nbytes", [0, 3, 4, 5, 100, 258, 259, 260, 4100, 65539, 65540, 70000])
def test_padding_object_is_one_msgpack_ext_of_exact_length(nbytes: int) -> None:
    pad = padding_object(nbytes)
    assert len(pad) == nbytes
    objects = list(msgpack.Unpacker(io.BytesIO(pad)))
    if nbytes == 0:
        assert objects == []
    else:
        assert len(objects) == 1
        assert objects[0].code == 1 and set(objects[0].data) <= {0}


@pytest.mark.parametrize("nbytes", [1, 2, -1])
def test_padding_object_rejects_impossible_gaps(nbytes: int) -> None:
    with pytest.raises(ValueError):
        padding_object(nbytes)


@pytest.mark.parametrize("alignment", [64, 128, 4096])
def test_payload_offset_is_smallest_reachable_aligned_offset(alignment: int) -> None:
    for prev_end in range(0, 3 * alignment):
        offset = payload_offset(prev_end, alignment)
        gap = offset - BIN32_HEADER_BYTES - prev_end
        assert offset % alignment == 0 and (gap == 0 or gap >= 3)
        # no smaller aligned offset would do
        for smaller in range(offset - alignment, 0, -alignment):
            g = smaller - BIN32_HEADER_BYTES - prev_end
            assert g < 0 or g in (1, 2)


def test_plan_layout_reaches_a_fixed_point_for_random_tensors() -> None:
    rng = random.Random(0)
    for _ in range(200):
        alignment = rng.choice([64, 256, 4096])
        tensors = [
            (
                f"t{i}",
                rng.choice(DTYPES),
                tuple(rng.randrange(0, 300) for _ in range(rng.randrange(3))),
            )
            for i in range(rng.randrange(0, 40))
        ]
        header = plan_layout("layer", alignment, tensors)
        assert len(pack_header("layer", alignment, header.tensors)) == header.header_nbytes
        end = header.header_nbytes
        for spec, (_, dtype, shape) in zip(header.tensors, tensors, strict=True):
            assert spec.offset_bytes % alignment == 0
            assert spec.offset_bytes >= end + BIN32_HEADER_BYTES
            assert spec.nbytes == math.prod(shape) * numpy_dtype(dtype).itemsize
            assert spec.crc32 == PLACEHOLDER_CRC32
            end = spec.offset_bytes + spec.nbytes
        assert header.file_nbytes == end


def test_plan_layout_rejects_bad_alignment_and_huge_tensors() -> None:
    with pytest.raises(ModelFormatError, match=r"power of two"):
        plan_layout("l", 96, [])
    with pytest.raises(ModelFormatError, match=r"'big'.*bin32"):
        plan_layout("l", 64, [("big", "float32", (1 << 30,))])


def test_header_round_trips_through_msgpack() -> None:
    planned = plan_layout("dense", 64, [("w", "float16", (3, 5)), ("s", "int32", ())])
    obj = msgpack.unpackb(pack_header("dense", 64, planned.tensors))
    assert list(obj) == ["magic", "format_version", "layer", "alignment_bytes", "tensors"]
    assert header_from_obj(obj, planned.header_nbytes, "f") == planned


def _header_obj(**changes: object) -> dict:
    planned = plan_layout("dense", 64, [("w", "float32", (2, 2))])
    obj = msgpack.unpackb(pack_header("dense", 64, planned.tensors))
    tensor_changes = {k: v for k, v in changes.items() if k in obj["tensors"][0]}
    obj.update({k: v for k, v in changes.items() if k not in tensor_changes})
    obj["tensors"][0].update(tensor_changes)
    return obj


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"magic": "safetensors"}, "magic is 'safetensors', expected 'edgemind-weights'"),
        ({"format_version": 9}, "format_version is 9, this edgemind reads versions 1, 2"),
        ({"alignment_bytes": 100}, "alignment_bytes 100"),
        ({"nbytes": 12}, "tensor 'w': nbytes is 12, expected 16 for shape \\[2, 2\\]"),
        ({"shape": [2, 3]}, "tensor 'w': nbytes is 16, expected 24"),
        ({"storage": "complex64"}, "unknown storage type 'complex64'"),
        ({"storage": "q8_0"}, "q8_0"),  # blocks of 32 do not fit rows of 2
        ({"offset": 100}, "tensor 'w': payload offset 100 must be 64-aligned"),
        ({"offset": 0}, "payload offset 0"),
        ({"crc32": "ABCDEF01"}, "8 lowercase hex"),
        ({"layer": 3}, "'layer' is 3"),
    ],
)
def test_header_from_obj_names_what_is_wrong(changes: dict, message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        header_from_obj(_header_obj(**changes), 64, "layers/00_dense.msgpack")


def test_header_from_obj_rejects_non_maps() -> None:
    with pytest.raises(ModelFormatError, match=r"not an edgemind weight file"):
        header_from_obj([1, 2], 3, "f")


def test_check_header_matches_reports_field_found_and_expected() -> None:
    planned = plan_layout("dense", 64, [("w", "float32", (2, 2))])
    spec = planned.tensors[0]
    layer = LayerSpec("dense", "dense", {}, "f", (spec,))
    check_header_matches(planned, layer, "f")
    other = LayerSpec(
        "dense", "dense", {}, "f", (TensorSpec("w", *_spec_fields(spec, "1234abcd")),)
    )
    with pytest.raises(
        ModelFormatError, match=r"tensor 'w': header has crc32 '00000000', manifest"
    ):
        check_header_matches(planned, other, "f")
    with pytest.raises(ModelFormatError, match=r"header names layer 'dense', manifest expects 'x'"):
        check_header_matches(planned, LayerSpec("x", "dense", {}, "f", (spec,)), "f")
    with pytest.raises(ModelFormatError, match=r"holds tensors \['w'\], manifest expects \[\]"):
        check_header_matches(planned, LayerSpec("dense", "dense", {}, "f", ()), "f")


def _spec_fields(spec: TensorSpec, crc: str) -> tuple:
    return (spec.dtype, spec.shape, spec.nbytes, spec.offset_bytes, crc)


def test_dtype_names_round_trip() -> None:
    for name in DTYPES:
        assert dtype_name(numpy_dtype(name)) == name
    assert dtype_name(np.dtype(">f2")) == "float16"
    with pytest.raises(ModelFormatError, match=r"complex64"):
        dtype_name(np.dtype("complex64"))
    with pytest.raises(ModelFormatError, match=r"float8"):
        numpy_dtype("float8")


def test_magic_constant_is_what_the_spec_says() -> None:
    assert WEIGHTS_MAGIC == "edgemind-weights"
