"""Planner speed and quality: plan random chain models of 100, 1,000 and 10,000 layers.

Prints, per size, the median planning time over repeats and how close the planned
peak is to the lower bound (largest live total at any step).

    python bench/bench_planner.py [--quick] [--repeats N] [--prefetch-depth D]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

from edgemind.planner import CostTable, ExitCost, UnitCost, make_plan, verify_plan
from edgemind.policy import Policy


def random_chain(n_layers: int, seed: int) -> CostTable:
    """A chain with random weights (0-3 tensors), activations and modest working sets."""
    rng = random.Random(seed)
    layers = []
    for i in range(n_layers):
        tensors = tuple((f"t{j}", rng.randint(1_000, 200_000)) for j in range(rng.randint(0, 3)))
        output = rng.randint(1_000, 100_000)
        layers.append(UnitCost(f"layer{i}", "dense", tensors, output, rng.randint(0, output // 5)))
    exits = (ExitCost(1, n_layers // 2, None), ExitCost(2, n_layers - 1, None))
    return CostTable(f"random{n_layers}", (1,), 50_000, tuple(layers), exits)


@dataclasses.dataclass(frozen=True)
class PlannerTiming:
    """Medians of planning and checking one random chain, and the plan's quality."""

    n_layers: int
    plan_s: float
    verify_s: float
    peak_over_lower_bound: float
    naive_over_peak: float


def time_planner(n_layers: int, repeats: int, prefetch_depth: int = 1) -> PlannerTiming:
    """Plan and verify ``random_chain(n_layers)`` ``repeats`` times; the proof must hold."""
    costs = random_chain(n_layers, seed=n_layers)
    policy = Policy(arena_capacity_bytes=1 << 40, prefetch_depth=prefetch_depth)
    plan_s, verify_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = make_plan(costs, policy)
        middle = time.perf_counter()
        problems = verify_plan(plan, costs)
        plan_s.append(middle - start)
        verify_s.append(time.perf_counter() - middle)
        if problems:
            raise RuntimeError(f"planner produced an invalid plan: {problems[:3]}")
    return PlannerTiming(
        n_layers,
        statistics.median(plan_s),
        statistics.median(verify_s),
        plan.peak_bytes / plan.lower_bound_bytes,
        plan.naive_bytes / plan.peak_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip 10,000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefetch-depth", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = (100, 1_000) if args.quick else (100, 1_000, 10_000)
    repeats = 2 if args.quick else args.repeats
    print(f"{'layers':>8} {'plan ms':>9} {'verify ms':>10} {'peak/LB':>8} {'naive/peak':>11}")
    for n_layers in sizes:
        t = time_planner(n_layers, repeats, args.prefetch_depth)
        print(
            f"{n_layers:>8} {t.plan_s * 1e3:>9.1f} {t.verify_s * 1e3:>10.1f} "
            f"{t.peak_over_lower_bound:>8.4f} {t.naive_over_peak:>11.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
