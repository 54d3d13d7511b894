"""The streaming executor: one request, step by step, exactly as planned.

For each plan step it reserves the step's new buffers in the arena ledger, starts
the step's weight reads (in a background thread when they are prefetches, so they
overlap the running layer's compute), runs the unit's compiled function on
zero-copy views of the arena, waits for it (JAX dispatch is asynchronous: a slot
must not be reused before its reader is done), copies the output into its planned
slot, and releases what the plan frees. Any error releases everything.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from edgemind.errors import EdgemindError, MemoryBoundExceeded, MemoryQuotaExceeded
from edgemind.layers.cost import (
    CONTEXT_ALIGNMENT,
    compiled_tiles,
    compiled_units,
    gathered_tensors,
    param_structs,
)
from edgemind.layers.registry import (
    STATE_PREFIX,
    TILE_ACC,
    TILE_START,
    get_kind,
    state_layout,
)
from edgemind.planner.plan import Buffer, Plan, Step
from edgemind.runtime.arena import Arena
from edgemind.runtime.memory import SETTLE_SLACK_BYTES, sample_rss, settle_rss
from edgemind.runtime.report import LayerTiming, Outcome, Result, RunReport
from edgemind.runtime.workset import warm_up
from edgemind.units import align_up, format_bytes
from edgemind.weights.format import numpy_dtype
from edgemind.weights.manifest import LayerSpec, Manifest, all_layer_specs
from edgemind.weights.reader import LayerFile, direct_read_nbytes


class Executor:
    """Runs requests of one plan in one arena; keeps pinned layers across requests."""

    def __init__(
        self,
        model_dir: str | Path,
        manifest: Manifest,
        plan: Plan,
        dims: Mapping[str, int],
        *,
        verify: bool = False,
        direct: bool = False,
        arena: Arena | None = None,
    ):
        """``arena``: share one with the executors of other plans of the same session
        (a generation's prefill and decode plans, whose state lies at the same offsets):
        it must be at least this plan's extent, and only one of them runs at a time
        (:meth:`detach` the other first)."""
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.plan = plan
        self.verify = verify
        self.direct = direct  # O_DIRECT reads: the plan's slots hold whole 4 KiB blocks
        self._specs = {spec.name: spec for spec in all_layer_specs(manifest)}
        self._dims = dict(dims)
        self._born: dict[int, list[Buffer]] = {}
        for buf in plan.buffers:
            if buf.offset_bytes is not None and buf.role not in _KEPT:
                self._born.setdefault(buf.first_step, []).append(buf)
        self._pinned = [b for b in plan.buffers if b.role == "pinned"]
        self._state = [b for b in plan.buffers if b.role == "state"]
        self._pinned_loaded = False
        # compiled (and measured) when the plan was costed: running them compiles nothing
        tiled = {s.layer for s in plan.steps if s.tile is not None}
        units = compiled_units(manifest, dims, plan.units)
        self._fns = {name: fn for name, (_, fn) in units.items()}
        self._tiles = compiled_tiles(manifest, dims, tile_shapes(plan, self._specs))
        warm = [entry for name, entry in units.items() if name not in tiled]
        for key, fn in dict([*warm, *self._tiles.values()]).items():
            warm_up(fn, key)  # kernels' one-time set-up belongs to the baseline, not a request
        self._rows = int(np.prod(plan.input_shape))  # ids a gathered table is read for
        self._pool = ThreadPoolExecutor(1, "edgemind-prefetch") if plan.prefetch_depth else None
        self._owns_arena = arena is None
        if arena is not None and arena.nbytes < plan.arena_bytes:
            raise MemoryQuotaExceeded(
                f"a shared arena of {format_bytes(arena.nbytes)} is smaller than the "
                f"plan's {format_bytes(plan.arena_bytes)}"
            )
        try:
            self.arena: Arena | None = arena if arena is not None else Arena(plan.arena_bytes)
        except MemoryError:
            raise MemoryBoundExceeded(
                f"{plan.model_name}: cannot allocate the plan's {format_bytes(plan.arena_bytes)} "
                "arena: the process's memory limit is below its baseline + the plan's peak; "
                "raise the limit or lower model.arena_capacity_mb",
                needed_bytes=plan.arena_bytes,
                capacity_bytes=plan.capacity_bytes,
            ) from None
        self._files: dict[str, LayerFile] = {}  # open weight files, by unit
        self._param_views: dict[int, dict[str, np.ndarray]] = {}  # by weights buffer
        self._state_views: dict[str, dict[str, np.ndarray]] = {}  # by unit

    # ------------------------------------------------------------------ loading

    def _load(self, buf: Buffer, ids: np.ndarray | None) -> tuple[float, int]:
        """Read one unit's weights into its buffer; returns (seconds, bytes read)."""
        assert self.arena is not None
        start = time.perf_counter()
        spec = self._specs[buf.layer]
        gathered = gathered_tensors(spec)
        dests = {}
        nbytes = 0
        for slot in buf.tensors:
            offset = (buf.offset_bytes or 0) + slot.offset_bytes
            if slot.name in gathered:  # scattered rows: always through the page cache
                if ids is None:
                    raise EdgemindError(f"layer {spec.name}: gathered tensor needs token ids")
                view = self.arena.view(offset, slot.nbytes)
                nbytes += self._file(spec).read_rows_into(slot.name, ids.ravel(), view)
            elif slot.nbytes != spec.tensor(slot.name).nbytes:  # a tile's rows: buffered
                view = self.arena.view(offset, slot.nbytes)
                file = self._file(spec)
                nbytes += file.read_range_into(slot.name, slot.source_offset_bytes, view)
            else:
                extent = direct_read_nbytes(slot.nbytes) if self.direct else slot.nbytes
                if slot.offset_bytes + extent > buf.nbytes:
                    raise MemoryQuotaExceeded(
                        f"layer {spec.name}, tensor {slot.name}: a {extent}-byte read does not "
                        f"fit its planned slot; plan again with this policy's read_mode"
                    )
                dests[slot.name] = self.arena.view(offset, extent)
        if dests:
            nbytes += self._file(spec).read_into(dests, verify=self.verify)
        return time.perf_counter() - start, nbytes

    def _file(self, spec: LayerSpec) -> LayerFile:
        """The unit's weight file, opened (and its header checked) on first use."""
        f = self._files.get(spec.name)
        if f is None:
            f = self._files[spec.name] = LayerFile(self.model_dir, spec, direct=self.direct)
        return f

    def _params(self, buf: Buffer) -> dict[str, np.ndarray]:
        """Typed views of a weights buffer's tensors, shaped as ``apply`` takes them.

        The arena and the plan are fixed for this executor, so the views are made once.
        """
        assert self.arena is not None
        params = self._param_views.get(buf.id)
        if params is None:
            structs = param_structs(self._specs[buf.layer], self._rows)
            params = {}
            for slot in buf.tensors:
                offset = (buf.offset_bytes or 0) + slot.offset_bytes
                sds = structs[slot.name]
                dtype = numpy_dtype(str(sds.dtype))
                row = int(np.prod(sds.shape[1:], dtype=np.int64)) * dtype.itemsize
                shape = sds.shape
                if slot.nbytes != int(np.prod(sds.shape, dtype=np.int64)) * dtype.itemsize:
                    shape = (slot.nbytes // row, *sds.shape[1:])  # a tile's rows
                view = self.arena.view(offset, slot.nbytes)
                params[slot.name] = view.view(dtype).reshape(shape)
            self._param_views[buf.id] = params
        return params

    def state(self, unit: str) -> dict[str, np.ndarray]:
        """Typed views of a stateful unit's state arrays (its KV cache) in the arena."""
        assert self.arena is not None
        views = self._state_views.get(unit)
        if views is None:
            spec = self._specs[unit]
            (buf,) = (b for b in self._state if b.layer == unit)
            views = {}
            for name, offset, shape, dtype in state_layout(
                get_kind(spec.kind), self._dims, spec.config
            ):
                start = (buf.offset_bytes or 0) + offset
                views[name] = self._view(start, numpy_dtype(dtype), shape)
            self._state_views[unit] = views
        return views

    def reset_state(self) -> None:
        """Zero every state buffer: a new session starts with an empty KV cache."""
        assert self.arena is not None
        for buf in self._state:
            self.arena.view(buf.offset_bytes or 0, buf.nbytes)[:] = 0

    def adopt_pinned(self) -> None:
        """Take over a shared arena whose pinned layers the previous executor placed
        exactly where this plan places them: reserve them (and the state), read nothing."""
        assert self.arena is not None
        for buf in (*self._state, *self._pinned):
            self.arena.reserve(buf, 0)
        self._pinned_loaded = True

    def detach(self) -> None:
        """Give a shared arena to another plan's executor: this one's pinned and state
        reservations leave the ledger (the state's bytes stay where they are), and its
        pinned layers will be read again when it next runs."""
        if self.arena is not None:
            for buf in (*self._state, *self._pinned):
                if self.arena.is_live(buf.id):
                    self.arena.release(buf.id)
        self._pinned_loaded = False

    def _load_pinned(self, ids: np.ndarray | None) -> dict[str, tuple[float, int]]:
        """Reserve and read the pinned layers once; later requests find them resident."""
        assert self.arena is not None
        loads = {}
        for buf in self._state:  # reserved once; the session's, not a request's
            self.arena.reserve(buf, 0)
            if self._owns_arena:  # a shared arena's state is the session's: kept
                self.arena.view(buf.offset_bytes or 0, buf.nbytes)[:] = 0
        for buf in self._pinned:
            self.arena.reserve(buf, 0)
            loads[buf.layer] = self._load(buf, ids)
        self._pinned_loaded = True
        return loads

    # ------------------------------------------------------------------ running

    def run(
        self,
        x: np.ndarray,
        context: Mapping[str, np.ndarray],
        after_run: Callable[[int, str], None] | None = None,
    ) -> Result:
        """Execute the plan on ``x`` (already validated), returning output and report.

        ``after_run(step, unit)`` is called after each unit has run (the runtime's
        memory guard); an error it raises ends the request like any other.
        """
        if self.arena is None:
            raise EdgemindError("this executor has been closed; open a new Runtime")
        plan, arena = self.plan, self.arena
        started = time.perf_counter()
        arena.reset_peak()
        ids = x if any(gathered_tensors(s) for s in self._specs.values()) else None
        loads: dict[str, tuple[float, int]] = {}
        pending: dict[int, Future[tuple[float, int]]] = {}
        acts: dict[int, tuple[np.dtype, tuple[int, ...]]] = {}
        ctx: dict[str, np.ndarray] = {}
        compute: dict[str, float] = {}
        usage: list[int] = []
        ends: list[float] = []
        output: np.ndarray | None = None
        try:
            if (self._pinned or self._state) and not self._pinned_loaded:
                loads = self._load_pinned(ids)
            for step in plan.steps:
                for buf in self._born.get(step.index, ()):
                    arena.reserve(buf, step.index)
                if step.index == 0:
                    ctx = self._place_inputs(x, context, acts)
                for bid in step.loads:
                    buf = plan.buffers[bid]
                    if self._pool is not None and step.action == "run":
                        pending[bid] = self._pool.submit(self._load, buf, ids)
                    else:
                        _add(loads, buf.layer, self._load(buf, ids))
                if step.action == "run":
                    if step.weights in pending:
                        _add(loads, step.layer, pending.pop(step.weights).result())
                    seconds, output = self._run_step(step, ctx, acts)
                    compute[step.layer] = compute.get(step.layer, 0.0) + seconds  # tiles add up
                    if after_run is not None:
                        after_run(step.index, step.layer)
                usage.append(arena.live_bytes)  # everything the step holds, before its frees
                for bid in step.frees:  # pinned layers and state stay for the next request
                    if arena.is_live(bid) and plan.buffers[bid].role not in _KEPT:
                        arena.release(bid)
                ends.append(time.perf_counter() - started)
        except MemoryError:  # a Python-side allocation under a process limit
            self._drain(pending)
            self.close()
            raise MemoryBoundExceeded(
                f"{plan.model_name}: out of memory while running the request; the process's "
                "memory limit is below its baseline + the plan's peak"
            ) from None
        except BaseException:
            self._drain(pending)
            self.close()
            raise
        timings = tuple(
            LayerTiming(
                u, loads.get(u, (0.0, 0))[0], compute.get(u, 0.0), loads.get(u, (0.0, 0))[1]
            )
            for u in plan.units
        )
        return self._result(output, timings, usage, ends, time.perf_counter() - started)

    def _place_inputs(
        self, x: np.ndarray, context: Mapping[str, np.ndarray], acts: dict
    ) -> dict[str, np.ndarray]:
        """Copy the request's input and context into their arena buffers; views of them."""
        ctx: dict[str, np.ndarray] = {}
        for buf in self.plan.buffers:
            if buf.role != "activation" or buf.layer not in ("input", "context"):
                continue
            arrays = (
                [("input", x)]
                if buf.layer == "input"
                else [(inp.name, context[inp.name]) for inp in self.manifest.inputs[1:]]
            )
            offset = buf.offset_bytes or 0  # context inputs share one buffer, each aligned
            for name, arr in arrays:
                if offset + arr.nbytes > buf.end_bytes:
                    raise MemoryQuotaExceeded(
                        f"input {name!r} ({arr.nbytes} bytes) does not fit its planned "
                        f"{buf.nbytes}-byte buffer; the plan is for another input shape"
                    )
                view = self._view(offset, arr.dtype, arr.shape)
                view[...] = arr
                if buf.layer == "input":
                    acts[buf.id] = (arr.dtype, arr.shape)
                else:
                    ctx[name] = view
                offset += align_up(arr.nbytes, CONTEXT_ALIGNMENT)
        return ctx

    def _view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        assert self.arena is not None
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self.arena.view(offset, nbytes).view(dtype).reshape(shape)

    def _activation(self, bid: int, acts: dict) -> np.ndarray:
        dtype, shape = acts[bid]
        return self._view(self.plan.buffers[bid].offset_bytes or 0, dtype, shape)

    def _run_step(self, step, ctx, acts) -> tuple[float, np.ndarray | None]:
        """Run one unit; wait until XLA has given back its working set (see
        :func:`settle_rss`) so the next unit's never overlaps it."""
        before = sample_rss()
        seconds, result = self._call_unit(step, ctx, acts)
        if before is not None:
            # the runtime touched the whole arena up front: reads and output copies do
            # not grow RSS, so what is above ``before`` is XLA's, on its way back
            settle_rss(before.rss_bytes + SETTLE_SLACK_BYTES)
        return seconds, result

    def _call_unit(self, step, ctx, acts) -> tuple[float, np.ndarray | None]:
        assert step.input is not None
        spec = self._specs[step.layer]
        params = {}
        if step.weights is not None:
            params = self._params(self.plan.buffers[step.weights])
        fn = self._fns[spec.name]
        if step.tile is not None:  # a tile: its start row and the accumulator so far
            fn = self._tiles[tile_shape(step, spec)][1]
            ctx = {**ctx, TILE_START: np.asarray(step.tile[0], np.int32)}
            if step.tile[0] > 0:
                ctx[TILE_ACC] = self._activation(step.output, acts)
        state_kind = get_kind(spec.kind).state
        state: dict[str, np.ndarray] = {}
        if state_kind is not None:  # the unit's KV cache: read in the call, written after
            state = self.state(spec.name)
            ctx = {**ctx, **{STATE_PREFIX + name: view for name, view in state.items()}}
        start = time.perf_counter()
        try:
            out = fn(params, self._activation(step.input, acts), ctx)
            jax.block_until_ready(out)  # the views may be overwritten after this step
        except Exception as exc:
            if not is_allocation_failure(exc):
                raise
            raise allocation_error(exc, step.index, spec.name) from None
        if state_kind is not None:
            out, *updates = out
            state_kind.write(state, updates, ctx, **spec.config)
        seconds = time.perf_counter() - start
        if step.output is None:
            return seconds, None
        out_buf = self.plan.buffers[step.output]
        host = np.asarray(out)
        if host.nbytes > out_buf.nbytes:
            raise MemoryQuotaExceeded(
                f"step {step.index}: {spec.name} produced {host.nbytes} bytes, the plan "
                f"reserved {out_buf.nbytes}; the cost table is stale, plan again",
                needed_bytes=host.nbytes,
                capacity_bytes=out_buf.nbytes,
            )
        acts[step.output] = (host.dtype, host.shape)
        result = self._activation(step.output, acts)
        result[...] = host
        return seconds, result

    def _result(self, output, timings, usage, ends, latency_s) -> Result:
        assert self.arena is not None
        plan = self.plan
        outcome: Outcome = "complete" if plan.complete else "early_exit"
        report = RunReport(
            model_name=plan.model_name,
            outcome=outcome,
            exit_level=plan.exit_level,
            num_levels=plan.num_levels,
            capacity_bytes=plan.capacity_bytes,
            arena_bytes=plan.arena_bytes,
            plan_peak_bytes=plan.peak_bytes,
            arena_peak_used_bytes=self.arena.peak_live_bytes,
            observed_peak_bytes=None,
            bytes_read=sum(t.bytes_read for t in timings),
            latency_s=latency_s,
            layers=timings,
            arena_used_bytes_per_step=tuple(usage),
            step_end_s=tuple(ends),
            quota_exceeded=not plan.complete,
            arena_held_bytes=self.arena.live_bytes,
        )
        final = None if output is None else np.array(output, copy=True)
        return Result(final, plan.complete, plan.exit_level, report)

    # ------------------------------------------------------------------ teardown

    @staticmethod
    def _drain(pending: Mapping[int, Future[Any]]) -> None:
        """Wait for background reads so none writes into a released arena."""
        for future in pending.values():
            future.cancel()
            with contextlib.suppress(BaseException):  # the first error is propagating
                future.result()

    def close(self) -> None:
        """Release the arena and the reader thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.arena is not None:
            if self._owns_arena:
                self.arena.close()
            else:
                self.detach()
            self.arena = None
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._param_views.clear()
        self._state_views.clear()
        self._pinned_loaded = False


# What XLA's CPU runtime and its library kernels say when an allocation fails.
_ALLOCATION_FAILURES = re.compile(
    r"RESOURCE_EXHAUSTED|out of memory|YNNPACK operation failed|XNNPACK|oneDNN|bad_alloc",
    re.IGNORECASE,
)


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether an error raised by a compiled call is a failed allocation."""
    return isinstance(exc, MemoryError) or bool(_ALLOCATION_FAILURES.search(str(exc)[:2000]))


def allocation_error(exc: BaseException, step: int, unit: str) -> MemoryBoundExceeded:
    """The one-line error for an allocation that failed while ``unit`` ran."""
    found = re.search(r"allocating (\d+) bytes", str(exc))
    nbytes = int(found.group(1)) if found else 0
    what = f"allocating {format_bytes(nbytes)}" if nbytes else "allocating its working memory"
    return MemoryBoundExceeded(
        f"step {step}, {unit}: XLA ran out of memory {what} "
        f"({type(exc).__name__}); the process's memory limit is below its baseline + the "
        "plan's peak: raise the limit, or lower model.arena_capacity_mb",
        needed_bytes=nbytes,
    )


_KEPT = ("pinned", "state")  # buffers that outlive a request
TileShape = tuple[str, int, bool, bool]  # (unit, rows, first tile, last tile)


def tile_shape(step: Step, spec: LayerSpec) -> TileShape:
    """The compiled tile a run step needs: its unit, its rows, and whether it is the
    unit's first (no accumulator yet) or last (adds the rest, gives the output) tile."""
    assert step.tile is not None
    kind = get_kind(spec.kind)
    assert kind.tiling is not None
    rows_total = spec.tensor(kind.tiling.tensor).shape[0]
    start, end = step.tile
    return (spec.name, end - start, start == 0, end == rows_total)


def tile_shapes(plan: Plan, specs: Mapping[str, LayerSpec]) -> list[TileShape]:
    """Every distinct compiled tile a plan runs, in order of first use."""
    shapes = [tile_shape(s, specs[s.layer]) for s in plan.steps if s.tile is not None]
    return list(dict.fromkeys(shapes))


def _add(loads: dict[str, tuple[float, int]], unit: str, load: tuple[float, int]) -> None:
    """Sum a unit's loads (one, or one per tile): seconds and bytes."""
    seconds, nbytes = loads.get(unit, (0.0, 0))
    loads[unit] = (seconds + load[0], nbytes + load[1])
