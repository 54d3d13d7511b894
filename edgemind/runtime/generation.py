"""Text generation under a plan: prefill in chunks, then decode a token at a time.

A decoder model (``edgemind convert model.gguf``) is a chain: the token embedding
(rows read on demand), the blocks, each keeping its KV cache as planned **state**, the
final norm (last position only) and the LM head, run in tiles when its table is larger
than the arena. A session is a batch of prompts decoded together, so that every
weight read serves every row:

1. **Plan.** A session's shape is ``(batch, context)``: ``context`` is the most
   positions a row holds (its padded prompt and the generated tokens), rounded up to
   :data:`CONTEXT_STEP` so that sessions share compiled units. Two plans cover it: the
   prefill plan (``chunk`` tokens a step) and the decode plan (one). Both place the
   same state buffers at the same offsets (state comes first, from offset 0), and the
   session's one arena is the larger of the two plans' extents; the session's bound is
   that arena plus the larger working set, and it must fit the capacity. A session that
   does not fit is rejected before any weight is read (:class:`ContextTooLarge`, with
   the largest context that fits) or, under ``early_exit``, runs in the largest context
   that fits and stops there with ``finish_reason == "memory"``.
2. **Prefill.** Prompts are left-padded to a common length, a multiple of the chunk;
   padded positions are masked and do not count in the RoPE positions.
3. **Decode.** One token per row per step. Pinned layers stay in the arena; the
   others are streamed, the LM head in tiles.

Switching from the prefill plan to the decode plan keeps the KV cache where it is;
pinned layers are read again when the two plans place them differently.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from edgemind.errors import InputError, MemoryQuotaExceeded, ModelFormatError
from edgemind.layers.gemma3 import PAD, START
from edgemind.layers.registry import get_kind, state_nbytes
from edgemind.planner import make_plan
from edgemind.planner.plan import Plan
from edgemind.runtime.arena import Arena
from edgemind.runtime.executor import Executor
from edgemind.runtime.memory import PeakRssMeter
from edgemind.sampling import Choice, Sampler, SamplingParams
from edgemind.units import format_bytes

CONTEXT_STEP = 256  # session contexts are planned (and compiled) in multiples of this
DEFAULT_CHUNK = 64  # prefill tokens per step (fewer when the prompt is shorter)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    id: int
    logprob: float


@dataclasses.dataclass(frozen=True)
class GeneratedToken:
    """One decoding step's choice for one row: the id, its log-probability under the
    model, and the best alternatives when asked for."""

    row: int
    id: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


def tokens_of(choice: Choice) -> list[GeneratedToken]:
    """A sampler's choice for a batch as one :class:`GeneratedToken` per row."""
    return [
        GeneratedToken(row, token, logprob, tuple(TokenLogprob(i, lp) for i, lp in top))
        for row, (token, logprob, top) in enumerate(
            zip(choice.token_ids, choice.logprobs, choice.top_logprobs, strict=True)
        )
    ]


@dataclasses.dataclass(frozen=True)
class GenerationReport:
    """What a session cost: time, bytes read and memory, planned against observed."""

    model_name: str
    batch: int
    context: int
    chunk: int
    prompt_tokens: int  # the padded prompt length (every row)
    generated_tokens: int  # decode steps (each serves every row)
    time_to_first_token_s: float
    prefill_s: float
    decode_s: float
    bytes_read_prefill: int
    bytes_read_decode: int
    kv_bytes: int
    pinned_bytes: int
    capacity_bytes: int
    arena_bytes: int
    plan_peak_bytes: int  # the session's bound: its arena + the larger working set
    observed_peak_bytes: int | None
    decode_step_s: tuple[float, ...] = ()

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens * self.batch / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens * self.batch / self.decode_s if self.decode_s else 0.0

    @property
    def bytes_read_per_token(self) -> float:
        """Weight bytes read per decode step (each step serves the whole batch)."""
        return self.bytes_read_decode / self.generated_tokens if self.generated_tokens else 0.0


@dataclasses.dataclass(frozen=True)
class Generation:
    """A finished session: per row the prompt ids, generated ids, why it stopped and
    each generated token's log-probabilities; the report and the two plans."""

    prompt_token_ids: tuple[tuple[int, ...], ...]
    token_ids: tuple[tuple[int, ...], ...]
    finish_reasons: tuple[str, ...]
    logprobs: tuple[tuple[GeneratedToken, ...], ...]
    report: GenerationReport
    plan: Plan  # the decode plan
    prefill_plan: Plan


class ContextTooLarge(MemoryQuotaExceeded):
    """A session's KV cache and buffers do not fit the capacity at its context.

    ``largest_context`` is the largest context (a multiple of :data:`CONTEXT_STEP`)
    that fits, 0 when none does.
    """

    def __init__(self, message: str, *, largest_context: int, **kw: Any):
        super().__init__(message, **kw)
        self.largest_context = largest_context


def session_context(padded_prompt: int, max_tokens: int) -> int:
    """The context a session plans: its padded prompt and generated tokens, rounded up
    to :data:`CONTEXT_STEP`.

    >>> session_context(10, 32), session_context(250, 7)
    (256, 512)
    """
    return -(-(padded_prompt + max_tokens) // CONTEXT_STEP) * CONTEXT_STEP


def check_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    """Prompts as lists of ids: at least one, none empty, every id in the vocabulary."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise InputError("give at least one prompt of token ids")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            raise InputError(f"prompt {i} is text; give token ids (or use the tokenizer)")
        ids = [int(t) for t in prompt]
        if not ids:
            raise InputError(f"prompt {i} is empty; give at least one token (the BOS token)")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(
                f"prompt {i} holds id {bad[0]}, outside the vocabulary 0..{vocab - 1} (are "
                "these ids from this model's tokenizer?)"
            )
        rows.append(ids)
    return rows


def vocab_size(manifest: Any) -> int:
    """A decoder's vocabulary: the rows of its first unit's gathered token table."""
    first = manifest.layers[0]
    names = [n.name for n in manifest.inputs]
    if names[1:] != [START, PAD] or not first.config.get("gathered"):
        raise ModelFormatError(
            f"{manifest.model_name} is not a decoder edgemind can generate with (inputs "
            f"{names}); convert a GGUF language model with `edgemind convert MODEL.gguf DIR`"
        )
    return int(first.tensor(first.config["gathered"][0]).shape[0])


def _kept_layout(plan: Plan) -> tuple:
    """Where a plan keeps pinned layers: equal layouts can hand over without reading."""
    return tuple(
        (b.layer, b.offset_bytes, b.nbytes, b.tensors) for b in plan.buffers if b.role == "pinned"
    )


HOST_BYTES_PER_VOCAB = 12  # the sampler's row workspace, per vocabulary entry
HOST_BYTES_PER_LOGIT = 8  # per logit of the batch: the step's output copy, the sampler's


def host_bytes(batch: int, vocab: int) -> int:
    """What a decode step holds outside the arena and XLA once its logits are out: the
    executor's copy of the logits and the sampler's workspace. Measured with tracemalloc
    (``Sampler.choose`` on 262,144 logits with every option on: 13.1 bytes per entry at
    batch 1, 21.2 at batch 4, plus the 4-byte copy per logit); bounded here by
    ``(12 + 8 x batch)`` bytes per vocabulary entry and counted in the session's peak.
    """
    return (HOST_BYTES_PER_VOCAB + HOST_BYTES_PER_LOGIT * batch) * vocab


def session_bounds(plans: Sequence[Plan]) -> tuple[int, int]:
    """(arena, peak) of plans that share one arena: the largest extent, and it plus the
    largest working set (any plan's working set may come while the arena is whole)."""
    arena = max(p.arena_bytes for p in plans)
    return arena, arena + max(p.peak_bytes - p.arena_bytes for p in plans)


_FIT_ROUNDS = 3


def fit_session(
    plan_at: Callable[[int, int], Plan], seqs: Sequence[int], capacity: int
) -> list[Plan]:
    """The plans (one per ``seq``, ``plan_at(seq, capacity)``) of a session whose shared
    arena fits ``capacity``, when they can.

    Each plan alone fills its capacity (pins, the largest tiles), so two of them in one
    arena can exceed it: the arena of one beside the working set of the other. When
    they do, each is planned again within the capacity less the amount by which the
    largest working set exceeds its own, so that its arena plus that working set fits;
    a few rounds, as a new tile size can change a working set.
    """
    plans = [plan_at(seq, capacity) for seq in seqs]
    for _ in range(_FIT_ROUNDS):
        if session_bounds(plans)[1] <= capacity or not all(p.complete for p in plans):
            break
        top = max(p.peak_bytes - p.arena_bytes for p in plans)
        plans = [
            plan_at(seq, max(1, capacity - (top - (p.peak_bytes - p.arena_bytes))))
            for seq, p in zip(seqs, plans, strict=True)
        ]
    return plans


class Session:
    """The prefill and decode plans of one generation shape, run in one arena.

    Built by :meth:`edgemind.runtime.Runtime.generate`; kept while the shape repeats,
    so the pinned layers and compiled units serve the next session too.
    """

    def __init__(self, runtime: Any, batch: int, context: int, chunk: int):
        self.runtime = runtime
        self.batch, self.context, self.chunk = batch, context, chunk
        dims = runtime.session_dims(context)
        seqs = (chunk, 1) if chunk > 1 else (1,)
        capacity = runtime.policy.arena_capacity_bytes
        self.host_bytes = host_bytes(batch, vocab_size(runtime.manifest))
        plans = fit_session(
            lambda seq, cap: runtime.plan_within(cap, batch=batch, seq=seq, **dims),
            seqs,
            capacity - self.host_bytes,
        )
        self.prefill_plan: Plan = plans[0]
        self.decode_plan: Plan = plans[-1]
        self.arena_bytes, peak = session_bounds(plans)
        self.peak_bytes = peak + self.host_bytes
        self.capacity_bytes = capacity
        self.kv_bytes = sum(b.nbytes for b in self.decode_plan.buffers if b.role == "state")
        states = [
            [(b.layer, b.offset_bytes, b.nbytes) for b in p.buffers if b.role == "state"]
            for p in (self.prefill_plan, self.decode_plan)
        ]
        if states[0] != states[1]:  # the planner places state first: cannot differ
            raise MemoryQuotaExceeded("the prefill and decode plans place the KV cache apart")
        self._executors: dict[int, Executor] = {}
        self._arena: Arena | None = None
        self._active: Executor | None = None
        self.meter: PeakRssMeter | None = None

    @property
    def feasible(self) -> bool:
        return (
            self.decode_plan.complete
            and self.prefill_plan.complete
            and self.peak_bytes <= self.capacity_bytes
        )

    def open(self) -> None:
        """Allocate the arena and the executors (compiled units warmed); the meter's
        baseline is taken before the arena is touched, so it counts as model memory."""
        if self._arena is not None:
            return
        rt = self.runtime
        self._arena = Arena(self.arena_bytes)
        for plan, seq in ((self.prefill_plan, self.chunk), (self.decode_plan, 1)):
            if id(plan) in self._executors:
                continue
            self._executors[id(plan)] = Executor(
                rt.model_dir,
                rt.manifest,
                plan,
                {"batch": self.batch, "seq": seq, **rt.session_dims(self.context)},
                verify=rt.policy.verify_checksums,
                direct=rt.policy.read_mode == "direct",
                arena=self._arena,
            )
        self.meter = PeakRssMeter()
        self._arena.touch()

    def executor(self, plan: Plan) -> Executor:
        """The executor of ``plan``, made the arena's user (the other one detached)."""
        self.open()
        ex = self._executors[id(plan)]
        if self._active is not ex:
            previous = self._active
            if previous is not None:
                loaded = previous._pinned_loaded
                previous.detach()
                if loaded and _kept_layout(previous.plan) == _kept_layout(plan):
                    ex.adopt_pinned()
            self._active = ex
        return ex

    def reset(self) -> None:
        """An empty KV cache for a new session."""
        self.open()
        next(iter(self._executors.values())).reset_state()

    def close(self) -> None:
        for ex in self._executors.values():
            ex.close()
        self._executors.clear()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        self._active = None


def largest_context(runtime: Any, batch: int, chunk: int, context: int) -> int:
    """The largest context (a multiple of :data:`CONTEXT_STEP`, below ``context``) whose
    session fits the capacity; 0 if none does.

    It plans, for each candidate, the cost tables measured at ``context`` with only the
    state's bytes recomputed: working sets grow with the context (more keys to attend
    over), so the ones measured at ``context`` bound every smaller one, and a candidate
    found to fit this way fits for real. Planning is pure and fast; nothing is compiled.
    """
    specs = {spec.name: spec for spec in runtime.manifest.layers}
    capacity = runtime.policy.arena_capacity_bytes
    host = host_bytes(batch, vocab_size(runtime.manifest))
    measured = {}
    for seq in dict.fromkeys((chunk, 1)):
        runtime.plan(batch=batch, seq=seq, **runtime.session_dims(context))  # measures tiles
        measured[seq] = runtime.costs(batch=batch, seq=seq, **runtime.session_dims(context))

    def fits(candidate: int) -> bool:
        dims = {"batch": batch, **runtime.session_dims(candidate)}
        tables = {}
        for seq, costs in measured.items():
            layers = tuple(
                dataclasses.replace(
                    u, state_bytes=state_nbytes(get_kind(u.kind), dims, specs[u.name].config)
                )
                if u.state_bytes
                else u
                for u in costs.layers
            )
            tables[seq] = dataclasses.replace(costs, layers=layers)

        def plan_at(seq: int, cap: int) -> Plan:
            return make_plan(tables[seq], runtime.policy.replace(arena_capacity_bytes=cap))

        plans = fit_session(plan_at, tuple(measured), capacity - host)
        return all(p.complete for p in plans) and session_bounds(plans)[1] <= capacity - host

    lo, hi = 0, (context - 1) // CONTEXT_STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * CONTEXT_STEP):
            lo = mid
        else:
            hi = mid - 1
    return lo * CONTEXT_STEP


class GenerationRun:
    """Iterate for each step's tokens (one per running row); :attr:`result` at the end.

    The steps are the executor's requests: prompt chunks first (no tokens yielded),
    then one decode step per token.
    """

    def __init__(
        self,
        session: Session,
        prompts: list[list[int]],
        sampling: SamplingParams,
        *,
        pad_id: int = 0,
        limit: int | None = None,
    ):
        self.session = session
        self.prompts = prompts
        self.sampling = sampling
        self.sampler = Sampler(sampling)
        self.max_tokens = sampling.max_tokens
        self.stop_ids = frozenset(sampling.stop_token_ids)
        self.pad_id = pad_id
        self.limit = limit or session.context  # positions the session may fill
        self.result: Generation | None = None
        self._stopped: dict[int, str] = {}  # rows ended from outside (a stop string)

    def stop_row(self, row: int, reason: str = "stop") -> None:
        """End ``row`` before its next step (its consumer found a stop string)."""
        self._stopped.setdefault(row, reason)

    def __iter__(self) -> Iterator[list[GeneratedToken]]:
        session, chunk = self.session, self.session.chunk
        batch = len(self.prompts)
        longest = max(len(p) for p in self.prompts)
        padded = -(-longest // chunk) * chunk
        pads = np.array([padded - len(p) for p in self.prompts], np.int32)
        ids = np.full((batch, padded), self.pad_id, np.int32)
        for row, prompt in enumerate(self.prompts):
            ids[row, pads[row] :] = prompt
        started = time.perf_counter()
        session.reset()
        assert session.meter is not None
        session.meter.reset_peak()
        read_prefill = 0
        logits = None
        for start in range(0, padded, chunk):
            ex = session.executor(session.prefill_plan)
            ctx = {START: np.array([start], np.int32), PAD: pads}
            res = ex.run(ids[:, start : start + chunk], ctx)
            read_prefill += res.report.bytes_read
            logits = res.output
        assert logits is not None
        prefill_s = time.perf_counter() - started
        histories = [list(p) for p in self.prompts]
        generated: list[list[GeneratedToken]] = [[] for _ in range(batch)]
        reasons: list[str | None] = [None] * batch
        read_decode, step_s = 0, []
        first_token_s = 0.0
        position = padded
        decode_started = time.perf_counter()
        while True:
            choice = self.sampler.choose(np.asarray(logits).reshape(batch, -1), histories)
            tokens = tokens_of(choice)
            emitted = []
            for tok in tokens:
                if reasons[tok.row] is not None:
                    continue
                generated[tok.row].append(tok)
                histories[tok.row].append(tok.id)
                emitted.append(tok)
                if tok.id in self.stop_ids:
                    reasons[tok.row] = "stop"
                elif len(generated[tok.row]) >= self.max_tokens:
                    reasons[tok.row] = "length"
                elif position >= self.limit:
                    reasons[tok.row] = "memory"
            if not first_token_s:
                first_token_s = time.perf_counter() - started
            yield emitted
            for row, reason in self._stopped.items():
                if reasons[row] is None:
                    reasons[row] = reason
            if all(r is not None for r in reasons):
                break
            step_start = time.perf_counter()
            ex = session.executor(session.decode_plan)
            last = np.array([[h[-1]] for h in histories], np.int32)
            ctx = {START: np.array([position], np.int32), PAD: pads}
            res = ex.run(last, ctx)
            read_decode += res.report.bytes_read
            logits = res.output
            position += 1
            step_s.append(time.perf_counter() - step_start)
        decode_s = time.perf_counter() - decode_started
        report = GenerationReport(
            model_name=session.decode_plan.model_name,
            batch=batch,
            context=session.context,
            chunk=chunk,
            prompt_tokens=padded,
            generated_tokens=len(step_s),
            time_to_first_token_s=first_token_s,
            prefill_s=prefill_s,
            decode_s=decode_s,
            bytes_read_prefill=read_prefill,
            bytes_read_decode=read_decode,
            kv_bytes=session.kv_bytes,
            pinned_bytes=sum(b.nbytes for b in session.decode_plan.buffers if b.role == "pinned"),
            capacity_bytes=session.capacity_bytes,
            arena_bytes=session.arena_bytes,
            plan_peak_bytes=session.peak_bytes,
            observed_peak_bytes=session.meter.peak_above_baseline(),
            decode_step_s=tuple(step_s),
        )
        self.result = Generation(
            prompt_token_ids=tuple(tuple(p) for p in self.prompts),
            token_ids=tuple(tuple(t.id for t in g) for g in generated),
            finish_reasons=tuple(r or "length" for r in reasons),
            logprobs=tuple(tuple(g) for g in generated),
            report=report,
            plan=session.decode_plan,
            prefill_plan=session.prefill_plan,
        )


def context_message(session: Session, needed: int, largest: int) -> str:
    """One line: the context asked for, what it needs, the capacity, the largest that fits."""
    fits = (
        f"the largest context that fits is {largest} positions"
        if largest
        else "no context fits; raise model.arena_capacity_mb"
    )
    return (
        f"{session.decode_plan.model_name}: a context of {needed} positions x batch "
        f"{session.batch} needs {format_bytes(session.peak_bytes)} (KV cache "
        f"{format_bytes(session.kv_bytes)}), the arena has "
        f"{format_bytes(session.capacity_bytes)}; {fits} (lower max_tokens or the prompt, "
        "or raise model.arena_capacity_mb)"
    )
