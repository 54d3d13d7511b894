"""The layer-kind registry: each kind's jax apply, its NumPy reference, and its jit cache.

A kind is registered once, on import of the module that defines it (``layers/dense.py``,
later ``layers/bert.py``); the manifest names kinds by string and :func:`get_kind`
resolves them. :func:`jitted` hands out one ``jax.jit`` per (kind, config), so XLA
compiles each (kind, config, shapes, dtypes) signature once; :data:`TRACE_COUNTS`
counts traces so tests can prove it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.stages
import numpy as np

from edgemind.errors import ModelFormatError
from edgemind.planner.plan import TileMode

Params = Mapping[str, Any]  # tensor name -> array (NumPy view of the arena, or jax.Array)
Context = Mapping[str, Any]  # request-level arrays (an attention mask...), same every layer
LayerFn = jax.stages.Wrapped  # a jitted apply(params, x, ctx): call it, or .lower() it


TILE_SUFFIX = ".tile"  # the kind that runs one tile of ``kind`` is named ``kind + TILE_SUFFIX``
TILE_START = "tile_start"  # ctx entry: the tile's first row (an int32 scalar)
TILE_ACC = "tile_acc"  # ctx entry: the accumulator so far (absent for the first tile)
STATE_PREFIX = "state."  # ctx entries of a stateful unit's state arrays: "state." + name
STATE_ALIGNMENT = 64  # each state array's start inside its unit's buffer (zero-copy for JAX)

StateShapes = Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype), in order


@dataclasses.dataclass(frozen=True)
class StateKind:
    """State a kind keeps across the steps and requests of a session (a KV cache).

    ``shapes(dims, **config)`` gives the arrays, by name and in layout order, for a
    request shape (``dims`` has ``batch``, ``context``...). ``apply`` receives each one
    read-only as ``ctx["state." + name]`` and returns ``(output, *updates)``; after the
    call the executor hands the updates to ``write(state, updates, ctx, **config)``,
    which stores them into the state arrays (NumPy views of the arena) in place. The
    state itself never passes through XLA's allocator as an output.
    """

    shapes: Callable[..., StateShapes]
    write: Callable[..., None]


@dataclasses.dataclass(frozen=True)
class TileKind:
    """How a kind runs in tiles: ``apply(params, x, acc, start, ctx, *, first, last,
    **config) -> acc``, where ``params[tensor]`` holds rows ``start..start + rows`` of the
    tiled tensor (the other tensors only on the last tile) and ``acc`` is None on the first.
    The last tile returns the unit's output."""

    tensor: str
    apply: Callable[..., jax.Array]
    mode: TileMode = "accumulate"  # or "concat": each tile writes its rows of the output


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of layer: a pure jax.numpy ``apply`` and an independent NumPy ``reference``.

    Both take ``(params, x, ctx, **config)``; config values are the manifest's JSON
    scalars. ``tensors`` names the params ``apply`` reads, so a manifest that lacks
    one is rejected when its cost is computed, not half-way through a request.
    """

    name: str
    apply: Callable[..., Any]  # an array; (array, *state updates) for a kind with state
    reference: Callable[..., Any]
    tensors: tuple[str, ...] = ()
    tiling: TileKind | None = None  # None: the kind's weights are only loaded whole
    state: StateKind | None = None  # None: the kind keeps nothing between calls


_KINDS: dict[str, LayerKind] = {}
_JITTED: dict[tuple[str, tuple[tuple[str, Any], ...]], LayerFn] = {}

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""Traces per kind name: a jitted apply is traced once per new shape/dtype signature."""


def register(kind: LayerKind) -> LayerKind:
    """Make ``kind`` known by its name; registering a different kind twice is an error.

    A kind with ``tiling`` also registers ``kind.name + ".tile"``: one tile's run as a
    kind of its own, ``apply(params, x, ctx, *, first, last, **config)`` with the tile's
    start row and the accumulator in ``ctx``, so tiles compile, cost and run like units.
    """
    known = _KINDS.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"layer kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    if kind.tiling is not None:
        _KINDS[kind.name + TILE_SUFFIX] = _tile_kind(kind, kind.tiling)
    return kind


def _tile_kind(kind: LayerKind, tiling: TileKind) -> LayerKind:
    def apply(params: Params, x: Any, ctx: Context, *, first: bool, last: bool, **config: Any):
        acc = None if first else ctx[TILE_ACC]
        return tiling.apply(params, x, acc, ctx[TILE_START], ctx, first=first, last=last, **config)

    base = inspect.signature(kind.apply)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in ("first", "last")]
    apply.__signature__ = base.replace(  # type: ignore[attr-defined]
        parameters=[*base.parameters.values(), *extra]
    )
    return LayerKind(kind.name + TILE_SUFFIX, apply, kind.reference, kind.tensors)


def state_layout(
    kind: LayerKind, dims: Mapping[str, int], config: Mapping[str, Any]
) -> tuple[tuple[str, int, tuple[int, ...], str], ...]:
    """(name, byte offset, shape, dtype) of each state array of a unit of ``kind``, packed
    in one buffer, each start aligned to :data:`STATE_ALIGNMENT`; empty without state."""
    if kind.state is None:
        return ()
    layout = []
    end = 0
    for name, (shape, dtype) in kind.state.shapes(dims, **config).items():
        offset = -(-end // STATE_ALIGNMENT) * STATE_ALIGNMENT
        layout.append((name, offset, tuple(int(d) for d in shape), str(dtype)))
        end = offset + math.prod(shape) * np.dtype(jax.numpy.dtype(dtype)).itemsize
    return tuple(layout)


def state_nbytes(kind: LayerKind, dims: Mapping[str, int], config: Mapping[str, Any]) -> int:
    """Bytes of a unit's state buffer (0 without state)."""
    layout = state_layout(kind, dims, config)
    if not layout:
        return 0
    _, offset, shape, dtype = layout[-1]
    return offset + math.prod(shape) * np.dtype(jax.numpy.dtype(dtype)).itemsize


def known_kinds() -> tuple[str, ...]:
    """The registered kind names, sorted."""
    return tuple(sorted(_KINDS))


def get_kind(name: str) -> LayerKind:
    """The registered kind called ``name``.

    >>> get_kind("no-such-kind")
    Traceback (most recent call last):
    ...
    edgemind.errors.ModelFormatError: unknown layer kind 'no-such-kind'; known kinds: ...
    """
    try:
        return _KINDS[name]
    except KeyError:
        raise ModelFormatError(
            f"unknown layer kind {name!r}; known kinds: {', '.join(known_kinds()) or 'none'}"
        ) from None


def freeze_config(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable, order-independent form of a layer config (lists become tuples)."""

    def freeze(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        if isinstance(value, Mapping):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        return value

    return tuple(sorted((str(k), freeze(v)) for k, v in config.items()))


def check_config(kind: LayerKind, config: Mapping[str, Any]) -> None:
    """Reject config keys that ``kind.apply`` does not take, listing the ones it does."""
    sig = inspect.signature(kind.apply)
    try:
        sig.bind(None, None, None, **config)
    except TypeError:
        valid = list(sig.parameters)[3:]
        raise ModelFormatError(
            f"layer kind {kind.name!r} does not accept config {dict(config)}; "
            f"valid keys: {valid or 'none'}"
        ) from None


def jitted(kind: str, config: Mapping[str, Any]) -> LayerFn:
    """The jitted ``apply(params, x, ctx)`` of ``kind`` with ``config`` bound, cached.

    One function per (kind, config): calling it again with the same shapes and dtypes
    neither traces nor compiles again.

    >>> import numpy as np
    >>> f = jitted("dense", {"activation": "relu"})
    >>> f is jitted("dense", {"activation": "relu"})
    True
    >>> params = {"w": np.eye(2, dtype=np.float32), "b": np.ones(2, np.float32)}
    >>> np.asarray(f(params, np.array([[1.0, -3.0]], np.float32), {})).tolist()
    [[2.0, 0.0]]
    """
    frozen = freeze_config(config)
    key = (kind, frozen)
    fn = _JITTED.get(key)
    if fn is None:
        layer_kind = get_kind(kind)
        bound = dict(frozen)
        check_config(layer_kind, bound)

        def traced(params: Params, x: Any, ctx: Context) -> jax.Array:
            # Python side effects run only while tracing: this counts traces, not calls.
            TRACE_COUNTS[kind] += 1
            return layer_kind.apply(params, x, ctx, **bound)

        traced.__name__ = f"{kind}_apply"
        fn = _JITTED[key] = jax.jit(traced)
    return fn


def reference(kind: str, config: Mapping[str, Any]) -> Callable[[Params, Any, Context], Any]:
    """The NumPy reference of ``kind`` with ``config`` bound (for tests and checks)."""
    layer_kind = get_kind(kind)
    check_config(layer_kind, config)
    return functools.partial(layer_kind.reference, **config)
