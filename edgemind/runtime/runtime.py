"""The user-facing runtime: open a model, plan a request shape, run NumPy inputs.

>>> import tempfile, numpy as np
>>> from edgemind.examples.toy import build_toy_model
>>> model = build_toy_model(tempfile.mkdtemp() + "/toy")
>>> with Runtime.open(model) as rt:
...     result = rt.run(np.ones((1, 1024), np.float32))
>>> result.complete, result.exit_level, result.output.shape
(True, 3, (1, 10))
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemind.errors import (
    EdgemindError,
    InputError,
    MemoryBoundExceeded,
    MemoryBoundWarning,
    MemoryQuotaExceeded,
    ModelFormatError,
    PlanError,
)
from edgemind.layers.cost import cost_table, tile_working_sets
from edgemind.planner import level_min_capacity, make_plan
from edgemind.planner.plan import CostTable, Plan
from edgemind.policy import Policy, load_policy
from edgemind.runtime.executor import Executor, tile_shapes
from edgemind.runtime.generation import (
    DEFAULT_CHUNK,
    ContextTooLarge,
    Generation,
    GenerationRun,
    Session,
    check_prompts,
    context_message,
    largest_context,
    session_context,
    vocab_size,
)
from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES, PeakRssMeter, configure_malloc
from edgemind.runtime.report import Result
from edgemind.runtime.workset import WorkingSetMeter
from edgemind.sampling import SamplingParams
from edgemind.units import MIB, format_bytes
from edgemind.weights.format import numpy_dtype
from edgemind.weights.manifest import InputSpec, Manifest, all_layer_specs, load_manifest

_TILE_ROUNDS = 4  # plan, measure the tiles it runs, plan again: at most this many times


def dims_of(manifest: Manifest, arrays: tuple[np.ndarray, ...]) -> dict[str, int]:
    """Named dims (batch, seq...) read off the inputs; checks ranks, fixed dims and dtypes."""
    if len(arrays) != len(manifest.inputs):
        names = ", ".join(i.name for i in manifest.inputs)
        raise InputError(
            f"{manifest.model_name} takes {len(manifest.inputs)} inputs ({names}), "
            f"got {len(arrays)}"
        )
    dims: dict[str, int] = {}
    for spec, arr in zip(manifest.inputs, arrays, strict=True):
        _check_input(spec, arr, dims)
    return dims


def _check_input(spec: InputSpec, arr: np.ndarray, dims: dict[str, int]) -> None:
    expected = "(" + ", ".join(str(d) for d in spec.shape) + ")"
    if not isinstance(arr, np.ndarray):
        raise InputError(f"input {spec.name!r}: expected a NumPy array, got {type(arr).__name__}")
    if arr.dtype != numpy_dtype(spec.dtype):
        raise InputError(
            f"input {spec.name!r}: expected dtype {spec.dtype}, got {arr.dtype}; "
            f"convert with x.astype(np.{spec.dtype})"
        )
    if arr.ndim != len(spec.shape):
        raise InputError(f"input {spec.name!r}: expected shape {expected}, got {arr.shape}")
    for want, got in zip(spec.shape, arr.shape, strict=True):
        if isinstance(want, str):
            if got < 1:  # an empty array has no rows to run
                raise InputError(
                    f"input {spec.name!r}: dim {want!r} is {got} (shape {arr.shape}); give at "
                    "least one element along every dim"
                )
            if dims.setdefault(want, got) != got:
                raise InputError(
                    f"input {spec.name!r}: dim {want!r} is {got}, expected {dims[want]} "
                    f"(shape {expected}, got {arr.shape})"
                )
        elif want != got:
            raise InputError(f"input {spec.name!r}: expected shape {expected}, got {arr.shape}")


def input_structs_shape(manifest: Manifest, dims: dict[str, int]) -> tuple[int, ...]:
    """The chain input's concrete shape for ``dims`` (a missing dim is an InputError)."""
    try:
        return manifest.inputs[0].concrete_shape(dims)
    except ModelFormatError as exc:
        raise InputError(str(exc)) from None


def check_token_ids(manifest: Manifest, x: np.ndarray) -> None:
    """Ids that index a gathered table (token ids) must be rows of it."""
    first = manifest.layers[0]
    for name in first.config.get("gathered", ()):
        rows = first.tensor(name).shape[0]
        if x.size and (int(x.min()) < 0 or int(x.max()) >= rows):
            bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
            raise InputError(
                f"input {manifest.inputs[0].name!r} holds id {bad}; {first.name}.{name} has "
                f"rows 0..{rows - 1} (are these ids from this model's tokenizer?)"
            )


def _mib_up(nbytes: int) -> str:
    """MiB to two decimals, rounded up: a capacity that is enough."""
    return f"{math.ceil(nbytes * 100 / MIB) / 100:.2f}"


def quota_message(plan: Plan, policy: Policy, shallowest_bytes: int | None = None) -> str:
    """One line: what does not fit, by how much, and what to change.

    ``shallowest_bytes``: what exit level 1 alone would need, when no level fits.
    """
    need = plan.min_capacity_bytes
    witness = plan.witness
    where = (
        f" (short by {format_bytes(witness.missing_bytes)} at step {witness.step}, {witness.layer})"
        if witness
        else ""
    )
    fix = (
        f"raise model.arena_capacity_mb to at least {_mib_up(need)}"
        if need
        else "raise model.arena_capacity_mb"
    )
    if policy.on_memory_quota_exceeded == "reject_request":
        fix += " or set scheduler.on_memory_quota_exceeded: early_exit"
    elif plan.status == "infeasible" and shallowest_bytes and plan.num_levels > 1:
        fix += f" (exit level 1 alone needs {_mib_up(shallowest_bytes)})"
    needs = format_bytes(need) if need else "more"
    return (
        f"{plan.model_name} at input {plan.input_shape} needs {needs}, the arena has "
        f"{format_bytes(plan.capacity_bytes)}{where}; {fix}"
    )


class Runtime:
    """A model opened under a policy: plans request shapes and runs requests.

    One arena is held at a time; layers the plan pins stay resident in it across
    requests of the same shape, so only the streamed layers are read again. Requests
    from several threads take turns. Opening a runtime limits glibc to one malloc arena
    and each request resets the process's RSS high-water mark (docs/design.md says why).
    """

    def __init__(self, model_dir: str | os.PathLike[str], manifest: Manifest, policy: Policy):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.policy = policy
        self._costs: dict[tuple[tuple[str, int], ...], CostTable] = {}
        self._plans: dict[tuple[tuple[str, int], ...], Plan] = {}
        self._executor: Executor | None = None
        self._sessions: dict[tuple[int, int, int], Session] = {}  # generation shapes
        self.last_plan: Plan | None = None  # the plan of the latest request
        self._meter: PeakRssMeter | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.working_sets = WorkingSetMeter()  # measured once per signature, cached on disk

    @classmethod
    def open(
        cls,
        model_dir: str | os.PathLike[str],
        policy: Policy | str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> Runtime:
        """Open ``model_dir`` (validating its manifest) under a policy or policy file."""
        manifest = load_manifest(model_dir)
        configure_malloc()  # RSS that follows what is live (see runtime.memory); before measuring
        if not isinstance(policy, Policy):
            policy = load_policy(policy, overrides=overrides)
        elif overrides:
            policy = policy.replace(**overrides)
        return cls(model_dir, manifest, policy)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def costs(self, **dims: int) -> CostTable:
        """The per-unit cost table for a request shape (``batch=``, ``seq=``...)."""
        key = tuple(sorted(dims.items()))
        if key not in self._costs:
            self._costs[key] = cost_table(self.manifest, dims, measure=self.working_sets)
        return self._costs[key]

    def plan(self, **dims: int) -> Plan:
        """The plan for a request shape, e.g. ``rt.plan(batch=8)``; cached."""
        key = tuple(sorted(dims.items()))
        if key not in self._plans:
            self._plans[key] = self._plan_with_measured_tiles(key, dims)
        return self._plans[key]

    def plan_within(self, capacity_bytes: int, **dims: int) -> Plan:
        """The plan for ``dims`` under this policy with a smaller capacity (a generation
        session's plans share one arena: :func:`~edgemind.runtime.generation.fit_session`);
        the policy's own capacity gives :meth:`plan`'s plan. Cached."""
        if capacity_bytes == self.policy.arena_capacity_bytes:
            return self.plan(**dims)
        key = (("capacity", capacity_bytes), *sorted(dims.items()))
        if key not in self._plans:
            policy = self.policy.replace(arena_capacity_bytes=capacity_bytes)
            self._plans[key] = self._plan_with_measured_tiles(
                tuple(sorted(dims.items())), dims, policy
            )
        return self._plans[key]

    def _plan_with_measured_tiles(
        self, key: tuple, dims: dict[str, int], policy: Policy | None = None
    ) -> Plan:
        """Plan; when the plan runs tiles whose working sets were estimated (their unit's
        whole working set), measure those tiles and plan again, until every tile it runs
        was measured (a new tile size can follow from the new figures: a few rounds)."""
        policy = policy or self.policy
        digests = {
            "manifest_digest": self.manifest.digest(),
            "policy_digest": self.policy.digest(),
        }
        costs = self.costs(**dims)
        plan = make_plan(costs, policy, **digests)
        specs = {spec.name: spec for spec in all_layer_specs(self.manifest)}
        for _ in range(_TILE_ROUNDS):
            known = {(unit, rows) for unit, rows, _ in costs.tile_working_sets}
            shapes = [s for s in tile_shapes(plan, specs) if (s[0], s[1]) not in known]
            if not shapes:
                break
            measured = tile_working_sets(self.manifest, dims, shapes, self.working_sets)
            costs = dataclasses.replace(
                costs, tile_working_sets=tuple(sorted({*costs.tile_working_sets, *measured}))
            )
            self._costs[key] = costs
            plan = make_plan(costs, policy, **digests)
        return plan

    def use_plan(self, plan: Plan, *, source: str = "the plan", **dims: int) -> None:
        """Adopt a plan (loaded from a file) for the request shape ``dims``.

        It must be the plan this model, policy and shape give here, field for field: a
        file reviewed elsewhere runs only if it is still exactly what will run.
        """
        from edgemind.planner.planfile import check_plan_matches

        shape = input_structs_shape(self.manifest, dims)
        check_plan_matches(plan, self.manifest.digest(), self.policy.digest(), shape, source=source)
        if plan != self.plan(**dims):
            raise PlanError(
                f"{source}: the plan differs from the one this model and policy give here "
                "(edited, or costs measured by another jax/XLA); re-run `edgemind plan --out`"
            )

    def run(self, x: np.ndarray, *context: np.ndarray) -> Result:
        """Run one request. Raises :class:`MemoryQuotaExceeded` before reading any
        weight when the plan rejects it; returns partial output on an early exit."""
        with self._lock:  # one arena: requests on one runtime run one at a time
            if self._closed:
                raise EdgemindError(
                    f"this runtime of {self.manifest.model_name} is closed; open a new one "
                    "(Runtime.release() frees memory but keeps a runtime usable)"
                )
            return self._run(x, *context)

    def _run(self, x: np.ndarray, *context: np.ndarray) -> Result:
        dims = dims_of(self.manifest, (x, *context))
        check_token_ids(self.manifest, x)
        plan = self.last_plan = self.plan(**dims)
        if plan.status == "infeasible":
            shallowest = None
            if self.policy.on_memory_quota_exceeded == "early_exit":
                shallowest = level_min_capacity(self.costs(**dims), self.policy, 1)
            error = MemoryQuotaExceeded(
                quota_message(plan, self.policy, shallowest),
                needed_bytes=plan.min_capacity_bytes or 0,
                capacity_bytes=plan.capacity_bytes,
            )
            error.plan = plan  # type: ignore[attr-defined]
            raise error
        executor = self._executor_for(plan, dims)
        ctx = {spec.name: arr for spec, arr in zip(self.manifest.inputs[1:], context, strict=True)}
        assert self._meter is not None
        self._meter.reset_peak()
        guard = None if self.policy.enforce == "off" else self._guard(plan)
        result = executor.run(x, ctx, guard)
        observed = self._meter.peak_above_baseline()
        report = dataclasses.replace(result.report, observed_peak_bytes=observed)
        return Result(result.output, result.complete, result.exit_level, report)

    # ------------------------------------------------------------------ generation

    def session_dims(self, context: int) -> dict[str, int]:
        """The dims a decoder's state is sized by: the context and the KV cache's width."""
        return {"context": context, "kv_bits": 16 if self.policy.kv_dtype == "bfloat16" else 32}

    def session(self, batch: int, context: int, chunk: int) -> Session:
        """The plans (and, once run, the arena) of a generation shape; cached."""
        key = (batch, context, chunk)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = Session(self, batch, context, chunk)
        return session

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        chunk: int = DEFAULT_CHUNK,
        context: int | None = None,
    ) -> Generation:
        """Generate from a batch of prompts (token ids, decoded together) until each row
        stops: a stop id, ``sampling.max_tokens``, or (under ``early_exit``) the largest
        context that fits. ``sampling`` defaults to greedy.

        Raises :class:`ContextTooLarge` before reading any weight when the session does
        not fit the capacity and the policy rejects.
        """
        run = self.generate_stream(prompts, sampling, chunk=chunk, context=context)
        for _ in run:
            pass
        assert run.result is not None
        return run.result

    def generate_stream(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        chunk: int = DEFAULT_CHUNK,
        context: int | None = None,
    ) -> GenerationRun:
        """Like :meth:`generate`, as an iterator of each step's tokens (see
        :class:`~edgemind.runtime.generation.GenerationRun`): planned, and rejected, when
        called; run as it is iterated. ``chunk``: prompt tokens per prefill step;
        ``context``: positions to plan for (default: the prompt and ``max_tokens``)."""
        sampling = sampling or SamplingParams(temperature=0.0)
        max_tokens = sampling.max_tokens
        vocab = vocab_size(self.manifest)
        rows = check_prompts(prompts, vocab)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        longest = max(len(r) for r in rows)
        chunk = min(chunk, longest)
        padded = -(-longest // chunk) * chunk
        needed = padded + max_tokens
        ctx = session_context(padded, max_tokens) if context is None else int(context)
        if ctx < needed and context is not None:
            raise InputError(
                f"context {ctx} is shorter than the padded prompt ({padded}) + max_tokens "
                f"({max_tokens}) = {needed}"
            )
        session = self.session(len(rows), ctx, chunk)
        limit = None
        if not session.feasible:
            largest = largest_context(self, len(rows), chunk, ctx)
            message = context_message(session, needed, largest)
            if self.policy.on_memory_quota_exceeded == "reject_request" or largest <= padded:
                raise ContextTooLarge(
                    message,
                    largest_context=largest,
                    needed_bytes=session.peak_bytes,
                    capacity_bytes=session.capacity_bytes,
                )
            session, limit = self.session(len(rows), largest, chunk), largest
        if self._executor is not None:  # one arena at a time
            self._release_executor()
        for other in self._sessions.values():
            if other is not session:
                other.close()
        return GenerationRun(session, rows, sampling, limit=limit)

    def _guard(self, plan: Plan) -> Callable[[int, str], None]:
        """After each unit: the request's memory growth so far against the plan's peak +
        the allowance (growth within the request, so the host's own allocations between
        requests are not counted; pinned layers read earlier are not counted either)."""
        meter, bound = self._meter, plan.peak_bytes + BOUND_ALLOWANCE_BYTES
        warned = False

        def check(step: int, unit: str) -> None:
            nonlocal warned
            observed = meter.growth_in_stretch() if meter is not None else None
            if observed is None or observed <= bound or warned:
                return
            message = (
                f"step {step}, {unit}: observed {format_bytes(observed)} of model memory, "
                f"above the plan's {format_bytes(plan.peak_bytes)} + the "
                f"{format_bytes(BOUND_ALLOWANCE_BYTES)} allowance; please report it "
                "(docs/design.md, 'What the bound covers')"
            )
            if self.policy.enforce == "fail":
                raise MemoryBoundExceeded(
                    message, needed_bytes=observed, capacity_bytes=plan.capacity_bytes
                )
            warned = True
            warnings.warn(MemoryBoundWarning(message), stacklevel=2)

        return check

    def _executor_for(self, plan: Plan, dims: dict[str, int]) -> Executor:
        current = self._executor
        if current is not None and current.plan is plan and current.arena is not None:
            return current
        self._release()  # one arena at a time: the old one goes before the new one comes
        self._executor = Executor(
            self.model_dir,
            self.manifest,
            plan,
            dims,
            verify=self.policy.verify_checksums,
            direct=self.policy.read_mode == "direct",
        )
        # The baseline is taken warmed up (the executor has every unit compiled, even for
        # a plan loaded from a file) and before the arena's pages are touched (np.empty
        # maps them lazily): model memory is what rises above it.
        self._meter = PeakRssMeter()
        assert self._executor.arena is not None
        self._executor.arena.touch()  # counted above the baseline: it is model memory
        return self._executor

    def release(self) -> None:
        """Release the arena (and pinned layers) between requests; the runtime can still
        plan and run (the next request allocates a new arena and reads pins again)."""
        with self._lock:  # never under a running request
            self._release()

    def close(self) -> None:
        """Release everything; waits for a request running in another thread to finish.
        Later calls to :meth:`run` raise :class:`EdgemindError` ("closed")."""
        with self._lock:
            self._closed = True
            self._release()

    def _release(self) -> None:
        self._release_executor()
        for session in self._sessions.values():
            session.close()

    def _release_executor(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None


def run_model(
    model_dir: str | os.PathLike[str],
    x: np.ndarray,
    *context: np.ndarray,
    policy: Policy | None = None,
    **overrides: Any,
) -> Result:
    """One-shot convenience: open, run one request, close."""
    with Runtime.open(model_dir, policy, **overrides) as rt:
        return rt.run(x, *context)


__all__ = ["Runtime", "dims_of", "quota_message", "run_model"]
