"""Text in, text out: prompts through the tokenizer, generation, and back to text.

The runtime generates token ids (:meth:`edgemind.runtime.Runtime.generate_stream`);
this module puts the model's tokenizer around it for the CLI and the server: prompts
(or chat messages) to ids, each step's ids to text as they come (multi-byte characters
held until whole), stop strings found across token boundaries (the row ends there, the
stop string is not part of the text), and a result per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgemind.runtime.generation import DEFAULT_CHUNK, GeneratedToken, Generation
from edgemind.sampling import SamplingParams, StopMatcher
from edgemind.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TextChoice:
    """One row of a finished generation, as text and ids."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop", "length" or "memory"
    logprobs: tuple[GeneratedToken, ...]


@dataclasses.dataclass(frozen=True)
class TextGeneration:
    choices: tuple[TextChoice, ...]
    generation: Generation


def prompt_ids(
    tokenizer: Tokenizer, prompt: str | Sequence[Mapping[str, Any]], *, chat: bool = False
) -> list[int]:
    """A prompt's ids: plain text (with BOS as the model says), or chat messages (a
    string is one user message) rendered by the model's chat template."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.encode_chat(messages)
    if not isinstance(prompt, str):
        raise TypeError("a plain prompt is text; give chat=True for messages")
    return tokenizer.encode(prompt)


def generate_text(
    runtime: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[Mapping[str, Any]]],
    sampling: SamplingParams | None = None,
    *,
    chat: bool = False,
    chunk: int = DEFAULT_CHUNK,
    context: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> TextGeneration:
    """Generate from text prompts decoded together; ``on_text(row, text)`` receives each
    row's new text as soon as it is safe to show. Stops: the tokenizer's stop ids
    (EOS, end of turn) unless ``sampling`` names its own, and ``sampling.stop``."""
    sampling = sampling or SamplingParams(temperature=0.0)
    if not sampling.stop_token_ids:
        sampling = dataclasses.replace(sampling, stop_token_ids=tokenizer.stop_ids)
    ids = [prompt_ids(tokenizer, p, chat=chat) for p in prompts]
    run = runtime.generate_stream(ids, sampling, chunk=chunk, context=context)
    decoders = [tokenizer.stream() for _ in ids]
    matchers = [StopMatcher(sampling.stop) for _ in ids]
    texts = [""] * len(ids)

    def emit(row: int, piece: str) -> None:
        if not piece or matchers[row].stopped:
            return
        out = matchers[row].feed(piece)
        texts[row] += out.text
        if out.text and on_text is not None:
            on_text(row, out.text)
        if out.stopped:
            run.stop_row(row)

    for step in run:
        for token in step:
            if token.id not in sampling.stop_token_ids:  # <eos> and the like are not text
                emit(token.row, decoders[token.row].push(token.id))
    for row, decoder in enumerate(decoders):
        emit(row, decoder.finish())
        tail = matchers[row].flush()
        if tail and not matchers[row].stopped:
            texts[row] += tail
            if on_text is not None:
                on_text(row, tail)
    result = run.result
    assert result is not None
    choices = tuple(
        TextChoice(
            prompt_token_ids=result.prompt_token_ids[row],
            token_ids=result.token_ids[row],
            text=texts[row],
            finish_reason="stop" if matchers[row].stopped else result.finish_reasons[row],
            logprobs=result.logprobs[row],
        )
        for row in range(len(ids))
    )
    return TextGeneration(choices, result)
