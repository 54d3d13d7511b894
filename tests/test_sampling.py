"""Sampling: greedy, penalty, truncation and draws against plain references; stop strings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemind.errors import InputError
from edgemind.sampling import (
    FINISH_REASONS,
    Emitted,
    Sampler,
    SamplingParams,
    StopMatcher,
    finish_reason,
    penalize,
    token_distribution,
)


def random_logits(seed: int, shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def reference_distribution(
    logits: np.ndarray, context: list[int], params: SamplingParams
) -> dict[int, float]:
    """The truncated, renormalised distribution, written plainly: lists, sorted, math."""
    values = [float(v) for v in logits]
    for i in set(context):
        p = params.repetition_penalty
        values[i] = values[i] / p if values[i] > 0 else values[i] * p
    if params.temperature == 0:
        best = max(range(len(values)), key=lambda i: (values[i], -i))
        return {best: 1.0}
    values = [v / params.temperature for v in values]
    kept = list(range(len(values)))
    if params.top_k:
        kth = sorted(values, reverse=True)[min(params.top_k, len(values)) - 1]
        kept = [i for i in kept if values[i] >= kth]  # ties at the boundary stay

    def probs(ids: list[int]) -> dict[int, float]:
        top = max(values[i] for i in ids)
        weights = {i: math.exp(values[i] - top) for i in ids}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    if params.top_p < 1:
        p = probs(kept)
        before, boundary = 0.0, None
        for i in sorted(kept, key=lambda i: -values[i]):
            if before >= params.top_p:
                break
            before, boundary = before + p[i], values[i]
        kept = [i for i in kept if values[i] >= boundary]
    if params.min_p:
        p = probs(kept)
        kept = [i for i in kept if p[i] >= params.min_p * max(p.values())]
    return probs(kept)


def log_softmax64(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - row.max() - np.log(np.exp(row - row.max()).sum())


# --------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = random_logits(0, (4, 1000))
    logits[3, [7, 500]] = 50.0  # a tie
    choice = Sampler(SamplingParams(temperature=0)).choose(logits, [[]] * 4)
    assert choice.token_ids == tuple(int(i) for i in logits.argmax(axis=1))
    assert choice.token_ids[3] == 7


def test_greedy_sees_the_repetition_penalty():
    logits = np.float32([[2.0, 1.9, -1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert Sampler(params).choose(logits, [[0]]).token_ids == (1,)
    assert Sampler(params).choose(logits, [[2]]).token_ids == (0,)


def test_repetition_penalty_against_a_direct_computation():
    logits = random_logits(1, (300,))
    context = [3, 3, 17, 299, 0, 150, 17]
    want = [float(v) for v in logits]
    for i in set(context):
        want[i] = want[i] / 1.3 if want[i] > 0 else want[i] * 1.3
    got = penalize(logits, context, 1.3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got is not logits and not np.array_equal(got, logits)
    np.testing.assert_array_equal(penalize(logits, context, 1.0), logits)
    np.testing.assert_array_equal(penalize(logits, [], 1.3), logits)


# ----------------------------------------------------------------------- truncation

TRUNCATIONS = [
    {"top_k": 1},
    {"top_k": 5},
    {"top_k": 40, "temperature": 0.5},
    {"top_p": 0.5},
    {"top_p": 0.9, "temperature": 1.7},
    {"top_p": 0.95, "top_k": 20},
    {"min_p": 0.05},
    {"min_p": 0.3, "temperature": 2.0},
    {"top_k": 50, "top_p": 0.8, "min_p": 0.02, "repetition_penalty": 1.2},
    {"temperature": 0.7},
    {"temperature": 0, "repetition_penalty": 2.0},
]


@pytest.mark.parametrize("options", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("seed", range(6))
def test_kept_support_and_probabilities_match_a_plain_reference(options, seed):
    logits = random_logits(seed, (257,), scale=2.0)
    context = [int(i) for i in np.random.default_rng(seed).integers(0, 257, 30)]
    params = SamplingParams(**options)
    want = reference_distribution(logits, context, params)
    ids, probs = token_distribution(logits, context, params)
    assert ids.tolist() == sorted(want)
    np.testing.assert_allclose(probs, [want[i] for i in sorted(want)], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("logits", "options", "kept"),
    [
        ([1.0, 3.0, 3.0, 0.0, 3.0], {"top_k": 2}, [1, 2, 4]),  # ties at the boundary stay
        ([0.0, 0.0, 0.0, 0.0], {"top_p": 0.3}, [0, 1, 2, 3]),
        ([5.0, 0.0, 0.0, -5.0], {"top_p": 0.9}, [0]),
        ([2.0, 1.0, 0.0], {"top_p": 0.99}, [0, 1, 2]),
        ([0.0, -math.inf, -1.0], {}, [0, 2]),  # a masked token is never drawn
        ([0.0, math.log(0.5), math.log(0.09)], {"min_p": 0.1}, [0, 1]),
    ],
)
def test_hand_made_supports(logits, options, kept):
    ids, probs = token_distribution(np.float32(logits), [], SamplingParams(**options))
    assert ids.tolist() == kept and math.isclose(probs.sum(), 1.0)


def test_sampled_frequencies_match_the_truncated_distribution():
    logits = np.float32([1.0, 0.5, 0.0, -1.0, 2.0])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=7)
    want = reference_distribution(logits, [], params)
    assert sorted(want) == [0, 1, 4]  # the test means something: two tokens cut
    n = 20_000
    choice = Sampler(params).choose(np.tile(logits, (n, 1)), [[]] * n)
    counts = np.bincount(choice.token_ids, minlength=5)
    for token in range(5):
        p = want.get(token, 0.0)
        assert abs(counts[token] / n - p) <= 4 * math.sqrt(p * (1 - p) / n), (token, counts)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = random_logits(3, (64, 2000), scale=0.5)  # flat: every draw is a real choice

    def tokens(seed: int) -> tuple[int, ...]:
        return Sampler(SamplingParams(seed=seed, top_p=0.95)).choose(logits, [[]] * 64).token_ids

    assert tokens(11) == tokens(11)
    assert tokens(11) != tokens(12)


def test_rows_draw_in_order_one_number_each():
    logits = random_logits(4, (3, 500))
    params = SamplingParams(seed=5, top_k=100)
    batch = Sampler(params).choose(logits, [[], [1], [2]])
    one_by_one = Sampler(params)
    rows = [one_by_one.choose(logits[i : i + 1], [ctx]) for i, ctx in enumerate([[], [1], [2]])]
    assert batch.token_ids == tuple(c.token_ids[0] for c in rows)


def test_a_tiny_temperature_is_near_greedy_not_nan():
    logits = np.float32([[0.0, 1.0, 0.999, -3.0]])
    for temperature in (1e-30, 1e-45, 5e-324):
        params = SamplingParams(temperature=temperature, seed=0)
        assert token_distribution(logits[0], [], params)[0].tolist() == [1]
        assert Sampler(params).choose(logits, [[]]).token_ids == (1,)


def test_an_extreme_penalty_stays_finite():
    logits = np.float32([[3.0, -3.0, 1.0]])
    for penalty, want in ((1e-300, 0), (1e300, 2)):  # boosts token 0, or sinks 0 and 1
        params = SamplingParams(repetition_penalty=penalty, seed=0)
        assert Sampler(params).choose(logits, [[0, 1]]).token_ids == (want,)


def test_a_full_vocabulary_draw_lands_in_the_kept_set():
    logits = random_logits(8, (2, 262_144))
    params = SamplingParams(top_p=0.9, seed=1)
    choice = Sampler(params).choose(logits, [[], [5, 6]])
    for row, context in enumerate([[], [5, 6]]):
        ids, _ = token_distribution(logits[row], context, params)
        assert 0 < len(ids) < 262_144 and choice.token_ids[row] in set(ids.tolist())


# ------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize(
    "options", [{"temperature": 0}, {"temperature": 1.5, "top_k": 3, "repetition_penalty": 1.4}]
)
def test_logprobs_are_the_raw_log_softmax(options):
    logits = random_logits(5, (3, 5000), scale=5.0)
    logits[2, [10, 20, 30]] = 40.0  # ties among the top: lowest id first
    params = SamplingParams(top_logprobs=5, seed=0, **options)
    context = [[1, 2, 3], list(range(100)), [10]]
    choice = Sampler(params).choose(logits, context)
    for row in range(3):
        reference = log_softmax64(logits[row])
        token = choice.token_ids[row]
        assert math.isclose(choice.logprobs[row], reference[token], abs_tol=1e-5)
        order = sorted(range(5000), key=lambda i: (-reference[i], i))[:5]
        assert [i for i, _ in choice.top_logprobs[row]] == order
        np.testing.assert_allclose(
            [lp for _, lp in choice.top_logprobs[row]], reference[order], atol=1e-5
        )
    assert [i for i, _ in choice.top_logprobs[2][:3]] == [10, 20, 30]


def test_no_top_logprobs_by_default():
    choice = Sampler(SamplingParams(seed=0)).choose(random_logits(6, (2, 10)), [[], []])
    assert choice.top_logprobs == ((), ())


# ------------------------------------------------------------------ invalid inputs

INVALID = [
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("seed", -1),
    ("seed", 1.5),
    ("max_tokens", 0),
    ("max_tokens", None),
    ("stop_token_ids", (1, -2)),
    ("stop_token_ids", 3),
    ("stop", ("ok", "")),
    ("stop", (None,)),
    ("top_logprobs", 21),
    ("top_logprobs", -1),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=str)
def test_invalid_parameter_names_the_field(field, value):
    with pytest.raises(InputError, match=f"^sampling {field}: got ") as caught:
        SamplingParams(**{field: value})
    assert "\n" not in str(caught.value) and "expected" in str(caught.value)


def test_parameters_are_normalised_to_plain_immutable_values():
    params = SamplingParams(
        temperature=np.float32(0.5), top_k=np.int64(3), stop="END", stop_token_ids=[1, 2]
    )
    assert params.stop == ("END",) and params.stop_token_ids == (1, 2)
    assert type(params.temperature) is float and type(params.top_k) is int
    assert SamplingParams(top_p=1.0, min_p=0.0, top_logprobs=20, temperature=0).top_p == 1.0


@pytest.mark.parametrize(
    ("logits", "context", "message"),
    [
        (np.zeros(5, np.float32), [[]], "logits: expected a float array"),
        (np.zeros((1, 5), np.int32), [[]], "logits: expected a float array"),
        (np.zeros((2, 5), np.float32), [[]], "context_ids: 1 rows for 2"),
        (np.float32([[0, np.nan]]), [[]], "logits row 0: the maximum is nan"),
        (np.float32([[-np.inf, -np.inf]]), [[]], "logits row 0: the maximum is -inf"),
        (np.zeros((1, 5), np.float32), [[5]], "token id 5 is outside the vocabulary 0..4"),
        (np.zeros((1, 5), np.float32), [[-1]], "token id -1 is outside"),
    ],
)
def test_bad_logits_or_context(logits, context, message):
    with pytest.raises(InputError, match=message):
        Sampler(SamplingParams()).choose(logits, context)


# ---------------------------------------------------------------- finish and stops


def test_finish_reasons():
    params = SamplingParams(max_tokens=3, stop_token_ids=(2,))
    assert FINISH_REASONS == ("stop", "length", "memory")
    assert finish_reason(params, 5, 1) is None
    assert finish_reason(params, 2, 1) == "stop"
    assert finish_reason(params, 5, 1, stop_string_hit=True) == "stop"
    assert finish_reason(params, 2, 3) == "stop"  # a stop wins over the length
    assert finish_reason(params, 5, 3, context_full=True) == "length"
    assert finish_reason(params, 5, 2, context_full=True) == "memory"


def test_stop_matcher_holds_back_a_possible_start_and_flushes_it():
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("Hi <") == Emitted("Hi ", False)
    assert matcher.feed("/") == Emitted("", False)
    assert matcher.feed("b>") == Emitted("</b>", False)
    assert matcher.feed("ok </") == Emitted("ok ", False)
    assert matcher.flush() == "</" and matcher.flush() == ""
    assert StopMatcher([]).feed("anything") == Emitted("anything", False)
    # "b" completes before "abc" (which starts earlier): generation stops after "ab".
    assert StopMatcher(["abc", "b"]).feed("xabc") == Emitted("xa", True)
    with pytest.raises(InputError, match="stop strings"):
        StopMatcher(["", "x"])


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(
    text=st.text(alphabet="ab\nc", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_stop_matcher_streams_the_text_cut_before_the_first_stop(text, stops, cuts):
    """Any split of ``text`` emits the same text: all of it up to the first stop."""
    # The first stop string to complete (a generator stops there), of those the longest.
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    want = text[: min(found)[1]] if found else text
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopMatcher(stops)
    emitted, stopped = "", False
    for start, end in itertools.pairwise(bounds):
        out = matcher.feed(text[start:end])
        assert not stopped or out == Emitted("", True)  # nothing after a stop
        emitted, stopped = emitted + out.text, out.stopped
        assert want.startswith(emitted)
        assert len(text[:end]) - len(emitted) < max(map(len, stops), default=1) or stopped
    if not stopped:
        emitted += matcher.flush()
    assert (emitted, stopped) == (want, bool(found))
