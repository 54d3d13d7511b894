"""The on-disk model format: manifest, weight file layout, writer and reader.

A model directory holds ``manifest.json`` and one msgpack weight file per layer and
exit head; see docs/format.md for the byte-level specification.
"""

from edgemind.weights.format import (
    WEIGHTS_FORMAT_VERSION,
    WEIGHTS_MAGIC,
    WeightFileHeader,
    dtype_name,
    numpy_dtype,
)
from edgemind.weights.manifest import (
    MANIFEST_NAME,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    InputSpec,
    LayerSpec,
    Manifest,
    TensorSpec,
    all_layer_specs,
    load_manifest,
)
from edgemind.weights.reader import (
    aligned_empty,
    load_layer_arrays,
    read_file_header,
    read_rows_into,
    read_tensors_into,
    verify_model,
)
from edgemind.weights.writer import ModelWriter, TensorSource, write_layer_file

__all__ = [
    "MANIFEST_NAME",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "WEIGHTS_FORMAT_VERSION",
    "WEIGHTS_MAGIC",
    "InputSpec",
    "LayerSpec",
    "Manifest",
    "ModelWriter",
    "TensorSource",
    "TensorSpec",
    "WeightFileHeader",
    "aligned_empty",
    "all_layer_specs",
    "dtype_name",
    "load_layer_arrays",
    "load_manifest",
    "numpy_dtype",
    "read_file_header",
    "read_rows_into",
    "read_tensors_into",
    "verify_model",
    "write_layer_file",
]
