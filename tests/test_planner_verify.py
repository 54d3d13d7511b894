"""The independent checker: it accepts planned plans and catches planted violations."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from edgemind.errors import PlanError
from edgemind.planner import CostTable, ExitCost, Plan, UnitCost, check_plan, make_plan, verify_plan
from edgemind.policy import Policy


@pytest.fixture
def costs() -> CostTable:
    layers = tuple(
        UnitCost(f"l{i}", "dense", (("kernel", 4000 + 1000 * i), ("bias", 100)), 2000, 500)
        for i in range(6)
    )
    return CostTable("toy", (1, 8), 2000, layers, (ExitCost(1, 2, None), ExitCost(2, 5, None)))


@pytest.fixture
def plan(costs: CostTable) -> Plan:
    made = make_plan(costs, Policy(arena_capacity_bytes=1 << 20, prefetch_depth=1))
    assert verify_plan(made, costs) == []
    check_plan(made, costs)
    return made


def with_buffer(plan: Plan, buffer_id: int, **changes: Any) -> Plan:
    buffers = list(plan.buffers)
    buffers[buffer_id] = dataclasses.replace(buffers[buffer_id], **changes)
    return dataclasses.replace(plan, buffers=tuple(buffers))


def with_step(plan: Plan, index: int, **changes: Any) -> Plan:
    steps = list(plan.steps)
    steps[index] = dataclasses.replace(steps[index], **changes)
    return dataclasses.replace(plan, steps=tuple(steps))


def assert_caught(plan: Plan, fragment: str, costs: CostTable | None = None) -> None:
    problems = verify_plan(plan, costs)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(PlanError, match="fails verification"):
        check_plan(plan, costs)


def ref(buffer_id: int | None) -> int:
    assert buffer_id is not None
    return buffer_id


def run_steps(plan: Plan) -> list[int]:
    return [s.index for s in plan.steps if s.action == "run"]


def test_overlapping_offsets_are_caught(plan: Plan) -> None:
    step = plan.steps[run_steps(plan)[2]]
    weights, output = plan.buffer(ref(step.weights)), plan.buffer(ref(step.output))
    assert weights.offset_bytes != output.offset_bytes
    assert_caught(with_buffer(plan, output.id, offset_bytes=weights.offset_bytes), "overlap")


def test_weights_freed_before_use_are_caught(plan: Plan) -> None:
    index = run_steps(plan)[3]
    weights = plan.buffer(ref(plan.steps[index].weights))
    early = with_buffer(plan, weights.id, last_step=index - 1)
    assert_caught(early, "reads weights buffer")


def test_weights_never_loaded_are_caught(plan: Plan) -> None:
    index = run_steps(plan)[3]
    weights = plan.steps[index].weights
    loader = next(s for s in plan.steps if weights in s.loads)
    unloaded = with_step(plan, loader.index, loads=tuple(b for b in loader.loads if b != weights))
    assert_caught(unloaded, "before any step loads it")


def test_a_step_over_capacity_is_caught(plan: Plan) -> None:
    tight = dataclasses.replace(plan, capacity_bytes=plan.peak_bytes - 64)
    assert_caught(tight, "exceeds the capacity")
    assert_caught(tight, "holds")


def test_misalignment_is_caught(plan: Plan) -> None:
    target = plan.buffer(ref(plan.steps[run_steps(plan)[1]].output))
    assert_caught(
        with_buffer(plan, target.id, offset_bytes=ref(target.offset_bytes) + 8), "aligned"
    )


def test_a_buffer_outside_the_arena_is_caught(plan: Plan) -> None:
    target = plan.buffer(ref(plan.steps[-1].output))
    assert_caught(with_buffer(plan, target.id, offset_bytes=plan.arena_bytes), "outside the")
    assert_caught(dataclasses.replace(plan, arena_bytes=plan.arena_bytes - 64), "outside the")


def test_recorded_bytes_must_match_the_buffers(plan: Plan) -> None:
    assert_caught(
        with_step(plan, 1, arena_live_bytes=plan.steps[1].arena_live_bytes - 64), "records"
    )
    assert_caught(dataclasses.replace(plan, peak_bytes=plan.peak_bytes - 1), "peak_bytes")
    assert_caught(dataclasses.replace(plan, lower_bound_bytes=1), "lower_bound_bytes")
    assert_caught(with_step(plan, 1, frees=()), "frees")


def test_activations_must_be_alive_where_used(plan: Plan) -> None:
    index = run_steps(plan)[2]
    step = plan.steps[index]
    assert_caught(with_buffer(plan, ref(step.input), last_step=index - 1), "input buffer")
    assert_caught(with_step(plan, index, input=step.output), "previous run wrote")


def test_costs_are_checked(plan: Plan, costs: CostTable) -> None:
    index = run_steps(plan)[4]
    weights = plan.buffer(ref(plan.steps[index].weights))
    small = with_buffer(plan, weights.id, tensors=weights.tensors[:1])
    assert_caught(small, "slot for l4.bias", costs)
    assert_caught(dataclasses.replace(plan, streamed_bytes=0), "streamed_bytes", costs)
    partial = make_plan(costs, Policy(arena_capacity_bytes=1 << 20))
    assert_caught(dataclasses.replace(partial, exit_level=1, status="early_exit"), "runs", costs)


def test_verdict_consistency(plan: Plan) -> None:
    assert_caught(dataclasses.replace(plan, exit_level=None), "exit_level")
    assert_caught(dataclasses.replace(plan, status="infeasible"), "witness")


def test_dangling_ids_are_reported_not_crashed(plan: Plan) -> None:
    assert_caught(with_step(plan, 0, loads=(len(plan.buffers) + 3,)), "does not exist")
    assert_caught(with_buffer(plan, 0, last_step=len(plan.steps)), "outside 0..")


def test_a_run_reading_another_units_weights_is_caught():
    import dataclasses as dc

    from edgemind.planner import CostTable, ExitCost, UnitCost, make_plan, verify_plan
    from edgemind.policy import Policy

    units = tuple(UnitCost(f"l{i}", "dense", (("w", 4096), ("b", 64)), 256, 256) for i in range(3))
    costs = CostTable("m", (1, 8), 256, units, (ExitCost(1, 2, None),))
    plan = make_plan(costs, Policy(arena_capacity_bytes=1 << 20, prefetch_depth=0))
    runs = [s for s in plan.steps if s.action == "run"]
    swapped = dc.replace(runs[2], weights=runs[1].weights)
    steps = tuple(swapped if s.index == swapped.index else s for s in plan.steps)
    problems = verify_plan(dc.replace(plan, steps=steps))
    assert any("holds the weights of l1" in p for p in problems), problems
