"""Layer kinds through jax.jit against their NumPy references, and the registry."""

from __future__ import annotations

import numpy as np
import pytest

from edgemind.errors import ModelFormatError
from edgemind.layers import (
    TRACE_COUNTS,
    LayerKind,
    get_kind,
    jitted,
    known_kinds,
    reference,
    registry,
)


def _params(rng: np.random.Generator, d_in: int, d_out: int) -> dict[str, np.ndarray]:
    w = rng.standard_normal((d_in, d_out), dtype=np.float32) / np.float32(np.sqrt(d_in))
    b = rng.standard_normal((d_out,), dtype=np.float32)
    return {"w": w, "b": b}


CASES = [
    ("dense", {"activation": "relu"}, (4, 16), 8),
    ("dense", {"activation": "gelu"}, (2, 3, 16), 5),
    ("dense", {"activation": "none"}, (1, 64), 32),
    ("dense", {}, (7, 9), 3),
    ("exit_head", {}, (4, 16), 10),
    ("exit_head", {}, (2, 5, 32), 3),
]


@pytest.mark.parametrize(("kind", "config", "x_shape", "d_out"), CASES)
def test_kind_matches_numpy_reference(kind, config, x_shape, d_out):
    rng = np.random.default_rng(len(x_shape) * 100 + d_out)
    params = _params(rng, x_shape[-1], d_out)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    got = np.asarray(jitted(kind, config)(params, x, {}))
    want = reference(kind, config)(params, x, {})
    assert got.shape == (*x_shape[:-1], d_out)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_exit_head_rows_are_probabilities():
    rng = np.random.default_rng(0)
    probs = np.asarray(jitted("exit_head", {})(_params(rng, 8, 4), np.ones((3, 8), np.float32), {}))
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-6)


def test_jitted_traces_once_per_shape():
    rng = np.random.default_rng(1)
    # Shapes no other test uses, so the first call below is certainly a new signature.
    params = _params(rng, 13, 11)
    fn = jitted("dense", {"activation": "relu"})
    before = TRACE_COUNTS["dense"]
    for _ in range(3):
        fn(params, rng.standard_normal((5, 13), dtype=np.float32), {}).block_until_ready()
    assert TRACE_COUNTS["dense"] == before + 1
    assert jitted("dense", {"activation": "relu"}) is fn  # cached per (kind, config)
    fn(params, rng.standard_normal((6, 13), dtype=np.float32), {}).block_until_ready()
    assert TRACE_COUNTS["dense"] == before + 2


def test_config_order_does_not_matter_and_new_config_is_new_function():
    assert registry.freeze_config({"a": 1, "b": [1, 2]}) == registry.freeze_config(
        {"b": (1, 2), "a": 1}
    )
    assert jitted("dense", {"activation": "none"}) is not jitted("dense", {"activation": "relu"})


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(ModelFormatError, match=r"unknown layer kind 'conv9d'.*dense.*exit_head"):
        get_kind("conv9d")
    assert {"dense", "exit_head"} <= set(known_kinds())


def test_bad_config_key_lists_valid_keys():
    with pytest.raises(ModelFormatError, match=r"does not accept.*valid keys: \['activation'\]"):
        jitted("dense", {"activaton": "relu"})


def test_bad_activation_lists_valid_ones():
    params = _params(np.random.default_rng(2), 4, 4)
    with pytest.raises(ModelFormatError, match=r"unknown activation 'swish'.*relu, gelu, none"):
        jitted("dense", {"activation": "swish"})(params, np.ones((1, 4), np.float32), {})


def test_a_new_kind_registers_like_the_built_in_ones(monkeypatch):
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))
    monkeypatch.setattr(registry, "_JITTED", {})
    kind = LayerKind(
        "test_scale",
        apply=lambda params, x, ctx, *, factor: x * params["s"] * factor + ctx["bias"],
        reference=lambda params, x, ctx, *, factor: x * params["s"] * factor + ctx["bias"],
        tensors=("s",),
    )
    assert registry.register(kind) is kind
    assert get_kind("test_scale") is kind
    with pytest.raises(ValueError, match="already registered"):
        registry.register(LayerKind("test_scale", kind.apply, kind.reference))
    params = {"s": np.full((3,), 2.0, np.float32)}
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ctx = {"bias": np.ones((2, 3), np.float32)}
    got = np.asarray(jitted("test_scale", {"factor": 3})(params, x, ctx))
    np.testing.assert_allclose(got, reference("test_scale", {"factor": 3})(params, x, ctx))
