"""Write the committed version-1 model directory (``tests/data/formats/v1-dense``) and its
expected output, with the edgemind that wrote format version 1 (commit 965155d).

The expected output comes from a float64 NumPy forward pass written here, not from
edgemind. Run from the repository root (it refuses to overwrite):

    python tests/data/formats/make_v1_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgemind.weights import ModelWriter
from edgemind.weights.manifest import InputSpec

HERE = Path(__file__).resolve().parent
OUT = HERE / "v1-dense"


def main() -> None:
    rng = np.random.default_rng(2026)
    w0 = rng.standard_normal((16, 12), dtype=np.float32)
    b0 = rng.standard_normal((12,), dtype=np.float32)
    w1 = rng.standard_normal((12, 4), dtype=np.float32)
    b1 = rng.standard_normal((4,), dtype=np.float32)
    with ModelWriter(
        OUT, model_name="v1-dense", inputs=[InputSpec("x", "float32", ("batch", 16))]
    ) as writer:
        writer.add_layer("fc0", "dense", {"activation": "relu"}, [("w", w0), ("b", b0)])
        writer.add_layer("fc1", "dense", {"activation": "none"}, [("w", w1), ("b", b1)])
    x = rng.standard_normal((3, 16), dtype=np.float32)
    h = np.maximum(x.astype(np.float64) @ w0 + b0, 0.0)
    y = h @ w1 + b1
    np.savez(HERE / "v1-dense-expected.npz", x=x, y=y.astype(np.float32))
    manifest = json.loads((OUT / "manifest.json").read_text())
    assert manifest["format_version"] == 1, manifest["format_version"]


if __name__ == "__main__":
    main()
