"""Tiles: a unit whose weights do not fit runs as row ranges of one tensor, in turn."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from edgemind.planner import CostTable, ExitCost, Plan, UnitCost, make_plan, verify_plan
from edgemind.planner.plan import Tiling
from edgemind.planner.schedule import MAX_TILES, tile_ladder
from edgemind.policy import Policy

ALIGN = 64


def dense(name: str, rows: int, cols: int, out: int, ws: int) -> UnitCost:
    """A tileable dense unit: w (rows, cols) float32 split by rows, b (cols,)."""
    w = rows * cols * 4
    return UnitCost(
        name, "dense", (("w", w), ("b", cols * 4)), out, ws, tiling=Tiling("w", rows, cols * 4)
    )


def chain(*units: UnitCost, input_bytes: int = 4096) -> CostTable:
    return CostTable("tiled", (1, 1024), input_bytes, units, (ExitCost(1, len(units) - 1, None),))


def plan_ok(costs: CostTable, **policy) -> Plan:
    plan = make_plan(costs, Policy(**{"tiling": "auto", **policy}))
    assert verify_plan(plan, costs) == [], verify_plan(plan, costs)[:3]
    return plan


def test_a_unit_twice_the_arena_runs_complete_in_tiles():
    big = dense("big", 2048, 1024, 4096, 8192)  # 8 MiB of weights
    costs = chain(dense("a", 1024, 1024, 4096, 8192), big, dense("c", 1024, 256, 1024, 4096))
    plan = plan_ok(costs, arena_capacity_bytes=4 << 20)
    assert plan.status == "feasible" and plan.complete
    tiles = [s for s in plan.steps if s.action == "run" and s.layer == "big"]
    assert len(tiles) > 2 and tiles[0].tile == (0, tiles[0].tile[1])
    assert all(a.tile[1] == b.tile[0] for a, b in itertools.pairwise(tiles))
    assert tiles[-1].tile[1] == 2048
    assert {plan.buffers[s.output].role for s in tiles} == {"accumulator"}
    assert len({s.output for s in tiles}) == 1 and len({s.input for s in tiles}) == 1
    assert plan.streamed_bytes == sum(u.weight_bytes for u in costs.layers)  # same bytes
    assert any(note.startswith("tiled: ") and "big in" in note for note in plan.notes)
    # with room for two tiles, prefetch runs across tile boundaries
    roomier = plan_ok(costs, arena_capacity_bytes=6 << 20)
    tiles = [s for s in roomier.steps if s.action == "run" and s.layer == "big"]
    assert roomier.prefetch_depth == 1 and tiles[0].tile is not None
    assert {roomier.buffers[s.weights].role for s in tiles} == {"prefetch"}


def test_whole_units_are_kept_when_they_fit():
    costs = chain(dense("a", 1024, 1024, 4096, 8192), dense("b", 1024, 1024, 4096, 8192))
    plan = plan_ok(costs, arena_capacity_bytes=64 << 20)
    assert all(s.tile is None for s in plan.steps)
    assert plan.min_capacity_bytes is not None and plan.min_capacity_bytes < 64 << 20


def test_tiling_is_opt_in():
    assert Policy().tiling == "off"


def test_tiling_off_exits_early_or_rejects_instead():
    costs = chain(dense("a", 1024, 1024, 4096, 8192), dense("big", 2048, 1024, 4096, 8192))
    tiled = plan_ok(costs, arena_capacity_bytes=4 << 20)
    off = plan_ok(costs, arena_capacity_bytes=4 << 20, tiling="off")
    assert tiled.complete and off.status == "infeasible"
    assert off.min_capacity_bytes > tiled.min_capacity_bytes


def test_the_ladder_goes_from_coarse_to_at_most_max_tiles():
    units = [dense("big", 10_000, 16, 64, 0)]
    ladder = tile_ladder(units)
    counts = [len(tiles[0]) for tiles in ladder]
    assert counts == sorted(counts) and counts[0] == 2 and counts[-1] <= MAX_TILES
    for tiles in ladder:
        ranges = tiles[0]
        assert ranges[0][0] == 0 and ranges[-1][1] == 10_000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def random_tileable(seed: int) -> CostTable:
    rng = random.Random(seed)
    units = []
    for i in range(rng.randint(1, 7)):
        rows, cols = rng.randint(1, 600), rng.choice((1, 16, 100, 256))
        out, ws = rng.randint(1, 20_000), rng.randint(0, 30_000)
        if rng.random() < 0.6:
            units.append(dense(f"d{i}", rows, cols, out, ws))
        else:
            units.append(UnitCost(f"u{i}", "other", (("t", rng.randint(1, 90_000)),), out, ws))
    return chain(*units, input_bytes=rng.randint(1, 9_000))


@pytest.mark.parametrize("seed", range(25))
def test_min_capacity_is_exact_with_tiles(seed: int):
    costs = random_tileable(seed)
    depth = seed % 3
    need = plan_ok(costs, arena_capacity_bytes=1 << 40, prefetch_depth=depth).min_capacity_bytes
    assert need is not None
    at = plan_ok(costs, arena_capacity_bytes=need, prefetch_depth=depth)
    assert at.complete, (need, at.notes)
    below = plan_ok(
        costs,
        arena_capacity_bytes=need - ALIGN,
        prefetch_depth=depth,
        on_memory_quota_exceeded="reject_request",
    )
    assert below.status == "infeasible" and below.min_capacity_bytes == need
    assert below.witness is not None and below.witness.missing_bytes == ALIGN


@pytest.mark.parametrize("seed", range(15))
def test_random_tiled_plans_verify_at_random_capacities(seed: int):
    costs = random_tileable(100 + seed)
    rng = random.Random(seed)
    need = plan_ok(costs, arena_capacity_bytes=1 << 40).min_capacity_bytes
    for _ in range(4):
        capacity = rng.randint(max(1, need // 2), need * 3)
        for depth in (0, 1, 2):
            plan_ok(costs, arena_capacity_bytes=capacity, prefetch_depth=depth)


def tiled_plan() -> tuple[Plan, CostTable]:
    costs = chain(dense("a", 512, 512, 2048, 0), dense("big", 2048, 1024, 4096, 8192))
    return plan_ok(costs, arena_capacity_bytes=3 << 20), costs


def replace_slot(plan: Plan, step_index: int, **changes) -> Plan:
    step = plan.steps[step_index]
    buf = plan.buffers[step.weights]
    slots = list(buf.tensors)
    slots[0] = dataclasses.replace(slots[0], **changes)
    buffers = list(plan.buffers)
    buffers[buf.id] = dataclasses.replace(buf, tensors=tuple(slots))
    return dataclasses.replace(plan, buffers=tuple(buffers))


def test_the_checker_catches_tiles_that_skip_or_repeat_rows():
    plan, costs = tiled_plan()
    tiles = [s.index for s in plan.steps if s.action == "run" and s.tile is not None]
    assert len(tiles) >= 2
    second = plan.steps[tiles[1]]
    gap = replace_slot(plan, second.index, source_offset_bytes=second.tile[0] * 4096 + 4096)
    assert any("expected" in p and "cover it once" in p for p in verify_plan(gap, costs))
    again = replace_slot(plan, second.index, source_offset_bytes=0)
    assert any("cover it once" in p for p in verify_plan(again, costs))
    steps = list(plan.steps)
    steps[tiles[0]] = dataclasses.replace(steps[tiles[0]], tile=(1, steps[tiles[0]].tile[1]))
    late = dataclasses.replace(plan, steps=tuple(steps))
    assert any("not 0" in p for p in verify_plan(late, costs))
    steps = list(plan.steps)
    steps[tiles[1]] = dataclasses.replace(steps[tiles[1]], output=steps[tiles[0]].input)
    wrong = dataclasses.replace(plan, steps=tuple(steps))
    assert verify_plan(wrong, costs)
