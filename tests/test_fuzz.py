"""Fuzzing every reader of outside input: each input ends well or in one line.

Hypothesis mutates valid manifests, policies, plan files and weight files (their
decoded structure and their raw bytes), costs one-layer models of every kind with
drawn configs and shapes, and builds hostile command lines. Every input
must either be accepted or end in the reader's own ``EdgemindError`` subclass with a
one-line message (the CLI: exit 1 or 2 with one line on stderr, no traceback), within
a time bound.

The suite runs a short, deterministic profile; ``make fuzz`` runs the long one
(``EDGEMIND_FUZZ=long``, random, about 100 times as many cases).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemind.cli import main
from edgemind.errors import EdgemindError, ModelFormatError, PlanError, PolicyError
from edgemind.planner import CostTable, ExitCost, UnitCost, make_plan
from edgemind.planner.planfile import load_plan, save_plan
from edgemind.policy import load_policy
from edgemind.weights import InputSpec, ModelWriter, load_manifest, read_file_header
from edgemind.weights.manifest import manifest_from_json

LONG = os.environ.get("EDGEMIND_FUZZ", "short") == "long"
SCALE = 100 if LONG else 1
SECONDS_PER_CASE = 30.0  # a generous bound: the slowest case is a first XLA compile


def fuzz_settings(examples: int) -> settings:
    """Short: derandomized (the same cases every run). Long: random, 100x the cases."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=not LONG,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def check_outcome(
    call: Callable[[], object], expected: type[EdgemindError] | tuple[type[EdgemindError], ...]
) -> None:
    """``call()`` returns, or raises ``expected`` with a short one-line message, in time."""
    start = time.perf_counter()
    try:
        call()
    except expected as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        assert len(message) < 2000, message[:200]
    assert time.perf_counter() - start < SECONDS_PER_CASE


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edgemind-fuzz-") as tmp:
        yield Path(tmp)


# ------------------------------------------------------------------------- strategies

INTERESTING_INTS = [0, 1, -1, 2, 63, 64, 4096, 2**31, 2**32, 2**32 - 1, 2**62, 2**63, 10**30]
INTERESTING_TEXT = ["", "\x00", "../x", "/etc/passwd", "batch", "seq", "float32", "a" * 3000]
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTERESTING_INTS),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.sampled_from(INTERESTING_TEXT),
    st.text(max_size=12),
)
VALUES = st.recursive(
    LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one value somewhere inside replaced, dropped or extended."""
    if isinstance(base, dict) and base and draw(st.integers(0, 4)) > 0:
        out = dict(base)
        key = draw(st.sampled_from(sorted(base)))
        action = draw(st.sampled_from(["descend", "descend", "descend", "drop", "replace"]))
        if action == "drop":
            del out[key]
        else:
            out[key] = draw(mutated(base[key])) if action == "descend" else draw(VALUES)
        return out
    if isinstance(base, list) and base and draw(st.integers(0, 4)) > 0:
        out_list = list(base)
        index = draw(st.integers(0, len(base) - 1))
        action = draw(st.sampled_from(["descend", "descend", "drop", "duplicate", "replace"]))
        if action == "drop":
            del out_list[index]
        elif action == "duplicate":
            out_list.insert(index, out_list[index])
        else:
            new = draw(mutated(base[index])) if action == "descend" else draw(VALUES)
            out_list[index] = new
        return out_list
    return draw(VALUES)


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, cut, inserted or the file truncated."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:
            data = data[:pos]
    return bytes(data)


def _tensor(name: str, shape: list[int], offset: int) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": "float32",
        "shape": shape,
        "nbytes": int(np.prod(shape)) * 4,
        "offset": offset,
        "crc32": "0badf00d",
    }


def _layer(name: str, d_in: int, d_out: int) -> dict[str, Any]:
    tensors = [_tensor("w", [d_in, d_out], 4096), _tensor("b", [d_out], 8192)]
    config = {"activation": "relu"}
    return {"name": name, "kind": "dense", "config": config, "file": f"layers/{name}.msgpack"} | {
        "tensors": tensors
    }


BASE_MANIFEST: dict[str, Any] = {
    "format": "edgemind-model",
    "format_version": 1,
    "model_name": "fuzz",
    "alignment_bytes": 4096,
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
    "layers": [
        _layer("l0", 8, 8) | {"exit_head": _layer("h0", 8, 2)},
        _layer("l1", 8, 4),
    ],
    "metadata": {"tokenizer": "tokenizer.json", "max_seq_length": 16, "note": {"a": [1]}},
}


# ---------------------------------------------------------------------------- targets


def test_base_inputs_are_valid() -> None:
    """The mutations start from valid inputs (else the fuzzing proves little)."""
    manifest = manifest_from_json(BASE_MANIFEST)
    assert len(manifest.layers) == 2 and manifest.num_levels == 2


def _accept_manifest(data: Any) -> None:
    manifest = manifest_from_json(data)
    manifest.digest()
    manifest.exit_levels()
    for spec in manifest.inputs:  # sizes refused before they reach NumPy or XLA
        with contextlib.suppress(EdgemindError):
            spec.concrete_shape({"batch": 2**40, "seq": 3})


@fuzz_settings(150)
@given(mutated(BASE_MANIFEST))
def test_manifest_structure(data: Any) -> None:
    check_outcome(lambda: _accept_manifest(data), ModelFormatError)


@fuzz_settings(60)
@given(mutated_bytes(json.dumps(BASE_MANIFEST).encode()))
def test_manifest_bytes(blob: bytes) -> None:
    with scratch() as root:
        (root / "manifest.json").write_bytes(blob)
        check_outcome(lambda: load_manifest(root), ModelFormatError)


BASE_POLICY = {
    "model": {
        "arena_capacity_mb": 50,
        "keep_resident_layers": "auto",
        "prefetch_depth": 1,
        "alignment_bytes": 64,
        "verify_checksums": False,
        "read_mode": "buffered",
    },
    "scheduler": {"on_memory_quota_exceeded": "early_exit"},
    "metrics": {"enable_http": False, "http_addr": "127.0.0.1:9090"},
}
ENV_VALUES = st.one_of(
    st.sampled_from(["", "1e308", "nan", "-1", "0", "inf", "50", "0.000001", "1" * 5000]),
    st.text(max_size=20),
)


@fuzz_settings(80)
@given(mutated(BASE_POLICY), ENV_VALUES)
def test_policy_structure(data: Any, env: str) -> None:
    with scratch() as root:
        path = root / "policy.yaml"
        path.write_text(yaml.safe_dump(data))
        check_outcome(lambda: load_policy(path, env={"EDGE_MODEL_ARENA_MB": env}), PolicyError)


@fuzz_settings(60)
@given(mutated_bytes(yaml.safe_dump(BASE_POLICY).encode()) | st.binary(max_size=200))
def test_policy_bytes(blob: bytes) -> None:
    with scratch() as root:
        path = root / "policy.yaml"
        path.write_bytes(blob)
        check_outcome(lambda: load_policy(path, env={}), PolicyError)


def _base_plan_file() -> bytes:
    from edgemind.policy import Policy

    layers = tuple(
        UnitCost(f"l{i}", "dense", (("kernel", 5000), ("bias", 70)), 900, 300) for i in range(3)
    )
    costs = CostTable("toy", (2, 8), 900, layers, (ExitCost(1, 0, None), ExitCost(2, 2, None)))
    policy = Policy(arena_capacity_bytes=12_000, keep_resident_layers="auto")
    plan = make_plan(costs, policy, manifest_digest="abc123", policy_digest=policy.digest())
    with scratch() as root:
        save_plan(plan, root / "plan.msgpack")
        return (root / "plan.msgpack").read_bytes()


BASE_PLAN_FILE = _base_plan_file()


@fuzz_settings(80)
@given(mutated(msgpack.unpackb(BASE_PLAN_FILE, raw=False)))
def test_plan_file_structure(data: Any) -> None:
    try:
        blob = msgpack.packb(data, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not representable in msgpack: no file can hold it
    with scratch() as root:
        (root / "plan.msgpack").write_bytes(blob)
        check_outcome(lambda: load_plan(root / "plan.msgpack"), PlanError)


@fuzz_settings(40)
@given(mutated_bytes(BASE_PLAN_FILE))
def test_plan_file_bytes(blob: bytes) -> None:
    with scratch() as root:
        (root / "plan.msgpack").write_bytes(blob)
        check_outcome(lambda: load_plan(root / "plan.msgpack"), PlanError)


def _base_weight_file() -> tuple[bytes, Any]:
    rng = np.random.default_rng(0)
    with scratch() as root:
        out = root / "model"
        inputs = [InputSpec("x", "float32", ("batch", 8))]
        with ModelWriter(out, "fuzz", inputs, alignment_bytes=64) as writer:
            arrays = [("w", rng.standard_normal((8, 4)).astype(np.float32))]
            writer.add_layer("l0", "dense", {}, [*arrays, ("b", np.zeros(4, np.float32))])
        layer = load_manifest(out).layers[0]
        return (out / layer.file).read_bytes(), layer


BASE_WEIGHT_FILE, BASE_LAYER = _base_weight_file()


@fuzz_settings(60)
@given(mutated_bytes(BASE_WEIGHT_FILE), st.booleans())
def test_weight_file_header(blob: bytes, against_manifest: bool) -> None:
    with scratch() as root:
        (root / "w.msgpack").write_bytes(blob)
        expected = BASE_LAYER if against_manifest else None
        check_outcome(lambda: read_file_header(root / "w.msgpack", expected), ModelFormatError)


def _config_keys(kind: str) -> list[str]:
    from edgemind.layers.registry import get_kind

    names = inspect.signature(get_kind(kind).apply).parameters
    return [n for n in names if n not in ("params", "x", "ctx")] or ["activation"]


CONFIG_VALUES = st.sampled_from(
    [0, 1, 2, 3, 4, 8, -1, 1e-12, 0.0, float("nan"), "relu", "gelu", "x", None, True, []]
) | st.sampled_from([["w"], ["word_embeddings"], 3, 2**40])


@st.composite
def one_layer_manifests(draw: st.DrawFn) -> dict[str, Any]:
    """One layer of any registered kind, with drawn config, tensor shapes and inputs."""
    import edgemind.layers  # noqa: F401  (registers the kinds)
    from edgemind.layers.registry import get_kind, known_kinds

    kind = draw(st.sampled_from(list(known_kinds())))
    keys = _config_keys(kind)
    config = draw(st.dictionaries(st.sampled_from(keys), CONFIG_VALUES, max_size=len(keys)))
    tensors = []
    for i, name in enumerate(get_kind(kind).tensors or ("w",)):
        shape = draw(st.lists(st.integers(0, 9), max_size=3))
        dtype = draw(st.sampled_from(["float32", "int32", "float16"]))
        size = 2 if dtype == "float16" else 4
        tensors.append(
            {"name": name, "dtype": dtype, "shape": shape, "nbytes": int(np.prod(shape)) * size}
            | {"offset": 4096 * (i + 1), "crc32": "00000000"}
        )
    shape = draw(st.lists(st.sampled_from(["batch", "seq", 1, 2, 8]), min_size=1, max_size=3))
    inputs = [{"name": "x", "dtype": draw(st.sampled_from(["float32", "int32"])), "shape": shape}]
    if draw(st.booleans()):
        inputs.append({"name": "attention_mask", "dtype": "int32", "shape": ["batch", "seq"]})
    layer = {"name": "l", "kind": kind, "config": config, "file": "l.msgpack", "tensors": tensors}
    return BASE_MANIFEST | {"inputs": inputs, "layers": [layer], "metadata": {}}


@fuzz_settings(25)
@given(one_layer_manifests())
def test_layer_configs_while_costing(data: dict[str, Any]) -> None:
    """Layer code that trips over a config or shape is a one-line error, not a traceback."""
    from edgemind.errors import InputError
    from edgemind.layers.cost import cost_table

    def cost() -> None:
        cost_table(manifest_from_json(data), {"batch": 2, "seq": 3})

    check_outcome(cost, (ModelFormatError, InputError))


# ---------------------------------------------------------------------------- the CLI

NUMBERS = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "1e308", "nan", "inf", "-0", "0x10", "", "auto"]),
    st.sampled_from([str(2**62), str(2**64), "9" * 5000, "1.5", "50MB", "1e-9"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(max_size=8),
)
# Values that are valid and cheap keep the cases that get past parsing small: no case
# may allocate gigabytes because a flag was plausible.
SMALL = st.sampled_from(["1", "2", "3"])
FLAGS: dict[str, st.SearchStrategy[str] | None] = {
    "--arena-mb": NUMBERS | st.sampled_from(["0.01", "1", "50"]),
    "--arena-bytes": NUMBERS,
    "--keep-resident": NUMBERS,
    "--prefetch-depth": NUMBERS | SMALL,
    "--read-mode": st.sampled_from(["buffered", "direct", "mmap", ""]),
    "--on-quota": st.sampled_from(["early_exit", "reject_request", "explode"]),
    "--batch": st.sampled_from([str(2**62), str(2**40), "0", "-1", "x"]) | SMALL,
    "--seq": st.sampled_from([str(2**62), "0", "x"]) | SMALL,
    "--seed": NUMBERS,
    "--repeat": st.sampled_from(["0", "-1", "x", "1e3"]) | SMALL,
    "--linger": st.sampled_from(["-1", "nan", "inf", "1e308", "0"]),
    "--text": st.text(max_size=20) | st.sampled_from(["\udcff", "", " ", "a" * 3000]),
    "--metrics-addr": st.sampled_from(
        [":0", "127.0.0.1:0", "[::1]:x", "a" * 300 + ":1", "h:99999"]
    ),
    "--json": None,
    "--verify": None,
    "--buffers": None,
}

FILE_FLAGS = ("--policy", "--plan", "--text-file", "--input")


@st.composite
def command_lines(draw: st.DrawFn, model: str, files: list[str]) -> list[str]:
    command = draw(st.sampled_from(["inspect", "plan", "run", "convert", "frobnicate", "--x"]))
    argv = [command]
    if draw(st.integers(0, 9)):
        argv.append(draw(st.sampled_from([model, model, *files])))
    if command == "run" and draw(st.integers(0, 5)):
        argv += draw(
            st.sampled_from(
                [
                    ["--random-input"],
                    ["--input", *draw(st.lists(st.sampled_from(files), max_size=1))],
                ]
            )
        )
    flags = {**FLAGS, **{name: st.sampled_from(files) for name in FILE_FLAGS}}
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=4, unique=True)):
        values = flags[flag]
        argv += [flag] if values is None else [flag, draw(values)]
    return argv


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("fuzz-files")
    (root / "empty.npy").write_bytes(b"")
    np.save(root / "zero.npy", np.zeros((0, 1024), np.float32))
    np.save(root / "wrong.npy", np.zeros((1, 7), np.float64))
    (root / "text.npy").write_text("not an array")
    os.mkfifo(root / "fifo")
    return [str(root / n) for n in ("empty.npy", "zero.npy", "wrong.npy", "text.npy", "fifo")] + [
        "/dev/null",
        str(root / "missing"),
        str(root),
    ]


@fuzz_settings(40)
@given(data=st.data())
def test_cli_arguments(toy_model: Path, bad_files: list[str], data: st.DataObject) -> None:
    """Every command line exits 0-5; errors (1, 2) print exactly one line on stderr."""
    argv = data.draw(command_lines(str(toy_model), bad_files), label="argv")
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert time.perf_counter() - start < SECONDS_PER_CASE
    text = err.getvalue()
    assert code in (0, 1, 2, 3, 4, 5), (argv, code)  # 5: out of memory while running
    assert "Traceback" not in text, (argv, text)
    if code in (1, 2):
        assert len(text.strip().splitlines()) == 1, (argv, text)
    else:  # 4 and 5 say why on one line; `plan` says it on stdout instead
        assert len(text.strip().splitlines()) <= 1, (argv, text)
