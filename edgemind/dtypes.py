"""Storage types: how a tensor's elements are laid out in bytes, in one table.

This module is the only source of byte sizes. A storage type is either a dense dtype
(one element per "block", ``itemsize`` bytes) or a block-quantized type that packs
``block_elements`` values with their scales into ``block_bytes`` bytes. Blocks run
along a tensor's **last** dimension (a weight's input dimension, as in GGUF and ggml),
so that dimension must hold a whole number of blocks and every row starts on a block.

The quantized types are GGUF's, with ggml's layouts (``ggml-common.h``):

======  ========  =====  =====================================================
name    elements  bytes  layout of one block
======  ========  =====  =====================================================
q4_0    32        18     f16 d, 16 bytes of nibbles; ``d * (q - 8)``
q5_0    32        22     f16 d, 4-byte high-bit mask, 16 bytes of nibbles;
                         ``d * (q - 16)``
q8_0    32        34     f16 d, 32 int8; ``d * q``
q4_k    256       144    f16 d, f16 dmin, 12 bytes of 6-bit scales and mins,
                         128 bytes of nibbles; ``d*sc*q - dmin*m`` per 32
q6_k    256       210    128 bytes low nibbles, 64 bytes high 2 bits, 16 int8
                         scales, f16 d; ``d * sc * (q - 32)`` per 16
======  ========  =====  =====================================================

``gguf_type`` is the type's number in GGUF files (``GGMLQuantizationType``); the table
is kept here rather than imported so that byte sizes need no third-party package
(``tests/test_dtypes.py`` checks it against the ``gguf`` package).

>>> nbytes("q8_0", (262144, 640)) / 2**20
170.0
>>> nbytes("float32", (2, 3))
24
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from edgemind.errors import ModelFormatError


@dataclass(frozen=True)
class StorageType:
    """One storage type: ``block_elements`` values stored in ``block_bytes`` bytes.

    A dense dtype is the case ``block_elements == 1``, ``block_bytes == itemsize``.

    >>> storage_type("q4_k").block_bytes
    144
    """

    name: str  # the manifest's name: "float32", "q8_0"
    block_elements: int  # values per block (1 for a dense dtype)
    block_bytes: int  # bytes per block (the itemsize for a dense dtype)
    gguf_type: int | None  # GGMLQuantizationType number; None if GGUF has no such type

    @property
    def quantized(self) -> bool:
        """Whether values are packed in blocks with scales (not a plain dtype)."""
        return self.block_elements > 1


_TABLE: tuple[StorageType, ...] = (
    # dense: exactly the dtypes a version-1 manifest accepts (weights/manifest.py DTYPES)
    StorageType("float32", 1, 4, 0),
    StorageType("float16", 1, 2, 1),
    StorageType("bfloat16", 1, 2, 30),
    StorageType("int32", 1, 4, 26),
    StorageType("int64", 1, 8, 27),
    StorageType("int8", 1, 1, 24),
    StorageType("uint8", 1, 1, None),  # GGUF has no unsigned integer type
    # block-quantized (GGUF / ggml)
    StorageType("q4_0", 32, 18, 2),
    StorageType("q5_0", 32, 22, 6),
    StorageType("q8_0", 32, 34, 8),
    StorageType("q4_k", 256, 144, 12),
    StorageType("q6_k", 256, 210, 14),
)

STORAGE_TYPES = MappingProxyType({t.name: t for t in _TABLE})
"""Every storage type by name, dense ones first."""

DENSE_NAMES: tuple[str, ...] = tuple(t.name for t in _TABLE if not t.quantized)
QUANTIZED_NAMES: tuple[str, ...] = tuple(t.name for t in _TABLE if t.quantized)

_BY_GGUF = MappingProxyType({t.gguf_type: t for t in _TABLE if t.gguf_type is not None})


def storage_type(name: str | StorageType) -> StorageType:
    """The storage type called ``name`` (a ``StorageType`` is returned as it is).

    >>> storage_type("q6_k").block_elements
    256
    >>> storage_type("q3_k")
    Traceback (most recent call last):
    ...
    edgemind.errors.ModelFormatError: unknown storage type 'q3_k'; expected one of float32, \
float16, bfloat16, int32, int64, int8, uint8, q4_0, q5_0, q8_0, q4_k, q6_k
    """
    if isinstance(name, StorageType):
        return name
    try:
        return STORAGE_TYPES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a bad manifest
        names = ", ".join(STORAGE_TYPES)
        raise ModelFormatError(
            f"unknown storage type {name!r:.40}; expected one of {names}"
        ) from None


def from_gguf_type(number: int) -> StorageType:
    """The storage type of a GGUF tensor type number (``GGMLQuantizationType``).

    >>> from_gguf_type(8).name
    'q8_0'
    """
    try:
        return _BY_GGUF[number]
    except (KeyError, TypeError):
        known = ", ".join(f"{t.gguf_type} ({t.name})" for t in _BY_GGUF.values())
        raise ModelFormatError(
            f"GGUF tensor type {number!r:.20} is not supported; supported types: {known}"
        ) from None


def row_nbytes(type_: str | StorageType, row_elements: int, *, where: str = "") -> int:
    """Bytes of one row of ``row_elements`` values (a whole number of blocks).

    >>> row_nbytes("q4_k", 640 * 4)
    1440
    """
    t = storage_type(type_)
    if isinstance(row_elements, bool) or not isinstance(row_elements, int) or row_elements < 0:
        raise ModelFormatError(
            f"{_at(where)}{t.name} row length {row_elements!r:.40} must be an integer >= 0"
        )
    blocks, rest = divmod(row_elements, t.block_elements)
    if rest:
        raise ModelFormatError(
            f"{_at(where)}{t.name} row of {row_elements} values is not a whole number of "
            f"{t.block_elements}-value blocks (the last, input, dimension must be a multiple "
            f"of {t.block_elements})"
        )
    return blocks * t.block_bytes


def nbytes(type_: str | StorageType, shape: Sequence[int], *, where: str = "") -> int:
    """Bytes of a tensor of ``shape`` stored as ``type_`` (blocks along the last axis).

    ``where`` (a file and tensor name, say) prefixes error messages.

    >>> nbytes("q5_0", (2048, 640))
    901120
    >>> nbytes("q8_0", (4, 33), where="blk.0.ffn_up")
    Traceback (most recent call last):
    ...
    edgemind.errors.ModelFormatError: blk.0.ffn_up: q8_0 row of 33 values is not a whole \
number of 32-value blocks (the last, input, dimension must be a multiple of 32)
    """
    t = storage_type(type_)
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ModelFormatError(
            f"{_at(where)}shape {list(dims)!r:.80} must be a sequence of integers >= 0"
        )
    if not t.quantized:
        return math.prod(dims) * t.block_bytes
    if not dims:
        raise ModelFormatError(
            f"{_at(where)}a {t.name} tensor needs at least one dimension (blocks run along "
            "the last); got a scalar"
        )
    return math.prod(dims[:-1]) * row_nbytes(t, dims[-1], where=where)


def _at(where: str) -> str:
    return f"{where}: " if where else ""
