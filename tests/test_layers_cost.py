"""Per-unit costs from eval_shape and memory_analysis, and the cost table of a manifest."""

from __future__ import annotations

import math
from types import MappingProxyType

import jax
import pytest

from edgemind.errors import ModelFormatError
from edgemind.layers import LayerKind, cost, cost_table, input_structs, jitted, registry, unit_cost
from edgemind.planner.plan import CostTable
from edgemind.weights.manifest import InputSpec, LayerSpec, Manifest, TensorSpec

F32 = "float32"


def _tensor(name: str, shape: tuple[int, ...], dtype: str = F32) -> TensorSpec:
    return TensorSpec(name, dtype, shape, math.prod(shape) * 4, 0, "00000000")


def _dense(name: str, d_in: int, d_out: int, kind: str = "dense", **config) -> LayerSpec:
    if kind == "dense":
        config.setdefault("activation", "relu")
    tensors = (_tensor("w", (d_in, d_out)), _tensor("b", (d_out,)))
    return LayerSpec(name, kind, MappingProxyType(config), f"{name}.msgpack", tensors)


def _with_head(layer: LayerSpec, d_in: int, classes: int) -> LayerSpec:
    head = _dense(f"{layer.name}_exit", d_in, classes, kind="exit_head")
    return LayerSpec(layer.name, layer.kind, layer.config, layer.file, layer.tensors, head)


def _manifest(*layers: LayerSpec, inputs: tuple[InputSpec, ...] | None = None) -> Manifest:
    inputs = inputs or (InputSpec("x", F32, ("batch", 16)),)
    return Manifest("synthetic", 64, inputs, layers)


def _x(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, F32)


def test_output_matches_eval_shape_and_working_set_covers_it():
    spec = _dense("fc", 16, 24)
    x = _x(3, 16)
    unit, out = unit_cost(spec, x, {})
    params = cost.param_structs(spec)
    want = jax.eval_shape(jitted("dense", spec.config), params, x, {})
    assert (out.shape, out.dtype) == (want.shape, want.dtype) == ((3, 24), F32)
    assert unit.output_bytes == 3 * 24 * 4
    assert unit.working_set_bytes >= unit.output_bytes
    assert unit.tensors == (("w", 16 * 24 * 4), ("b", 24 * 4))
    assert (unit.name, unit.kind, unit.weight_bytes) == ("fc", "dense", 16 * 24 * 4 + 96)


def test_working_set_comes_from_memory_analysis():
    spec = _dense("fc", 64, 256)
    small, _ = unit_cost(spec, _x(1, 64), {})
    large, _ = unit_cost(spec, _x(128, 64), {})
    assert large.working_set_bytes > small.working_set_bytes >= small.output_bytes
    stats = (
        jitted("dense", spec.config)
        .lower(cost.param_structs(spec), _x(128, 64), {})
        .compile()
        .memory_analysis()
    )
    expected = stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    assert large.working_set_bytes == max(expected, large.output_bytes)


def test_repeated_signature_is_analysed_once():
    spec_a, spec_b = _dense("a", 16, 40), _dense("b", 16, 40)  # same kind, config, shapes
    unit_cost(spec_a, _x(2, 16), {})
    before = cost._analyse.cache_info()
    unit_b, _ = unit_cost(spec_b, _x(2, 16), {})
    after = cost._analyse.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    assert unit_b.name == "b"


def test_cost_table_units_exits_and_input_bytes():
    manifest = _manifest(
        _dense("l0", 16, 32),
        _with_head(_dense("l1", 32, 32), 32, 5),
        _dense("l2", 32, 8, activation="none"),
    )
    table = cost_table(manifest, {"batch": 4})
    assert isinstance(table, CostTable)
    assert (table.model_name, table.input_shape, table.input_bytes) == ("synthetic", (4, 16), 256)
    assert table.context_bytes == 0
    assert [u.name for u in table.layers] == ["l0", "l1", "l2"]
    assert [u.output_bytes for u in table.layers] == [4 * 32 * 4, 4 * 32 * 4, 4 * 8 * 4]
    assert [(e.level, e.after_layer) for e in table.exits] == [(1, 1), (2, 2)]
    head = table.exits[0].head
    assert head is not None and (head.name, head.kind) == ("l1_exit", "exit_head")
    assert head.output_bytes == 4 * 5 * 4
    assert table.exits[1].head is None
    assert table.num_levels == 2


def test_context_inputs_are_counted_and_passed():
    inputs = (InputSpec("x", F32, ("batch", 16)), InputSpec("mask", "int32", ("batch", 7)))
    manifest = _manifest(_dense("l0", 16, 8), inputs=inputs)
    table = cost_table(manifest, {"batch": 2})
    # the context buffer holds each input from a 64-byte boundary (zero-copy views)
    assert (table.input_bytes, table.context_bytes) == (2 * 16 * 4, 64)
    structs = input_structs(manifest, {"batch": 2})
    assert [(s.shape, str(s.dtype)) for s in structs] == [((2, 16), F32), ((2, 7), "int32")]


def test_missing_dim_says_which_flag_to_give():
    with pytest.raises(ModelFormatError, match="--batch"):
        cost_table(_manifest(_dense("l0", 16, 8)), {})


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_dim_size_is_rejected(size):
    with pytest.raises(ModelFormatError, match="positive integer"):
        input_structs(_manifest(_dense("l0", 16, 8)), {"batch": size})


def test_shape_mismatch_names_the_layer():
    manifest = _manifest(_dense("l0", 16, 32), _dense("l1", 24, 8))
    with pytest.raises(
        ModelFormatError, match=r"layer 'l1'.*do not fit its input of shape \[1, 32\]"
    ):
        cost_table(manifest, {"batch": 1})


def test_bad_bias_shape_names_the_layer():
    spec = _dense("l0", 16, 8)
    bad = LayerSpec("l0", "dense", spec.config, spec.file, (spec.tensors[0], _tensor("b", (9,))))
    with pytest.raises(ModelFormatError, match="layer 'l0'"):
        unit_cost(bad, _x(1, 16), {})


def test_unknown_kind_missing_tensor_and_bad_config_name_the_layer():
    spec = _dense("l0", 16, 8)
    unknown = LayerSpec("l0", "conv", spec.config, spec.file, spec.tensors)
    with pytest.raises(ModelFormatError, match=r"layer 'l0'.*unknown layer kind 'conv'"):
        unit_cost(unknown, _x(1, 16), {})
    no_bias = LayerSpec("l0", "dense", spec.config, spec.file, spec.tensors[:1])
    with pytest.raises(ModelFormatError, match=r"layer 'l0'.*missing tensor\(s\) \['b'\]"):
        unit_cost(no_bias, _x(1, 16), {})
    bad_act = _dense("l9", 16, 8, activation="tanh")
    with pytest.raises(ModelFormatError, match=r"layer 'l9'.*unknown activation 'tanh'"):
        unit_cost(bad_act, _x(1, 16), {})


def test_gathered_tensor_costs_only_the_rows_a_request_loads(monkeypatch):
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))

    def lookup(params, x, ctx, *, gathered=()):
        return params["table"].reshape(*x.shape, -1)  # (batch, seq, hidden), rows in order

    registry.register(LayerKind("test_lookup", lookup, lookup, ("table",)))
    table = _tensor("table", (1000, 8))
    spec = LayerSpec("emb", "test_lookup", {"gathered": ["table"]}, "emb.msgpack", (table,))
    x = jax.ShapeDtypeStruct((2, 5), "int32")
    unit, out = unit_cost(spec, x, {})
    assert unit.tensors == (("table", 2 * 5 * 8 * 4),)
    assert out.shape == (2, 5, 8)
    bad = LayerSpec("emb", "test_lookup", {"gathered": ["tabel"]}, "emb.msgpack", (table,))
    with pytest.raises(ModelFormatError, match=r"layer 'emb'.*gathered tensor 'tabel'"):
        unit_cost(bad, x, {})
