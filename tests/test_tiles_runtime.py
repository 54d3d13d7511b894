"""Tiles at run time: the toy model in an arena smaller than its largest layers, run
complete in tiles, equal to the in-memory reference, inside the plan's bound."""

from __future__ import annotations

import numpy as np
import pytest

from edgemind.cli import main
from edgemind.layers.registry import TRACE_COUNTS
from edgemind.planner.verify import verify_plan
from edgemind.runtime import InMemoryModel, Runtime
from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES
from edgemind.units import MIB

ARENA = 12 * MIB  # L8 holds 25 MiB of weights: twice the arena


def x_of(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 1024), dtype=np.float32)


@pytest.mark.parametrize("read_mode", ["buffered", "direct"])
def test_layers_twice_the_arena_run_complete_in_tiles(toy_model, read_mode):
    x = x_of(4)
    reference = InMemoryModel(toy_model)
    want, want64 = reference.run(x), reference.run(x, numpy=True)  # JAX, NumPy float64
    with Runtime.open(
        toy_model, arena_capacity_bytes=ARENA, tiling="auto", read_mode=read_mode
    ) as rt:
        plan = rt.plan(batch=4)
        assert plan.complete and plan.peak_bytes <= ARENA
        tiles = [s for s in plan.steps if s.action == "run" and s.layer == "L8"]
        assert len(tiles) >= 2 and all(s.tile is not None for s in tiles)
        assert verify_plan(plan, rt.costs(batch=4)) == []
        measured = {(u, r) for u, r, _ in rt.costs(batch=4).tile_working_sets}
        assert {("L8", s.tile[1] - s.tile[0]) for s in tiles} <= measured
        for _ in range(2):
            result = rt.run(x)
            assert result.complete and result.exit_level == plan.num_levels
            # the partial sums add in another order than one matmul: float32 rounding only
            # (measured: 2e-6 absolute on logits of order 1); as close to float64 as JAX is
            np.testing.assert_allclose(result.output, want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(result.output, want64, rtol=2e-4, atol=2e-4)
            report = result.report
            assert report.bytes_read == plan.streamed_bytes
            assert report.observed_peak_bytes <= report.plan_peak_bytes + BOUND_ALLOWANCE_BYTES


def test_tiles_compile_once(toy_model):
    with Runtime.open(toy_model, arena_capacity_bytes=ARENA, tiling="auto") as rt:
        rt.run(x_of(2))
        before = TRACE_COUNTS["dense.tile"]
        rt.run(x_of(2))
        assert TRACE_COUNTS["dense.tile"] == before > 0


def test_the_cli_runs_and_plans_in_tiles(toy_model, capsys):
    assert main(["run", str(toy_model), "--random-input", "--arena-mb", "12"]) == 3
    capsys.readouterr()  # without tiling: an early exit
    code = main(["run", str(toy_model), "--random-input", "--arena-mb", "12", "--tiling", "auto"])
    assert code == 0
    capsys.readouterr()
    assert main(["plan", str(toy_model), "--arena-mb", "12", "--tiling", "auto"]) == 0
    out = capsys.readouterr().out
    assert "tiled: " in out and "L8" in out
