"""Text tokenisation for text models: strings in, padded ``input_ids`` and mask out.

:class:`Tokenizer` wraps a Hugging Face ``tokenizers`` tokenizer read offline from the
model directory (the file the manifest's ``metadata["tokenizer"]`` names). It pads each
batch up to the smallest of a few sequence buckets, so a model compiles for a handful
of shapes instead of one per length, and reports which texts were truncated to the
model's token limit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgemind.errors import InputError, ModelFormatError

SEQ_BUCKETS = (16, 32, 64, 128, 256, 512)
DEFAULT_TOKENIZER_FILE = "tokenizer.json"


def bucket_length(n_tokens: int, max_length: int) -> int:
    """The padded length for ``n_tokens``: the smallest bucket that holds them, capped.

    >>> bucket_length(5, 256), bucket_length(17, 256), bucket_length(200, 256)
    (16, 32, 256)
    >>> bucket_length(90, 100)
    100
    """
    for bucket in SEQ_BUCKETS:
        if bucket >= n_tokens:
            return max(min(bucket, max_length), n_tokens)
    return max(n_tokens, min(SEQ_BUCKETS[-1], max_length))


class Encoded(NamedTuple):
    """A tokenised batch: unpacks as ``ids, mask, truncated = tokenizer.encode(...)``."""

    input_ids: np.ndarray  # (batch, seq) int32, padding with the pad id
    attention_mask: np.ndarray  # (batch, seq) int32, 1 for tokens, 0 for padding
    truncated: list[bool]  # per text: was it cut to the token limit?


class Tokenizer:
    """A model directory's tokenizer, with the model's token limit.

    >>> Tokenizer.from_model_dir("no/such/model")
    Traceback (most recent call last):
    ...
    edgemind.errors.ModelFormatError: no/such/model: model directory not found
    """

    def __init__(self, tokenizer: Any, max_length: int, pad_id: int = 0) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        self._tok = tokenizer
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        # tokenizer.json files often carry their own truncation/padding (all-MiniLM's
        # says 128 and pads to 128); encode() decides both, so switch them off here.
        self._tok.no_padding()
        self._tok.no_truncation()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_length: int) -> Tokenizer:
        """Load a ``tokenizer.json`` (offline) with the model's token limit."""
        from edgemind.extras import require

        HFTokenizer = require("tokenizers", "hf", "embedding text").Tokenizer
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelFormatError(f"{path}: cannot load tokenizer ({exc})") from None
        pad_id = tok.token_to_id("[PAD]")
        padding = tok.padding
        if padding is not None:
            pad_id = padding.get("pad_id", pad_id)
        return cls(tok, max_length, 0 if pad_id is None else pad_id)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer a converted model directory records in its manifest metadata."""
        from edgemind.weights.manifest import check_metadata, read_manifest_json, resolve_inside

        if not Path(model_dir).is_dir():
            raise ModelFormatError(f"{model_dir}: model directory not found")
        try:
            metadata = read_manifest_json(model_dir).get("metadata", {})
        except (ModelFormatError, AttributeError):
            metadata = {}  # the runtime reports a bad manifest; here only the tokenizer matters
        if not isinstance(metadata, dict):
            metadata = {}
        check_metadata(metadata, f"{Path(model_dir) / 'manifest.json'}: metadata")
        name = metadata.get("tokenizer") or DEFAULT_TOKENIZER_FILE
        path = resolve_inside(model_dir, str(name), "metadata.tokenizer")
        if not path.is_file():
            raise ModelFormatError(
                f"{path}: tokenizer file not found; convert the model again from a "
                f"checkpoint that ships {DEFAULT_TOKENIZER_FILE}"
            )
        limit = metadata.get("max_seq_length") or metadata.get("max_position_embeddings") or 512
        return cls.from_file(path, int(limit))

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> Encoded:
        """Tokenise ``texts`` into one batch padded to a bucket length.

        ``max_length`` (at most the model's limit, the default) cuts longer texts;
        ``truncated`` says which were cut. An empty text is an :class:`InputError`.
        """
        limit = self.max_length if max_length is None else int(max_length)
        if not 2 <= limit <= self.max_length:
            raise InputError(f"max_length {limit} must lie in [2, {self.max_length}] tokens")
        if isinstance(texts, str) or not texts:
            raise InputError("expected a non-empty list of texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text {i} is empty; give at least one word")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # undecodable bytes from argv or a file
                raise InputError(
                    f"text {i} is not valid UTF-8 (at character {exc.start}); give UTF-8 text"
                ) from None
        # The tokenizer's own truncation keeps the special tokens ([CLS] ... [SEP]) as
        # sentence-transformers does; what it cut off comes back as ``overflowing``.
        self._tok.enable_truncation(limit)
        try:
            encodings = self._tok.encode_batch(list(texts))
        finally:
            self._tok.no_truncation()
        truncated = [bool(e.overflowing) for e in encodings]
        rows = [e.ids for e in encodings]
        seq = bucket_length(max(len(r) for r in rows), limit)
        ids = np.full((len(rows), seq), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), seq), dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return Encoded(ids, mask, truncated)
