"""GGUF as a source: a ``.gguf`` file into an edgemind model directory.

The file is read with the ``gguf`` package's ``GGUFReader``, which memory-maps it; each
tensor's bytes are copied from the map into its layer's weight file **byte for byte**
(quantized blocks are never dequantized or requantized), one tensor at a time, so the
whole file is never held in memory. An architecture maps the GGUF tensor names onto
units through a table (:data:`ARCHITECTURES`); a tensor used by two units (Gemma's tied
``token_embd``: the input embedding and the LM head) is stored once and the second unit
``shares`` it.

    edgemind convert gemma-3-270m-q4_k_m.gguf models/gemma3-270m

The units' kinds are the decoder's (:mod:`edgemind.layers.gemma3`: ``gemma3_embed``,
``gemma3_block``, ``rms_norm``; and ``lm_head``, run in tiles when the arena is smaller
than the vocabulary's table). Inputs: the token ids, the chunk's first sequence index
(``start``) and each row's left padding (``pad``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgemind.dtypes import from_gguf_type, row_nbytes, storage_type
from edgemind.errors import ConversionError, EdgemindError, ModelFormatError, brief
from edgemind.tokenizer import tokenizer_files_from_gguf
from edgemind.weights.manifest import InputSpec
from edgemind.weights.writer import ModelWriter, TensorSource


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of the converted model: GGUF tensors under edgemind names, or a share."""

    name: str
    kind: str
    config: Mapping[str, Any]
    tensors: Mapping[str, str]  # edgemind name -> GGUF tensor name
    shares: str | None = None  # an earlier unit whose tensors this one reads


Layout = Callable[[Mapping[str, Any], Mapping[str, Any]], Iterator[Unit]]
"""An architecture's mapping: (metadata, GGUF tensors by name) -> units in order."""
_MAX_LIST_ITEMS = 1024  # metadata lists longer than this (a vocabulary) are not copied

GEMMA3_BLOCK_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_q_norm",
    "attn_k_norm",
    "attn_output",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
)
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer attends globally (llama.cpp's gemma3 graph)
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # RoPE base of the sliding layers (llama.cpp: swa base)


def gemma3_layout(meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> Iterator[Unit]:
    """Gemma 3: token embedding (rows read on demand), the blocks, the final norm, and an
    LM head that shares the embedding table."""
    hidden = int(_need(meta, "gemma3.embedding_length"))
    blocks = int(_need(meta, "gemma3.block_count"))
    eps = float(_need(meta, "gemma3.attention.layer_norm_rms_epsilon"))
    embd = tensors.get("token_embd.weight")
    vocab = int(embd.shape[-1]) if embd is not None else 0  # GGUF: innermost dim first
    embd_storage = _storage(embd) if embd is not None else "float32"
    yield Unit(
        "token_embd",
        "gemma3_embed",
        {
            "hidden": hidden,
            "vocab_size": vocab,
            "scale": math.sqrt(hidden),
            "gathered": ["weight"],
            "storage": {"weight": embd_storage},
        },
        {"weight": "token_embd.weight"},
    )
    heads = int(_need(meta, "gemma3.attention.head_count"))
    for i in range(blocks):
        full = (i + 1) % GEMMA3_SLIDING_PATTERN == 0
        config: dict[str, Any] = {
            "hidden": hidden,
            "heads": heads,
            "kv_heads": int(meta.get("gemma3.attention.head_count_kv", heads)),
            "head_dim": int(meta.get("gemma3.attention.key_length", hidden // heads)),
            "ffn": int(_need(meta, "gemma3.feed_forward_length")),
            "eps": eps,
            "attention": "full" if full else "sliding",
            "window": int(meta.get("gemma3.attention.sliding_window", 0)),
            "rope_base": float(
                meta.get("gemma3.rope.freq_base", 1e6) if full else GEMMA3_LOCAL_ROPE_BASE
            ),
        }
        names = {t: f"blk.{i}.{t}.weight" for t in GEMMA3_BLOCK_TENSORS}
        config["storage"] = {t: _storage(tensors[g]) for t, g in names.items() if g in tensors}
        yield Unit(f"blk.{i}", "gemma3_block", config, names)
    norm = {"eps": eps, "last": True}  # generation needs the last position's logits only
    yield Unit("output_norm", "rms_norm", norm, {"weight": "output_norm.weight"})
    head = {"storage": embd_storage, "hidden": hidden, "vocab": vocab}
    yield Unit("lm_head", "lm_head", head, {"weight": ""}, "token_embd")


def _storage(tensor: Any) -> str:
    """The storage type name of a GGUF tensor."""
    return from_gguf_type(int(tensor.tensor_type)).name


ARCHITECTURES: dict[str, Layout] = {"gemma3": gemma3_layout}


def _need(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ConversionError(f"GGUF metadata lacks {key!r}; is this a complete model file?")
    return meta[key]


def read_metadata(reader: Any) -> dict[str, Any]:
    """The GGUF key-value fields as plain Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or len(field.data) > _MAX_LIST_ITEMS:
            continue  # the vocabulary's 262,144 tokens stay out of the manifest (and RAM)
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):  # an odd field: skip it
            continue
    return meta


def _source(tensor: Any, name: str) -> TensorSource:
    """A writer source copying a GGUF tensor's bytes as they are (GGUF lists dims
    innermost first; edgemind's shapes are row-major, so they are reversed)."""
    storage = from_gguf_type(int(tensor.tensor_type)).name
    shape = tuple(int(d) for d in reversed(tensor.shape))
    stored = shape
    if storage_type(storage).quantized:
        stored = (*shape[:-1], row_nbytes(storage, shape[-1], where=f"GGUF tensor {name}"))

    def load() -> np.ndarray:
        return np.asarray(tensor.data).reshape(stored)  # a view of the map, not a copy

    return TensorSource(name, storage, shape, load)


def convert_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    alignment_bytes: int = 4096,
) -> Path:
    """Convert a GGUF file to an edgemind model directory at ``dst``; returns ``dst``."""
    try:
        import gguf
    except ImportError:
        raise ConversionError(
            "reading GGUF needs the gguf package: pip install 'edgemind-runtime[gguf]'"
        ) from None
    if not Path(src).is_file():
        raise ConversionError(f"{src}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(os.fspath(src))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ConversionError(
            f"{src}: cannot read as GGUF (truncated, or not a GGUF file: "
            f"{type(exc).__name__}: {str(exc)[:80]})"
        ) from None
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"{src}: GGUF architecture {brief(arch)} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    units = list(ARCHITECTURES[arch](meta, tensors))
    missing = [g for u in units if u.shares is None for g in u.tensors.values() if g not in tensors]
    if missing:
        raise ConversionError(f"{src}: {arch} tensors missing from the file: {missing[:5]}")
    name = model_name or str(meta.get("general.name") or Path(src).stem)
    scalars = {k: v for k, v in meta.items() if not isinstance(v, list)}
    metadata = {"source": {"format": "gguf", "file": Path(src).name}, "gguf": scalars}
    inputs = [
        InputSpec("input_ids", "int32", ("batch", "seq")),
        InputSpec("start", "int32", (1,)),  # the chunk's first sequence index
        InputSpec("pad", "int32", ("batch",)),  # each row's leading padding
    ]
    try:
        with ModelWriter(
            dst,
            name,
            inputs,
            alignment_bytes=alignment_bytes,
            metadata=metadata,
            overwrite=overwrite,
        ) as writer:
            if "tokenizer.ggml.tokens" in reader.fields:  # a file may carry no tokenizer
                for file_name, data in tokenizer_files_from_gguf(src).items():
                    writer.add_bytes(file_name, data)  # the vocabulary stays out of the manifest
            for unit in units:
                if unit.shares is not None:
                    writer.add_shared_layer(
                        unit.name, unit.kind, unit.config, unit.shares, list(unit.tensors)
                    )
                    continue
                sources = [_source(tensors[g], n) for n, g in unit.tensors.items()]
                writer.add_layer(unit.name, unit.kind, unit.config, sources)
    except ModelFormatError as exc:
        raise ConversionError(f"{src}: {exc}") from None
    except EdgemindError:
        raise
    return Path(dst)
