"""The model manifest: what a model directory holds, layer by layer.

``manifest.json`` names the format and version, the model, its input signature, and
its layers in execution order, each with its tensors (dtype, shape, bytes, file,
aligned payload offset, checksum) and the exit head that follows it, if any.
Everything is validated when a manifest is built, so later stages can trust it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import numpy as np

from edgemind.dtypes import STORAGE_TYPES, row_nbytes, storage_type
from edgemind.dtypes import nbytes as storage_nbytes
from edgemind.errors import InputError, ModelFormatError, brief
from edgemind.files import read_bounded
from edgemind.units import MAX_ARRAY_BYTES, format_bytes

MANIFEST_NAME = "manifest.json"
MODEL_FORMAT = "edgemind-model"
MODEL_FORMAT_VERSION = 2  # 2: tensors name a storage type (dense or block-quantized)
READABLE_MODEL_VERSIONS = (1, 2)  # 1: tensors name a dense "dtype"
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8")
MAX_TENSOR_BYTES = 2**32 - 1  # one payload is one msgpack bin32 object
MAX_OFFSET_BYTES = 2**62  # far past any file, and still an off_t
MAX_NDIM = 32  # NumPy's limit is 64; no layer needs more than a few
MAX_JSON_DEPTH = 32  # a converted manifest nests about 6 deep (metadata.config)
MAX_MANIFEST_BYTES = 64 << 20  # a 1,000-layer model's manifest is about 1 MiB
MAX_SEQ_LENGTH = 1 << 20  # metadata token limits


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a manifest dtype name."""
    if dtype == "bfloat16":
        return 2
    return int(np.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layer, and where its payload lies in the layer's weight file.

    ``storage`` names an :mod:`edgemind.dtypes` storage type: a dense dtype, or a
    block-quantized type whose ``shape`` is the logical (dequantized) shape and whose
    payload is raw blocks (``array_shape`` uint8 rows, blocks along the last axis).
    """

    name: str
    storage: str
    shape: tuple[int, ...]
    nbytes: int
    offset_bytes: int  # payload start inside the layer's file, aligned
    crc32: str  # 8 lowercase hex digits, zlib.crc32 of the payload

    @property
    def quantized(self) -> bool:
        return storage_type(self.storage).quantized

    @property
    def dtype(self) -> str:
        """The NumPy dtype of the payload as an array: the storage's, uint8 for blocks."""
        return "uint8" if self.quantized else self.storage

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The payload's shape as an array of ``dtype``: the logical shape, or for blocks
        ``(*shape[:-1], bytes per row)``."""
        if not self.quantized or not self.shape:
            return self.shape
        return (*self.shape[:-1], row_nbytes(self.storage, self.shape[-1]))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "storage": self.storage,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "offset": self.offset_bytes,
            "crc32": self.crc32,
        }


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer (or exit head): its kind, static config, file and tensors."""

    name: str
    kind: str
    config: Mapping[str, Any]
    file: str  # relative to the model directory, POSIX separators
    tensors: tuple[TensorSpec, ...]
    exit_head: LayerSpec | None = None  # the head that may end the run after this layer
    # the earlier layer whose weight file (and tensors) this one reads: a tensor used by
    # two units (a tied embedding and LM head) is stored once
    shares: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of all this layer's tensor payloads (its exit head excluded)."""
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise ModelFormatError(f"layer {brief(self.name)} has no tensor {brief(name)}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "config": dict(self.config),
            "file": self.file,
            "tensors": [t.to_json() for t in self.tensors],
        }
        if self.exit_head is not None:
            out["exit_head"] = self.exit_head.to_json()
        if self.shares is not None:
            out["shares"] = self.shares
        return out


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: dtype and shape, dynamic dims named (``"batch"``, ``"seq"``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with named dims filled from ``dims``; a missing name is an error.

        A shape whose array would exceed ``MAX_ARRAY_BYTES`` is an :class:`InputError`:
        sizes are checked here, before they reach NumPy or XLA (which abort the process
        on an overflowing extent).
        """
        shape = []
        for d in self.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ModelFormatError(
                        f"input {brief(self.name)} has dynamic dim {brief(d)}; give its size "
                        f"(e.g. --{d})"
                    )
                shape.append(int(dims[d]))
            else:
                shape.append(d)
        nbytes = math.prod(shape) * dtype_itemsize(self.dtype)
        if nbytes > MAX_ARRAY_BYTES:
            raise InputError(
                f"input {brief(self.name)} of shape {brief(tuple(shape))} {self.dtype} would take "
                f"{format_bytes(nbytes)}, more than the {format_bytes(MAX_ARRAY_BYTES)} edgemind "
                "accepts for one array; lower the batch or sequence size"
            )
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A whole model directory's description. Build it with :func:`load_manifest`."""

    model_name: str
    alignment_bytes: int
    inputs: tuple[InputSpec, ...]
    layers: tuple[LayerSpec, ...]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    format_version: int = MODEL_FORMAT_VERSION  # the version read (older ones are accepted)

    @property
    def nbytes(self) -> int:
        """All weight bytes, exit heads included."""
        heads = sum(layer.exit_head.nbytes for layer in self.layers if layer.exit_head)
        return sum(layer.nbytes for layer in self.layers) + heads

    def exit_levels(self) -> tuple[tuple[int, int], ...]:
        """``(level, layer_index)`` for every exit, 1-based, deepest last.

        Each layer with an exit head is one level; the last layer's own output is the
        final level when no head follows it. A run is complete at the final level.
        """
        levels = [i for i, layer in enumerate(self.layers) if layer.exit_head is not None]
        if not levels or levels[-1] != len(self.layers) - 1:
            levels.append(len(self.layers) - 1)
        return tuple((n + 1, i) for n, i in enumerate(levels))

    @property
    def num_levels(self) -> int:
        return len(self.exit_levels())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,  # entries are written in its form
            "model_name": self.model_name,
            "alignment_bytes": self.alignment_bytes,
            "inputs": [i.to_json() for i in self.inputs],
            "layers": [layer.to_json() for layer in self.layers],
            "metadata": dict(self.metadata),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n"

    def digest(self) -> str:
        """A hash of the manifest's content (checksums included): plans pin it."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- parsing


def _req(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise ModelFormatError(f"{where}: missing field {brief(key)}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelFormatError(f"{where}: field {brief(key)} has the wrong type ({brief(value)})")
    return value


def check_depth(data: Any, where: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse containers nested deeper than ``limit`` (layer code and hashing recurse).

    Walks iteratively, so the check itself cannot overflow the stack.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: Any = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth > limit:
            raise ModelFormatError(
                f"{where}: nested more than {limit} levels deep; a manifest edgemind writes "
                "nests about 6"
            )
        stack.extend((child, depth + 1) for child in children)


def check_alignment(alignment: int, where: str) -> int:
    """Payload alignment must be a power of two of at least 64 bytes (zero-copy views)."""
    if alignment < 64 or alignment & (alignment - 1):
        raise ModelFormatError(f"{where}: alignment_bytes {alignment} must be a power of two >= 64")
    return alignment


def check_relative_path(file: str, where: str) -> str:
    """A weight file's name must stay inside the model directory."""
    path = PurePosixPath(file)
    if (
        not file
        or path.is_absolute()
        or any(c in file for c in "\\:\x00")
        or ".." in path.parts
        or len(file) > 4096
    ):
        raise ModelFormatError(
            f"{where}: file {brief(file)} must be a relative path inside the model directory"
        )
    return file


def resolve_inside(model_dir: str | os.PathLike[str], file: str, where: str) -> Path:
    """``model_dir / file`` with symlinks resolved; refused when it lands outside.

    A manifest names files relative to its directory; a symlink (the file's, or a
    folder's on the way) that points elsewhere would read whatever it points at.
    """
    check_relative_path(file, where)
    root = Path(model_dir).resolve()
    try:
        path = (root / file).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ModelFormatError(
            f"{model_dir}: {where}: cannot resolve {brief(file)} ({exc})"
        ) from None
    if not path.is_relative_to(root):
        raise ModelFormatError(
            f"{model_dir}: {where}: {brief(file)} resolves to {path}, outside the model "
            "directory; copy the file into the model directory instead of linking to it"
        )
    return path


def parse_tensor_entry(obj: Any, where: str, alignment: int) -> TensorSpec:
    """Validate one tensor entry (manifest or weight-file header) into a TensorSpec."""
    name = _req(obj, "name", str, where)
    where = f"{where}, tensor {brief(name)}"
    if "storage" in obj:  # format version 2
        storage = _req(obj, "storage", str, where)
        if storage not in STORAGE_TYPES:
            raise ModelFormatError(
                f"{where}: unknown storage type {brief(storage)}; expected one of "
                f"{', '.join(STORAGE_TYPES)}"
            )
    else:  # version 1: a dense dtype
        storage = _req(obj, "dtype", str, where)
        if storage not in DTYPES:
            raise ModelFormatError(
                f"{where}: unknown dtype {brief(storage)}; expected one of {DTYPES}"
            )
    shape = tuple(_req(obj, "shape", list, where))
    if len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_TENSOR_BYTES for d in shape
    ):
        raise ModelFormatError(
            f"{where}: shape {brief(list(shape))} must be at most {MAX_NDIM} integers "
            f"from 0 to {MAX_TENSOR_BYTES}"
        )
    nbytes = _req(obj, "nbytes", int, where)
    expected = storage_nbytes(storage, shape, where=where)  # blocks: whole ones per row
    if nbytes != expected:
        raise ModelFormatError(
            f"{where}: nbytes is {brief(nbytes)}, expected {expected} for shape {list(shape)} "
            f"of {storage}"
        )
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelFormatError(
            f"{where}: {nbytes} bytes exceed one msgpack bin32 object ({MAX_TENSOR_BYTES} "
            "bytes); split the tensor and convert again"
        )
    offset = _req(obj, "offset", int, where)
    if not 0 <= offset <= MAX_OFFSET_BYTES or offset % alignment:
        raise ModelFormatError(
            f"{where}: payload offset {brief(offset)} must be {alignment}-aligned, from 0 to "
            f"{MAX_OFFSET_BYTES}"
        )
    crc = _req(obj, "crc32", str, where)
    if len(crc) != 8 or any(c not in "0123456789abcdef" for c in crc):
        raise ModelFormatError(f"{where}: crc32 {brief(crc)} must be 8 lowercase hex digits")
    return TensorSpec(name, storage, shape, nbytes, offset, crc)  # type: ignore[arg-type]


def _parse_layer(obj: Any, where: str, alignment: int) -> LayerSpec:
    name = _req(obj, "name", str, where)
    where = f"{where} {brief(name)}"
    kind = _req(obj, "kind", str, where)
    config = _req(obj, "config", dict, where)
    gathered = config.get("gathered", [])  # the convention cost and runtime rely on
    if not isinstance(gathered, list) or not all(isinstance(n, str) for n in gathered):
        raise ModelFormatError(
            f"{where}: config 'gathered' must be a list of tensor names, got {brief(gathered)}"
        )
    file = check_relative_path(_req(obj, "file", str, where), where)
    tensors = tuple(
        parse_tensor_entry(t, where, alignment) for t in _req(obj, "tensors", list, where)
    )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ModelFormatError(f"{where}: duplicate tensor names in {names}")
    head = obj.get("exit_head")
    exit_head = None if head is None else _parse_layer(head, f"{where}, exit head", alignment)
    shares = obj.get("shares")
    if shares is not None and not isinstance(shares, str):
        raise ModelFormatError(f"{where}: shares is {brief(shares)}, expected a layer name")
    config_map = MappingProxyType(dict(config))
    return LayerSpec(name, kind, config_map, file, tensors, exit_head, shares)


def _check_shares(layers: Sequence[LayerSpec], where: str) -> None:
    """A layer that shares another's file names an earlier layer, its file, and entries
    equal to some of that layer's tensors."""
    earlier: dict[str, LayerSpec] = {}
    for layer in layers:
        if layer.shares is not None:
            owner = earlier.get(layer.shares)
            if owner is None:
                raise ModelFormatError(
                    f"{where}: layer {brief(layer.name)} shares {brief(layer.shares)}, which is "
                    "not an earlier layer"
                )
            stray = [t.name for t in layer.tensors if t not in owner.tensors]
            if layer.file != owner.file or stray:
                raise ModelFormatError(
                    f"{where}: layer {brief(layer.name)} shares {brief(owner.name)} but its file "
                    f"or tensors {stray} differ from that layer's; convert the model again"
                )
        earlier[layer.name] = layer


def _parse_input(obj: Any, where: str) -> InputSpec:
    """One input: a known dtype, dims that are positive ints or names such as ``batch``."""
    name = _req(obj, "name", str, where)
    where = f"{where} {brief(name)}"
    dtype = _req(obj, "dtype", str, where)
    if dtype not in DTYPES:
        raise ModelFormatError(f"{where}: unknown dtype {brief(dtype)}; expected one of {DTYPES}")
    shape = tuple(_req(obj, "shape", list, where))
    for d in shape:
        named = isinstance(d, str) and d.isidentifier()
        sized = isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_TENSOR_BYTES
        if not (named or sized):
            raise ModelFormatError(
                f"{where}: shape {brief(list(shape))} must hold positive integers and dim names "
                "such as 'batch'"
            )
    fixed = math.prod(d for d in shape if isinstance(d, int)) * dtype_itemsize(dtype)
    if len(shape) > MAX_NDIM or fixed > MAX_ARRAY_BYTES:
        raise ModelFormatError(
            f"{where}: shape {brief(list(shape))} is larger than edgemind accepts "
            f"({MAX_NDIM} dims, {format_bytes(MAX_ARRAY_BYTES)})"
        )
    return InputSpec(name, dtype, shape)


def check_metadata(metadata: Mapping[str, Any], where: str) -> None:
    """The metadata keys edgemind itself reads must make sense; the rest is free-form."""
    for key in ("max_seq_length", "max_position_embeddings"):
        value = metadata.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 2 <= value <= MAX_SEQ_LENGTH
        ):
            raise ModelFormatError(
                f"{where}: {key} is {brief(value)}, expected an integer number of tokens from 2 "
                f"to {MAX_SEQ_LENGTH}; convert the model again"
            )
    tokenizer = metadata.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, str):
            raise ModelFormatError(
                f"{where}: tokenizer is {brief(tokenizer)}, expected a file name"
            )
        check_relative_path(tokenizer, f"{where}: tokenizer")


def manifest_from_json(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded ``manifest.json`` and build the :class:`Manifest`."""
    if not isinstance(data, Mapping):
        raise ModelFormatError(f"{where}: expected a JSON object")
    fmt = data.get("format")
    if fmt != MODEL_FORMAT:
        raise ModelFormatError(f"{where}: format is {brief(fmt)}, expected {brief(MODEL_FORMAT)}")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_MODEL_VERSIONS:
        raise ModelFormatError(
            f"{where}: format_version is {brief(version)}, this edgemind reads versions "
            f"{', '.join(map(str, READABLE_MODEL_VERSIONS))}; convert the model again or "
            "upgrade edgemind"
        )
    check_depth(data, where)
    name = _req(data, "model_name", str, where)
    alignment = check_alignment(_req(data, "alignment_bytes", int, where), where)
    inputs = tuple(
        _parse_input(obj, f"{where}: input {i}")
        for i, obj in enumerate(_req(data, "inputs", list, where))
    )
    if len({i.name for i in inputs}) != len(inputs):
        raise ModelFormatError(
            f"{where}: input names must be unique, got {[i.name for i in inputs]}"
        )
    layers = tuple(
        _parse_layer(obj, f"{where}: layer", alignment) for obj in _req(data, "layers", list, where)
    )
    if not layers or not inputs:
        raise ModelFormatError(f"{where}: a model needs at least one input and one layer")
    _check_shares(layers, where)
    names = [layer.name for layer in layers]
    names += [layer.exit_head.name for layer in layers if layer.exit_head is not None]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ModelFormatError(
            f"{where}: layer and exit head names must be unique; repeated: {dupes}"
        )
    metadata = data.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise ModelFormatError(f"{where}: metadata must be an object")
    check_metadata(metadata, f"{where}: metadata")
    return Manifest(
        model_name=name,
        alignment_bytes=alignment,
        inputs=inputs,
        layers=layers,
        metadata=MappingProxyType(dict(metadata)),
        format_version=version,  # as found; to_json writes the current version
    )


def load_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``MODEL_DIR/manifest.json``.

    >>> load_manifest("no/such/dir")
    Traceback (most recent call last):
    ...
    edgemind.errors.ModelFormatError: no/such/dir: model directory not found
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelFormatError(f"{model_dir}: model directory not found")
    return manifest_from_json(read_manifest_json(root), str(root / MANIFEST_NAME))


def read_manifest_json(model_dir: str | os.PathLike[str]) -> Any:
    """The decoded JSON of ``MODEL_DIR/manifest.json``, not yet validated.

    Bounded in size and nesting, and UTF-8, or a one-line :class:`ModelFormatError`.
    """
    path = Path(model_dir) / MANIFEST_NAME
    blob = read_bounded(path, MAX_MANIFEST_BYTES, what="manifest", error=ModelFormatError)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(
            f"{path}: not UTF-8 (byte 0x{blob[exc.start]:02x} at offset {exc.start}); "
            "a manifest is UTF-8 JSON, convert the model again"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise ModelFormatError(
            f"{path}: JSON nested too deeply to read; convert the model again"
        ) from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise ModelFormatError(f"{path}: not valid JSON ({str(exc)[:80]})") from None
    return data


def all_layer_specs(manifest: Manifest) -> Sequence[LayerSpec]:
    """Every layer and exit head, in file order."""
    out: list[LayerSpec] = []
    for layer in manifest.layers:
        out.append(layer)
        if layer.exit_head is not None:
            out.append(layer.exit_head)
    return out
