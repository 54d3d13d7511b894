"""Arena allocators: no overlaps, coalescing frees, and placements near the bound."""

from __future__ import annotations

import itertools
import random

import pytest

from edgemind.errors import MemoryQuotaExceeded
from edgemind.planner import (
    FirstFitArena,
    GreedyBySize,
    NaiveSlots,
    Request,
    SweepFirstFit,
    TwoSided,
    allocator,
)

STRATEGIES = (GreedyBySize(), TwoSided(), SweepFirstFit(), NaiveSlots())


def assert_disjoint(requests: list[Request], offsets: tuple[int, ...], extent: int) -> None:
    for (a, ra), (b, rb) in itertools.combinations(zip(offsets, requests, strict=True), 2):
        if ra.first_step <= rb.last_step and rb.first_step <= ra.last_step:
            assert a + ra.nbytes <= b or b + rb.nbytes <= a, (ra, rb, a, b)
    assert all(o >= 0 and o + r.nbytes <= extent for o, r in zip(offsets, requests, strict=True))


def live_bound(requests: list[Request]) -> int:
    steps = range(max(r.last_step for r in requests) + 1)
    return max(sum(r.nbytes for r in requests if r.first_step <= s <= r.last_step) for s in steps)


def test_first_fit_reuses_and_coalesces() -> None:
    arena = FirstFitArena(alignment_bytes=64)
    a, b, c = arena.alloc(64), arena.alloc(128), arena.alloc(64)
    assert (a, b, c) == (0, 64, 192)
    arena.free(a)
    arena.free(b)
    assert arena.alloc(192) == 0  # the two freed gaps merged
    arena.free(c)
    assert arena.top_bytes == 192 and arena.high_water_bytes == 256
    arena.free(0)
    assert arena.top_bytes == 0 and arena.used_bytes == 0


def test_first_fit_errors() -> None:
    arena = FirstFitArena(capacity_bytes=256, alignment_bytes=64)
    arena.alloc(200)
    with pytest.raises(MemoryQuotaExceeded) as info:
        arena.alloc(1)
    assert info.value.needed_bytes == 320 and info.value.capacity_bytes == 256
    with pytest.raises(ValueError, match="nothing is allocated"):
        arena.free(64)
    with pytest.raises(ValueError, match="positive"):
        arena.alloc(0)


@pytest.mark.parametrize("seed", range(25))
def test_strategies_never_overlap(seed: int) -> None:
    rng = random.Random(seed)
    requests = []
    for _ in range(rng.randint(1, 40)):
        first = rng.randint(0, 20)
        requests.append(
            Request(64 * rng.randint(0, 20), first, first + rng.randint(0, 4), rng.randint(0, 1))
        )
    for strategy in STRATEGIES:
        placement = strategy.place(requests)
        assert len(placement.offsets) == len(requests)
        assert_disjoint(requests, placement.offsets, placement.extent_bytes)
        if any(r.nbytes for r in requests):
            assert placement.extent_bytes >= live_bound(requests)


def test_two_sided_reaches_the_bound_on_a_neighbour_chain() -> None:
    rng = random.Random(3)
    requests = [Request(64 * rng.randint(1, 50), k, k + 1, k % 2) for k in range(200)]
    assert TwoSided().place(requests).extent_bytes == live_bound(requests)
    assert NaiveSlots().place(requests).extent_bytes == sum(r.nbytes for r in requests)


def test_greedy_stacks_whole_span_buffers_at_the_bottom() -> None:
    requests = [Request(64, 0, 1), Request(640, 0, 5), Request(128, 2, 5), Request(64, 0, 5)]
    placement = GreedyBySize().place(requests)
    assert placement.offsets[1] == 0 and placement.offsets[3] == 640
    assert placement.extent_bytes == 640 + 64 + 128
    assert GreedyBySize().place([]).extent_bytes == 0


@pytest.mark.parametrize("seed", range(12))
def test_the_numpy_columns_place_as_the_loops_do(seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    span = rng.choice((3, 40, 400))
    requests = []
    for _ in range(rng.randint(300, 900)):
        first = rng.randint(0, span)
        last = min(span, first + rng.choice((0, 1, 2, 3, span)))
        if rng.random() < 0.05:
            first, last = 0, span
        nbytes = rng.choice((0, 64, 128, 64 * rng.randint(1, 4), rng.randint(0, 9000)))
        requests.append(Request(nbytes, first, last, rng.randint(0, 1)))
    monkeypatch.setattr(allocator, "_ROUND_MIN", rng.choice((1, 96, 10**6)))
    monkeypatch.setattr(allocator, "_TAIL_LISTS", rng.choice((0, 512)))
    columns = [GreedyBySize().place(requests), TwoSided().place(requests)]
    monkeypatch.setattr(allocator, "VECTOR_MIN", 10**9)  # the plain loops
    assert columns == [GreedyBySize().place(requests), TwoSided().place(requests)]
    assert all(type(offset) is int for p in columns for offset in p.offsets)
