"""The weight reader: checks a file's header, then reads payloads straight into buffers.

Payloads never pass through msgpack or an intermediate ``bytes``: each is read with
``os.preadv`` into the caller's buffer (an arena slice), short reads handled. Every
read checks the file's header against the manifest first, so a truncated, corrupted
or mismatched file is an error naming the file and tensor, never wrong numbers.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from edgemind.errors import ChecksumError, ModelFormatError, brief
from edgemind.files import open_regular
from edgemind.units import DIRECT_IO_BLOCK
from edgemind.weights.format import (
    BIN32_HEADER_BYTES,
    MAX_HEADER_BYTES,
    WeightFileHeader,
    bin32_header,
    check_header_matches,
    header_from_obj,
    numpy_dtype,
)
from edgemind.weights.manifest import (
    LayerSpec,
    Manifest,
    TensorSpec,
    all_layer_specs,
    load_manifest,
    resolve_inside,
)

_HAS_PREADV = hasattr(os, "preadv")
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_FIRST_HEADER_READ = 4096
_ROW_GAP_BYTES = 16 << 10  # read a gap this small between rows rather than pay a syscall
_VERIFY_CHUNK_BYTES = 1 << 20

Buffer = Any  # a writable, C-contiguous buffer: memoryview, bytearray or np.ndarray


def aligned_empty(nbytes: int, alignment: int = 64) -> np.ndarray:
    """An uninitialised uint8 array whose data address is a multiple of ``alignment``.

    NumPy only guarantees 16-byte alignment; JAX shares memory with a host array only
    when it is 64-byte aligned, so over-allocate and slice.

    >>> a = aligned_empty(1000, 4096)
    >>> a.nbytes, a.ctypes.data % 4096
    (1000, 0)
    """
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} must be a power of two")
    if nbytes < 0:
        raise ValueError(f"nbytes {nbytes} must not be negative")
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:][:nbytes]  # (raw[start:start] would not keep the address)


def _layer_path(model_dir: str | os.PathLike[str], layer: LayerSpec) -> tuple[Path, str]:
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelFormatError(f"{model_dir}: model directory not found")
    path = resolve_inside(root, layer.file, f"layer {brief(layer.name)}")
    return path, str(root / layer.file)


def _pread_some(f: io.FileIO, bufs: Sequence[memoryview], offset: int) -> int:
    if _HAS_PREADV:
        return os.preadv(f.fileno(), bufs, offset)
    f.seek(offset)  # no preadv (Windows): readinto the first buffer, the caller loops
    return f.readinto(bufs[0]) or 0


def _pread_full(f: io.FileIO, bufs: Sequence[memoryview], offset: int, where: str) -> int:
    """Fill every buffer in order from ``offset`` on, however short the reads come back."""
    pending = collections.deque(b for b in bufs if b.nbytes)
    pos = offset
    while pending:
        batch = [pending[i] for i in range(min(len(pending), _IOV_MAX))]
        try:
            n = _pread_some(f, batch, pos)
        except OSError as exc:
            raise ModelFormatError(f"{where}: read failed at byte {pos} ({exc.strerror})") from None
        if n == 0:
            raise ModelFormatError(f"{where}: file ends at byte {pos} (truncated?)")
        pos += n
        while n:
            head = pending[0]
            if n >= head.nbytes:
                n -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[n:]
                n = 0
    return pos - offset


def _read_header(
    f: io.FileIO, where: str, expected: LayerSpec | None, *, check_objects: bool = False
) -> WeightFileHeader:
    unpacker = msgpack.Unpacker(
        raw=False, read_size=_FIRST_HEADER_READ, max_buffer_size=MAX_HEADER_BYTES
    )
    pos, chunk = 0, _FIRST_HEADER_READ
    while True:
        try:
            data = os.pread(f.fileno(), chunk, pos) if _HAS_PREADV else _seek_read(f, chunk, pos)
        except OSError as exc:
            raise ModelFormatError(
                f"{where}: reading the header failed at byte {pos} ({exc.strerror}); check the "
                "disk, then copy or convert the model again"
            ) from None
        if not data:
            raise ModelFormatError(
                f"{where}: file ends inside its header after {pos} bytes (truncated or not an "
                f"edgemind weight file); convert the model again"
            )
        pos += len(data)
        try:
            unpacker.feed(data)
            obj = unpacker.unpack()
            break
        except msgpack.OutOfData:
            if pos >= MAX_HEADER_BYTES:
                raise ModelFormatError(
                    f"{where}: no header within the first {MAX_HEADER_BYTES} bytes; "
                    f"not an edgemind weight file"
                ) from None
            chunk = min(chunk * 4, MAX_HEADER_BYTES - pos)
        except (ValueError, TypeError, msgpack.BufferFull) as exc:  # TypeError: unhashable keys
            raise ModelFormatError(
                f"{where}: header is not valid msgpack ({str(exc)[:80]}); not an edgemind "
                "weight file"
            ) from None
    header = header_from_obj(obj, unpacker.tell(), where)
    if expected is not None:
        check_header_matches(header, expected, where)
    _check_extent(f, header, where, check_objects)
    return header


def _seek_read(f: io.FileIO, n: int, pos: int) -> bytes:
    f.seek(pos)
    return f.read(n) or b""


def _check_extent(f: io.FileIO, header: WeightFileHeader, where: str, check_objects: bool) -> None:
    try:
        _check_extent_io(f, header, where, check_objects)
    except OSError as exc:
        raise ModelFormatError(
            f"{where}: layer {brief(header.layer)}: cannot read the file ({exc.strerror}); check "
            "the "
            "disk, then copy or convert the model again"
        ) from None


def _check_extent_io(
    f: io.FileIO, header: WeightFileHeader, where: str, check_objects: bool
) -> None:
    size = os.fstat(f.fileno()).st_size
    for t in header.tensors:
        if t.offset_bytes + t.nbytes > size:
            raise ModelFormatError(
                f"{where}: layer {brief(header.layer)}, tensor {brief(t.name)}: payload needs "
                "bytes "
                f"{t.offset_bytes}..{t.offset_bytes + t.nbytes}, file has {size} (truncated); "
                f"copy or convert the model again"
            )
        if check_objects:
            found = os.pread(f.fileno(), BIN32_HEADER_BYTES, t.offset_bytes - BIN32_HEADER_BYTES)
            if found != bin32_header(t.nbytes):
                raise ModelFormatError(
                    f"{where}: layer {brief(header.layer)}, tensor {brief(t.name)}: bytes before "
                    "the "
                    f"payload are {found.hex()}, expected bin32 header "
                    f"{bin32_header(t.nbytes).hex()}"
                )
    if size != header.file_nbytes:
        raise ModelFormatError(
            f"{where}: layer {brief(header.layer)}: file has {size} bytes, its header describes "
            f"{header.file_nbytes}; copy or convert the model again"
        )


@contextlib.contextmanager
def _open_layer(
    model_dir: str | os.PathLike[str], layer: LayerSpec, *, check_objects: bool = False
) -> Iterator[tuple[io.FileIO, str]]:
    path, where = _layer_path(model_dir, layer)
    try:
        f = open_regular(path)
    except OSError as exc:
        raise ModelFormatError(
            f"{where}: cannot open weight file of layer {brief(layer.name)} ({exc.strerror})"
        ) from None
    with f:
        _read_header(f, where, layer, check_objects=check_objects)
        yield f, where


def read_file_header(
    path: str | os.PathLike[str], expected_layer: LayerSpec | None = None
) -> WeightFileHeader:
    """Read and check a weight file's header (magic, version, layout, length).

    With ``expected_layer`` every tensor entry must equal the manifest's TensorSpec.
    Reads only the first few KiB and 5 bytes before each payload.
    """
    try:
        f = open_regular(path)
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot open weight file ({exc.strerror})") from None
    with f:
        return _read_header(f, str(path), expected_layer, check_objects=True)


def _dest_bytes(dest: Buffer, nbytes: int, dtype: str, what: str) -> memoryview:
    """A flat byte view of ``dest``, after checking it can take ``nbytes`` in place."""
    if isinstance(dest, np.ndarray):
        if dest.dtype != np.uint8 and dest.dtype != numpy_dtype(dtype):
            raise ModelFormatError(
                f"{what}: destination dtype {dest.dtype} is neither uint8 nor {dtype}"
            )
        ok = dest.flags.writeable and dest.flags.c_contiguous
        view = dest.reshape(-1).view(np.uint8).data if ok else memoryview(b"")
    else:
        try:
            view = memoryview(dest)
        except TypeError:
            raise ModelFormatError(
                f"{what}: destination {type(dest).__name__} is not a buffer"
            ) from None
        ok = not view.readonly and view.c_contiguous
    if not ok:
        raise ModelFormatError(f"{what}: destination must be writable and C-contiguous")
    if view.nbytes != nbytes:
        raise ModelFormatError(f"{what}: destination holds {view.nbytes} bytes, expected {nbytes}")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_crc(view: memoryview, spec: TensorSpec, where: str, layer: LayerSpec) -> None:
    found = f"{zlib.crc32(view):08x}"
    if found != spec.crc32:
        raise ChecksumError(
            f"{where}: layer {brief(layer.name)}, tensor {brief(spec.name)}: crc32 is {found}, "
            "expected "
            f"{spec.crc32}; the file is corrupted, copy or convert the model again"
        )


class LayerFile:
    """One layer's weight file, opened and checked once, then read from many times.

    Opening checks the header against the manifest (magic, version, layout, exact
    length); each read then only checks, with one ``fstat``, that the file has not been
    replaced or modified since, and ``preadv``s payloads straight into the caller's
    buffers. ``direct=True`` also opens it with ``O_DIRECT`` (see
    :func:`read_tensors_into`).
    """

    def __init__(
        self, model_dir: str | os.PathLike[str], layer: LayerSpec, *, direct: bool = False
    ) -> None:
        self.layer = layer
        path, self.where = _layer_path(model_dir, layer)
        try:
            self._file = open_regular(path)
        except OSError as exc:
            raise ModelFormatError(
                f"{self.where}: cannot open weight file of layer {brief(layer.name)} "
                f"({exc.strerror})"
            ) from None
        self._direct_fd: int | None = None
        self._checked: set[str] = set()  # tensors whose checksum this open file checked
        try:
            _read_header(self._file, self.where, layer)
            self._identity = _identity(self._file.fileno())
            if direct:
                self._direct_fd = _open_direct(path, self.where)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> LayerFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def read_into(self, dests: Mapping[str, Buffer], *, verify: bool = False) -> int:
        """Read the named tensors into ``dests`` (see :func:`read_tensors_into`).

        Each tensor's checksum is checked the first time this open file reads it, and on
        every read with ``verify=True``: corruption at rest is caught by default, at the
        cost of one crc32 pass over the bytes a first request reads anyway; later reads
        rely on the file being unchanged since (the ``fstat`` identity check).
        """
        self._check_unchanged()
        specs = [(self.layer.tensor(name), dest) for name, dest in dests.items()]
        total = 0
        for spec, dest in specs:
            what = f"{self.where}: layer {brief(self.layer.name)}, tensor {brief(spec.name)}"
            if self._direct_fd is not None:
                view = _direct_view(dest, spec, what)
                total += _pread_direct(self._direct_fd, view, spec, what)
                view = view[: spec.nbytes]
            else:
                view = _dest_bytes(dest, spec.nbytes, spec.dtype, what)
                total += _pread_full(self._file, [view], spec.offset_bytes, what)
            if verify or spec.name not in self._checked:
                _check_crc(view, spec, self.where, self.layer)
                self._checked.add(spec.name)
        return total

    def read_range_into(self, tensor_name: str, start_bytes: int, dest: Buffer) -> int:
        """Bytes ``start_bytes..start_bytes + len(dest)`` of a tensor's payload into
        ``dest`` (a tile's rows), through the page cache; returns the bytes read.

        Whole-tensor checksums cannot be checked on a part: tile reads rely on the
        header check at open and the per-read ``fstat`` identity check.
        """
        spec = self.layer.tensor(tensor_name)
        what = f"{self.where}: layer {brief(self.layer.name)}, tensor {brief(tensor_name)}"
        view = memoryview(dest).cast("B")
        if start_bytes < 0 or start_bytes + view.nbytes > spec.nbytes:
            raise ModelFormatError(
                f"{what}: bytes {start_bytes}..{start_bytes + view.nbytes} lie outside its "
                f"{spec.nbytes}-byte payload; plan again"
            )
        if view.nbytes == 0:
            return 0
        self._check_unchanged()
        return _pread_full(self._file, [view], spec.offset_bytes + start_bytes, what)

    def read_rows_into(
        self, tensor_name: str, rows: Sequence[int] | np.ndarray, dest: Buffer
    ) -> int:
        """Rows of a 2-D tensor into consecutive rows of ``dest`` (see :func:`read_rows_into`)."""
        spec = self.layer.tensor(tensor_name)
        what = f"{self.where}: layer {brief(self.layer.name)}, tensor {brief(tensor_name)}"
        if len(spec.shape) != 2:
            raise ModelFormatError(
                f"{what}: row reads need a 2-D tensor, shape is {list(spec.shape)}"
            )
        index = np.asarray(rows)
        if index.size == 0:
            index = index.astype(np.int64)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise ModelFormatError(f"{what}: rows must be a 1-D sequence of integers")
        bad = index[(index < 0) | (index >= spec.shape[0])]
        if bad.size:
            raise ModelFormatError(f"{what}: row {int(bad[0])} is outside 0..{spec.shape[0] - 1}")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
        view = _dest_bytes(dest, index.size * row_bytes, spec.dtype, what)
        if view.nbytes == 0:
            return 0
        self._check_unchanged()
        _read_row_runs(self._file, spec, index, view, row_bytes, what)
        return view.nbytes

    def _check_unchanged(self) -> None:
        if _identity(self._file.fileno()) != self._identity:
            raise ModelFormatError(
                f"{self.where}: layer {brief(self.layer.name)}: the file changed since it was "
                "opened; reopen the model (and plan again)"
            )


def read_tensors_into(
    model_dir: str | os.PathLike[str],
    layer: LayerSpec,
    dests: Mapping[str, Buffer],
    *,
    verify: bool = False,
    direct: bool = False,
) -> int:
    """Read the named tensors of ``layer`` into ``dests``; returns the bytes read.

    Each destination is a writable, C-contiguous buffer of exactly the tensor's nbytes
    (an ndarray must be uint8 or the tensor's dtype). ``dests`` may name a subset.

    ``direct=True`` reads with ``O_DIRECT``, bypassing the page cache: the disk's DMA
    fills the buffers without a CPU copy (so a prefetch overlaps compute fully) and the
    model never fills RAM as cached file pages. Each destination must then start on a
    4 KiB boundary and hold :func:`direct_read_nbytes` bytes (whole blocks); the bytes
    past the tensor's end are scratch. To read a layer many times, keep a
    :class:`LayerFile` open instead. Every tensor read here is crc32-checked (a first
    read of a freshly opened file always is; see :meth:`LayerFile.read_into`).
    """
    with LayerFile(model_dir, layer, direct=direct) as f:
        return f.read_into(dests, verify=verify)


def direct_read_nbytes(nbytes: int) -> int:
    """Bytes an ``O_DIRECT`` read of an ``nbytes`` tensor fills: whole 4 KiB blocks."""
    return -(-nbytes // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK


def _identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_direct(path: Path, where: str) -> int:
    try:
        if not getattr(os, "O_DIRECT", 0):
            raise OSError(0, "O_DIRECT is not available on this platform")
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        raise ModelFormatError(
            f"{where}: cannot open for direct reads ({exc.strerror}); set model.read_mode: buffered"
        ) from None


def _direct_view(dest: Buffer, spec: TensorSpec, what: str) -> memoryview:
    if spec.offset_bytes % DIRECT_IO_BLOCK:
        raise ModelFormatError(
            f"{what}: payload offset {spec.offset_bytes} is not {DIRECT_IO_BLOCK}-aligned,"
            " as direct reads need; convert with --alignment-bytes 4096 or set "
            "model.read_mode: buffered"
        )
    view = _dest_bytes(dest, direct_read_nbytes(spec.nbytes), "uint8", what)
    if spec.nbytes and _address(view) % DIRECT_IO_BLOCK:
        raise ModelFormatError(f"{what}: direct reads need a 4 KiB-aligned destination")
    return view


def _pread_direct(fd: int, view: memoryview, spec: TensorSpec, what: str) -> int:
    done, pos = 0, spec.offset_bytes
    while done < spec.nbytes:  # a short read comes only at the end of the file
        try:
            n = os.preadv(fd, [view[done:]], pos)
        except OSError as exc:
            raise ModelFormatError(
                f"{what}: direct read failed at byte {pos} ({exc.strerror}); set "
                "model.read_mode: buffered if the filesystem does not support it"
            ) from None
        if n == 0:
            raise ModelFormatError(f"{what}: file ends at byte {pos} (truncated?)")
        done, pos = done + n, pos + n
    return spec.nbytes


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def read_rows_into(
    model_dir: str | os.PathLike[str],
    layer: LayerSpec,
    tensor_name: str,
    rows: Sequence[int] | np.ndarray,
    dest: Buffer,
) -> int:
    """Read rows of a 2-D tensor into consecutive rows of ``dest``; returns bytes placed.

    Rows may repeat and come in any order. Rows close together in the file are read
    with one ``preadv`` (one iovec per row, small gaps into a scratch buffer). To read
    from a layer many times, keep a :class:`LayerFile` open instead.
    """
    with LayerFile(model_dir, layer) as f:
        return f.read_rows_into(tensor_name, rows, dest)


def _read_row_runs(
    f: io.FileIO, spec: TensorSpec, index: np.ndarray, view: memoryview, row_bytes: int, what: str
) -> None:
    scratch = memoryview(bytearray(_ROW_GAP_BYTES))
    order = np.argsort(index, kind="stable")
    dup_to: list[int] = []  # destination rows that repeat an earlier row...
    dup_from: list[int] = []  # ...and the destination row already holding it
    run: list[memoryview] = []
    run_start = prev = first_slot = -1
    for slot in order.tolist():
        row = int(index[slot])
        if row == prev:
            dup_to.append(slot)
            dup_from.append(first_slot)
            continue
        first_slot = slot
        gap = (row - prev - 1) * row_bytes
        if run and (gap > _ROW_GAP_BYTES or len(run) + 2 > _IOV_MAX):
            _pread_full(f, run, spec.offset_bytes + run_start * row_bytes, what)
            run = []
        if not run:
            run_start = row
        elif gap:
            run.append(scratch[:gap])
        run.append(view[slot * row_bytes : (slot + 1) * row_bytes])
        prev = row
    _pread_full(f, run, spec.offset_bytes + run_start * row_bytes, what)
    if dup_to:
        table = np.frombuffer(view, dtype=np.uint8).reshape(index.size, row_bytes)
        table[dup_to] = table[dup_from]


def load_layer_arrays(
    model_dir: str | os.PathLike[str], layer: LayerSpec, *, verify: bool = False
) -> dict[str, np.ndarray]:
    """Every tensor of ``layer`` as a fresh 64-byte-aligned array (reference path)."""
    arrays = {}
    for spec in layer.tensors:
        flat = aligned_empty(spec.nbytes).view(numpy_dtype(spec.dtype))
        arrays[spec.name] = flat.reshape(spec.array_shape)  # blocks: uint8 rows
    read_tensors_into(model_dir, layer, arrays, verify=verify)
    return arrays


def verify_model(model_dir: str | os.PathLike[str], manifest: Manifest | None = None) -> list[str]:
    """Check every file and recompute every checksum; returns one line per problem.

    Reads in 1 MiB chunks into one reusable buffer, so memory stays bounded.
    """
    if not Path(model_dir).is_dir():
        raise ModelFormatError(f"{model_dir}: model directory not found")
    if manifest is None:
        manifest = load_manifest(model_dir)
    problems: list[str] = []
    chunk = aligned_empty(_VERIFY_CHUNK_BYTES).data
    for layer in all_layer_specs(manifest):
        try:
            with _open_layer(model_dir, layer, check_objects=True) as (f, where):
                for spec in layer.tensors:
                    crc, pos, end = 0, spec.offset_bytes, spec.offset_bytes + spec.nbytes
                    while pos < end:
                        part = chunk[: min(end - pos, chunk.nbytes)]
                        pos += _pread_full(f, [part], pos, where)
                        crc = zlib.crc32(part, crc)
                    if f"{crc:08x}" != spec.crc32:
                        problems.append(
                            f"{where}: layer {brief(layer.name)}, tensor {brief(spec.name)}: "
                            "crc32 is "
                            f"{crc:08x}, expected {spec.crc32}; the file is corrupted"
                        )
        except ModelFormatError as exc:
            problems.append(str(exc))
    return problems
