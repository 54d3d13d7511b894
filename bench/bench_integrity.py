"""What integrity checking by default costs: reading every weight of a model through
opened files from the page cache, with and without the crc32 that the first read of
each opened file now does (edgemind.weights.reader.LayerFile.read_into).

    python -m bench.bench_integrity [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import mib, ms, table


def read_model(model_dir: Path, check: bool) -> float:
    """Seconds to read every tensor once, the crc32 checked (first read) or not."""
    from edgemind.weights.manifest import all_layer_specs, load_manifest
    from edgemind.weights.reader import LayerFile, aligned_empty

    start = time.perf_counter()
    for layer in all_layer_specs(load_manifest(model_dir)):
        with LayerFile(model_dir, layer) as f:
            if not check:  # as if a previous read of this open file had checked them
                f._checked.update(t.name for t in layer.tensors)
            for tensor in layer.tensors:
                f.read_into({tensor.name: aligned_empty(tensor.nbytes)})
    return time.perf_counter() - start


def integrity_table(model_dir: Path, repeats: int = 7) -> str:
    from edgemind.weights.manifest import all_layer_specs, load_manifest

    total = sum(t.nbytes for s in all_layer_specs(load_manifest(model_dir)) for t in s.tensors)
    read_model(model_dir, True)  # page cache warm
    plain, checked = [], []
    for _ in range(repeats):  # side by side, alternating
        plain.append(read_model(model_dir, False))
        checked.append(read_model(model_dir, True))
    a, b = statistics.median(plain), statistics.median(checked)
    return table(
        ("model MiB", "read (page cache)", "read + crc32 (first read per open file)", "ratio"),
        [[mib(total), ms(a), ms(b), f"{b / a:.2f}"]],
    )


def main(argv: Sequence[str] | None = None) -> int:
    from bench.bench_memory import toy_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(integrity_table(toy_dir(), args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
