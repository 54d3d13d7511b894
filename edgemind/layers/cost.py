"""Per-unit costs: what each layer and exit head costs for one concrete input shape.

The output's shape and dtype come from ``jax.eval_shape``; the working set (what XLA
allocates outside the arena for one call) from the compiled executable's
``memory_analysis()``: ``output + temp - alias``, never less than the output itself.
On CPU, scratch that a fused library call (a oneDNN matmul) allocates for itself can
show as 0 temp bytes, so the benchmark checks measured memory against the plan.

Each (kind, config, shapes, dtypes) signature is lowered and compiled once; the jit
cache in :mod:`edgemind.layers.registry` then reuses that trace when the runtime calls it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from edgemind.errors import ModelFormatError
from edgemind.layers.registry import (
    STATE_PREFIX,
    TILE_ACC,
    TILE_START,
    TILE_SUFFIX,
    LayerKind,
    freeze_config,
    get_kind,
    jitted,
    state_layout,
    state_nbytes,
)
from edgemind.planner.plan import (
    CostTable,
    ExitCost,
    Tiling,
    UnitCost,
    WorkingSetSource,
)
from edgemind.units import align_up
from edgemind.weights.manifest import DTYPES, LayerSpec, Manifest, all_layer_specs

Signature = tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype) per array
UnitKey = tuple[str, tuple[tuple[str, Any], ...], Signature, Signature, Signature]
# (kind, frozen config, params, x, ctx): one compiled executable
Measure = Callable[[UnitKey, jax.stages.Compiled], "int | None"]
"""Measures a compiled unit's working set in bytes (None: cannot measure here); the
runtime supplies one (:class:`edgemind.runtime.workset.WorkingSetMeter`)."""


def struct_nbytes(sds: jax.ShapeDtypeStruct) -> int:
    """Bytes of an array with this shape and dtype."""
    return math.prod(sds.shape) * jnp.dtype(sds.dtype).itemsize


def gathered_tensors(spec: LayerSpec) -> tuple[str, ...]:
    """Tensors of which a request loads only the rows its ids select (config ``"gathered"``)."""
    names = spec.config.get("gathered", ())
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ModelFormatError(
            f"layer {spec.name!r}: config 'gathered' must be a list of tensor names, got {names!r}"
        )
    known = {t.name: t for t in spec.tensors}
    for name in names:
        if name not in known or not known[name].shape:
            raise ModelFormatError(
                f"layer {spec.name!r}: gathered tensor {name!r} is not one of its tensors "
                f"with rows ({sorted(known)})"
            )
    return tuple(names)


def param_structs(spec: LayerSpec, gather_rows: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """The shape/dtype of each tensor as ``apply`` receives it for one request.

    A gathered tensor holds ``gather_rows`` rows (one per id of the chain input); every
    other tensor is whole. A block-quantized tensor arrives as its raw blocks: uint8
    rows of whole blocks (``TensorSpec.array_shape``); the kind knows its storage type.
    """
    gathered = gathered_tensors(spec)
    return {
        t.name: jax.ShapeDtypeStruct(
            (gather_rows, *t.array_shape[1:]) if t.name in gathered else t.array_shape,
            jnp.dtype(t.dtype),
        )
        for t in spec.tensors
    }


def input_structs(manifest: Manifest, dims: Mapping[str, int]) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The model's inputs with dynamic dims filled from ``dims``, in manifest order.

    The first is the chain input; the rest are context (an attention mask...).

    >>> from edgemind.weights.manifest import InputSpec, Manifest
    >>> m = Manifest("m", 64, (InputSpec("x", "float32", ("batch", 8)),), ())
    >>> input_structs(m, {"batch": 2})
    (ShapeDtypeStruct(shape=(2, 8), dtype=float32),)
    """
    for name, size in dims.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ModelFormatError(f"dim {name!r} must be a positive integer, got {size!r}")
    structs = []
    for spec in manifest.inputs:
        if spec.dtype not in DTYPES:
            raise ModelFormatError(
                f"input {spec.name!r}: unknown dtype {spec.dtype!r}; expected one of {DTYPES}"
            )
        shape = spec.concrete_shape(dims)
        structs.append(jax.ShapeDtypeStruct(shape, jnp.dtype(spec.dtype)))
    return tuple(structs)


def _signature(arrays: Mapping[str, Any]) -> Signature:
    return tuple(
        (name, tuple(int(d) for d in a.shape), str(jnp.dtype(a.dtype)))
        for name, a in sorted(arrays.items())
    )


def _structs(sig: Signature) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for name, shape, dtype in sig}


@functools.cache
def _compile(
    kind: str, config: tuple[tuple[str, Any], ...], params: Signature, x: Signature, ctx: Signature
) -> jax.stages.Compiled:
    """The XLA executable of one signature: compiled once, then costed and run."""
    args = (_structs(params), _structs(x)["x"], _structs(ctx))
    return jitted(kind, dict(config)).lower(*args).compile()


@functools.cache
def _analyse(
    kind: str, config: tuple[tuple[str, Any], ...], params: Signature, x: Signature, ctx: Signature
) -> tuple[jax.ShapeDtypeStruct, int]:
    """Output struct and working-set bytes of one signature."""
    fn = jitted(kind, dict(config))
    args = (_structs(params), _structs(x)["x"], _structs(ctx))
    out = jax.eval_shape(fn, *args)
    if get_kind(kind).state is not None and isinstance(out, tuple) and out:
        out = out[0]  # a stateful kind returns (output, *state updates)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ModelFormatError(f"layer kind {kind!r} must return one array, got {out!r}")
    out_bytes = struct_nbytes(out)
    stats = _compile(kind, config, params, x, ctx).memory_analysis()
    if stats is None:  # a backend without memory statistics: the output is all we know
        return out, out_bytes
    xla_bytes = stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    return out, max(int(xla_bytes), out_bytes)


def unit_cost(
    spec: LayerSpec,
    x: jax.ShapeDtypeStruct,
    ctx: Mapping[str, jax.ShapeDtypeStruct],
    *,
    gather_rows: int | None = None,
    measure: Measure | None = None,
    dims: Mapping[str, int] | None = None,
) -> tuple[UnitCost, jax.ShapeDtypeStruct]:
    """The cost of running ``spec`` on input ``x`` (with context ``ctx``), and its output.

    ``tensors`` are the bytes this request loads: a gathered tensor (config
    ``"gathered"``, an embedding table) costs only ``gather_rows`` rows, by default one
    per element of ``x`` (the chain input's ids, when ``spec`` is the first layer).
    A kind with state (a KV cache) is costed for the request shape ``dims``: its state
    arrays join its context and their bytes are ``state_bytes``. With ``measure``, the
    working set is ``max(memory_analysis, measured)`` and the cost says
    ``working_set_source="measured"``.

    >>> from edgemind.weights.manifest import LayerSpec, TensorSpec
    >>> w = TensorSpec("w", "float32", (8, 4), 128, 0, "00000000")
    >>> b = TensorSpec("b", "float32", (4,), 16, 128, "00000000")
    >>> spec = LayerSpec("fc", "dense", {"activation": "relu"}, "fc.msgpack", (w, b))
    >>> cost, out = unit_cost(spec, jax.ShapeDtypeStruct((2, 8), "float32"), {})
    >>> cost.output_bytes, cost.weight_bytes, out.shape
    (32, 144, (2, 4))
    """
    where = f"layer {spec.name!r} (kind {spec.kind!r})"
    try:
        kind = get_kind(spec.kind)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None
    names = {t.name for t in spec.tensors}
    missing = [n for n in kind.tensors if n not in names]
    if missing:
        raise ModelFormatError(
            f"{where}: missing tensor(s) {missing}; it has {sorted(names)}, "
            f"kind {kind.name!r} needs {list(kind.tensors)}"
        )
    rows = math.prod(x.shape) if gather_rows is None else gather_rows
    params = param_structs(spec, rows)
    try:
        state_bytes = state_nbytes(kind, dims or {}, spec.config)
        key = _unit_key(spec, x, unit_context(spec, ctx, dims or {}), rows)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(
            f"{where}: its state cannot be sized for dims {dict(dims or {})} ({exc}); "
            "give the request's batch and context"
        ) from None
    try:
        out, working_set_bytes = _analyse(*key)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:  # shape or dtype mismatch found while tracing
        shapes = {t.name: list(t.shape) for t in spec.tensors}
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFormatError(
            f"{where}: its tensors {shapes} do not fit its input of shape {list(x.shape)} "
            f"{jnp.dtype(x.dtype)} ({first_line}); the manifest's layers are out of order "
            f"or the model was converted wrongly"
        ) from None
    except (LookupError, ArithmeticError, AttributeError, RecursionError) as exc:
        # layer code that trips over its config or the model's inputs (a missing context
        # input, heads: 0): one line naming the layer, not a traceback
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ModelFormatError(
            f"{where}: its code fails on this manifest ({type(exc).__name__} {detail}); check "
            f"the layer's config and the model's inputs ({', '.join(sorted(ctx)) or 'none'}"
            " besides the chain input), or convert the model again"
        ) from None
    source: WorkingSetSource = "analysis"
    measured = None if measure is None else measure(key, _compile(*key))
    if measured is not None:
        working_set_bytes, source = max(working_set_bytes, measured), "measured"
    tensors = tuple((name, struct_nbytes(sds)) for name, sds in params.items())
    cost = UnitCost(
        spec.name,
        spec.kind,
        tensors,
        struct_nbytes(out),
        working_set_bytes,
        pinnable=not gathered_tensors(spec),  # gathered rows belong to one request
        working_set_source=source,
        tiling=_tiling(spec, kind, params),
        state_bytes=state_bytes,
    )
    return cost, out


def unit_context(
    spec: LayerSpec, ctx: Mapping[str, jax.ShapeDtypeStruct], dims: Mapping[str, int]
) -> dict[str, jax.ShapeDtypeStruct]:
    """The context a unit's apply receives: the request's, plus its state arrays (as
    ``"state." + name``) when its kind keeps state."""
    layout = state_layout(get_kind(spec.kind), dims, spec.config)
    state = {
        STATE_PREFIX + name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        for name, _, shape, dtype in layout
    }
    return {**ctx, **state}


def _tiling(spec: LayerSpec, kind: LayerKind, params: Mapping[str, Any]) -> Tiling | None:
    """How the unit can run in tiles: its kind's tiled tensor, split by rows."""
    if kind.tiling is None or kind.tiling.tensor in gathered_tensors(spec):
        return None
    sds = params.get(kind.tiling.tensor)
    if sds is None or len(sds.shape) < 1 or sds.shape[0] < 2:
        return None
    rows = int(sds.shape[0])
    return Tiling(kind.tiling.tensor, rows, struct_nbytes(sds) // rows, kind.tiling.mode)


def tile_key(
    spec: LayerSpec,
    x: jax.ShapeDtypeStruct,
    ctx: Mapping[str, jax.ShapeDtypeStruct],
    out: jax.ShapeDtypeStruct,
    rows: int,
    *,
    first: bool,
    last: bool,
) -> UnitKey:
    """The signature of one tile of ``spec``: ``rows`` rows of its tiled tensor (and its
    other tensors when ``last``), the accumulator (unless ``first``) and the start row."""
    kind = get_kind(spec.kind)
    assert kind.tiling is not None
    params = param_structs(spec, 0)
    tensor = params[kind.tiling.tensor]
    tile = {kind.tiling.tensor: jax.ShapeDtypeStruct((rows, *tensor.shape[1:]), tensor.dtype)}
    if last:
        tile.update((name, sds) for name, sds in params.items() if name != kind.tiling.tensor)
    tile_ctx = {**ctx, TILE_START: jax.ShapeDtypeStruct((), jnp.int32)}
    if not first:
        tile_ctx[TILE_ACC] = out
    config = freeze_config({**spec.config, "first": first, "last": last})
    return (
        spec.kind + TILE_SUFFIX,
        config,
        _signature(tile),
        _signature({"x": x}),
        _signature(tile_ctx),
    )


def _unit_inputs(
    manifest: Manifest, dims: Mapping[str, int]
) -> tuple[dict[str, tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]], dict]:
    """Each unit's (input, output) structs along the chain (heads after their layer), and
    the context structs."""
    structs = input_structs(manifest, dims)
    ctx = {s.name: a for s, a in zip(manifest.inputs[1:], structs[1:], strict=True)}
    x, rows = structs[0], math.prod(structs[0].shape)
    shapes = {}
    for spec in manifest.layers:
        out = _analyse(*_unit_key(spec, x, unit_context(spec, ctx, dims), rows))[0]
        shapes[spec.name] = (x, out)
        if spec.exit_head is not None:
            head = spec.exit_head
            shapes[head.name] = (out, _analyse(*_unit_key(head, out, ctx, rows))[0])
        x = out
    return shapes, ctx


def _unit_key(
    spec: LayerSpec, x: jax.ShapeDtypeStruct, ctx: Mapping[str, jax.ShapeDtypeStruct], rows: int
) -> UnitKey:
    """The signature of ``spec`` run on ``x``: the key of its one compiled executable."""
    params = _signature(param_structs(spec, rows))
    return (spec.kind, freeze_config(spec.config), params, _signature({"x": x}), _signature(ctx))


def compiled_tiles(
    manifest: Manifest, dims: Mapping[str, int], tiles: Sequence[tuple[str, int, bool, bool]]
) -> dict[tuple[str, int, bool, bool], tuple[UnitKey, jax.stages.Compiled]]:
    """The executables of tiles, by (unit, rows, first, last), compiled once each."""
    specs = {s.name: s for s in all_layer_specs(manifest)}
    shapes, ctx = _unit_inputs(manifest, dims)
    compiled = {}
    for unit, rows, first, last in tiles:
        x, out = shapes[unit]
        key = tile_key(specs[unit], x, ctx, out, rows, first=first, last=last)
        compiled[(unit, rows, first, last)] = (key, _compile(*key))
    return compiled


def tile_working_sets(
    manifest: Manifest,
    dims: Mapping[str, int],
    tiles: Sequence[tuple[str, int, bool, bool]],
    measure: Measure | None = None,
) -> tuple[tuple[str, int, int], ...]:
    """(unit, rows, working-set bytes) for tiles: the largest of a size's variants (first,
    middle, last), each ``max(memory_analysis, measured)`` like a unit's."""
    worst: dict[tuple[str, int], int] = {}
    for (unit, rows, _, _), (key, compiled) in compiled_tiles(manifest, dims, tiles).items():
        nbytes = _analyse(*key)[1]
        measured = None if measure is None else measure(key, compiled)
        nbytes = max(nbytes, measured or 0)
        worst[(unit, rows)] = max(worst.get((unit, rows), 0), nbytes)
    return tuple((unit, rows, nbytes) for (unit, rows), nbytes in sorted(worst.items()))


CONTEXT_ALIGNMENT = 64  # each context input's start in its shared buffer: JAX's zero-copy minimum


def compiled_units(
    manifest: Manifest, dims: Mapping[str, int], units: Sequence[str]
) -> dict[str, tuple[UnitKey, jax.stages.Compiled]]:
    """The executables of a chain of units (a plan's ``units``) for one input shape.

    They are the very executables :func:`cost_table` compiled and measured, so running
    them compiles nothing and their working sets are the ones the plan counted. Each
    comes with its signature key (what :func:`edgemind.runtime.workset.zero_args` takes).
    """
    specs = {s.name: s for s in all_layer_specs(manifest)}
    shapes, ctx = _unit_inputs(manifest, dims)
    rows = math.prod(input_structs(manifest, dims)[0].shape)
    compiled = {}
    for name in units:
        spec = specs[name]
        key = _unit_key(spec, shapes[name][0], unit_context(spec, ctx, dims), rows)
        compiled[name] = (key, _compile(*key))
    return compiled


def cost_table(
    manifest: Manifest, dims: Mapping[str, int], *, measure: Measure | None = None
) -> CostTable:
    """Every layer's and exit head's cost for the input shape that ``dims`` fixes.

    The first input is the chain's input; the others are context every unit receives.
    Exit level k's head runs on the output of the layer it follows. Gathered tensors
    hold one row per element of the chain input (its token ids). ``measure`` (the
    runtime's) turns analysed working sets into measured ones.
    """
    structs = input_structs(manifest, dims)
    x = structs[0]
    rows = math.prod(x.shape)
    ctx = {spec.name: s for spec, s in zip(manifest.inputs[1:], structs[1:], strict=True)}
    layers: list[UnitCost] = []
    outputs: list[jax.ShapeDtypeStruct] = []
    for spec in manifest.layers:
        cost, x = unit_cost(spec, x, ctx, gather_rows=rows, measure=measure, dims=dims)
        layers.append(cost)
        outputs.append(x)
    exits = []
    for level, index in manifest.exit_levels():
        head_spec = manifest.layers[index].exit_head
        head = None
        if head_spec is not None:
            head = unit_cost(head_spec, outputs[index], ctx, gather_rows=rows, measure=measure)[0]
        exits.append(ExitCost(level=level, after_layer=index, head=head))
    return CostTable(
        model_name=manifest.model_name,
        input_shape=tuple(int(d) for d in structs[0].shape),
        input_bytes=struct_nbytes(structs[0]),
        layers=tuple(layers),
        exits=tuple(exits),
        # context inputs share one arena buffer, each starting on a zero-copy boundary
        context_bytes=sum(align_up(struct_nbytes(s), CONTEXT_ALIGNMENT) for s in structs[1:]),
    )
