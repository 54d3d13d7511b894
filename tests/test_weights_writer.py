"""Tests of the model writer: valid msgpack streams, atomic directories, validation."""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edgemind.errors import ModelFormatError
from edgemind.weights import (
    InputSpec,
    ModelWriter,
    TensorSource,
    load_manifest,
    numpy_dtype,
    write_layer_file,
)
from edgemind.weights.format import WEIGHTS_MAGIC

INPUTS = [InputSpec("x", "float32", ("batch", 8))]


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((8, 5)).astype(np.float32),
        "h": rng.standard_normal((3, 7)).astype(np.float16),
        "i": rng.integers(-(2**31), 2**31, (11,), dtype=np.int32),
        "b": rng.standard_normal((4,)).astype(numpy_dtype("bfloat16")),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "q": rng.integers(-128, 128, (65,), dtype=np.int8),
    }


def _write(
    out: Path, alignment: int = 64, overwrite: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    layers = {f"block.{i}": _arrays(i) for i in range(3)}
    with ModelWriter(
        out, "toy", INPUTS, alignment_bytes=alignment, metadata={"k": 1}, overwrite=overwrite
    ) as w:
        for name, arrays in layers.items():
            head = (
                ("exit", "head", {"n": 2}, [("w", arrays["w"][:2])]) if name == "block.1" else None
            )
            w.add_layer(name, "dense", {"units": 5}, list(arrays.items()), exit_head=head)
    return layers


def _decode(path: Path) -> list[object]:
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False))


@pytest.mark.parametrize("alignment", [64, 4096])
def test_every_file_is_a_plain_msgpack_stream_of_header_padding_and_payloads(
    tmp_path: Path, alignment: int
) -> None:
    layers = _write(tmp_path / "m", alignment)
    manifest = load_manifest(tmp_path / "m")
    assert manifest.model_name == "toy" and manifest.alignment_bytes == alignment
    assert dict(manifest.metadata) == {"k": 1}
    for layer in manifest.layers:
        objects = _decode(tmp_path / "m" / layer.file)
        header, rest = objects[0], objects[1:]
        assert isinstance(header, dict) and header["magic"] == WEIGHTS_MAGIC
        assert header["layer"] == layer.name and header["alignment_bytes"] == alignment
        assert header["tensors"] == [t.to_json() for t in layer.tensors]
        payloads = [o for o in rest if isinstance(o, bytes)]
        pads = [o for o in rest if not isinstance(o, bytes)]
        assert all(p.code == 1 and not any(p.data) for p in pads)  # type: ignore[attr-defined]
        expected = layers[layer.name]
        assert len(payloads) == len(expected)
        for spec, payload in zip(layer.tensors, payloads, strict=True):
            array = expected[spec.name]
            assert spec.offset_bytes % alignment == 0
            assert payload == array.tobytes()
            assert spec.crc32 == f"{zlib.crc32(payload):08x}"
            assert (spec.dtype, spec.shape) == (array.dtype.name, array.shape)


def test_file_names_follow_layer_order_and_are_sanitised(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "m", "toy", INPUTS) as w:
        w.add_layer("../evil/name", "dense", {}, [("w", np.ones(2, np.float32))])
        w.add_layer("x_", "dense", {}, [], exit_head=("x?", "head", {}, []))  # same stem
    manifest = load_manifest(tmp_path / "m")
    assert [layer.file for layer in manifest.layers] == [
        "layers/00_evil_name.msgpack",
        "layers/01_x.msgpack",
    ]
    head = manifest.layers[1].exit_head
    assert head is not None and head.file == "layers/01_x_exit.msgpack"
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp directory left


def test_tensor_sources_are_loaded_lazily_one_at_a_time(tmp_path: Path) -> None:
    calls: list[str] = []

    def source(name: str) -> TensorSource:
        def load() -> np.ndarray:
            calls.append(name)
            return np.full((4, 4), len(calls), np.float32)

        return TensorSource(name, "float32", (4, 4), load)

    specs = write_layer_file(tmp_path / "l.msgpack", "l", 64, [source("a"), source("b")])
    assert calls == ["a", "b"]
    assert [s.name for s in specs] == ["a", "b"]


def test_arrays_are_stored_little_endian_c_order(tmp_path: Path) -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    write_layer_file(tmp_path / "l.msgpack", "l", 64, [("big", big), ("f", fortran)])
    payloads = [o for o in _decode(tmp_path / "l.msgpack")[1:] if isinstance(o, bytes)]
    assert payloads == [big.astype("<i4").tobytes(), np.ascontiguousarray(fortran).tobytes()]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (TensorSource("w", "float32", (2, 2), lambda: np.zeros((2, 3), np.float32)), "declared"),
        (TensorSource("w", "float32", (2,), lambda: np.zeros(2, np.float64)), "float64"),
    ],
)
def test_array_must_match_its_declared_spec(
    tmp_path: Path, source: TensorSource, message: str
) -> None:
    with pytest.raises(ModelFormatError, match=f"tensor 'w'.*{message}"):
        write_layer_file(tmp_path / "l.msgpack", "l", 64, [source])
    assert not (tmp_path / "l.msgpack").exists()


def test_bad_specs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"duplicate tensor names"):
        write_layer_file(
            tmp_path / "l", "l", 64, [("a", np.ones(1, "f4")), ("a", np.ones(1, "f4"))]
        )
    with pytest.raises(ModelFormatError, match=r"tensor 'd': dtype 'float64'"):
        write_layer_file(tmp_path / "l", "l", 64, [("d", np.ones(1))])
    with pytest.raises(ModelFormatError, match=r"complex64"):
        TensorSource("w", "complex64", (1,), lambda: np.ones(1))
    with pytest.raises(ModelFormatError, match=r"shape"):
        TensorSource("w", "float32", (-1,), lambda: np.ones(1))
    with pytest.raises(ModelFormatError, match=r"power of two"):
        ModelWriter(tmp_path / "m", "toy", INPUTS, alignment_bytes=32)


def test_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    _write(tmp_path / "m")
    with pytest.raises(ModelFormatError, match=r"already exists.*--overwrite \(overwrite=True"):
        ModelWriter(tmp_path / "m", "toy", INPUTS)
    with ModelWriter(tmp_path / "m", "toy2", INPUTS, overwrite=True) as w:
        w.add_layer("only", "dense", {}, [("w", np.ones(3, np.float32))])
    assert load_manifest(tmp_path / "m").model_name == "toy2"
    assert sorted(os.listdir(tmp_path / "m" / "layers")) == ["00_only.msgpack"]
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_exception_inside_the_writer_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(KeyError), ModelWriter(tmp_path / "m", "toy", INPUTS) as w:
        w.add_layer("a", "dense", {}, [("w", np.ones(3, np.float32))])
        raise KeyError("interrupted")
    assert os.listdir(tmp_path) == []


def test_exception_overwriting_keeps_the_old_model(tmp_path: Path) -> None:
    _write(tmp_path / "m")
    before = (tmp_path / "m" / "manifest.json").read_text()
    with (
        pytest.raises(ModelFormatError, match=r"declared"),
        ModelWriter(tmp_path / "m", "toy", INPUTS, overwrite=True) as w,
    ):
        w.add_layer("a", "dense", {}, [TensorSource("w", "int8", (2,), lambda: np.ones(3))])
    assert (tmp_path / "m" / "manifest.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_layer_validation(tmp_path: Path) -> None:
    writer = ModelWriter(tmp_path / "m", "toy", INPUTS)
    with pytest.raises(ModelFormatError, match=r"inside `with"):
        writer.add_layer("a", "dense", {}, [])
    with pytest.raises(ModelFormatError, match=r"names must be unique"), writer as w:
        w.add_layer("a", "dense", {}, [])
        w.add_layer("a", "dense", {}, [])
    with pytest.raises(ModelFormatError, match=r"'b': config is not JSON"), writer as w:
        w.add_layer("b", "dense", {"f": object()}, [])
    with pytest.raises(ModelFormatError, match=r"at least one input and one layer"), writer:
        pass
    assert os.listdir(tmp_path) == []


def test_manifest_written_is_what_the_reader_parses(tmp_path: Path) -> None:
    _write(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert data["format"] == "edgemind-model" and data["format_version"] == 2
    assert load_manifest(tmp_path / "m").to_json() == data


def test_side_files_land_with_the_model_or_not_at_all(tmp_path: Path) -> None:
    from edgemind.errors import ModelFormatError
    from edgemind.weights import ModelWriter
    from edgemind.weights.manifest import InputSpec

    side = tmp_path / "tokenizer.json"
    side.write_text("{}")
    inputs = [InputSpec("x", "float32", ("batch", 4))]
    with ModelWriter(tmp_path / "ok", model_name="m", inputs=inputs) as w:
        w.add_layer("l0", "dense", {}, [("w", np.ones((4, 4), np.float32))])
        w.add_file("tokenizer.json", side)
    assert (tmp_path / "ok" / "tokenizer.json").read_text() == "{}"
    bad = ModelWriter(tmp_path / "bad", model_name="m", inputs=inputs)
    with pytest.raises(ModelFormatError, match="plain file name"), bad as w:
        w.add_file("../escape.json", side)
    missing = ModelWriter(tmp_path / "missing", model_name="m", inputs=inputs)
    with pytest.raises(ModelFormatError, match="cannot copy"), missing as w:
        w.add_layer("l0", "dense", {}, [("w", np.ones((4, 4), np.float32))])
        w.add_file("tokenizer.json", tmp_path / "nope.json")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "tokenizer.json"]


def test_an_exit_head_may_not_share_a_layers_name(tmp_path: Path) -> None:
    writer = ModelWriter(tmp_path / "m", "toy", INPUTS)
    with pytest.raises(ModelFormatError, match="names must be unique"), writer as w:
        w.add_layer("a", "dense", {}, [], exit_head=("a", "exit_head", {}, []))
    assert not (tmp_path / "m").exists()


class _FullDisk:
    """A file object whose writes fail with ``errno_`` once ``limit`` bytes are written."""

    def __init__(self, f: object, limit: int, errno_: int) -> None:
        self._f, self._left, self._errno = f, limit, errno_

    def write(self, data: object) -> int:
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes  # type: ignore[arg-type]
        if n > self._left:
            raise OSError(self._errno, os.strerror(self._errno))
        self._left -= n
        return self._f.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("errno_", "hint"),
    [(errno.ENOSPC, "no space left"), (errno.EFBIG, "ulimit -f"), (errno.EROFS, "read-only")],
)
@pytest.mark.parametrize("limit", [0, 700, 10**9])  # header, a payload, the manifest
def test_a_failing_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, hint: str, limit: int
) -> None:
    import builtins

    from edgemind.weights import writer

    def failing_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = builtins.open(path, mode, *args, **kwargs)  # type: ignore[call-overload]  # noqa: SIM115
        if "w" not in mode:
            return f
        # the manifest is the last file written: a huge limit fails only there
        return _FullDisk(f, 0 if limit == 10**9 and str(path).endswith(".json") else limit, errno_)

    monkeypatch.setattr(writer, "open", failing_open, raising=False)
    with pytest.raises(ModelFormatError) as info:
        _write(tmp_path / "m")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "m") in message and hint in message
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_an_unwritable_parent_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only parent: real when not root (root writes anyway), simulated for root."""
    import tempfile

    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:

        def refuse(*args: object, **kwargs: object) -> str:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    parent.chmod(0o555)
    try:
        with pytest.raises(ModelFormatError, match=r"ro/m: cannot write .*permission denied"):
            _write(parent / "m")
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from edgemind.weights import InputSpec, ModelWriter
out, stage = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace_then_die(src, dst):
    real_replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)  # between moving the old model away and the new in
if stage == "commit":
    os.replace = replace_then_die
with ModelWriter(out, "new", [InputSpec("x", "float32", ("batch", 8))], overwrite=True) as w:
    w.add_layer("a", "dense", {}, [("w", np.ones(3, np.float32))])
    if stage == "layers":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["layers", "commit"])
def test_leftovers_of_a_killed_writer_are_cleaned_on_the_next_write(
    tmp_path: Path, stage: str
) -> None:
    import subprocess
    import sys

    _write(tmp_path / "m")
    before = (tmp_path / "m" / "manifest.json").read_text()
    script = [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "m"), stage]
    assert subprocess.run(script, timeout=120).returncode == -9
    leftovers = [n for n in os.listdir(tmp_path) if n != "m"]
    assert leftovers and all(n.startswith((".m.partial-", ".m.old-")) for n in leftovers)
    # killed mid-commit, the previous model sits in .m.old-*/model: it is put back
    with pytest.raises(ModelFormatError, match="already exists"):
        ModelWriter(tmp_path / "m", "toy", INPUTS)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert (tmp_path / "m" / "manifest.json").read_text() == before


def test_leftovers_of_a_live_writer_are_kept(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "m", "toy", INPUTS) as w:
        w.add_layer("a", "dense", {}, [("w", np.ones(3, np.float32))])
        ModelWriter(tmp_path / "m", "toy", INPUTS)  # a second writer of the same target
        assert len(os.listdir(tmp_path)) == 1  # the first one's .m.partial-PID-* is kept
    assert load_manifest(tmp_path / "m").layers[0].name == "a"


def test_the_model_directory_gets_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        _write(tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
