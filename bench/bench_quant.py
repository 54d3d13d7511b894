"""Dequantize-then-matmul against the float32 matmul, on an LM-head shaped weight.

Gemma 3 270M's tied embedding used as its LM head: x (1, 640) against a weight
(262144, 640) stored as ``q8_0`` (170 MiB) or as float32 (640 MiB). Variants, timed
interleaved in one process (the machine is shared, so only ratios taken together mean
much), medians over repeats:

- ``f32``: ``x @ w.T`` on a resident float32 weight;
- ``q8_0, N MiB chunks``: :func:`edgemind.layers.quant.quant_matmul` as layers call
  it: dequantize N MiB of float32 rows at a time, each chunk times x, in one jit;
- ``q8_0, whole``: the same with the whole weight dequantized at once;
- ``q8_0, N tiles of R rows``: one jitted call per tile, each tile its own buffer (as
  the planner's tiles in arena slots would be: 16384 rows are 10.6 MiB of q8_0, a
  16 MiB arena's tile), the outputs concatenated.

It reports, and asserts nothing. ``XLA temp`` is the compiled call's temporary bytes
(``memory_analysis().temp_size_in_bytes``): what XLA allocates beside the arena.
Thread counts are XLA's defaults unless ``XLA_FLAGS`` says otherwise; the load average
is printed because the machine is shared.

    python bench/bench_quant.py [--repeats 9] [--chunk-mib 4] [--tile-rows 16384]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # `python bench/bench_quant.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, median, mib, ms, table
from edgemind import dtypes
from edgemind.layers.quant import CHUNK_BYTES, dequantize, quant_matmul

OUT_FEATURES, IN_FEATURES = 262144, 640


def random_q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """q8_0 blocks (rows, row_bytes): int8 values, f16 scales giving weights up to ~0.13."""
    n_blocks = rows * cols // 32
    blocks = np.empty((n_blocks, 34), np.uint8)
    scales = rng.uniform(1e-4, 1e-3, n_blocks).astype("<f2")
    blocks[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 2:] = rng.integers(-127, 128, (n_blocks, 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, dtypes.row_nbytes("q8_0", cols))


def temp_bytes(fn: Any, *args: Any) -> int | None:
    analysis = fn.lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run(repeats: int, chunk_bytes: int, tile_rows: int) -> list[list[object]]:
    rng = np.random.default_rng(0)
    blocks_np = random_q8_0(rng, OUT_FEATURES, IN_FEATURES)
    blocks = jax.device_put(blocks_np)
    shape = (OUT_FEATURES, IN_FEATURES)
    w_f32 = jax.jit(dequantize, static_argnums=(0, 2))("q8_0", blocks, shape)
    x = jnp.asarray(rng.normal(0, 1, (1, IN_FEATURES)).astype(np.float32))
    tiles = [
        jax.device_put(blocks_np[i : i + tile_rows]) for i in range(0, OUT_FEATURES, tile_rows)
    ]
    del blocks_np

    def q8(rows: int, chunk: int | None) -> Any:
        return jax.jit(
            lambda x, b: quant_matmul(x, "q8_0", b, (rows, IN_FEATURES), chunk_bytes=chunk)
        )

    f32, chunked, whole, per_tile = (
        jax.jit(lambda x, w: x @ w.T),
        q8(OUT_FEATURES, chunk_bytes),
        q8(OUT_FEATURES, None),
        q8(tile_rows, chunk_bytes),
    )
    # name: (call, (jitted function, its arguments) for XLA's temp bytes, weight bytes)
    variants: dict[str, tuple[Callable[[], Any], tuple[Any, tuple[Any, ...]], int]] = {
        "f32": (lambda: f32(x, w_f32), (f32, (x, w_f32)), w_f32.nbytes),
        f"q8_0, {mib(chunk_bytes)} MiB chunks": (
            lambda: chunked(x, blocks),
            (chunked, (x, blocks)),
            blocks.nbytes,
        ),
        "q8_0, whole": (lambda: whole(x, blocks), (whole, (x, blocks)), blocks.nbytes),
        f"q8_0, {len(tiles)} tiles of {tile_rows} rows": (
            lambda: jnp.concatenate([per_tile(x, t) for t in tiles], axis=-1),
            (per_tile, (x, tiles[0])),
            blocks.nbytes,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {k: np.asarray(call()) for k, (call, _, _) in variants.items()}  # compile
    for _ in range(repeats):
        for key, (call, _, _) in variants.items():
            t0 = time.perf_counter()
            call().block_until_ready()
            times[key].append(time.perf_counter() - t0)

    base = median(times["f32"])
    rows = []
    for key, (_, (fn, args), weight_bytes) in variants.items():
        diff = float(np.abs(outputs[key] - outputs["f32"]).max())
        t = median(times[key])
        rows.append(
            [key, mib(weight_bytes), ms(t), f"{t / base:.2f}", mib(temp_bytes(fn, *args)), diff]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chunk-mib", type=float, default=CHUNK_BYTES / 2**20)
    parser.add_argument("--tile-rows", type=int, default=16384, help="divides 262144")
    args = parser.parse_args(argv)
    if args.tile_rows <= 0 or OUT_FEATURES % args.tile_rows:
        parser.error(f"--tile-rows must divide {OUT_FEATURES}")
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    headers = ["variant", "weight MiB", "median ms", "vs f32", "XLA temp MiB", "max |y - y_f32|"]
    rows = run(args.repeats, int(args.chunk_mib * 2**20), args.tile_rows)
    print(f"x (1, {IN_FEATURES}) @ w.T, w ({OUT_FEATURES}, {IN_FEATURES}), {args.repeats} repeats")
    print(table(headers, rows))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
