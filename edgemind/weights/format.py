"""The weight file layout: a msgpack stream whose tensor payloads start at aligned offsets.

A layer's weight file is one msgpack header map, then for each tensor an optional
padding ext object (type 1, zero bytes) and a bin32 object whose data starts at a
multiple of the alignment. Any msgpack decoder reads it; edgemind's reader instead
reads each payload straight into its destination. This module is pure: it computes
layouts and packs and validates headers, and does no I/O. docs/format.md is the spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from edgemind.dtypes import nbytes as storage_nbytes
from edgemind.errors import ModelFormatError, brief
from edgemind.units import align_up
from edgemind.weights.manifest import (
    DTYPES,
    MAX_TENSOR_BYTES,
    LayerSpec,
    TensorSpec,
    check_alignment,
    parse_tensor_entry,
)

WEIGHTS_MAGIC = "edgemind-weights"
WEIGHTS_FORMAT_VERSION = 2  # 2: tensors name a storage type (see edgemind.dtypes)
READABLE_WEIGHTS_VERSIONS = (1, 2)
PAD_EXT_TYPE = 1  # msgpack ext type of padding objects
BIN32_HEADER_BYTES = 5  # 0xc6 + 4-byte big-endian length
MAX_PAYLOAD_BYTES = MAX_TENSOR_BYTES  # the largest bin32 object
MAX_HEADER_BYTES = 16 << 20  # a reader gives up on a header longer than this
PLACEHOLDER_CRC32 = "00000000"  # same width as a real checksum: the header keeps its size
_HEX = frozenset("0123456789abcdef")


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The NumPy dtype of a manifest dtype name (bfloat16 comes from ml_dtypes).

    >>> numpy_dtype("float16").itemsize
    2
    """
    if dtype not in DTYPES:
        raise ModelFormatError(f"unknown dtype {brief(dtype)}; expected one of {DTYPES}")
    if dtype == "bfloat16":
        import ml_dtypes  # only needed for bfloat16; keeps plain imports light

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The manifest name of a NumPy dtype, whatever its byte order.

    >>> dtype_name(np.dtype(">i4"))
    'int32'
    """
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ModelFormatError(f"dtype {brief(name)} cannot be stored; expected one of {DTYPES}")
    return name


def padding_object(nbytes: int) -> bytes:
    """A msgpack ext object of type 1 holding zeros, exactly ``nbytes`` long (0 or >= 3).

    >>> padding_object(4).hex()
    'c7010100'
    """
    if nbytes == 0:
        return b""
    if 3 <= nbytes <= 3 + 0xFF:
        return bytes((0xC7, nbytes - 3, PAD_EXT_TYPE)) + bytes(nbytes - 3)
    if 3 <= nbytes <= 4 + 0xFFFF:
        return (
            b"\xc8" + (nbytes - 4).to_bytes(2, "big") + bytes((PAD_EXT_TYPE,)) + bytes(nbytes - 4)
        )
    if 3 <= nbytes <= 6 + 0xFFFFFFFF:
        return (
            b"\xc9" + (nbytes - 6).to_bytes(4, "big") + bytes((PAD_EXT_TYPE,)) + bytes(nbytes - 6)
        )
    raise ValueError(f"no msgpack padding object is {nbytes} bytes long")


def bin32_header(nbytes: int) -> bytes:
    """The 5 bytes that open a msgpack bin32 object of ``nbytes`` data bytes."""
    return b"\xc6" + nbytes.to_bytes(4, "big")


def payload_offset(prev_end: int, alignment: int) -> int:
    """The first aligned payload offset after ``prev_end`` that a padding object can reach.

    The gap between ``prev_end`` and the bin32 header must be 0 or at least 3 bytes
    (the smallest ext object); a gap of 1 or 2 moves the payload one alignment on.

    >>> payload_offset(59, 64), payload_offset(60, 64), payload_offset(57, 64)
    (64, 128, 128)
    """
    offset = align_up(prev_end + BIN32_HEADER_BYTES, alignment)
    while offset - BIN32_HEADER_BYTES - prev_end in (1, 2):
        offset += alignment
    return offset


@dataclasses.dataclass(frozen=True)
class WeightFileHeader:
    """A weight file's decoded header, and the byte extent it implies."""

    layer: str
    alignment_bytes: int
    tensors: tuple[TensorSpec, ...]
    header_nbytes: int  # length of the header object at offset 0
    format_version: int = WEIGHTS_FORMAT_VERSION

    @property
    def file_nbytes(self) -> int:
        """Length of the whole file: the end of the last payload (or of the header)."""
        ends = [t.offset_bytes + t.nbytes for t in self.tensors]
        return max([self.header_nbytes, *ends])

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise ModelFormatError(
            f"weight file of layer {brief(self.layer)} has no tensor {brief(name)}"
        )


def pack_header(layer: str, alignment_bytes: int, tensors: Sequence[TensorSpec]) -> bytes:
    """The msgpack header map, keys in the documented order. Does not validate."""
    return msgpack.packb(
        {
            "magic": WEIGHTS_MAGIC,
            "format_version": WEIGHTS_FORMAT_VERSION,
            "layer": layer,
            "alignment_bytes": alignment_bytes,
            "tensors": [t.to_json() for t in tensors],
        },
        use_bin_type=True,
    )


def plan_layout(
    layer: str, alignment_bytes: int, tensors: Sequence[tuple[str, str, tuple[int, ...]]]
) -> WeightFileHeader:
    """Place ``(name, storage, shape)`` tensors in a file, checksums left as placeholders.

    Offsets depend on the header's length and the header's length on the offsets, so
    the layout is iterated to its least fixed point (both only grow, so it converges).

    >>> h = plan_layout("dense", 64, [("w", "float32", (4, 4)), ("b", "float32", (4,))])
    >>> [t.offset_bytes for t in h.tensors], h.file_nbytes
    ([256, 384], 400)
    """
    if alignment_bytes < 64 or alignment_bytes & (alignment_bytes - 1):
        raise ModelFormatError(f"alignment_bytes {alignment_bytes} must be a power of two >= 64")
    header_nbytes = 0
    while True:
        specs = []
        end = header_nbytes
        for name, dtype, shape in tensors:
            nbytes = storage_nbytes(
                dtype, shape, where=f"layer {brief(layer)}, tensor {brief(name)}"
            )
            if nbytes > MAX_PAYLOAD_BYTES:
                raise ModelFormatError(
                    f"layer {brief(layer)}, tensor {brief(name)}: {nbytes} bytes exceed one "
                    "msgpack "
                    f"bin32 object ({MAX_PAYLOAD_BYTES} bytes); split the tensor"
                )
            offset = payload_offset(end, alignment_bytes)
            specs.append(TensorSpec(name, dtype, tuple(shape), nbytes, offset, PLACEHOLDER_CRC32))
            end = offset + nbytes
        packed = len(pack_header(layer, alignment_bytes, specs))
        if packed == header_nbytes:
            return WeightFileHeader(layer, alignment_bytes, tuple(specs), header_nbytes)
        header_nbytes = packed


# ------------------------------------------------------------------------- validation


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelFormatError(
            f"{where}: header field {brief(key)} is {brief(value)}, expected a {kind.__name__}"
        )
    return value


def _tensor_from_obj(obj: Any, where: str, alignment: int, prev_end: int) -> TensorSpec:
    if not isinstance(obj, Mapping):
        raise ModelFormatError(f"{where}: tensor entry {brief(obj)} is not a map")
    spec = parse_tensor_entry(obj, where, alignment)
    if spec.offset_bytes < prev_end + BIN32_HEADER_BYTES:
        raise ModelFormatError(
            f"{where}, tensor {brief(spec.name)}: payload offset {spec.offset_bytes} must be at "
            f"least {prev_end + BIN32_HEADER_BYTES} (after the previous object and a bin32 "
            "header)"
        )
    return spec


def header_from_obj(obj: Any, header_nbytes: int, where: str) -> WeightFileHeader:
    """Validate a decoded header map; magic and version are checked first."""
    magic = obj.get("magic") if isinstance(obj, Mapping) else None
    if magic != WEIGHTS_MAGIC:
        raise ModelFormatError(
            f"{where}: not an edgemind weight file: magic is {brief(magic)}, expected "
            f"{brief(WEIGHTS_MAGIC)}; convert the model again"
        )
    version = obj.get("format_version")
    if isinstance(version, bool) or version not in READABLE_WEIGHTS_VERSIONS:
        raise ModelFormatError(
            f"{where}: weight format_version is {brief(version)}, this edgemind reads versions "
            f"{', '.join(map(str, READABLE_WEIGHTS_VERSIONS))}; convert the model again or "
            "upgrade edgemind"
        )
    layer = _field(obj, "layer", str, where)
    alignment = check_alignment(_field(obj, "alignment_bytes", int, where), where)
    where = f"{where}: layer {brief(layer)}"
    tensors: list[TensorSpec] = []
    end = header_nbytes
    for entry in _field(obj, "tensors", list, where):
        spec = _tensor_from_obj(entry, where, alignment, end)
        tensors.append(spec)
        end = spec.offset_bytes + spec.nbytes
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ModelFormatError(f"{where}: duplicate tensor names in {names}")
    return WeightFileHeader(layer, alignment, tuple(tensors), header_nbytes, version)


def check_header_matches(header: WeightFileHeader, expected: LayerSpec, where: str) -> None:
    """Raise unless the file's header describes exactly the manifest's layer (for a layer
    that shares another's file: the owner, and the shared tensors among its tensors)."""
    hint = "the file and manifest.json come from different conversions; convert the model again"
    owner = expected.shares or expected.name
    if header.layer != owner:
        raise ModelFormatError(
            f"{where}: header names layer {brief(header.layer)}, manifest expects "
            f"{brief(owner)}; "
            f"{hint}"
        )
    found = [t.name for t in header.tensors]
    wanted = [t.name for t in expected.tensors]
    if expected.shares is not None:  # the shared tensors, in the owner's order
        header = dataclasses.replace(
            header, tensors=tuple(t for t in header.tensors if t.name in wanted)
        )
        found = [t.name for t in header.tensors]
    if found != wanted:
        raise ModelFormatError(
            f"{where}: layer {brief(expected.name)} file holds tensors {found}, manifest expects "
            f"{wanted}; {hint}"
        )
    for got, want in zip(header.tensors, expected.tensors, strict=True):
        for field in ("storage", "shape", "nbytes", "offset_bytes", "crc32"):
            a, b = getattr(got, field), getattr(want, field)
            if a != b:
                raise ModelFormatError(
                    f"{where}: layer {brief(expected.name)}, tensor {brief(got.name)}: header has "
                    f"{field} {brief(a)}, manifest expects {brief(b)}; {hint}"
                )
