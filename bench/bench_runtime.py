"""Speed: streamed with prefetch, streamed without, and all in memory, side by side.

Every figure is a median over repeats in which the variants run interleaved in one
process (the machine is shared and noisy, so only ratios measured together mean much).
Weights are read from a warm page cache: there is no portable way to drop it without
root, so load times are memory-to-memory copies, the fastest a load can be.

Targets: streamed-with-prefetch latency <= 1.2 x max(total load, total compute) of the
serial run on a model whose load and compute are comparable, and below the serial
(no-prefetch) latency; load throughput into the arena >= 70% of a plain ``readinto`` of
the same files (each file whole into a preallocated page-aligned buffer).

    python bench/bench_runtime.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import median, ms, table, verdict
from edgemind.runtime.arena import aligned_buffer
from edgemind.runtime.reference import InMemoryModel
from edgemind.runtime.runtime import Runtime
from edgemind.weights.manifest import all_layer_specs, load_manifest

STREAM_CAPACITY_BYTES = 4 << 30  # ample: the plan streams every layer (keep_resident 1)
PREFETCH_SLACK = 1.2
THROUGHPUT_TARGET = 0.70


@dataclasses.dataclass(frozen=True)
class SpeedCase:
    """Medians of one (model, batch) comparison."""

    label: str
    batch: int
    prefetch_s: float
    serial_s: float
    in_memory_s: float
    load_s: float  # serial run: sum of per-layer loads
    compute_s: float  # serial run: sum of per-layer computes
    bytes_read: int
    readinto_s: float  # plain readinto of the same files
    readinto_bytes: int
    layers: tuple[tuple[str, float, float, int], ...]  # (layer, load_s, compute_s, bytes) medians

    @property
    def comparable(self) -> bool:
        """Load and compute within a factor of two of each other."""
        return 0.5 <= self.load_s / self.compute_s <= 2.0

    @property
    def prefetch_bound_s(self) -> float:
        return PREFETCH_SLACK * max(self.load_s, self.compute_s)

    @property
    def throughput_ratio(self) -> float:
        arena = self.bytes_read / self.load_s
        plain = self.readinto_bytes / self.readinto_s
        return arena / plain


def plain_readinto_s(
    model_dir: Path, files: Sequence[str], direct: bool = False
) -> tuple[float, int]:
    """Seconds and bytes to read each file whole into one preallocated aligned buffer
    (with ``O_DIRECT`` when ``direct``, in whole 4 KiB blocks, like the direct reader)."""
    paths = [model_dir / f for f in files]
    sizes = [p.stat().st_size for p in paths]
    block = 4096
    buf = aligned_buffer(-(-max(sizes) // block) * block)
    view = memoryview(buf.data)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    start = time.perf_counter()
    for path, size in zip(paths, sizes, strict=True):
        fd = os.open(path, flags)
        try:
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got:]], got)
                if not n:
                    raise OSError(f"{path}: short read at {got}")
                got += n
        finally:
            os.close(fd)
    return time.perf_counter() - start, sum(sizes)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def speed_case(
    label: str, model_dir: Path, batch: int, repeats: int, read_mode: str = "buffered"
) -> SpeedCase:
    """Interleave the three variants and the plain reads ``repeats`` times."""
    manifest = load_manifest(model_dir)
    width = int(manifest.inputs[0].shape[-1])
    x = np.random.default_rng(0).standard_normal((batch, width), np.float32)
    policy = {"arena_capacity_bytes": STREAM_CAPACITY_BYTES, "read_mode": read_mode}
    fast = Runtime.open(model_dir, None, **policy)
    slow = Runtime.open(model_dir, None, **policy, prefetch_depth=0)
    ref = InMemoryModel(model_dir, manifest)
    by_name = {s.name: s.file for s in all_layer_specs(manifest)}
    files = [by_name[u] for u in slow.plan(batch=batch).units]
    want = ref.run(x)
    for rt in (fast, slow):  # warm-up: compile, arena pages, page cache
        got = rt.run(x).output
        assert got is not None and np.array_equal(got, want), f"{label}: streamed != in-memory"
    samples: dict[str, list[float]] = {k: [] for k in ("fast", "slow", "ref", "load", "comp", "rd")}
    per_layer: dict[str, list[tuple[float, float, int]]] = {}
    bytes_read = readinto_bytes = 0
    try:
        for i in range(repeats):
            order = ("fast", "slow", "ref", "rd")[i % 2 :] + ("fast", "slow", "ref", "rd")[: i % 2]
            for variant in order:
                if variant == "ref":
                    samples["ref"].append(_timed(ref.run, x)[0])
                elif variant == "rd":
                    seconds, readinto_bytes = plain_readinto_s(
                        model_dir, files, direct=read_mode == "direct"
                    )
                    samples["rd"].append(seconds)
                else:
                    seconds, result = _timed((fast if variant == "fast" else slow).run, x)
                    samples[variant].append(seconds)
                    if variant == "slow":
                        rep = result.report
                        samples["load"].append(rep.load_s)
                        samples["comp"].append(rep.compute_s)
                        bytes_read = rep.bytes_read
                        for t in rep.layers:
                            per_layer.setdefault(t.layer, []).append(
                                (t.load_s, t.compute_s, t.bytes_read)
                            )
    finally:
        fast.close()
        slow.close()
    layers = tuple(
        (name, median([v[0] for v in vals]), median([v[1] for v in vals]), vals[-1][2])
        for name, vals in per_layer.items()
    )
    return SpeedCase(
        label, batch, median(samples["fast"]), median(samples["slow"]), median(samples["ref"]),
        median(samples["load"]), median(samples["comp"]), bytes_read, median(samples["rd"]),
        readinto_bytes, layers,
    )  # fmt: skip


def speed(
    label: str, model_dir: str, batch: int, repeats: int, read_mode: str = "buffered"
) -> dict[str, Any]:
    """Child side of :func:`speed_case` (run_all runs each case in a fresh process)."""
    return dataclasses.asdict(speed_case(label, Path(model_dir), batch, repeats, read_mode))


def from_dict(data: dict[str, Any]) -> SpeedCase:
    layers = tuple(tuple(layer) for layer in data.pop("layers"))
    return SpeedCase(**data, layers=layers)  # type: ignore[arg-type]


def latency_table(cases: Sequence[SpeedCase]) -> str:
    rows = []
    for c in cases:
        prefetch_ok = c.prefetch_s <= c.prefetch_bound_s and c.prefetch_s < c.serial_s
        target = verdict(prefetch_ok) + ("" if c.comparable else " (load, compute not comparable)")
        rows.append([
            c.label, c.batch, ms(c.prefetch_s), ms(c.serial_s), ms(c.in_memory_s),
            f"{c.prefetch_s / c.serial_s:.2f}", f"{c.prefetch_s / c.in_memory_s:.2f}",
            ms(c.load_s), ms(c.compute_s), f"{c.load_s / c.compute_s:.2f}",
            f"{c.prefetch_s / max(c.load_s, c.compute_s):.2f}", target,
        ])  # fmt: skip
    headers = (
        "model", "batch", "prefetch ms", "no-prefetch ms", "in-memory ms", "prefetch/no-prefetch",
        "prefetch/in-memory", "load ms", "compute ms", "load/compute",
        "prefetch/max(load,compute)", "target ≤ 1.2 and < no-prefetch",
    )  # fmt: skip
    return table(headers, rows)


def throughput_table(cases: Sequence[SpeedCase]) -> str:
    rows = []
    for c in cases:
        arena = c.bytes_read / c.load_s / 1e9
        plain = c.readinto_bytes / c.readinto_s / 1e9
        ratio = c.throughput_ratio
        rows.append([
            c.label, c.batch, f"{c.bytes_read / 2**20:.1f}", f"{arena:.2f}", f"{plain:.2f}",
            f"{ratio:.2f}", verdict(ratio >= THROUGHPUT_TARGET),
        ])  # fmt: skip
    headers = (
        "model",
        "batch",
        "MiB read",
        "arena load GB/s",
        "plain readinto GB/s",
        "ratio",
        "target ≥ 0.70",
    )
    return table(headers, rows)


def layer_table(case: SpeedCase) -> str:
    rows = [
        [name, f"{nbytes / 2**20:.2f}", f"{load * 1e3:.2f}", f"{comp * 1e3:.2f}"]
        for name, load, comp, nbytes in case.layers
    ]
    return table(("unit", "MiB read", "load ms", "compute ms"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.bench_memory import toy_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    case = speed_case("toy", toy_dir(), args.batch, 3 if args.quick else 9)
    print(latency_table([case]))
    print(throughput_table([case]))
    print(layer_table(case))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
