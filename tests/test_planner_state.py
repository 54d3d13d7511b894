"""State in the plan: a unit's bytes kept across steps and requests (a KV cache), packed
first from offset 0, alive at every step, at the same offsets in every plan."""

from __future__ import annotations

import dataclasses
import random

import pytest

from edgemind.planner import CostTable, ExitCost, Plan, UnitCost, make_plan, verify_plan
from edgemind.policy import Policy


def chain(states: list[int], seed: int = 0) -> CostTable:
    rng = random.Random(seed)
    units = tuple(
        UnitCost(
            f"u{i}",
            "block",
            (("w", rng.randint(1_000, 90_000)),),
            rng.randint(100, 20_000),
            rng.randint(0, 10_000),
            state_bytes=state,
        )
        for i, state in enumerate(states)
    )
    exits = (ExitCost(1, len(units) // 2, None), ExitCost(2, len(units) - 1, None))
    return CostTable("stateful", (1, 8), 4_096, units, exits)


def plan_ok(costs: CostTable, **policy) -> Plan:
    plan = make_plan(costs, Policy(**policy))
    assert verify_plan(plan, costs) == [], verify_plan(plan, costs)[:3]
    return plan


def state_offsets(plan: Plan) -> dict[str, tuple[int | None, int]]:
    return {b.layer: (b.offset_bytes, b.nbytes) for b in plan.buffers if b.role == "state"}


def test_state_is_packed_first_and_counted_at_every_step():
    costs = chain([10_000, 0, 30_000, 5_000])
    plan = plan_ok(costs, arena_capacity_bytes=1 << 30)
    state = [b for b in plan.buffers if b.role == "state"]
    assert [b.layer for b in state] == ["u0", "u2", "u3"]
    assert [b.offset_bytes for b in state] == [0, 10_048, 40_064]  # 64-byte aligned sizes
    total = sum(b.nbytes for b in state)
    assert all(step.arena_live_bytes >= total for step in plan.steps)
    assert plan.arena_bytes >= total and plan.peak_bytes >= total + 0


@pytest.mark.parametrize("seed", range(10))
def test_state_offsets_do_not_move_across_shapes_depths_and_exits(seed: int):
    rng = random.Random(seed)
    costs = chain([rng.choice((0, 4_096, 65_536)) for _ in range(6)], seed)
    plans = [
        plan_ok(costs, arena_capacity_bytes=1 << 30, prefetch_depth=d, keep_resident_layers=k)
        for d in (0, 1, 2)
        for k in (1, "auto")
    ]
    need = plans[0].min_capacity_bytes
    plans.append(plan_ok(costs, arena_capacity_bytes=need - 64))  # an early exit or reject
    layouts = {tuple(sorted(state_offsets(p).items())) for p in plans}
    assert len(layouts) == 1  # a session's state never moves when its plan changes


def test_min_capacity_is_exact_with_state():
    costs = chain([50_000, 0, 20_000])
    need = plan_ok(costs, arena_capacity_bytes=1 << 30).min_capacity_bytes
    assert plan_ok(costs, arena_capacity_bytes=need).complete
    below = plan_ok(
        costs, arena_capacity_bytes=need - 64, on_memory_quota_exceeded="reject_request"
    )
    assert below.status == "infeasible"


def test_the_checker_catches_state_that_moves_or_is_overlaid():
    costs = chain([8_192, 8_192, 0])
    plan = plan_ok(costs, arena_capacity_bytes=1 << 30)
    state = [b for b in plan.buffers if b.role == "state"]

    def with_buffer(buffer_id: int, **changes) -> Plan:
        buffers = list(plan.buffers)
        buffers[buffer_id] = dataclasses.replace(buffers[buffer_id], **changes)
        return dataclasses.replace(plan, buffers=tuple(buffers))

    moved = with_buffer(state[1].id, offset_bytes=state[1].offset_bytes + 64)
    assert any("expected 8192 (packed from 0)" in p for p in verify_plan(moved))
    short = with_buffer(state[0].id, last_step=0)
    assert any("lives 0..0" in p for p in verify_plan(short))
    other = next(b for b in plan.buffers if b.role == "activation")
    overlaid = with_buffer(other.id, offset_bytes=0)
    assert any("lies in the state region" in p for p in verify_plan(overlaid))


def test_the_plan_text_and_picture_show_state(tmp_path):
    from edgemind.cli_text import format_plan
    from edgemind.viz import save_timeline

    plan = plan_ok(chain([10_000, 0, 30_000]), arena_capacity_bytes=1 << 30)
    text = format_plan(plan, buffers=True)
    assert "kept across requests at offsets 0..40064 (2 units: u0, u2)" in text
    assert text.count(" state ") >= 2  # the buffer table lists each state buffer
    pytest.importorskip("matplotlib")
    save_timeline(plan, tmp_path / "state.png")
    assert (tmp_path / "state.png").stat().st_size > 1000
