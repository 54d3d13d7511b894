"""The safetensors converter: a Hugging Face checkpoint directory to an edgemind model.

:func:`convert_safetensors` reads ``config.json`` and ``model.safetensors`` (or the
shards a ``model.safetensors.index.json`` names), checks that every tensor the
architecture needs is there with the right shape before writing anything, then
streams the tensors one at a time into the model directory: each is read from the
checkpoint only when the writer writes it, so the whole model is never in memory.
Supported architectures: ``bert`` (encoders such as all-MiniLM-L6-v2), as
``embeddings``, ``encoder_0``... each followed by a ``pool_k`` exit head that pools as
the checkpoint's sentence-transformers modules say (:mod:`edgemind.weights.st_pooling`;
mean + L2 when it has none).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgemind.errors import ConversionError
from edgemind.layers.bert import kind_configs
from edgemind.weights import InputSpec, ModelWriter, TensorSource
from edgemind.weights.quantize import QUANTIZERS, quantizable, quantize_array
from edgemind.weights.st_pooling import pooling_head

SUPPORTED_ARCHITECTURES = ("bert",)
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
TOKENIZER_FILE = "tokenizer.json"
# Copied into the model directory when the checkpoint has them.
SIDE_FILES = (CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
_DTYPES = {"F32": "float32", "F16": "float16"}  # safetensors dtype -> what we read
STORED_DTYPE = "float32"  # the kinds compute in float32: half-precision sources are widened


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One edgemind tensor and where it comes from in the checkpoint."""

    name: str  # edgemind name inside its layer
    source: str  # checkpoint name
    transpose: bool  # torch Linear weights are (out, in); edgemind stores (in, out)
    shape: tuple[int, ...]  # the shape edgemind stores


def _bert_units(cfg: Mapping[str, Any]) -> Iterator[tuple[str, str, list[_Tensor]]]:
    """``(unit name, kind, tensors)`` of a BERT encoder, in execution order."""
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    emb = "embeddings."
    yield (
        "embeddings",
        "bert_embeddings",
        [
            _Tensor("word_embeddings", emb + "word_embeddings.weight", False,
                    (int(cfg["vocab_size"]), hidden)),
            _Tensor("position_embeddings", emb + "position_embeddings.weight", False,
                    (int(cfg["max_position_embeddings"]), hidden)),
            _Tensor("token_type_embeddings", emb + "token_type_embeddings.weight", False,
                    (int(cfg.get("type_vocab_size", 2)), hidden)),
            _Tensor("ln_gamma", emb + "LayerNorm.weight", False, (hidden,)),
            _Tensor("ln_beta", emb + "LayerNorm.bias", False, (hidden,)),
        ],
    )  # fmt: skip
    for i in range(int(cfg["num_hidden_layers"])):
        pre = f"encoder.layer.{i}."
        linears = [
            ("q", "attention.self.query", hidden, hidden),
            ("k", "attention.self.key", hidden, hidden),
            ("v", "attention.self.value", hidden, hidden),
            ("o", "attention.output.dense", hidden, hidden),
            ("ffn_in", "intermediate.dense", hidden, inter),
            ("ffn_out", "output.dense", inter, hidden),
        ]
        tensors = []
        for short, hf, n_in, n_out in linears:
            tensors.append(_Tensor(f"{short}_weight", f"{pre}{hf}.weight", True, (n_in, n_out)))
            tensors.append(_Tensor(f"{short}_bias", f"{pre}{hf}.bias", False, (n_out,)))
        for short, hf in (("ln1", "attention.output.LayerNorm"), ("ln2", "output.LayerNorm")):
            tensors.append(_Tensor(f"{short}_gamma", f"{pre}{hf}.weight", False, (hidden,)))
            tensors.append(_Tensor(f"{short}_beta", f"{pre}{hf}.bias", False, (hidden,)))
        yield f"encoder_{i}", "bert_encoder", tensors


# ------------------------------------------------------------------ reading the source


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None


def read_config(src: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, checked to be an architecture edgemind converts."""
    path = src / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: not found; a checkpoint directory needs {CONFIG_FILE}")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is "
            f"not supported; edgemind converts: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_bert_config(cfg, path)
    return cfg


def _check_bert_config(cfg: Mapping[str, Any], path: Path) -> None:
    keys = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
            "vocab_size", "max_position_embeddings")  # fmt: skip
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{path}: {key} must be a positive integer, got {value!r}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConversionError(
            f"{path}: hidden_size {cfg['hidden_size']} is not a multiple of "
            f"num_attention_heads {cfg['num_attention_heads']}"
        )
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{path}: hidden_act {act!r} is not supported; expected 'gelu'")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ConversionError(
            f"{path}: position_embedding_type {pos!r} is not supported; expected 'absolute'"
        )


def weight_map(src: Path) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file (relative to ``src``) holding it."""
    from safetensors import safe_open

    index = src / INDEX_FILE
    if index.is_file():
        data = _read_json(index)
        mapping = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(mapping, dict):
            raise ConversionError(f"{index}: missing its 'weight_map' object")
        return {str(k): str(v) for k, v in mapping.items()}
    single = src / SINGLE_FILE
    if not single.is_file():
        raise ConversionError(
            f"{src}: no {SINGLE_FILE} or {INDEX_FILE}; edgemind converts safetensors checkpoints"
        )
    with _open(single, safe_open) as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def _open(path: Path, safe_open: Callable[..., Any]) -> Any:
    if not path.is_file():
        raise ConversionError(f"{path}: safetensors file not found")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises its own SafetensorError on bad headers
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None


def _prefix(names: Mapping[str, str]) -> str:
    """``"bert."`` for checkpoints saved from a task model (BertForMaskedLM...), else ``""``."""
    if "embeddings.word_embeddings.weight" in names:
        return ""
    if "bert.embeddings.word_embeddings.weight" in names:
        return "bert."
    return ""


def max_seq_length(src: Path, cfg: Mapping[str, Any]) -> int:
    """The token limit: sentence-transformers' ``max_seq_length`` if set, else the positions."""
    positions = int(cfg["max_position_embeddings"])
    path = src / SENTENCE_CONFIG_FILE
    if path.is_file():
        data = _read_json(path)
        value = data.get("max_seq_length") if isinstance(data, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool) and 1 < value <= positions:
            return value
    return positions


# ------------------------------------------------------------------ checking and writing


class _Checkpoint:
    """The checkpoint's safetensors files, opened lazily once each (headers only: mmap)."""

    def __init__(self, src: Path, names: Mapping[str, str]) -> None:
        self.src, self.names = src, names
        self._open: dict[str, Any] = {}

    def where(self, source: str) -> Path:
        return self.src / self.names.get(source, INDEX_FILE if self.sharded else SINGLE_FILE)

    @property
    def sharded(self) -> bool:
        return (self.src / INDEX_FILE).is_file()

    def handle(self, source: str) -> Any:
        from safetensors import safe_open

        file = self.names[source]
        if file not in self._open:
            self._open[file] = _open(self.src / file, safe_open)
        return self._open[file]

    def check(self, unit: str, t: _Tensor, unclaimed: Collection[str] = ()) -> None:
        """Raise a ConversionError unless ``t`` is present with the right shape and dtype.

        ``unclaimed``: checkpoint names no expected tensor has; a renamed tensor is
        among them, so the hint looks there first (else ``layer.5.key`` would suggest
        ``layer.4.key``, which is present and fine).
        """
        f = self.handle(t.source) if t.source in self.names else None
        if f is None or t.source not in set(f.keys()):
            close = difflib.get_close_matches(t.source, list(unclaimed), n=3, cutoff=0.6)
            close = close or difflib.get_close_matches(t.source, list(self.names), n=3, cutoff=0.6)
            hint = f"; similar names: {close}" if close else ""
            raise ConversionError(
                f"{self.where(t.source)}: tensor {t.source!r} (edgemind {unit}.{t.name}) is "
                f"missing{hint}; is this checkpoint a complete BERT model?"
            )
        sl = f.get_slice(t.source)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        expected = t.shape[::-1] if t.transpose else t.shape
        if shape != expected:
            raise ConversionError(
                f"{self.where(t.source)}: tensor {t.source!r} has shape {list(shape)}, "
                f"config.json implies {list(expected)}"
            )
        if dtype not in _DTYPES:
            raise ConversionError(
                f"{self.where(t.source)}: tensor {t.source!r} has dtype {dtype}; edgemind "
                f"converts {', '.join(_DTYPES)}"
            )

    def loader(self, t: _Tensor, done: Callable[[int], None]) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            array = self.handle(t.source).get_tensor(t.source)
            if t.transpose:
                array = array.T
            array = np.ascontiguousarray(array, dtype=STORED_DTYPE)
            done(array.nbytes)
            return array

        return load


def _metadata(src: Path, cfg: Mapping[str, Any], files: list[str], ignored: list[str]) -> dict:
    return {
        "architecture": "bert",
        "source_format": "safetensors",
        "source": src.name,
        "config": dict(cfg),
        "embedding_dim": int(cfg["hidden_size"]),
        "max_position_embeddings": int(cfg["max_position_embeddings"]),
        "max_seq_length": max_seq_length(src, cfg),
        "tokenizer": TOKENIZER_FILE if TOKENIZER_FILE in files else None,
        "files": files,
        "pooling": "mean over attention_mask, then L2 normalise",
        "ignored_tensors": ignored,
    }


def _quantized(
    name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray], storage: str
) -> TensorSource:
    """A source that quantizes the tensor when its turn to be written comes."""
    return TensorSource(name, storage, shape, lambda: quantize_array(load(), storage))


def convert_safetensors(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    alignment_bytes: int = 4096,
    overwrite: bool = False,
    progress: bool | None = None,
    model_name: str | None = None,
    quantize: str | None = None,
) -> Path:
    """Convert a Hugging Face safetensors checkpoint directory; returns ``out_dir``.

    ``progress``: a tqdm bar on stderr (None: only when stderr is a terminal).
    ``model_name`` defaults to the checkpoint directory's name. ``quantize`` (``q8_0``,
    ``q5_0``, ``q4_0``) stores the encoder blocks' weight matrices as GGUF blocks
    (:mod:`edgemind.weights.quantize`), dequantized inside each layer's jit.

    >>> convert_safetensors("no/such/checkpoint", "out")
    Traceback (most recent call last):
    ...
    edgemind.errors.ConversionError: no/such/checkpoint: checkpoint directory not found
    """
    from edgemind.extras import require

    for module in ("safetensors", "tqdm"):
        require(module, "hf", "converting a safetensors checkpoint")
    from tqdm import tqdm

    if quantize is not None and quantize not in QUANTIZERS:
        raise ConversionError(
            f"--quantize {quantize!r} is not supported; choose one of {', '.join(QUANTIZERS)}"
        )
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise ConversionError(f"{src_dir}: checkpoint directory not found")
    cfg = read_config(src)
    names = weight_map(src)
    ckpt = _Checkpoint(src, names)
    prefix = _prefix(names)
    units = [
        (unit, kind, [dataclasses.replace(t, source=prefix + t.source) for t in tensors])
        for unit, kind, tensors in _bert_units(cfg)
    ]
    used = {t.source for _, _, tensors in units for t in tensors}
    unclaimed = sorted(set(names) - used)
    for unit, _, tensors in units:  # everything is checked before anything is written
        for t in tensors:
            ckpt.check(unit, t, unclaimed)
    files = [name for name in SIDE_FILES if (src / name).is_file()]
    total = sum(math.prod(t.shape) * 4 for _, _, tensors in units for t in tensors)
    configs = kind_configs(cfg)
    inputs = [
        InputSpec("input_ids", "int32", ("batch", "seq")),
        InputSpec("attention_mask", "int32", ("batch", "seq")),
    ]
    metadata = _metadata(src, cfg, files, unclaimed)
    head_kind, head_config = pooling_head(src)  # checked before anything is written
    if head_kind != "mean_pool_l2":
        norm = ", then L2 normalise" if head_config["normalize"] else " (not normalised)"
        metadata["pooling"] = f"{head_config['mode']} over attention_mask{norm}"
    disable = None if progress is None else not progress
    with (
        tqdm(
            total=total,
            unit="iB",  # with 1024 as the divisor: KiB, MiB, as every summary says
            unit_scale=True,
            unit_divisor=1024,
            desc=f"converting {src.name}",
            disable=disable,
            leave=False,
        ) as bar,  # fmt: skip
        ModelWriter(
            out,
            model_name or src.resolve().name,
            inputs,
            alignment_bytes=alignment_bytes,
            metadata=metadata,
            overwrite=overwrite,
        ) as writer,
    ):
        for unit, kind, tensors in units:
            config = dict(configs[kind])
            sources = []
            for t in tensors:
                load = ckpt.loader(t, bar.update)
                if quantize and kind == "bert_encoder" and quantizable(t.shape, quantize):
                    sources.append(_quantized(t.name, t.shape, load, quantize))
                    config.setdefault("storage", {})[t.name] = quantize
                else:
                    sources.append(TensorSource(t.name, STORED_DTYPE, t.shape, load))
            head: tuple[str, str, Mapping[str, Any], list[TensorSource]] | None = None
            if kind == "bert_encoder":
                index = unit.rsplit("_", 1)[1]
                head = (f"pool_{index}", head_kind, head_config, [])
            writer.add_layer(unit, kind, config, sources, exit_head=head)
        for name in files:  # committed with the weights: all or nothing
            writer.add_file(name, src / name)
    return out
