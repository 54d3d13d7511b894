"""A synthetic dense model of any size, for benchmarks and the memory-pressure stress run.

``widths = (d0, d1, ..., dn)`` gives ``n`` dense layers, layer ``i`` mapping ``d_i`` to
``d_{i+1}`` (relu, the last one linear); ``exits_after`` puts a classifier exit head
after those layers. Weights are float32 from ``numpy.random.default_rng(seed)``, scaled
so activations stay O(1): the same arguments always give the same bytes. Models are
cached: :func:`cached_synthetic` writes once per parameter set and reuses the directory.

    python bench/synthetic.py OUT_DIR --width 4096 --layers 24
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemind.weights import ModelWriter
from edgemind.weights.manifest import InputSpec

NUM_CLASSES = 10
# generate big tensors in row blocks: one 64 MiB layer never needs a second 64 MiB temporary
_BLOCK_ELEMENTS = 1 << 22


def _weights(rng: np.random.Generator, d_in: int, d_out: int) -> np.ndarray:
    """He-scaled normal float32 (d_in, d_out), generated block by block in place."""
    w = np.empty((d_in, d_out), np.float32)  # (d_in, d_out)
    rows = max(1, _BLOCK_ELEMENTS // d_out)
    scale = np.float32(math.sqrt(2.0 / d_in))
    for start in range(0, d_in, rows):
        block = w[start : start + rows]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= scale
    return w


def _affine(rng: np.random.Generator, d_in: int, d_out: int) -> list[tuple[str, np.ndarray]]:
    b = rng.standard_normal((d_out,), dtype=np.float32) * np.float32(0.01)  # (d_out,)
    return [("w", _weights(rng, d_in, d_out)), ("b", b)]


def build_synthetic(
    out_dir: str | os.PathLike[str],
    widths: Sequence[int],
    *,
    exits_after: Sequence[int] = (),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the model (one layer in memory at a time) and return its directory.

    >>> import tempfile
    >>> from edgemind.weights.manifest import load_manifest
    >>> m = load_manifest(build_synthetic(tempfile.mkdtemp() + "/s", (8, 16, 4), exits_after=(0,)))
    >>> [(layer.name, layer.exit_head is not None) for layer in m.layers]
    [('D0', True), ('D1', False)]
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths {widths}: need at least two positive widths")
    n_layers = len(widths) - 1
    if any(not 0 <= i < n_layers - 1 for i in exits_after):
        raise ValueError(f"exits_after {tuple(exits_after)}: layers 0..{n_layers - 2} only")
    rng = np.random.default_rng(seed)
    metadata = {"generator": "bench/synthetic.py", "widths": list(widths), "seed": seed}
    inputs = [InputSpec("x", "float32", ("batch", widths[0]))]
    with ModelWriter(
        out_dir,
        model_name=f"synthetic-{n_layers}x{max(widths)}",
        inputs=inputs,
        alignment_bytes=4096,
        metadata=metadata,
        overwrite=overwrite,
    ) as writer:
        for i in range(n_layers):
            head: tuple[str, str, dict[str, Any], list[tuple[str, np.ndarray]]] | None = None
            if i in exits_after:
                head = (f"D{i}_exit", "exit_head", {}, _affine(rng, widths[i + 1], NUM_CLASSES))
            activation = "relu" if i < n_layers - 1 else "none"
            tensors = _affine(rng, widths[i], widths[i + 1])
            writer.add_layer(f"D{i}", "dense", {"activation": activation}, tensors, head)
            del tensors
    return Path(out_dir)


def weight_bytes(widths: Sequence[int], exits_after: Sequence[int] = ()) -> int:
    """Float32 weight bytes of the model these arguments build (heads included)."""
    layers = sum((a + 1) * b for a, b in itertools.pairwise(widths))
    heads = sum((widths[i + 1] + 1) * NUM_CLASSES for i in exits_after)
    return 4 * (layers + heads)


def cache_root() -> Path:
    """Where built benchmark models live (``EDGEMIND_BENCH_CACHE`` or ``build/bench-models``)."""
    default = Path(__file__).resolve().parent.parent / "build" / "bench-models"
    return Path(os.environ.get("EDGEMIND_BENCH_CACHE", default))


def cached_synthetic(
    widths: Sequence[int],
    *,
    exits_after: Sequence[int] = (),
    seed: int = 0,
    root: Path | None = None,
) -> Path:
    """The model for these arguments, built on first use under ``root``."""
    key = json.dumps([list(widths), list(exits_after), seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = (root or cache_root()) / f"synthetic-{len(widths) - 1}x{max(widths)}-{digest}"
    if not (out / "manifest.json").is_file():
        build_synthetic(out, widths, exits_after=exits_after, seed=seed, overwrite=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    widths = (args.width,) * (args.layers + 1)
    build_synthetic(args.out_dir, widths, seed=args.seed, overwrite=True)
    print(f"wrote {args.layers} x {args.width}² ({weight_bytes(widths) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
