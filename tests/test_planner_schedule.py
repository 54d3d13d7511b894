"""The planner: every plan it makes verifies, and its verdicts follow the policy."""

from __future__ import annotations

import dataclasses
import random

import pytest

from edgemind.errors import PlanError
from edgemind.planner import CostTable, ExitCost, Plan, UnitCost, allocator, make_plan, verify_plan
from edgemind.policy import Policy

ALIGN = 64
SHAPES = ("balanced", "weight_heavy", "activation_heavy", "zero_weights")


def random_costs(seed: int, n_layers: int, shape: str = "balanced", ws_scale: float = 1.0):
    """A seeded random chain: exits every few layers, heads with and without weights."""
    rng = random.Random(seed)
    w_hi, a_hi = {"weight_heavy": (400_000, 5_000), "activation_heavy": (5_000, 400_000)}.get(
        shape, (100_000, 50_000)
    )

    def unit(name: str, kind: str) -> UnitCost:
        tensors = tuple((f"t{j}", rng.randint(1, w_hi)) for j in range(rng.randint(0, 3)))
        if shape == "zero_weights" and rng.random() < 0.5:
            tensors = ()
        out = rng.randint(0, a_hi) if rng.random() < 0.9 else 0
        return UnitCost(name, kind, tensors, out, int(rng.randint(0, a_hi // 4) * ws_scale))

    layers = tuple(unit(f"layer{i}", "dense") for i in range(n_layers))
    exits: list[ExitCost] = []
    for index in sorted(rng.sample(range(n_layers - 1), min(3, n_layers - 1))):
        head = unit(f"head{index}", "head") if rng.random() < 0.7 else None
        exits.append(ExitCost(len(exits) + 1, index, head))
    final = unit("final_head", "head") if rng.random() < 0.5 else None
    exits.append(ExitCost(len(exits) + 1, n_layers - 1, final))
    context = rng.choice((0, 0, rng.randint(1, 10_000)))
    return CostTable(f"random{seed}", (1, 8), rng.randint(1, a_hi), layers, tuple(exits), context)


def plan_ok(costs: CostTable, **policy) -> Plan:
    plan = make_plan(costs, Policy(**policy))
    assert verify_plan(plan, costs) == []
    return plan


def toy_costs() -> CostTable:
    layers = tuple(
        UnitCost(f"dense{i}", "dense", (("kernel", 256 * 256 * 4), ("bias", 256 * 4)), 4096, 8192)
        for i in range(10)
    )
    return CostTable("toy", (4, 256), 4096, layers, (ExitCost(1, 4, None), ExitCost(2, 9, None)))


@pytest.mark.parametrize("seed", range(20))
def test_random_models_verify_under_many_policies(seed: int) -> None:
    rng = random.Random(seed)
    costs = random_costs(seed, rng.choice((1, 2, 3, 7, 20, 60, 200)), SHAPES[seed % 4])
    for depth in (0, 1, 3):
        need = plan_ok(costs, arena_capacity_bytes=1 << 40, prefetch_depth=depth)
        assert need.min_capacity_bytes is not None
        capacities = (need.min_capacity_bytes, need.min_capacity_bytes - ALIGN, 1000)
        for i, capacity in enumerate((*capacities, need.min_capacity_bytes // 2)):
            plan = plan_ok(
                costs,
                arena_capacity_bytes=max(capacity, 1),
                prefetch_depth=depth,
                keep_resident_layers=(1, 3, "auto")[(i + seed) % 3],
                on_memory_quota_exceeded=("early_exit", "reject_request")[i % 2],
            )
            assert plan.min_capacity_bytes == need.min_capacity_bytes


@pytest.mark.parametrize("seed", range(30))
def test_min_capacity_is_exact(seed: int) -> None:
    costs = random_costs(seed, 1 + seed * 3, SHAPES[seed % 4])
    depth = seed % 3
    need = plan_ok(costs, arena_capacity_bytes=1 << 40, prefetch_depth=depth).min_capacity_bytes
    assert need is not None
    at = plan_ok(costs, arena_capacity_bytes=need, prefetch_depth=depth)
    assert at.status == "feasible" and at.witness is None
    if need > ALIGN:
        below = plan_ok(
            costs,
            arena_capacity_bytes=need - ALIGN,
            prefetch_depth=depth,
            on_memory_quota_exceeded="reject_request",
        )
        assert below.status == "infeasible" and below.exit_level is None
        assert below.min_capacity_bytes == need
        assert below.witness is not None and below.witness.missing_bytes == ALIGN
        assert below.witness.buffers and below.witness.step < len(below.steps)


def test_steps_follow_the_prefetch_depth() -> None:
    costs = toy_costs()
    zero = plan_ok(costs, arena_capacity_bytes=1 << 30, prefetch_depth=0)
    assert [s.action for s in zero.steps] == ["load", "run"] * 10
    assert {b.role for b in zero.buffers} == {"weights", "activation", "working_set"}
    two = plan_ok(costs, arena_capacity_bytes=1 << 30, prefetch_depth=2)
    assert [s.action for s in two.steps] == ["load"] + ["run"] * 10
    assert [len(s.loads) for s in two.steps[:4]] == [1, 2, 1, 1]
    assert two.steps[-1].loads == ()
    prefetched = [b for b in two.buffers if b.role == "prefetch"]
    assert len(prefetched) == 9 and all(b.last_step - b.first_step == 2 for b in prefetched[1:])
    assert two.streamed_bytes == two.unpinned_streamed_bytes == 10 * (256 * 256 * 4 + 1024)


def test_toy_and_random_chains_are_near_the_lower_bound() -> None:
    plan = plan_ok(toy_costs(), arena_capacity_bytes=1 << 30)
    assert plan.peak_bytes <= 1.05 * plan.lower_bound_bytes
    assert plan.naive_bytes > 3 * plan.peak_bytes
    for seed in range(20):
        costs = random_costs(seed, 150, "balanced", ws_scale=0.2)
        for depth in (0, 1):
            plan = plan_ok(costs, arena_capacity_bytes=1 << 40, prefetch_depth=depth)
            assert plan.peak_bytes <= 1.05 * plan.lower_bound_bytes, (seed, depth)


def test_prefetch_is_reduced_before_anything_else() -> None:
    costs = toy_costs()
    peaks = [
        plan_ok(costs, arena_capacity_bytes=1 << 30, prefetch_depth=d).peak_bytes for d in range(3)
    ]
    assert peaks[0] < peaks[1] < peaks[2]
    plan = plan_ok(costs, arena_capacity_bytes=peaks[0], prefetch_depth=2)
    assert plan.status == "feasible" and plan.prefetch_depth == 0
    assert any(note.startswith("prefetch reduced from 2 to 0") for note in plan.notes)
    plan = plan_ok(costs, arena_capacity_bytes=peaks[1], prefetch_depth=2)
    assert plan.prefetch_depth == 1 and plan.min_capacity_bytes == peaks[0]


def test_early_exit_picks_the_deepest_level_that_fits() -> None:
    small = UnitCost("small", "dense", (("w", 10_000),), 1000, 0)
    big = UnitCost("big", "dense", (("w", 1_000_000),), 1000, 0)
    heavy_head = UnitCost("heavy_head", "head", (("w", 940_000),), 100, 0)
    layers = (small, dataclasses.replace(small, name="small2"), big)
    exits = (
        ExitCost(1, 0, None),
        ExitCost(2, 1, heavy_head),
        ExitCost(3, 2, None),
    )
    costs = CostTable("exits", (1,), 1000, layers, exits)
    plan = plan_ok(costs, arena_capacity_bytes=930_000)
    assert plan.status == "early_exit" and plan.exit_level == 1
    assert plan.units == ("small",) and plan.witness is not None
    plan = plan_ok(costs, arena_capacity_bytes=1_000_000, prefetch_depth=1)
    assert plan.status == "early_exit" and plan.exit_level == 2
    assert plan.units == ("small", "small2", "heavy_head")
    rejected = plan_ok(
        costs, arena_capacity_bytes=1_000_000, on_memory_quota_exceeded="reject_request"
    )
    assert rejected.status == "infeasible" and rejected.units == ("small", "small2", "big")
    assert rejected.prefetch_depth == 0 and rejected.witness is not None
    assert rejected.witness.layer == "big"
    nothing = plan_ok(costs, arena_capacity_bytes=1000)
    assert nothing.status == "infeasible" and nothing.exit_level is None


@pytest.mark.parametrize("seed", range(12))
def test_auto_pins_never_hurt_and_save_reading(seed: int) -> None:
    costs = random_costs(seed, 40, SHAPES[seed % 4])
    need = plan_ok(costs, arena_capacity_bytes=1 << 40).min_capacity_bytes
    assert need is not None
    for capacity in (need // 2, need, need + need // 3, need * 3, 1 << 40):
        base = plan_ok(costs, arena_capacity_bytes=capacity)
        auto = plan_ok(costs, arena_capacity_bytes=capacity, keep_resident_layers="auto")
        assert (auto.status, auto.exit_level, auto.prefetch_depth) == (
            base.status,
            base.exit_level,
            base.prefetch_depth,
        )
        assert auto.streamed_bytes <= base.streamed_bytes == base.unpinned_streamed_bytes
        if capacity == 1 << 40:
            assert auto.streamed_bytes == 0 and auto.peak_bytes <= capacity
        if auto.pinned_layers:
            assert auto.streamed_bytes < base.streamed_bytes
            assert any(n.startswith("keep_resident_layers=auto: ") for n in auto.notes)


def test_keep_resident_n_pins_at_most_n_minus_one_largest_first() -> None:
    sizes = (1000, 9000, 5000, 7000, 3000)
    layers = tuple(UnitCost(f"l{i}", "dense", (("w", n),), 640, 128) for i, n in enumerate(sizes))
    costs = CostTable("pins", (1,), 640, layers, (ExitCost(1, 4, None),))
    plan = plan_ok(costs, arena_capacity_bytes=1 << 30, keep_resident_layers=3)
    assert plan.pinned_layers == ("l1", "l3")
    assert plan.streamed_bytes == sum(sizes) - 16000
    pinned = [b for b in plan.buffers if b.role == "pinned"]
    assert all(b.first_step == 0 and b.last_step == len(plan.steps) - 1 for b in pinned)
    assert all(b.id not in s.loads for b in pinned for s in plan.steps)
    assert "up to 3 layers resident at once (2 pinned + the running one)" in " ".join(plan.notes)
    assert "pinned 2 of 5 units" in " ".join(plan.notes)


def test_zero_weight_units_get_no_load() -> None:
    layers = (
        UnitCost("relu", "act", (), 640, 0),
        UnitCost("dense", "dense", (("w", 6400),), 640, 0),
        UnitCost("norm", "act", (("scale", 0),), 640, 0),
    )
    costs = CostTable("z", (1,), 640, layers, (ExitCost(1, 2, None),), context_bytes=100)
    plan = plan_ok(costs, arena_capacity_bytes=1 << 20, prefetch_depth=0)
    assert [(s.action, s.layer) for s in plan.steps] == [
        ("run", "relu"),
        ("load", "dense"),
        ("run", "dense"),
        ("run", "norm"),
    ]
    context = [b for b in plan.buffers if b.layer == "context"]
    assert len(context) == 1 and context[0].nbytes == 2 * ALIGN
    one = plan_ok(costs, arena_capacity_bytes=1 << 20, prefetch_depth=1)
    assert one.steps[0].action == "run" and one.steps[0].loads


def test_plans_are_deterministic() -> None:
    costs = random_costs(7, 50)
    policy = Policy(arena_capacity_bytes=400_000, keep_resident_layers="auto")
    assert make_plan(costs, policy) == make_plan(costs, policy)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input_bytes": -1}, "input_bytes"),
        ({"layers": ()}, "no layers"),
        ({"exits": ()}, "no exits"),
        ({"exits": (ExitCost(1, 1, None), ExitCost(2, 0, None))}, "increasing order"),
        ({"exits": (ExitCost(2, 2, None),)}, "expected 1"),
        ({"exits": (ExitCost(1, 1, None),)}, "complete run ends"),
        ({"layers": (UnitCost("a", "d", (("w", -5),), 1, 1),) * 3}, "tensor 'w'"),
        ({"layers": (UnitCost("a", "d", (), -1, 1),) * 3}, "output_bytes"),
    ],
)
def test_malformed_cost_tables_are_refused(change: dict, message: str) -> None:
    layer = UnitCost("a", "d", (("w", 64),), 64, 0)
    costs = CostTable("bad", (1,), 64, (layer,) * 3, (ExitCost(1, 2, None),))
    with pytest.raises(PlanError, match=message):
        make_plan(dataclasses.replace(costs, **change), Policy())


def test_units_whose_weights_belong_to_the_request_are_never_pinned():
    gather = UnitCost("embeddings", "gather", (("rows", 40_000),), 256, 512, pinnable=False)
    rest = tuple(UnitCost(f"l{i}", "dense", (("w", 4096 * (i + 1)),), 256, 512) for i in range(3))
    costs = CostTable("m", (1, 16), 256, (gather, *rest), (ExitCost(1, 3, None),))
    plan = make_plan(costs, Policy(arena_capacity_bytes=1 << 30, keep_resident_layers="auto"))
    assert plan.pinned_layers == ("l0", "l1", "l2")
    assert plan.streamed_bytes == 40_000
    assert verify_plan(plan, costs) == []


def test_long_chains_plan_alike_on_numpy_columns_and_plain_loops(monkeypatch) -> None:
    costs = random_costs(7, 400, "balanced")
    policies = [
        Policy(arena_capacity_bytes=capacity, prefetch_depth=depth, keep_resident_layers=keep)
        for depth in (0, 1, 2)
        for keep in (1, "auto")
        for capacity in (1 << 40, 3_000_000)
    ]
    columns = [make_plan(costs, policy) for policy in policies]
    monkeypatch.setattr(allocator, "VECTOR_MIN", 10**9)  # placements by the plain loops
    assert columns == [make_plan(costs, policy) for policy in policies]


def test_byte_counts_past_int64_are_planned_exactly() -> None:
    costs = random_costs(3, 300)
    layers = list(costs.layers)
    layers[5] = dataclasses.replace(layers[5], tensors=(("huge", 1 << 70),))
    costs = dataclasses.replace(costs, layers=tuple(layers))
    plan = plan_ok(costs, arena_capacity_bytes=1 << 40, prefetch_depth=2)
    assert not plan.complete and plan.min_capacity_bytes is not None
    assert plan.min_capacity_bytes > 1 << 70
    assert all(
        type(b.nbytes) is int and type(b.offset_bytes) in (int, type(None)) for b in plan.buffers
    )
