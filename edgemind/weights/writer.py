"""The weight writer: streams a model into a new directory, one tensor at a time.

:class:`ModelWriter` writes each layer's file as it is added, into a hidden sibling
directory, and renames it into place only once ``manifest.json`` is written: a model
directory either appears complete or not at all. Converters give :class:`TensorSource`
specs up front and produce each array only when its turn comes, so no more than one
tensor is ever held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Union

import numpy as np

from edgemind.dtypes import STORAGE_TYPES, row_nbytes, storage_type
from edgemind.errors import ModelFormatError
from edgemind.files import fsync_dir, new_dir_mode, write_failure
from edgemind.weights.format import (
    bin32_header,
    dtype_name,
    numpy_dtype,
    pack_header,
    padding_object,
    plan_layout,
)
from edgemind.weights.manifest import (
    MANIFEST_NAME,
    InputSpec,
    LayerSpec,
    Manifest,
    TensorSpec,
    manifest_from_json,
)


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its spec now, its array from ``load()`` when its turn comes.

    ``dtype`` is a storage type (:mod:`edgemind.dtypes`): a dense dtype, whose ``load()``
    gives that array, or a block-quantized type with the **logical** ``shape``, whose
    ``load()`` gives the raw blocks as uint8 rows (``(*shape[:-1], bytes per row)``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = dataclasses.field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelFormatError(f"tensor name {self.name!r} must be a non-empty string")
        if self.dtype not in STORAGE_TYPES:
            raise ModelFormatError(
                f"tensor {self.name!r}: storage {self.dtype!r} cannot be stored; expected one "
                f"of {', '.join(STORAGE_TYPES)}"
            )
        shape = tuple(self.shape)
        if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            raise ModelFormatError(f"tensor {self.name!r}: shape {shape} must be non-negative ints")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> TensorSource:
        array = np.asarray(array)
        try:
            dtype = dtype_name(array.dtype)
        except ModelFormatError as exc:
            raise ModelFormatError(f"tensor {name!r}: {exc}") from None
        return cls(name, dtype, tuple(array.shape), lambda: array)


TensorLike = Union[TensorSource, tuple[str, np.ndarray]]  # noqa: UP007 (runtime alias, py3.10)
ExitHead = tuple[str, str, Mapping[str, Any], Sequence[TensorLike]]


def _sources(tensors: Sequence[TensorLike], layer: str) -> list[TensorSource]:
    out = [t if isinstance(t, TensorSource) else TensorSource.from_array(*t) for t in tensors]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ModelFormatError(f"layer {layer!r}: duplicate tensor names in {names}")
    return out


def _payload(source: TensorSource, layer: str) -> memoryview:
    """The source's array as little-endian C-order bytes, after checking its spec."""
    array = np.asarray(source.load())
    found = (array.dtype.name, tuple(array.shape))
    dtype, shape = source.dtype, source.shape
    if storage_type(dtype).quantized:  # raw blocks: uint8 rows of whole blocks
        dtype = "uint8"
        shape = (*shape[:-1], row_nbytes(source.dtype, shape[-1])) if shape else shape
    if found != (dtype, shape):
        raise ModelFormatError(
            f"layer {layer!r}, tensor {source.name!r}: array is {found[0]}{list(found[1])}, "
            f"declared {source.dtype}{list(source.shape)} ({dtype}{list(shape)} as stored)"
        )
    little = numpy_dtype(dtype).newbyteorder("<")
    array = np.ascontiguousarray(array, dtype=little)
    return array.reshape(-1).view(np.uint8).data


def write_layer_file(
    path: str | os.PathLike[str],
    layer_name: str,
    alignment: int,
    tensors: Sequence[TensorLike],
) -> tuple[TensorSpec, ...]:
    """Write one layer's weight file; returns its TensorSpecs with real checksums.

    The header goes first with placeholder checksums, payloads stream one at a time
    (checksummed as written), then the header is rewritten in place (same length).
    On any error the partial file is removed.

    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> specs = write_layer_file(f"{d}/l.msgpack", "l", 64, [("w", np.ones(3, np.int32))])
    >>> specs[0].offset_bytes % 64, specs[0].crc32
    (0, '9466edfb')
    """
    sources = _sources(tensors, layer_name)
    layout = plan_layout(layer_name, alignment, [(s.name, s.dtype, s.shape) for s in sources])
    header = pack_header(layer_name, alignment, layout.tensors)
    done: list[TensorSpec] = []
    try:
        with open(path, "wb") as f:
            f.write(header)
            for source, spec in zip(sources, layout.tensors, strict=True):
                f.write(padding_object(spec.offset_bytes - 5 - f.tell()))
                f.write(bin32_header(spec.nbytes))
                if f.tell() != spec.offset_bytes:  # a layout bug, not user input
                    raise RuntimeError(f"payload of {spec.name!r} at {f.tell()}, planned elsewhere")
                payload = _payload(source, layer_name)
                f.write(payload)
                done.append(dataclasses.replace(spec, crc32=f"{zlib.crc32(payload):08x}"))
                del payload  # hold one tensor at a time
            final = pack_header(layer_name, alignment, done)
            if len(final) != len(header):
                raise RuntimeError("header changed length when checksums were filled in")
            f.seek(0)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return tuple(done)


def file_stem(index: int, name: str) -> str:
    """A safe file name stem from a layer's position and name.

    >>> file_stem(3, "blk.3/attn")
    '03_blk.3_attn'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:64] or "layer"
    return f"{index:02d}_{safe}"


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a leftover of a live writer is kept)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process, alive
        return True
    return True


def clean_leftovers(out_dir: Path) -> list[Path]:
    """Remove what a killed writer of ``out_dir`` left beside it; returns what went.

    A writer builds ``.NAME.partial-PID-*`` and, while replacing a model, moves the old
    one to ``.NAME.old-PID-*/model``. Leftovers of a process that is still running are
    kept. A writer killed between its two renames left no ``NAME`` but the previous model
    in ``old-*/model``: that model is put back rather than deleted.
    """
    removed: list[Path] = []
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for path in sorted(siblings):
        match = _LEFTOVER.match(path.name)
        if match is None or match["name"] != out_dir.name or not path.is_dir():
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue
        previous = path / "model"
        if match["kind"] == "old" and previous.is_dir() and not out_dir.exists():
            with contextlib.suppress(OSError):
                os.replace(previous, out_dir)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _write_error(exc: OSError, out_dir: Path, doing: str) -> ModelFormatError:
    """A failed write as one line: what, where, and what to do (the partial model is gone)."""
    return ModelFormatError(
        f"{out_dir}: cannot write the model while {doing} ({write_failure(exc)}); nothing was "
        "left behind"
    )


class ModelWriter:
    """Writes a model directory: weight files as layers are added, then the manifest.

    >>> import tempfile, numpy as np
    >>> from edgemind.weights import InputSpec, load_manifest
    >>> out = tempfile.mkdtemp() + "/toy"
    >>> with ModelWriter(out, "toy", [InputSpec("x", "float32", ("batch", 4))]) as w:
    ...     _ = w.add_layer("dense0", "dense", {"units": 4}, [("w", np.eye(4, dtype="float32"))])
    >>> load_manifest(out).layers[0].file
    'layers/00_dense0.msgpack'
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        model_name: str,
        inputs: Sequence[InputSpec],
        *,
        alignment_bytes: int = 4096,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if alignment_bytes < 64 or alignment_bytes & (alignment_bytes - 1):
            raise ModelFormatError(
                f"alignment_bytes {alignment_bytes} must be a power of two >= 64"
            )
        if not inputs:
            raise ModelFormatError(f"model {model_name!r}: give at least one InputSpec")
        self.out_dir = Path(out_dir)
        self.model_name = model_name
        self.inputs = tuple(inputs)
        self.alignment_bytes = alignment_bytes
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self._layers: list[LayerSpec] = []
        self._tmp: Path | None = None
        clean_leftovers(self.out_dir)
        self._check_target()

    def _check_target(self) -> None:
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not self.overwrite:
                raise ModelFormatError(
                    f"{self.out_dir}: already exists; choose another directory, or replace it "
                    "with --overwrite (overwrite=True in Python)"
                )
            if not self.out_dir.is_dir():
                raise ModelFormatError(f"{self.out_dir}: exists and is not a directory")

    def __enter__(self) -> ModelWriter:
        prefix = f".{self.out_dir.name}.partial-{os.getpid()}-"
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out_dir.parent))
            os.chmod(self._tmp, new_dir_mode())  # mkdtemp made it 0700
            (self._tmp / "layers").mkdir()
        except OSError as exc:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            raise _write_error(exc, self.out_dir, f"creating it in {self.out_dir.parent}") from None
        self._layers = []
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self._commit()
        finally:
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def add_layer(
        self,
        name: str,
        kind: str,
        config: Mapping[str, Any],
        tensors: Sequence[TensorLike],
        exit_head: ExitHead | None = None,
    ) -> LayerSpec:
        """Write one layer's file (and its exit head's) now; returns its LayerSpec."""
        if self._tmp is None:
            raise ModelFormatError(
                "ModelWriter.add_layer must be called inside `with ModelWriter(...)`"
            )
        if not isinstance(name, str) or not name:
            raise ModelFormatError(f"layer name {name!r} must be a non-empty string")
        taken = {layer.name for layer in self._layers}
        taken |= {layer.exit_head.name for layer in self._layers if layer.exit_head is not None}
        head_name = exit_head[0] if exit_head is not None else None
        if name in taken or head_name in taken or head_name == name:
            raise ModelFormatError(
                f"layer {name!r}: layer and exit head names must be unique across the model"
            )
        index = len(self._layers)
        stem = file_stem(index, name)
        head = None
        if exit_head is not None:
            head_name, head_kind, head_config, head_tensors = exit_head
            head_stem = file_stem(index, head_name)
            head_stem = f"{head_stem}_exit" if head_stem == stem else head_stem
            head = self._write(head_name, head_kind, head_config, head_tensors, head_stem)
        layer = dataclasses.replace(self._write(name, kind, config, tensors, stem), exit_head=head)
        self._layers.append(layer)
        return layer

    def add_shared_layer(
        self, name: str, kind: str, config: Mapping[str, Any], owner: str, tensors: Sequence[str]
    ) -> LayerSpec:
        """A layer that reads tensors of the earlier layer ``owner`` from its file: stored
        once, used by both (a tied embedding and LM head)."""
        by_name = {layer.name: layer for layer in self._layers}
        if owner not in by_name:
            raise ModelFormatError(f"layer {name!r}: shares {owner!r}, not an earlier layer")
        if name in by_name:
            raise ModelFormatError(f"layer {name!r}: layer names must be unique")
        source = by_name[owner]
        specs = tuple(t for t in source.tensors if t.name in tensors)
        if len(specs) != len(tensors):
            raise ModelFormatError(
                f"layer {name!r}: {owner!r} has tensors {[t.name for t in source.tensors]}, "
                f"not all of {list(tensors)}"
            )
        config = json.loads(json.dumps(dict(config)))
        layer = LayerSpec(name, kind, MappingProxyType(config), source.file, specs, shares=owner)
        self._layers.append(layer)
        return layer

    def add_file(self, name: str, source: str | os.PathLike[str]) -> None:
        """Copy a side file (a tokenizer, a config) into the model; it lands with the rest.

        ``name`` is a plain file name inside the model directory, not ``manifest.json``.
        """
        target = self._side_file(name)
        try:
            shutil.copyfile(source, target)
        except OSError as exc:
            raise ModelFormatError(
                f"{source}: cannot copy into the model ({exc.strerror})"
            ) from None

    def add_bytes(self, name: str, data: bytes) -> None:
        """A side file made in memory (a tokenizer converted from GGUF metadata)."""
        target = self._side_file(name)
        try:
            target.write_bytes(data)
        except OSError as exc:
            raise _write_error(exc, self.out_dir, f"writing {name}") from None

    def _side_file(self, name: str) -> Path:
        """Where side file ``name`` goes in the directory being written (checked)."""
        if self._tmp is None:
            raise ModelFormatError("side files must be added inside `with ModelWriter`")
        if "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST_NAME, "layers"):
            raise ModelFormatError(f"side file name {name!r} must be a plain file name")
        return self._tmp / name

    def _write(
        self,
        name: str,
        kind: str,
        config: Mapping[str, Any],
        tensors: Sequence[TensorLike],
        stem: str,
    ) -> LayerSpec:
        assert self._tmp is not None
        try:
            config = json.loads(json.dumps(dict(config)))
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(
                f"layer {name!r}: config is not JSON-serialisable ({exc})"
            ) from None
        file = f"layers/{stem}.msgpack"
        try:
            specs = write_layer_file(self._tmp / file, name, self.alignment_bytes, tensors)
        except OSError as exc:  # disk full, file size limit, permissions...
            raise _write_error(exc, self.out_dir, f"writing layer {name!r}") from None
        return LayerSpec(name, kind, MappingProxyType(config), file, specs)

    def _commit(self) -> None:
        assert self._tmp is not None
        manifest = Manifest(
            model_name=self.model_name,
            alignment_bytes=self.alignment_bytes,
            inputs=self.inputs,
            layers=tuple(self._layers),
            metadata=MappingProxyType(self.metadata),
        )
        try:
            text = manifest.dumps()
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(
                f"model {self.model_name!r}: metadata is not JSON-serialisable ({exc})"
            ) from None
        # validated exactly as a reader will parse it
        manifest_from_json(json.loads(text), f"{self.out_dir / MANIFEST_NAME} (being written)")
        try:
            old = self._install(text)
        except OSError as exc:
            raise _write_error(exc, self.out_dir, "writing the manifest and renaming") from None
        self._tmp = None
        fsync_dir(self.out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _install(self, text: str) -> Path | None:
        """Write the manifest, fsync, and rename the finished directory into place;
        returns the folder holding the replaced model (to delete), if any."""
        assert self._tmp is not None
        with open(self._tmp / MANIFEST_NAME, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self._tmp / "layers")
        fsync_dir(self._tmp)
        self._check_target()
        old = None
        if self.out_dir.exists():
            old = Path(
                tempfile.mkdtemp(
                    prefix=f".{self.out_dir.name}.old-{os.getpid()}-", dir=self.out_dir.parent
                )
            )
            os.replace(self.out_dir, old / "model")
        try:
            os.replace(self._tmp, self.out_dir)
        except BaseException:
            if old is not None:  # put the previous model back rather than leave nothing
                os.replace(old / "model", self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            raise
        return old
