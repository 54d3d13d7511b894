"""Format versions: a committed version-1 model still loads and runs; version 2 records
storage types, quantized ones included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemind.errors import ModelFormatError
from edgemind.runtime import Runtime
from edgemind.weights.manifest import MODEL_FORMAT_VERSION, load_manifest, parse_tensor_entry
from edgemind.weights.reader import verify_model

FORMATS = Path(__file__).resolve().parent / "data" / "formats"


def test_a_version_1_model_still_loads_and_runs():
    model = FORMATS / "v1-dense"
    manifest = load_manifest(model)
    assert manifest.format_version == 1 < MODEL_FORMAT_VERSION
    assert [t.storage for t in manifest.layers[0].tensors] == ["float32", "float32"]
    assert verify_model(model, manifest) == []
    expected = np.load(FORMATS / "v1-dense-expected.npz")  # float64 NumPy, at writing time
    with Runtime.open(model) as rt:
        result = rt.run(expected["x"])
    np.testing.assert_allclose(result.output, expected["y"], rtol=1e-5, atol=1e-5)


def entry(storage: str, shape: list[int], nbytes: int) -> dict:
    return {
        "name": "w",
        "storage": storage,
        "shape": shape,
        "nbytes": nbytes,
        "offset": 4096,
        "crc32": "00000000",
    }


@pytest.mark.parametrize(
    ("storage", "shape", "nbytes", "array_shape"),
    [
        ("q8_0", [262144, 640], 262144 * 680, (262144, 680)),  # Gemma's LM head, 170 MiB
        ("q4_k", [2048, 640], 2048 * 360, None),  # 640 is not whole 256-blocks
        ("q6_k", [4, 512], 4 * 420, (4, 420)),
        ("float16", [3, 5], 30, (3, 5)),
    ],
)
def test_storage_types_size_tensors(storage, shape, nbytes, array_shape):
    if array_shape is None:
        with pytest.raises(ModelFormatError, match="block"):
            parse_tensor_entry(entry(storage, shape, nbytes), "manifest.json: layer", 4096)
        return
    spec = parse_tensor_entry(entry(storage, shape, nbytes), "manifest.json: layer", 4096)
    assert spec.storage == storage and spec.shape == tuple(shape)
    assert spec.array_shape == array_shape
    assert spec.dtype == ("uint8" if storage.startswith("q") else storage)
    wrong = entry(storage, shape, nbytes + 1)
    with pytest.raises(ModelFormatError, match=f"expected {nbytes} for shape"):
        parse_tensor_entry(wrong, "manifest.json: layer", 4096)


def test_version_1_entries_must_be_dense():
    v1 = entry("q8_0", [32, 32], 32 * 34)
    v1["dtype"] = v1.pop("storage")
    with pytest.raises(ModelFormatError, match="unknown dtype 'q8_0'"):
        parse_tensor_entry(v1, "manifest.json: layer", 4096)
