"""BERT kinds through jax.jit against their NumPy references, masking, gathered rows."""

from __future__ import annotations

import numpy as np
import pytest

from edgemind.errors import InputError
from edgemind.layers import TRACE_COUNTS, get_kind, jitted, reference
from edgemind.layers import bert as bert

TOL = {"rtol": 2e-5, "atol": 2e-5}


def tiny_bert(
    rng: np.random.Generator, hidden: int = 8, inter: int = 16, vocab: int = 13, positions: int = 20
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random embedding and encoder params of a tiny BERT."""

    def rand(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    emb = {
        "word_embeddings": rand(vocab, hidden),
        "position_embeddings": rand(positions, hidden),
        "token_type_embeddings": rand(2, hidden),
        "ln_gamma": 1 + rand(hidden, scale=0.1),
        "ln_beta": rand(hidden, scale=0.1),
    }
    enc = {}
    for name, n_in, n_out in [
        ("q", hidden, hidden),
        ("k", hidden, hidden),
        ("v", hidden, hidden),
        ("o", hidden, hidden),
        ("ffn_in", hidden, inter),
        ("ffn_out", inter, hidden),
    ]:
        enc[f"{name}_weight"] = rand(n_in, n_out, scale=n_in**-0.5)
        enc[f"{name}_bias"] = rand(n_out, scale=0.1)
    for ln in ("ln1", "ln2"):
        enc[f"{ln}_gamma"] = 1 + rand(hidden, scale=0.1)
        enc[f"{ln}_beta"] = rand(hidden, scale=0.1)
    return emb, enc


EMB_CONFIG = {"hidden": 8, "eps": 1e-12, "gathered": ["word_embeddings"]}
ENC_CONFIG = {"hidden": 8, "heads": 2, "intermediate": 16, "eps": 1e-12}


def _mask(lengths: list[int], seq: int) -> np.ndarray:
    return (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int32)


def test_kinds_are_registered_with_their_tensors():
    assert get_kind("bert_embeddings").tensors == bert.EMBEDDING_TENSORS
    assert get_kind("bert_encoder").tensors == bert.ENCODER_TENSORS
    assert get_kind("mean_pool_l2").tensors == ()


@pytest.mark.parametrize(("batch", "seq"), [(1, 5), (3, 7)])
def test_embeddings_match_reference(batch, seq):
    rng = np.random.default_rng(seq)
    emb, _ = tiny_bert(rng)
    ids = rng.integers(0, 13, (batch, seq)).astype(np.int32)
    params = bert.gather_params(emb, ids, ["word_embeddings"])
    assert params["word_embeddings"].shape == (batch * seq, 8)
    got = np.asarray(jitted("bert_embeddings", EMB_CONFIG)(params, ids, {}))
    want = reference("bert_embeddings", EMB_CONFIG)(params, ids, {})
    assert got.shape == (batch, seq, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize(("heads", "lengths", "seq"), [(1, [4], 4), (2, [3, 6, 1], 6), (4, [5], 8)])
def test_encoder_matches_reference(heads, lengths, seq):
    rng = np.random.default_rng(heads)
    _, enc = tiny_bert(rng)
    x = rng.standard_normal((len(lengths), seq, 8)).astype(np.float32)
    ctx = {"attention_mask": _mask(lengths, seq)}
    config = {**ENC_CONFIG, "heads": heads}
    got = np.asarray(jitted("bert_encoder", config)(enc, x, ctx))
    want = reference("bert_encoder", config)(enc, x, ctx)
    np.testing.assert_allclose(got, want, **TOL)


def test_mean_pool_matches_reference_and_is_unit_length():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 8)).astype(np.float32)
    ctx = {"attention_mask": _mask([6, 2, 1], 6)}
    got = np.asarray(jitted("mean_pool_l2", {"eps": 1e-12})({}, x, ctx))
    want = reference("mean_pool_l2", {"eps": 1e-12})({}, x, ctx)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got[2], x[2, 0] / np.linalg.norm(x[2, 0]), rtol=1e-5)


def _embed(emb, enc, ids, mask):
    ctx = {"attention_mask": mask}
    h = jitted("bert_embeddings", EMB_CONFIG)(
        bert.gather_params(emb, ids, ["word_embeddings"]), ids, ctx
    )
    h = jitted("bert_encoder", ENC_CONFIG)(enc, h, ctx)
    h = jitted("bert_encoder", ENC_CONFIG)(enc, h, ctx)
    return np.asarray(jitted("mean_pool_l2", {})({}, h, ctx))


def test_padding_does_not_change_the_embedding_of_real_tokens():
    rng = np.random.default_rng(1)
    emb, enc = tiny_bert(rng)
    real = rng.integers(1, 13, (1, 4)).astype(np.int32)
    alone = _embed(emb, enc, real, np.ones((1, 4), np.int32))
    for pad in (0, 7):  # whatever the pad id, masked positions are invisible
        ids = np.concatenate([real, np.full((1, 5), pad, np.int32)], axis=1)
        padded = _embed(emb, enc, ids, _mask([4], 9))
        np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
    # and in a batch next to a longer row
    other = rng.integers(1, 13, (1, 9)).astype(np.int32)
    ids = np.concatenate([np.pad(real, ((0, 0), (0, 5))), other])
    batched = _embed(emb, enc, ids, _mask([4, 9], 9))
    np.testing.assert_allclose(batched[:1], alone, rtol=1e-5, atol=1e-6)


def test_each_signature_traces_once():
    rng = np.random.default_rng(2)
    _, enc = tiny_bert(rng)
    config = {**ENC_CONFIG, "eps": 1e-6}  # a config no other test uses: a fresh jit
    fn = jitted("bert_encoder", config)
    before = TRACE_COUNTS["bert_encoder"]
    for _ in range(3):
        x = rng.standard_normal((2, 16, 8)).astype(np.float32)
        fn(enc, x, {"attention_mask": _mask([16, 3], 16)}).block_until_ready()
    assert TRACE_COUNTS["bert_encoder"] == before + 1


def test_embeddings_reject_the_whole_table_and_too_long_inputs():
    emb, _ = tiny_bert(np.random.default_rng(3), positions=6)
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"gathered rows.*\(4, hidden\)"):
        jitted("bert_embeddings", EMB_CONFIG)(emb, ids, {})
    long_ids = np.zeros((1, 7), np.int32)
    with pytest.raises(InputError, match="exceeds the 6 positions"):
        jitted("bert_embeddings", EMB_CONFIG)(
            bert.gather_params(emb, long_ids, ["word_embeddings"]), long_ids, {}
        )
    with pytest.raises(InputError, match="out of range"):
        bert.gather_params(emb, np.array([[13]]), ["word_embeddings"])


def test_gathered_rows_are_the_flat_ids():
    assert bert.gathered_rows(np.array([[3, 1], [2, 2]])).tolist() == [3, 1, 2, 2]
