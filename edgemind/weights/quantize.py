"""Quantizing weights when a checkpoint is converted: float matrices to GGUF blocks.

The blocks are made by the ``gguf`` package's NumPy quantizer (ggml's reference
algorithms: the same bytes llama.cpp's ``quantize`` writes), never by hand. Blocks run
along a matrix's last dimension, so it must hold whole blocks (32 values for the types
here); other tensors (biases, norms, odd shapes) stay as they are.

>>> import numpy as np
>>> blocks = quantize_array(np.ones((2, 64), np.float32), "q8_0")
>>> blocks.shape, blocks.dtype
((2, 68), dtype('uint8'))
"""

from __future__ import annotations

import numpy as np

from edgemind.dtypes import row_nbytes, storage_type
from edgemind.errors import ConversionError

QUANTIZERS = ("q8_0", "q5_0", "q4_0")  # the types the gguf package quantizes in NumPy


def quantizable(shape: tuple[int, ...], storage: str) -> bool:
    """Whether a tensor of ``shape`` is quantized to ``storage``: 2-D, whole blocks."""
    t = storage_type(storage)
    return len(shape) == 2 and shape[-1] % t.block_elements == 0 and shape[0] > 0


def quantize_array(array: np.ndarray, storage: str) -> np.ndarray:
    """``array`` (rows, cols) as ``storage`` blocks: uint8 (rows, bytes per row)."""
    if storage not in QUANTIZERS:
        raise ConversionError(
            f"--quantize {storage!r} is not supported; choose one of {', '.join(QUANTIZERS)}"
        )
    try:
        import gguf
    except ImportError:
        raise ConversionError(
            "quantizing needs the gguf package: pip install 'edgemind-runtime[gguf]'"
        ) from None
    t = storage_type(storage)
    assert t.gguf_type is not None
    values = np.ascontiguousarray(array, dtype=np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType(t.gguf_type))
    expected = (values.shape[0], row_nbytes(t, values.shape[-1]))
    return np.ascontiguousarray(blocks, dtype=np.uint8).reshape(expected)
