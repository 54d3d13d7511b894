"""Gemma 3 270M end to end: parity with transformers, streaming in a small arena, rejection.

The reference (``tests/data/gemma3/gemma3_reference.json``, made by
``tests/data/gemma3/make_gemma3_reference.py`` with transformers' ``Gemma3ForCausalLM``
loaded from the same GGUF, float32, eager attention) holds, per prompt, the top-64
logits at every prompt position with the max and the log-sum-exp over the whole
vocabulary, and 32 greedy tokens. Both sides compute in float32 from the same
dequantized weights, so logits differ only by summation order: the tolerance is
:data:`LOGIT_ATOL` (docs/gemma3.md, section 6, on the greedy margins).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgemind.cli import main
from edgemind.layers.gemma3 import PAD, START
from edgemind.runtime import Runtime
from edgemind.runtime.generation import ContextTooLarge
from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES
from edgemind.sampling import SamplingParams
from edgemind.units import MIB

REFERENCE = json.loads(
    (Path(__file__).parent / "data" / "gemma3" / "gemma3_reference.json").read_text()
)
LOGIT_ATOL = 1e-3
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
RESIDENT = {"arena_capacity_bytes": 1 << 30, "keep_resident_layers": "auto", "tiling": "auto"}


@pytest.fixture(scope="module")
def gemma_model(gemma_gguf_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma") / "gemma3-270m"
    assert main(["convert", str(gemma_gguf_path), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def resident(gemma_model):
    with Runtime.open(gemma_model, **RESIDENT) as rt:
        yield rt


def prompt_logits(rt: Runtime, ids: list[int]) -> np.ndarray:
    """The logits after every prompt position: the prompt fed one token at a time."""
    session = rt.session(1, 256, 1)
    session.reset()
    rows = []
    for position, token in enumerate(ids):
        ex = session.executor(session.decode_plan)
        ctx = {START: np.array([position], np.int32), PAD: np.zeros(1, np.int32)}
        rows.append(ex.run(np.array([[token]], np.int32), ctx).output.reshape(-1))
    return np.stack(rows)


def test_prompt_logits_match_transformers(resident):
    ref = REFERENCE["prompts"][0]
    logits = prompt_logits(resident, ref["prompt_token_ids"]).astype(np.float64)
    want = ref["prompt_logits"]
    for pos in range(len(ref["prompt_token_ids"])):
        ids = np.asarray(want["top_ids"][pos])
        np.testing.assert_allclose(logits[pos, ids], want["top_logits"][pos], atol=LOGIT_ATOL)
        assert abs(logits[pos].max() - want["max"][pos]) < LOGIT_ATOL
        top = logits[pos].max()
        lse = top + math.log(np.exp(logits[pos] - top).sum())
        assert abs(lse - want["logsumexp"][pos]) < LOGIT_ATOL


@pytest.mark.parametrize("index", range(len(REFERENCE["prompts"])))
def test_greedy_tokens_match_transformers(resident, index):
    ref = REFERENCE["prompts"][index]
    out = resident.generate([ref["prompt_token_ids"]], GREEDY)
    assert list(out.token_ids[0]) == ref["greedy"]["token_ids"]
    assert out.finish_reasons == ("length",)
    report = out.report
    assert report.bytes_read_decode <= report.generated_tokens * 640 * 2  # embedding rows only
    assert report.observed_peak_bytes is None or (
        report.observed_peak_bytes <= report.plan_peak_bytes + BOUND_ALLOWANCE_BYTES
    )


def test_a_batch_decodes_each_row_as_alone(resident):
    prompts = [p["prompt_token_ids"] for p in REFERENCE["prompts"][:2]]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    together = resident.generate(prompts, params)
    for row, prompt in enumerate(prompts):
        assert together.token_ids[row] == resident.generate([prompt], params).token_ids[0]


def test_same_seed_same_tokens(resident):
    ids = REFERENCE["prompts"][2]["prompt_token_ids"]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=6)
    first = resident.generate([ids], params).token_ids
    assert resident.generate([ids], params).token_ids == first


def test_streamed_in_32_mib_gives_the_resident_tokens(gemma_model):
    ref = REFERENCE["prompts"][0]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    with Runtime.open(gemma_model, arena_capacity_bytes=32 * MIB, tiling="auto") as rt:
        out = rt.generate([ref["prompt_token_ids"]], params)
    assert list(out.token_ids[0]) == ref["greedy"]["token_ids"][:8]
    report = out.report
    assert report.plan_peak_bytes <= 32 * MIB
    assert report.bytes_read_per_token > 150 * MIB  # the LM head's tiles and the blocks
    if report.observed_peak_bytes is not None:
        assert report.observed_peak_bytes <= report.plan_peak_bytes + BOUND_ALLOWANCE_BYTES


def test_a_context_that_cannot_fit_is_rejected_before_reading(gemma_model, capsys):
    ids = REFERENCE["prompts"][0]["prompt_token_ids"]
    policy = {"arena_capacity_bytes": 32 * MIB, "tiling": "auto"}
    with Runtime.open(gemma_model, on_memory_quota_exceeded="reject_request", **policy) as rt:
        with pytest.raises(ContextTooLarge) as info:
            rt.generate([ids], SamplingParams(temperature=0.0, max_tokens=2000))
        assert 0 < info.value.largest_context < 2048
        assert f"largest context that fits is {info.value.largest_context}" in str(info.value)
    code = main(
        ["generate", str(gemma_model), "--prompt", "Hi", "--max-tokens", "2000",
         "--arena-mb", "32", "--on-quota", "reject_request"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1 and "largest context that fits" in err


def test_early_exit_stops_at_the_largest_context(gemma_model):
    """Under early_exit a session too long for the arena runs in the largest context that
    fits and stops there: finish_reason "memory" (the generation analogue of an exit)."""
    words = REFERENCE["prompts"][1]["prompt_token_ids"][1:]
    ids = [2, *(words * 6)][:240]  # 240 tokens: 16 positions left in a 256 context
    params = SamplingParams(temperature=0.0, max_tokens=2000)
    # 30 MiB holds a 256-position session (about 24 MiB) but not 512 (about 33 MiB)
    with Runtime.open(gemma_model, arena_capacity_bytes=30 * MIB, tiling="auto") as rt:
        out = rt.generate([ids], params, chunk=16)
    assert out.finish_reasons == ("memory",)
    assert out.report.context == 256 and len(out.token_ids[0]) == 256 - 240 + 1


def test_a_bfloat16_kv_cache_halves_it_and_keeps_the_tokens(gemma_model):
    ref = REFERENCE["prompts"][0]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    with Runtime.open(gemma_model, kv_dtype="bfloat16", **RESIDENT) as rt:
        out = rt.generate([ref["prompt_token_ids"]], params)
    assert list(out.token_ids[0]) == ref["greedy"]["token_ids"][:8]
    assert out.report.kv_bytes == 18 * 2 * 256 * 256 * 2  # layers, k and v, positions, dim, bytes


def test_cli_generate_json(gemma_model, capsys):
    ref = REFERENCE["prompts"][0]
    code = main(
        ["generate", str(gemma_model), "--prompt", ref["text"], "--max-tokens", "4",
         "--arena-mb", "32", "--top-logprobs", "2", "--json"]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["prompt_token_ids"] == ref["prompt_token_ids"]
    assert out["token_ids"] == ref["greedy"]["token_ids"][:4]
    assert out["finish_reason"] == "length" and out["text"].startswith(" girl")
    assert [len(t["top_logprobs"]) for t in out["logprobs"]] == [2, 2, 2, 2]
    assert out["logprobs"][0]["top_logprobs"][0]["id"] == out["token_ids"][0]
    report = out["report"]
    assert report["observed_peak_bytes"] <= report["planned_peak_bytes"] + BOUND_ALLOWANCE_BYTES
    assert out["plan"]["peak_bytes"] <= 32 * MIB
