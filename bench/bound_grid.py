"""The bound at every shape: observed <= planned peak + the allowance, over a grid of
request shapes and policies, one fresh child process per case.

The grid: the toy model at batch 1...256 and MiniLM at batch 1...16 x seq 16...256,
``keep_resident_layers`` 1 or auto, prefetch depth 0/1/2, buffered or direct reads, at
the plan's own minimum capacity and at a generous one. ``make bench`` runs all of it;
the test suite runs a seeded sample (``tests/test_bound.py``).

    python -m bench.bound_grid [--sample N --seed S]
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Sequence
from typing import Any

from bench.common import mib, run_child, table, verdict

MIB = 2**20
REQUESTS = 3
TOY_BATCHES = (1, 8, 64, 256)
MINILM_SHAPES = tuple(itertools.product((1, 4, 8, 16), (16, 64, 256)))
POLICIES = tuple(
    itertools.product((1, "auto"), (0, 1, 2), ("buffered", "direct"), ("minimum", "generous"))
)


def grid() -> list[dict[str, Any]]:
    """Every case: model, batch, seq, keep, prefetch, read mode, capacity choice."""
    shapes = [("toy", b, 0) for b in TOY_BATCHES] + [("minilm", b, s) for b, s in MINILM_SHAPES]
    return [
        {"model": m, "batch": b, "seq": s, "keep": k, "prefetch": p, "read_mode": r, "capacity": c}
        for (m, b, s), (k, p, r, c) in itertools.product(shapes, POLICIES)
    ]


def sample(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` cases drawn without replacement by a seeded generator; the largest
    shapes of both models always among them (they are where the bound broke)."""
    cases = grid()
    largest = [
        c
        for c in cases
        if (c["model"], c["batch"], c["seq"]) in (("toy", 256, 0), ("minilm", 16, 256))
        and c["keep"] == 1
        and c["prefetch"] == 1
        and c["read_mode"] == "buffered"
        and c["capacity"] == "minimum"
    ]
    rest = [c for c in cases if c not in largest]
    return largest + random.Random(seed).sample(rest, max(0, count - len(largest)))


def _inputs(model_dir: str, model: str, batch: int, seq: int) -> tuple[Any, ...]:
    import numpy as np

    rng = np.random.default_rng(batch * 1000 + seq)
    if model == "toy":
        return (rng.standard_normal((batch, 1024), dtype=np.float32),)
    ids = rng.integers(1000, 30000, (batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[0, seq // 2 :] = 0  # one padded row
    return ids, mask


def run_case(model_dir: str, case: dict[str, Any]) -> dict[str, Any]:
    """Child side: plan the case, run :data:`REQUESTS` requests, report the worst."""
    from edgemind.runtime.runtime import Runtime

    policy = {
        "keep_resident_layers": case["keep"],
        "prefetch_depth": case["prefetch"],
        "read_mode": case["read_mode"],
        "enforce": "off",  # measure the bound here, do not act on it
    }
    inputs = _inputs(model_dir, case["model"], case["batch"], case["seq"])
    dims = {"batch": case["batch"]} | ({"seq": case["seq"]} if case["model"] == "minilm" else {})
    generous = 1024 * MIB
    with Runtime.open(model_dir, None, arena_capacity_bytes=generous, **policy) as rt:
        need = rt.plan(**dims).min_capacity_bytes or generous
    capacity = need if case["capacity"] == "minimum" else max(generous // 4, 2 * need)
    observed = []
    with Runtime.open(model_dir, None, arena_capacity_bytes=capacity, **policy) as rt:
        for _ in range(REQUESTS):
            report = rt.run(*inputs).report
            observed.append(report.observed_peak_bytes)
        plan = rt.last_plan
    assert plan is not None
    return {
        "capacity_bytes": capacity,
        "status": plan.status,
        "plan_peak_bytes": plan.peak_bytes,
        "working_set_source": plan.working_set_source,
        "observed_peak_bytes": max(o for o in observed if o is not None),
    }


def model_dirs() -> dict[str, str]:
    from bench.bench_memory import minilm_dir, toy_dir

    dirs = {"toy": str(toy_dir())}
    minilm, _ = minilm_dir()
    if minilm is not None:
        dirs["minilm"] = str(minilm)
    return dirs


def run_grid(cases: Sequence[dict[str, Any]], dirs: dict[str, str]) -> list[dict[str, Any]]:
    """Each case in a fresh child; the case with its result (or how its child ended)."""
    rows = []
    for case in cases:
        if case["model"] not in dirs:
            continue
        child = run_child(
            "bound_grid", "run_case", {"model_dir": dirs[case["model"]], "case": case}
        )
        rows.append({**case, **(child.payload or {}), "child": child.how})
    return rows


def summary(rows: Sequence[dict[str, Any]], allowance: int) -> tuple[str, str]:
    """The Markdown table of the worst rows, and the one-line worst-case summary."""
    done = [r for r in rows if "observed_peak_bytes" in r]
    failed = len(rows) - len(done)
    over = [r for r in done if r["observed_peak_bytes"] > r["plan_peak_bytes"] + allowance]
    ratio = max((r["observed_peak_bytes"] / r["plan_peak_bytes"] for r in done), default=0.0)
    excess = max((r["observed_peak_bytes"] - r["plan_peak_bytes"] for r in done), default=0)
    worst = sorted(done, key=lambda r: r["observed_peak_bytes"] - r["plan_peak_bytes"])[-8:]
    headers = ("model", "batch", "seq", "keep", "prefetch", "read", "capacity", "planned MiB",
               "observed MiB", "excess MiB", "target")  # fmt: skip
    body = []
    for r in reversed(worst):
        excess_bytes = r["observed_peak_bytes"] - r["plan_peak_bytes"]
        body.append(
            [r["model"], r["batch"], r["seq"] or "-", r["keep"], r["prefetch"], r["read_mode"],
             f"{r['capacity']} ({mib(r['capacity_bytes'])})", mib(r["plan_peak_bytes"]),
             mib(r["observed_peak_bytes"]), f"{excess_bytes / MIB:+.2f}",
             verdict(excess_bytes <= allowance)]
        )  # fmt: skip
    line = (
        f"{len(done)} cases ran ({failed} children failed), {len(over)} above plan + "
        f"{allowance / MIB:.0f} MiB; worst observed/planned {ratio:.3f}, worst excess "
        f"{excess / MIB:+.2f} MiB"
    )
    return table(headers, body), line


def main(argv: Sequence[str] | None = None) -> int:
    from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=0, help="run N sampled cases, not all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = sample(args.sample, args.seed) if args.sample else grid()
    text, line = summary(run_grid(cases, model_dirs()), BOUND_ALLOWANCE_BYTES)
    print(text + "\n\n" + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
