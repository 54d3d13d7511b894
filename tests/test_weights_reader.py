"""Tests of the weight reader: round trips, no copies, row reads, and every bad input."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edgemind.errors import ChecksumError, ModelFormatError
from edgemind.weights import (
    InputSpec,
    LayerSpec,
    ModelWriter,
    aligned_empty,
    load_layer_arrays,
    load_manifest,
    numpy_dtype,
    read_file_header,
    read_rows_into,
    read_tensors_into,
    verify_model,
)
from edgemind.weights import reader as reader_module
from edgemind.weights.format import pack_header, plan_layout

INPUTS = [InputSpec("x", "int32", ("batch", "seq"))]


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((9, 5)).astype(np.float32),
        "h": rng.standard_normal((3, 7)).astype(np.float16),
        "i": rng.integers(-(2**31), 2**31, (11,), dtype=np.int32),
        "b": rng.standard_normal((2, 3)).astype(numpy_dtype("bfloat16")),
        "l": rng.integers(-(2**62), 2**62, (3,), dtype=np.int64),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "u": rng.integers(0, 256, (65,), dtype=np.uint8),
    }


def _model(root: Path, alignment: int = 64) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    out = root / "model"
    layers = {f"l{i}": _arrays(i) for i in range(3)}
    with ModelWriter(out, "toy", INPUTS, alignment_bytes=alignment) as w:
        for name, arrays in layers.items():
            w.add_layer(name, "dense", {}, list(arrays.items()))
    return out, layers


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    return _model(tmp_path)


@pytest.mark.parametrize("alignment", [64, 4096])
def test_round_trip_into_aligned_buffers(tmp_path: Path, alignment: int) -> None:
    out, layers = _model(tmp_path, alignment)
    manifest = load_manifest(out)
    for layer in manifest.layers:
        assert read_file_header(out / layer.file, layer).tensors == layer.tensors
        buffers = {t.name: aligned_empty(t.nbytes, alignment) for t in layer.tensors}
        assert read_tensors_into(out, layer, buffers, verify=True) == layer.nbytes
        for spec in layer.tensors:
            expected = layers[layer.name][spec.name]
            assert spec.offset_bytes % alignment == 0
            assert buffers[spec.name].ctypes.data % alignment == 0
            got = buffers[spec.name].view(expected.dtype).reshape(expected.shape)
            np.testing.assert_array_equal(got, expected)
        arrays = load_layer_arrays(out, layer, verify=True)
        for name, array in arrays.items():
            assert array.dtype == layers[layer.name][name].dtype
            assert array.ctypes.data % 64 == 0
            np.testing.assert_array_equal(array, layers[layer.name][name])
    assert verify_model(out) == []


def test_fast_reader_agrees_with_a_plain_msgpack_decoder(model: tuple) -> None:
    out, _ = model
    for layer in load_manifest(out).layers:
        with open(out / layer.file, "rb") as f:
            objects = list(msgpack.Unpacker(f, raw=False))
        payloads = [o for o in objects[1:] if isinstance(o, bytes)]
        buffers = {t.name: bytearray(t.nbytes) for t in layer.tensors}
        read_tensors_into(out, layer, buffers)
        assert payloads == [bytes(buffers[t.name]) for t in layer.tensors]


def test_subset_of_tensors_and_typed_destinations(model: tuple) -> None:
    out, layers = model
    layer = load_manifest(out).layers[0]
    dest = np.empty((9, 5), np.float32)
    assert read_tensors_into(out, layer, {"w": dest}) == dest.nbytes
    np.testing.assert_array_equal(dest, layers["l0"]["w"])
    with pytest.raises(ModelFormatError, match=r"has no tensor 'nope'"):
        read_tensors_into(out, layer, {"nope": dest})


def test_reading_32_mib_allocates_no_copy(tmp_path: Path) -> None:
    array = np.arange(8 << 20, dtype=np.float32)  # 32 MiB
    with ModelWriter(tmp_path / "m", "big", INPUTS, alignment_bytes=4096) as w:
        w.add_layer("big", "dense", {}, [("w", array)])
    layer = load_manifest(tmp_path / "m").layers[0]
    dest = aligned_empty(array.nbytes)
    tracemalloc.start()
    try:
        read_tensors_into(tmp_path / "m", layer, {"w": dest})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert np.array_equal(dest.view(np.float32), array)


def test_aligned_view_is_shared_with_jax_without_copy(model: tuple) -> None:
    jax = pytest.importorskip("jax")
    out, layers = model
    layer = load_manifest(out).layers[0]
    arena = aligned_empty(4096)
    spec = layer.tensor("w")
    view = arena[: spec.nbytes].view(np.float32).reshape(spec.shape)
    read_tensors_into(out, layer, {"w": view})
    assert np.shares_memory(view, arena)
    device = jax.device_put(view)
    assert device.unsafe_buffer_pointer() == view.ctypes.data
    np.testing.assert_array_equal(np.asarray(device), layers["l0"]["w"])


@pytest.mark.parametrize(
    "rows",
    [[0], [8, 0, 3, 3, 8, 1], [2, 3, 4, 5], list(range(9))[::-1], [], [4, 4, 4]],
)
def test_read_rows_matches_fancy_indexing(model: tuple, rows: list[int]) -> None:
    out, layers = model
    layer = load_manifest(out).layers[1]
    dest = np.empty((len(rows), 5), np.float32)
    assert read_rows_into(out, layer, "w", rows, dest) == dest.nbytes
    np.testing.assert_array_equal(dest, layers["l1"]["w"][rows])


def test_read_rows_far_apart_and_in_small_syscalls(tmp_path: Path, monkeypatch) -> None:
    table = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32)
    with ModelWriter(tmp_path / "m", "emb", INPUTS, alignment_bytes=4096) as w:
        w.add_layer("embed", "embedding", {}, [("table", table)])
    layer = load_manifest(tmp_path / "m").layers[0]
    rows = np.random.default_rng(1).integers(0, 5000, 300)
    dest = aligned_empty(300 * 64)
    read_rows_into(tmp_path / "m", layer, "table", rows, dest)
    np.testing.assert_array_equal(dest.view(np.float32).reshape(300, 16), table[rows])
    # short reads, and the no-preadv fallback, still fill every byte
    real = reader_module._pread_some

    def short(f, bufs, offset):  # type: ignore[no-untyped-def]
        return real(f, [bufs[0][:7]], offset)

    monkeypatch.setattr(reader_module, "_pread_some", short)
    dest[:] = 0
    read_rows_into(tmp_path / "m", layer, "table", rows, dest)
    np.testing.assert_array_equal(dest.view(np.float32).reshape(300, 16), table[rows])
    monkeypatch.setattr(reader_module, "_pread_some", real)
    monkeypatch.setattr(reader_module, "_HAS_PREADV", False)
    arrays = load_layer_arrays(tmp_path / "m", layer, verify=True)
    np.testing.assert_array_equal(arrays["table"], table)


def test_read_rows_rejects_bad_requests(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[0]
    dest = np.empty((1, 5), np.float32)
    with pytest.raises(ModelFormatError, match=r"tensor 'w': row 9 is outside 0..8"):
        read_rows_into(out, layer, "w", [9], dest)
    with pytest.raises(ModelFormatError, match=r"row -1"):
        read_rows_into(out, layer, "w", [-1], dest)
    with pytest.raises(ModelFormatError, match=r"integers"):
        read_rows_into(out, layer, "w", np.array([0.5]), dest)
    with pytest.raises(
        ModelFormatError, match=r"tensor 'i': row reads need a 2-D tensor, shape is \[11\]"
    ):
        read_rows_into(out, layer, "i", [0], dest)
    with pytest.raises(ModelFormatError, match=r"holds 20 bytes, expected 40"):
        read_rows_into(out, layer, "w", [0, 1], dest)


# ------------------------------------------------------------------------ bad input


def test_missing_model_dir(tmp_path: Path) -> None:
    layer = LayerSpec("l", "dense", {}, "layers/00_l.msgpack", ())
    with pytest.raises(ModelFormatError, match=r"nope: model directory not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match=r"nope: model directory not found"):
        read_tensors_into(tmp_path / "nope", layer, {})
    with pytest.raises(ModelFormatError, match=r"nope: model directory not found"):
        verify_model(tmp_path / "nope")


def test_missing_weight_file(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[2]
    (out / layer.file).unlink()
    with pytest.raises(
        ModelFormatError, match=r"02_l2.msgpack: cannot open weight file of layer 'l2'"
    ):
        read_tensors_into(out, layer, {})
    assert len(verify_model(out)) == 1


def _edit_manifest(out: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((out / "manifest.json").read_text())
    edit(data)
    (out / "manifest.json").write_text(json.dumps(data))


def test_unknown_manifest_version(model: tuple) -> None:
    out, _ = model
    _edit_manifest(out, lambda d: d.update(format_version=3))
    with pytest.raises(
        ModelFormatError, match=r"format_version is 3, this edgemind reads versions 1, 2"
    ):
        load_manifest(out)


@pytest.mark.parametrize("file", ["/etc/passwd", "../outside.msgpack", "layers/../../x"])
def test_file_entries_must_stay_inside_the_model_dir(model: tuple, file: str) -> None:
    out, _ = model
    _edit_manifest(out, lambda d: d["layers"][0].update(file=file))
    with pytest.raises(ModelFormatError, match=r"must be a relative path inside the model"):
        load_manifest(out)
    layer = LayerSpec("l0", "dense", {}, file, ())
    with pytest.raises(ModelFormatError, match=r"must be a relative path inside the model"):
        read_tensors_into(out, layer, {})


def test_manifest_shape_disagreeing_with_nbytes(model: tuple) -> None:
    out, _ = model
    _edit_manifest(out, lambda d: d["layers"][0]["tensors"][0].update(shape=[9, 6]))
    with pytest.raises(
        ModelFormatError, match=r"tensor 'w': nbytes is 180, expected 216 for shape \[9, 6\]"
    ):
        load_manifest(out)


def test_header_shape_disagreeing_with_nbytes(tmp_path: Path) -> None:
    spec = plan_layout("l", 64, [("w", "float32", (4,))]).tensors[0]
    bad = spec.__class__(spec.name, spec.dtype, (5,), spec.nbytes, spec.offset_bytes, spec.crc32)
    header = pack_header("l", 64, [bad])
    (tmp_path / "f.msgpack").write_bytes(header.ljust(spec.offset_bytes + 16, b"\0"))
    with pytest.raises(ModelFormatError, match=r"f.msgpack: layer 'l', tensor 'w': nbytes is 16"):
        read_file_header(tmp_path / "f.msgpack")


def test_truncated_weight_file(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[1]
    spec = layer.tensor("u")
    os.truncate(out / layer.file, spec.offset_bytes + spec.nbytes - 1)
    with pytest.raises(ModelFormatError, match=r"01_l1.msgpack: layer 'l1', tensor 'u'.*truncated"):
        read_tensors_into(out, layer, {"w": np.empty((9, 5), np.float32)})
    os.truncate(out / layer.file, 10)
    with pytest.raises(ModelFormatError, match=r"01_l1.msgpack: file ends inside its header"):
        read_file_header(out / layer.file, layer)
    os.truncate(out / layer.file, 0)
    with pytest.raises(ModelFormatError, match=r"file ends inside its header after 0 bytes"):
        read_file_header(out / layer.file)


def test_trailing_bytes_are_reported(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[0]
    with open(out / layer.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFormatError, match=r"header describes"):
        read_file_header(out / layer.file, layer)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_payload_byte(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[2]
    spec = layer.tensor("h")
    _flip(out / layer.file, spec.offset_bytes + 3)
    dest = np.empty((3, 7), np.float16)
    message = (
        f"02_l2.msgpack: layer 'l2', tensor 'h': crc32 is [0-9a-f]{{8}}, expected {spec.crc32}"
    )
    # the first read of a freshly opened file checks the crc even without verify=True
    for verify in (False, True):
        with pytest.raises(ChecksumError, match=message):
            read_tensors_into(out, layer, {"h": dest}, verify=verify)
    problems = verify_model(out, load_manifest(out))
    assert len(problems) == 1 and "tensor 'h'" in problems[0]


def test_wrong_magic(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[0]
    data = (out / layer.file).read_bytes()
    (out / layer.file).write_bytes(data.replace(b"edgemind-weights", b"edgemind-weightX", 1))
    with pytest.raises(ModelFormatError, match=r"magic is 'edgemind-weightX', expected"):
        read_tensors_into(out, layer, {})
    (out / layer.file).write_bytes(b"\xc1" + data[1:])
    with pytest.raises(ModelFormatError, match=r"00_l0.msgpack: header is not valid msgpack"):
        read_file_header(out / layer.file)


def test_file_from_another_conversion(tmp_path: Path) -> None:
    out, _ = _model(tmp_path)
    other, _ = _model(tmp_path / "other")
    layer = load_manifest(out).layers[0]
    (out / layer.file).write_bytes((other / load_manifest(other).layers[1].file).read_bytes())
    with pytest.raises(ModelFormatError, match=r"header names layer 'l1', manifest expects 'l0'"):
        read_tensors_into(out, layer, {})


def test_corrupt_bin32_marker_is_found_by_full_checks(model: tuple) -> None:
    out, _ = model
    layer = load_manifest(out).layers[0]
    _flip(out / layer.file, layer.tensor("h").offset_bytes - 5)
    with pytest.raises(ModelFormatError, match=r"tensor 'h': bytes before the payload"):
        read_file_header(out / layer.file, layer)


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        (np.empty((9, 4), np.float32), "tensor 'w': destination holds 144 bytes, expected 180"),
        (np.empty((5, 9), np.float32).T, "writable and C-contiguous"),
        (np.empty((9, 5), np.int32), "dtype int32 is neither uint8 nor float32"),
        (b"\0" * 180, "writable"),
        (memoryview(bytearray(181)), "holds 181 bytes"),
        (object(), "not a buffer"),
    ],
)
def test_bad_destination(model: tuple, dest: object, message: str) -> None:
    out, _ = model
    layer = load_manifest(out).layers[0]
    with pytest.raises(ModelFormatError, match=message):
        read_tensors_into(out, layer, {"w": dest})


def test_read_only_array_destination(model: tuple) -> None:
    out, _ = model
    dest = np.empty((9, 5), np.float32)
    dest.flags.writeable = False
    with pytest.raises(ModelFormatError, match=r"writable"):
        read_tensors_into(out, load_manifest(out).layers[0], {"w": dest})


def test_aligned_empty() -> None:
    for alignment in (1, 64, 4096):
        for nbytes in (0, 1, 1000):
            a = aligned_empty(nbytes, alignment)
            assert a.dtype == np.uint8 and a.nbytes == nbytes and a.ctypes.data % alignment == 0
    with pytest.raises(ValueError):
        aligned_empty(10, 48)


def test_direct_reads_fill_block_sized_destinations(tmp_path: Path) -> None:
    from edgemind.weights.reader import direct_read_nbytes

    out, _ = _model(tmp_path, 4096)
    manifest = load_manifest(out)
    layer = manifest.layers[0]
    try:
        fd = os.open(out / layer.file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        pytest.skip("the test filesystem does not support O_DIRECT")
    os.close(fd)
    expected = load_layer_arrays(out, layer)
    dests = {t.name: aligned_empty(direct_read_nbytes(t.nbytes), 4096) for t in layer.tensors}
    read_tensors_into(out, layer, dests, direct=True, verify=True)
    for t in layer.tensors:
        got = dests[t.name][: t.nbytes].view(expected[t.name].dtype).reshape(t.shape)
        np.testing.assert_array_equal(got, expected[t.name])
    misaligned = {layer.tensors[0].name: aligned_empty(8192 + 64, 64)[64:]}
    with pytest.raises(ModelFormatError):
        read_tensors_into(out, layer, misaligned, direct=True)


def test_direct_reads_need_block_aligned_payloads(model: tuple) -> None:
    from edgemind.weights.reader import direct_read_nbytes

    out, _ = model  # written with 64-byte payload alignment
    layer = next(
        x for x in load_manifest(out).layers if any(t.offset_bytes % 4096 for t in x.tensors)
    )
    dests = {t.name: aligned_empty(direct_read_nbytes(t.nbytes), 4096) for t in layer.tensors}
    with pytest.raises(ModelFormatError, match="read_mode: buffered"):
        read_tensors_into(out, layer, dests, direct=True)
