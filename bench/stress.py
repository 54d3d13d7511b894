"""The memory-pressure stress run: a model several times larger than the process may map.

A synthetic dense model (full: 24 layers of 64 MiB and a wider last one, about 1.5 GiB;
``--quick``: 12 layers of 16 MiB) is run in child processes under a real
``RLIMIT_AS``. Importing jax and compiling reserves about 2 GB of address space here,
so each child first warms up (same shapes), then reads its own ``VmSize`` and sets the
limit to that baseline plus a budget smaller than the model. Under that limit:

- streaming through a small arena completes (exit 0), and its output matches a NumPy
  computation the parent does one layer at a time;
- loading the same model all in memory (``InMemoryModel``) fails: the limit is real;
- ``edgemind run`` with a too-small arena and ``reject_request`` exits 4, and with a
  capacity between an early exit and the complete run exits 3: cleanly, never killed.

    python bench/stress.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import resource
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import mib, run_child, table, verdict
from bench.synthetic import cached_synthetic, weight_bytes

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class StressConfig:
    widths: tuple[int, ...]
    exits_after: tuple[int, ...]
    budget_bytes: int  # address space allowed above the warmed-up baseline
    batch: int = 4

    @property
    def model_bytes(self) -> int:
        return weight_bytes(self.widths, self.exits_after)


FULL = StressConfig((4096,) * 24 + (6144,), (11,), 400 * MIB)
QUICK = StressConfig((2048,) * 12 + (3072,), (5,), 128 * MIB)


def vm_bytes(field: str) -> int:
    """A ``/proc/self/status`` size field (VmSize, VmPeak, VmHWM...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def request(widths: Sequence[int], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, widths[0]), dtype=np.float32)


def _warm_up(model_dir: str, x: np.ndarray, capacity_bytes: int, on_quota: str) -> None:
    from edgemind.errors import MemoryQuotaExceeded
    from edgemind.runtime.runtime import Runtime

    policy = {"arena_capacity_bytes": capacity_bytes, "on_memory_quota_exceeded": on_quota}
    with Runtime.open(model_dir, None, **policy) as rt, contextlib.suppress(MemoryQuotaExceeded):
        rt.run(x)
    gc.collect()


def child(
    model_dir: str,
    scenario: str,
    widths: list[int],
    batch: int,
    budget_bytes: int,
    capacity_bytes: int,
    out_path: str = "",
) -> dict[str, Any]:
    """Child side: warm up, limit the address space, then run one scenario under it."""
    x = request(widths, batch)
    on_quota = "reject_request" if scenario == "reject" else "early_exit"
    _warm_up(model_dir, x, capacity_bytes, on_quota)
    baseline = vm_bytes("VmSize")
    limit = baseline + budget_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    info: dict[str, Any] = {"baseline_vm_bytes": baseline, "limit_bytes": limit}
    if scenario == "stream":
        from edgemind.runtime.runtime import Runtime

        with Runtime.open(model_dir, None, arena_capacity_bytes=capacity_bytes) as rt:
            result = rt.run(x)
        assert result.output is not None
        np.save(out_path, result.output)
        info.update(complete=result.complete, observed_peak_bytes=result.report.observed_peak_bytes)
        info.update(plan_peak_bytes=result.report.plan_peak_bytes, exit_code=0)
    elif scenario == "in_memory":
        from edgemind.runtime.reference import InMemoryModel

        try:
            InMemoryModel(model_dir).run(x)
            info.update(outcome="completed (the limit is not real!)", exit_code=0)
        except MemoryError as exc:
            info.update(outcome=f"MemoryError: {str(exc)[:80]}", exit_code=1)
    else:  # "reject" / "early": the CLI, with its documented exit codes
        from edgemind.cli import main

        code = main(
            ["run", model_dir, "--random-input", "--batch", str(batch), "--arena-bytes",
             str(capacity_bytes), "--on-quota", on_quota]
        )  # fmt: skip
        info.update(exit_code=code)
    info["vm_peak_bytes"] = vm_bytes("VmPeak")
    return info


def expected_output(model_dir: Path, widths: Sequence[int], batch: int) -> np.ndarray:
    """The final output computed in NumPy, one layer's weights in memory at a time."""
    from edgemind.weights.manifest import load_manifest
    from edgemind.weights.reader import load_layer_arrays

    act = request(widths, batch).astype(np.float64)
    layers = load_manifest(model_dir).layers
    for i, spec in enumerate(layers):
        params = load_layer_arrays(model_dir, spec)
        act = act @ params["w"].astype(np.float64) + params["b"]
        if i < len(layers) - 1:
            act = np.maximum(act, 0.0)
        del params
    return act


def capacities(model_dir: Path, batch: int) -> dict[str, int]:
    """Arena capacities: the smallest complete run, an early exit, and a rejection."""
    from edgemind.runtime.runtime import Runtime

    with Runtime.open(model_dir, None, arena_capacity_bytes=MIB) as rt:
        need = rt.plan(batch=batch).min_capacity_bytes
    assert need is not None
    with Runtime.open(model_dir, None, arena_capacity_bytes=need - MIB) as rt:
        early = rt.plan(batch=batch)
    assert early.status == "early_exit", early.status
    return {"stream": need, "early": need - MIB, "reject": need - MIB, "in_memory": need}


EXPECTED = {"stream": 0, "in_memory": "fails", "reject": 4, "early": 3}


def stress(cfg: StressConfig, root: Path | None = None) -> list[dict[str, Any]]:
    """Build (once) and run every scenario; one dict per scenario."""
    model = cached_synthetic(cfg.widths, exits_after=cfg.exits_after, root=root)
    caps = capacities(model, cfg.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.npy"
        for scenario in ("stream", "in_memory", "reject", "early"):
            args = {
                "model_dir": str(model), "scenario": scenario, "widths": list(cfg.widths),
                "batch": cfg.batch, "budget_bytes": cfg.budget_bytes,
                "capacity_bytes": caps[scenario], "out_path": str(out),
            }  # fmt: skip
            res = run_child("stress", "child", args)
            row: dict[str, Any] = {
                "scenario": scenario,
                "how": res.how,
                "returncode": res.returncode,
            }
            row.update(res.payload or {}, capacity_bytes=caps[scenario])
            if scenario == "stream":
                row["rel_error"] = _rel_error(out, model, cfg) if res.returncode == 0 else None
                row["ok"] = res.returncode == 0 and (row["rel_error"] or 1) < 1e-4
            elif scenario == "in_memory":
                row["ok"] = res.returncode != 0
            else:
                row["ok"] = res.returncode == EXPECTED[scenario]
            if not row["ok"]:
                row["stderr"] = res.stderr_tail
            rows.append(row)
    return rows


def _rel_error(out: Path, model: Path, cfg: StressConfig) -> float:
    got = np.load(out).astype(np.float64)
    want = expected_output(model, cfg.widths, cfg.batch)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def stress_table(cfg: StressConfig, rows: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        detail = r.get("outcome", "")
        if r["scenario"] == "stream" and r.get("rel_error") is not None:
            detail = f"output rel. error {r['rel_error']:.1e} vs NumPy"
            if r.get("observed_peak_bytes") is not None:
                detail += (
                    f"; observed {mib(r['observed_peak_bytes'])} MiB "
                    f"/ planned {mib(r['plan_peak_bytes'])} MiB"
                )
        lines.append([
            r["scenario"], mib(r["capacity_bytes"]), mib(r.get("baseline_vm_bytes")),
            mib(r.get("limit_bytes")), r["how"], EXPECTED[r["scenario"]], detail,
            verdict(r["ok"]),
        ])  # fmt: skip
    head = (
        f"Model: {len(cfg.widths) - 1} dense layers, {cfg.model_bytes / MIB:.0f} MiB of weights; "
        f"RLIMIT_AS = warmed-up VmSize + {cfg.budget_bytes / MIB:.0f} MiB; batch {cfg.batch}.\n\n"
    )
    headers = (
        "scenario", "arena capacity MiB", "baseline VmSize MiB", "RLIMIT_AS MiB", "ended",
        "expected", "detail", "result",
    )  # fmt: skip
    return head + table(headers, lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    rows = stress(cfg)
    print(stress_table(cfg, rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
