"""Choosing the next token from a decoder's logits, and knowing when to stop.

:class:`SamplingParams` holds the knobs of an OpenAI-style completion request;
:class:`Sampler` turns a batch of logits into a :class:`Choice` (token ids, their
logprobs and the most probable alternatives); :class:`StopMatcher` finds stop strings
in streamed text; :func:`finish_reason` says why a generation ended. Pure NumPy.

Logits go through the transforms in the order transformers and llama.cpp use:
repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw. Temperature 0 is
greedy: the argmax after the repetition penalty, ties to the lowest id. Each filter
keeps the tokens whose (scaled) logit reaches a threshold, so ties at a top-k or top-p
boundary are all kept (as transformers does for top-k) and the kept set never depends
on a sort's order of equal values.

Reported logprobs are those of the model's own distribution, the log-softmax of the raw
logits before penalty, temperature and truncation (what OpenAI's API reports): they say
how likely the model found a token, not how likely this sampler was to draw it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from edgemind.errors import InputError, brief

FinishReason = Literal["stop", "length", "memory"]
# "stop": a stop token or stop string; "length": max_tokens reached; "memory": the
# plan's context limit reached (the KV cache the memory plan allows is full).
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "memory")
_BLOCK = 2048  # tokens per block of a running sum (see _first_above)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop; checked when built.

    >>> SamplingParams(temperature=0.7, top_p=0.9, stop="\\n\\n").stop
    ('\\n\\n',)
    >>> SamplingParams(top_p=1.5)
    Traceback (most recent call last):
    ...
    edgemind.errors.InputError: sampling top_p: got 1.5, expected a number in (0, 1]
    """

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # None = fresh entropy
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; a single str is one stop string
    top_logprobs: int = 0  # alternatives reported per token, 0..20 (OpenAI's limit)

    def __post_init__(self) -> None:
        t, k, p, m = self.temperature, self.top_k, self.top_p, self.min_p
        r, seed, n, lp = self.repetition_penalty, self.seed, self.max_tokens, self.top_logprobs
        ids = self.stop_token_ids
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        ids_ok = isinstance(ids, (tuple, list)) and all(_integer(i) and i >= 0 for i in ids)
        stop_ok = isinstance(stop, (tuple, list)) and all(isinstance(s, str) and s for s in stop)
        checks = [  # (field, value, valid?, the valid range); each `and` guards the next
            ("temperature", t, _finite(t) and t >= 0, "a finite number >= 0"),
            ("top_k", k, _integer(k) and k >= 0, "an integer >= 0"),
            ("top_p", p, _real(p) and 0 < p <= 1, "a number in (0, 1]"),
            ("min_p", m, _real(m) and 0 <= m < 1, "a number in [0, 1)"),
            ("repetition_penalty", r, _finite(r) and r > 0, "a finite number > 0"),
            ("seed", seed, seed is None or (_integer(seed) and seed >= 0), "None or an int >= 0"),
            ("max_tokens", n, _integer(n) and n >= 1, "an integer >= 1"),
            ("top_logprobs", lp, _integer(lp) and 0 <= lp <= 20, "an integer in 0..20"),
            ("stop_token_ids", ids, ids_ok, "a tuple of token ids >= 0"),
            ("stop", stop, stop_ok, "a tuple of non-empty strings"),
        ]
        for field, value, ok, expected in checks:
            if not ok:
                raise InputError(f"sampling {field}: got {brief(value)}, expected {expected}")
        plain: dict[str, object] = {  # immutable built-in values, whatever came in
            "temperature": float(t),
            "top_k": int(k),
            "top_p": float(p),
            "min_p": float(m),
            "repetition_penalty": float(r),
            "seed": None if seed is None else int(seed),
            "max_tokens": int(n),
            "top_logprobs": int(lp),
            "stop_token_ids": tuple(int(i) for i in ids),
            "stop": tuple(stop),
        }
        for name, plain_value in plain.items():
            object.__setattr__(self, name, plain_value)


@dataclass(frozen=True)
class Choice:
    """One chosen token per row of a batch, with logprobs under the model's distribution."""

    token_ids: tuple[int, ...]  # (batch,)
    logprobs: tuple[float, ...]  # (batch,) log-softmax of the raw logits at token_ids
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]  # (batch, top_logprobs) (id, lp)


def penalize(logits: np.ndarray, context_ids: Sequence[int], penalty: float) -> np.ndarray:
    """``logits`` (vocab,) with the CTRL repetition penalty on the ids in ``context_ids``.

    A seen token's logit is divided by ``penalty`` if positive, else multiplied by it,
    so ``penalty > 1`` always makes it less likely. Returns a copy; 1.0 returns the input.

    >>> penalize(np.array([2.0, -2.0, 1.0]), [0, 1, 1], 2.0).tolist()
    [1.0, -4.0, 1.0]
    """
    if penalty == 1.0 or len(context_ids) == 0:
        return logits
    seen = np.unique(np.asarray(context_ids, dtype=np.int64))
    out = logits.copy()
    values = out[seen]
    with np.errstate(over="ignore", divide="ignore"):  # extreme: -inf fine, +inf capped
        penalized = np.where(values > 0, values / penalty, values * penalty)
    out[seen] = np.minimum(penalized, np.finfo(out.dtype).max)
    return out


def _top_p_threshold(values: np.ndarray, top_p: float) -> float:
    """The smallest value top-p keeps (``values``: logits already filtered, max 0).

    transformers' rule: ascending, drop the least probable tokens while their mass
    stays within ``1 - top_p``; the most probable token always stays.
    """
    ranked = np.sort(values)  # ascending; the one sort of a step
    weights = np.exp(ranked)
    total = float(weights.sum(dtype=np.float64))
    return float(ranked[_first_above(weights, (1.0 - top_p) * total)])


def _first_above(weights: np.ndarray, target: float) -> int:
    """The first index at which the running sum of ``weights`` exceeds ``target``
    (the last index if none does).

    Two levels, block sums then one block's running sum, in float64: one running sum
    over a whole vocabulary is a slow sequential pass (milliseconds at 262,144).
    """
    starts = np.arange(0, len(weights), _BLOCK)
    ends = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    block = min(int(np.searchsorted(ends, target, side="right")), len(starts) - 1)
    before = float(ends[block - 1]) if block else 0.0
    run = before + np.cumsum(weights[starts[block] : starts[block] + _BLOCK], dtype=np.float64)
    return int(starts[block]) + min(int(np.searchsorted(run, target, side="right")), len(run) - 1)


def token_weights(
    logits: np.ndarray, context_ids: Sequence[int], params: SamplingParams
) -> np.ndarray:
    """The next token's unnormalised probabilities for one row; 0 off the kept set.

    ``logits``: (vocab,) float32 with a finite maximum. Returns (vocab,) float32 with
    the most probable token at 1.0. A token e^-104 times less probable than that one
    is below float32's range and counts as 0.
    """
    logits = penalize(logits, context_ids, params.repetition_penalty)
    if params.temperature == 0:
        weights = np.zeros(len(logits), dtype=np.float32)
        weights[np.argmax(logits)] = 1.0  # the first maximum: ties to the lowest id
        return weights
    # Shifted by the max first, a tiny temperature overflows only to -inf (probability 0).
    divisor = np.float32(max(params.temperature, float(np.finfo(np.float32).smallest_subnormal)))
    with np.errstate(over="ignore"):
        scaled = (logits - np.max(logits)) / divisor  # (vocab,) float32, max 0
    vocab = len(scaled)
    threshold = -math.inf
    if 0 < params.top_k < vocab:
        threshold = float(np.partition(scaled, vocab - params.top_k)[vocab - params.top_k])
    if params.top_p < 1.0:
        kept = scaled if threshold == -math.inf else scaled[scaled >= threshold]
        threshold = max(threshold, _top_p_threshold(kept, params.top_p))
    if params.min_p > 0.0:  # p_i >= min_p * p_max, and the max of scaled is 0
        threshold = max(threshold, math.log(params.min_p))
    weights = np.exp(scaled)
    if threshold > -math.inf:
        weights *= scaled >= threshold  # not a masked store: that branches per token
    return weights


def token_distribution(
    logits: np.ndarray, context_ids: Sequence[int], params: SamplingParams
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw may pick for one row, and their renormalised probabilities.

    Returns ``(ids, probs)``: the ids with a probability above 0, ascending (int64), and
    their probabilities (float64, summing to 1). Greedy gives one id with 1.0.

    >>> params = SamplingParams(temperature=1.0, top_k=2)
    >>> ids, probs = token_distribution(np.log(np.float32([0.1, 0.6, 0.3])), [], params)
    >>> ids.tolist(), probs.round(3).tolist()
    ([1, 2], [0.667, 0.333])
    """
    weights = token_weights(logits, context_ids, params)
    ids = np.flatnonzero(weights)
    kept = weights[ids].astype(np.float64)
    return ids, kept / kept.sum()


class Sampler:
    """Chooses tokens by :class:`SamplingParams`, with a random stream of its own.

    The stream is a PCG64 generator seeded by ``params.seed``: the same seed and the
    same logits give the same tokens. A sampling step draws one uniform number per row,
    in row order; greedy draws none.

    >>> sampler = Sampler(SamplingParams(temperature=0, top_logprobs=1))
    >>> choice = sampler.choose(np.log(np.float32([[0.2, 0.5, 0.3]])), [[]])
    >>> choice.token_ids, round(choice.logprobs[0], 4), choice.top_logprobs[0][0][0]
    ((1,), -0.6931, 1)
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def choose(self, logits: np.ndarray, context_ids: Sequence[Sequence[int]]) -> Choice:
        """One token per row of ``logits`` (batch, vocab); ``context_ids``: per row, the
        ids the repetition penalty applies to (prompt and tokens generated so far)."""
        logits = _check_logits(logits, context_ids)
        ids: list[int] = []
        logprobs: list[float] = []
        tops: list[tuple[tuple[int, float], ...]] = []
        for row, context in zip(logits, context_ids, strict=True):
            weights = token_weights(row, context, self.params)
            if self.params.temperature > 0:
                token = _draw(weights, self._rng.random())
            else:
                token = int(np.argmax(weights))
            shifted = row - np.max(row)
            log_total = math.log(float(np.exp(shifted).sum(dtype=np.float64)))
            ids.append(token)
            logprobs.append(float(shifted[token]) - log_total)
            top = _top_ids(shifted, self.params.top_logprobs)
            tops.append(tuple((int(i), float(shifted[i]) - log_total) for i in top))
        return Choice(tuple(ids), tuple(logprobs), tuple(tops))


def _draw(weights: np.ndarray, uniform: float) -> int:
    """The index whose share of the running sum of ``weights`` holds ``uniform`` in [0, 1)."""
    index = _first_above(weights, uniform * float(weights.sum(dtype=np.float64)))
    if weights[index] == 0:  # rounding pushed the target past the end
        index = int(np.flatnonzero(weights[: index + 1])[-1])
    return index


def _top_ids(values: np.ndarray, n: int) -> np.ndarray:
    """The ids of the ``n`` largest ``values``, largest first, ties to the lowest id."""
    n = min(n, len(values))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(values, len(values) - n)[len(values) - n]
    above = np.flatnonzero(values > kth)
    ids = np.concatenate([above, np.flatnonzero(values == kth)[: n - len(above)]])
    return ids[np.lexsort((ids, -values[ids]))]


def _check_logits(logits: np.ndarray, context_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """``logits`` as float32 (batch, vocab), each row with a finite max, ids in range."""
    array = np.asarray(logits)
    if array.ndim != 2 or 0 in array.shape or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"logits: expected a float array (batch, vocab), got {array.dtype} {array.shape}"
        )
    array = array.astype(np.float32, copy=False)
    if len(context_ids) != len(array):
        raise InputError(f"context_ids: {len(context_ids)} rows for {len(array)} rows of logits")
    for row, (values, context) in enumerate(zip(array, context_ids, strict=True)):
        top = np.max(values)  # NaN if any is, +inf if any is, -inf if all are
        if not np.isfinite(top):
            raise InputError(f"logits row {row}: the maximum is {top}; expected finite logits")
        ids = np.asarray(context, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= array.shape[1]):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise InputError(
                f"context_ids row {row}: token id {bad} is outside the vocabulary "
                f"0..{array.shape[1] - 1}"
            )
    return array


def finish_reason(
    params: SamplingParams,
    token_id: int,
    n_tokens: int,
    *,
    stop_string_hit: bool = False,
    context_full: bool = False,
) -> FinishReason | None:
    """Why generation ends after ``token_id`` (``n_tokens`` generated, it included), or
    None to go on. A stop wins over the length, the length over the memory limit.

    >>> params = SamplingParams(max_tokens=4, stop_token_ids=(1,))
    >>> finish_reason(params, 7, 2), finish_reason(params, 1, 4), finish_reason(params, 7, 4)
    (None, 'stop', 'length')
    """
    if stop_string_hit or token_id in params.stop_token_ids:
        return "stop"
    if n_tokens >= params.max_tokens:
        return "length"
    return "memory" if context_full else None


class Emitted(NamedTuple):
    """What :meth:`StopMatcher.feed` lets out: text safe to show, and whether to stop."""

    text: str
    stopped: bool


class StopMatcher:
    """Finds stop strings in text that arrives in pieces (one per token, say).

    It emits text as soon as no stop string can start in it, holds back a tail that
    could be the beginning of one, and cuts the text before the first stop string to
    complete (which is not emitted): the text a generator that stops there has made,
    however it came in pieces. Call :meth:`flush` when generation ends otherwise.

    >>> matcher = StopMatcher(["END", "\\n\\n"])
    >>> [matcher.feed(piece).text for piece in ("Hello E", "N", "Dless", "more")]
    ['Hello ', '', '', '']
    >>> matcher.stopped
    True
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise InputError(f"stop strings: got {brief(stop)}, expected non-empty strings")
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""  # the tail that could begin a stop string

    def feed(self, piece: str) -> Emitted:
        """The text safe to emit after ``piece``, and whether a stop string was hit."""
        if self.stopped:
            return Emitted("", True)
        text = self._held + piece
        hits = [(i + len(s), i) for s in self.stop if (i := text.find(s)) >= 0]
        if hits:  # the stop string completed first; of those, the longest
            self.stopped, self._held = True, ""
            return Emitted(text[: min(hits)[1]], True)
        hold = max((_prefix_tail(text, s) for s in self.stop), default=0)
        self._held = text[len(text) - hold :]
        return Emitted(text[: len(text) - hold], False)

    def flush(self) -> str:
        """The text held back, for a generation that ended without a stop string."""
        held, self._held = self._held, ""
        return held


def _prefix_tail(text: str, stop: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``stop``."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
