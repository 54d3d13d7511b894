"""GGUF as a source: tensors copied byte for byte, the tied embedding stored once."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

from edgemind.cli import main
from edgemind.errors import ConversionError
from edgemind.weights.gguf_source import GEMMA3_BLOCK_TENSORS, convert_gguf
from edgemind.weights.manifest import all_layer_specs, load_manifest
from edgemind.weights.reader import LayerFile, verify_model

HIDDEN, FFN, HEADS, KV, HEAD_DIM, VOCAB, BLOCKS = 64, 128, 2, 1, 32, 96, 6


def tiny_gemma3(path, arch: str = "gemma3") -> dict[str, np.ndarray]:
    """A 6-block Gemma 3 shaped GGUF: Q8_0 / Q4_0 matrices, F32 norms; its tensors."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(BLOCKS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(512)
    shapes = {  # logical (rows, in_features)
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV * HEAD_DIM, HIDDEN),
        "attn_v": (KV * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    tensors: dict[str, np.ndarray] = {}

    def add(name: str, array: np.ndarray, qtype: Q | None) -> None:
        if qtype is None:
            writer.add_tensor(name, array)
            tensors[name] = array
        else:
            blocks = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
            tensors[name] = blocks

    add("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32), Q.Q8_0)
    for i in range(BLOCKS):
        for t in GEMMA3_BLOCK_TENSORS:
            name = f"blk.{i}.{t}.weight"
            if t in shapes:
                qtype = Q.Q4_0 if t == "ffn_up" else Q.Q8_0
                add(name, rng.standard_normal(shapes[t], dtype=np.float32), qtype)
            else:
                width = HEAD_DIM if t in ("attn_q_norm", "attn_k_norm") else HIDDEN
                add(name, rng.standard_normal(width, dtype=np.float32), None)
    add("output_norm.weight", rng.standard_normal(HIDDEN, dtype=np.float32), None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def read_back(model, layer_name: str, tensor: str) -> bytes:
    spec = next(s for s in all_layer_specs(load_manifest(model)) if s.name == layer_name)
    t = spec.tensor(tensor)
    buf = np.empty(t.nbytes, np.uint8)
    with LayerFile(model, spec) as f:
        f.read_into({tensor: buf})  # the first read checks its crc32
    return buf.tobytes()


def test_a_gemma3_gguf_converts_byte_for_byte(tmp_path):
    tensors = tiny_gemma3(tmp_path / "tiny.gguf")
    model = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    manifest = load_manifest(model)
    names = [layer.name for layer in manifest.layers]
    assert names == ["token_embd", *(f"blk.{i}" for i in range(BLOCKS)), "output_norm", "lm_head"]
    assert verify_model(model, manifest) == []
    embd = manifest.layers[0].tensor("weight")
    assert (embd.storage, embd.shape) == ("q8_0", (VOCAB, HIDDEN))
    block = manifest.layers[1]
    assert block.tensor("ffn_up").storage == "q4_0"
    assert block.tensor("attn_q").shape == (HEADS * HEAD_DIM, HIDDEN)
    assert block.tensor("attn_norm").storage == "float32"
    for layer, tensor, source in (
        ("token_embd", "weight", "token_embd.weight"),
        ("blk.3", "ffn_up", "blk.3.ffn_up.weight"),
        ("blk.5", "attn_k_norm", "blk.5.attn_k_norm.weight"),
        ("output_norm", "weight", "output_norm.weight"),
    ):
        assert read_back(model, layer, tensor) == tensors[source].tobytes(), (layer, tensor)
    # the tied LM head reads the embedding's bytes: stored once
    head = manifest.layers[-1]
    assert head.shares == "token_embd" and head.file == manifest.layers[0].file
    assert read_back(model, "lm_head", "weight") == tensors["token_embd.weight"].tobytes()
    files = sorted(p.name for p in (model / "layers").iterdir())
    assert len(files) == len(names) - 1
    # every 6th block attends globally, with the global RoPE base
    attention = [layer.config.get("attention") for layer in manifest.layers[1:-2]]
    assert attention == ["sliding"] * 5 + ["full"]
    assert manifest.layers[6].config["rope_base"] == 1e6
    assert manifest.layers[1].config["rope_base"] == 10_000.0
    meta = json.loads((model / "manifest.json").read_text())["metadata"]
    assert meta["gguf"]["general.architecture"] == "gemma3"


def test_unsupported_architectures_and_bad_files_are_one_line(tmp_path, capsys):
    tiny_gemma3(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ConversionError, match="architecture 'llama' is not supported"):
        convert_gguf(tmp_path / "llama.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    code = main(["convert", str(tmp_path / "junk.gguf"), str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "cannot read as GGUF" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_the_real_gemma3_270m_converts(gemma_gguf_path, tmp_path, capsys):
    code = main(["convert", str(gemma_gguf_path), str(tmp_path / "gemma")])
    out = capsys.readouterr().out
    assert code == 0 and "21 layers" in out
    manifest = load_manifest(tmp_path / "gemma")
    storages = {t.storage for layer in manifest.layers for t in layer.tensors}
    assert storages == {"q8_0", "q5_0", "q4_k", "q6_k", "float32"}
    head = manifest.layers[-1]
    assert head.shares == "token_embd" and head.tensor("weight").shape == (262144, 640)
    stored = sum(p.stat().st_size for p in (tmp_path / "gemma" / "layers").iterdir())
    assert stored < 260 * 2**20  # the 170 MiB table once, not twice
    reader = gguf.GGUFReader(gemma_gguf_path)
    source = next(t for t in reader.tensors if t.name == "blk.7.ffn_down.weight")
    assert read_back(tmp_path / "gemma", "blk.7", "ffn_down") == np.asarray(source.data).tobytes()


def test_inspect_shows_storage_types_and_bytes(tmp_path, capsys):
    tiny_gemma3(tmp_path / "tiny.gguf")
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    assert main(["inspect", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "weight[96, 64] q8_0 6.4 KiB" in out  # 96 rows x 2 blocks x 34 bytes
    assert "ffn_up[128, 64] q4_0 4.5 KiB" in out  # 128 rows x 2 blocks x 18 bytes


def test_missing_and_truncated_files_are_one_line(tmp_path, capsys):
    tiny_gemma3(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    for name, message in (("missing.gguf", "GGUF file not found"), ("cut.gguf", "truncated")):
        code = main(["convert", str(tmp_path / name), str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
