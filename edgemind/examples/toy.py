"""Build the toy model: the original EdgeMind design's 10-layer feed-forward network.

The weights are He-scaled normal float32 drawn from ``numpy.random.default_rng(seed)``,
so the same seed always gives the same bytes. Sizes are chosen against the default
policy (50 MiB arena, ``keep_resident_layers: 1``, ``prefetch_depth: 1``): the complete
run fits in 50 MiB, about 24 MiB exits early at level 2, and about 2 MiB is rejected.

    python -m edgemind.examples.toy OUT_DIR [--seed N] [--overwrite]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemind.errors import EdgemindError
from edgemind.weights import ModelWriter
from edgemind.weights.manifest import InputSpec

MODEL_NAME = "toy-ffn-10"
INPUT_DIM = 1024
NUM_CLASSES = 10

# (name, d_in, d_out, activation, exit head after it): 107 MiB of float32 weights.
LAYERS: tuple[tuple[str, int, int, str, bool], ...] = (
    ("L0", 1024, 1024, "relu", False),  # 4 MiB
    ("L1", 1024, 1024, "relu", False),  # 4 MiB
    ("L2", 1024, 1024, "relu", False),  # 4 MiB
    ("L3", 1024, 1536, "relu", True),  # 6 MiB, exit level 1
    ("L4", 1536, 2048, "relu", False),  # 12 MiB
    ("L5", 2048, 2048, "relu", False),  # 16 MiB
    ("L6", 2048, 2048, "relu", True),  # 16 MiB, exit level 2
    ("L7", 2048, 2560, "relu", False),  # 20 MiB
    ("L8", 2560, 2560, "relu", False),  # 25 MiB
    ("L9", 2560, NUM_CLASSES, "none", False),  # logits, the final level 3
)


def _affine(rng: np.random.Generator, d_in: int, d_out: int) -> list[tuple[str, np.ndarray]]:
    # He initialisation keeps relu activations O(1) through ten layers.
    scale = np.float32(math.sqrt(2.0 / d_in))
    w = rng.standard_normal((d_in, d_out), dtype=np.float32) * scale  # (d_in, d_out)
    b = rng.standard_normal((d_out,), dtype=np.float32) * np.float32(0.01)  # (d_out,)
    return [("w", w), ("b", b)]


def build_toy_model(
    out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the toy model to ``out_dir`` (one layer in memory at a time); return the path."""
    rng = np.random.default_rng(seed)
    metadata: dict[str, Any] = {
        "seed": seed,
        "generator": "edgemind/examples/toy.py",
        "init": "He-scaled normal weights, N(0, 0.01) biases, numpy default_rng, float32",
        "num_classes": NUM_CLASSES,
    }
    inputs = [InputSpec("x", "float32", ("batch", INPUT_DIM))]
    with ModelWriter(
        out_dir,
        model_name=MODEL_NAME,
        inputs=inputs,
        alignment_bytes=4096,
        metadata=metadata,
        overwrite=overwrite,
    ) as writer:
        for name, d_in, d_out, activation, has_exit in LAYERS:
            tensors = _affine(rng, d_in, d_out)
            head: tuple[str, str, dict[str, Any], list[tuple[str, np.ndarray]]] | None = None
            if has_exit:
                head_tensors = _affine(rng, d_out, NUM_CLASSES)
                head = (f"{name}_exit", "exit_head", {}, head_tensors)
            writer.add_layer(
                name, "dense", {"activation": activation}, tensors=tensors, exit_head=head
            )
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgemind.examples.toy OUT_DIR``: 0 on success, 1 on a known error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="model directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model")
    args = parser.parse_args(argv)
    if Path(args.out_dir).exists() and not args.overwrite:
        print(
            f"error: {args.out_dir} already exists; pass --overwrite to replace it", file=sys.stderr
        )
        return 1
    try:
        path = build_toy_model(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    except (EdgemindError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {MODEL_NAME} (seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
