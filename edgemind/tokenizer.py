"""A generative model's tokenizer: built from a GGUF's vocabulary once, then used to
encode prompts, render chats and decode generated ids as they come.

``edgemind convert`` writes :data:`TOKENIZER_FILES` beside the model: a Hugging Face
``tokenizers`` file that reproduces transformers' GGUF tokenizer for Gemma, and a small
versioned config of edgemind's own (special ids, stop ids, the chat template). Gemma's
GGUF stores no merges, so they are derived from the vocabulary (:func:`derive_merges`);
without a ``tokenizer.chat_template`` the built-in :data:`GEMMA_CHAT_TEMPLATE` is used.
See ``docs/gemma3.md`` §4–5 for the facts this follows.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import operator
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgemind.errors import ConversionError, InputError, ModelFormatError, brief
from edgemind.files import open_regular, read_bounded

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONFIG_FORMAT, CONFIG_VERSION = "edgemind-tokenizer", 1
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")  # llama.cpp's EOT spellings
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types
_FILE_LIMIT_BYTES = 256 << 20
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# llama.cpp's built-in "gemma" template (llm_chat_apply_template) in Jinja, with the
# leading <bos> of Gemma 3's own template: contents trimmed, "assistant" spelled "model",
# system messages (Gemma has no system role) put before the first user turn's text.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] | trim %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if ns.system and role != 'model' %}"
    "{{ ns.system + '\\n\\n' }}{% set ns.system = '' %}"
    "{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def derive_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary, best first: every split of a token into two
    vocabulary tokens, ranked by the token's position in the list, then longer left
    part first (transformers' ``generate_merges`` with position as the score).

    A dictionary probe or two per split point (1.2 M points in Gemma's 262,144 tokens,
    about a second) and no sort: tokens in id order, each cut right to left, is that order.

    >>> derive_merges(["a", "b", "c", "ab", "abc", "bc"])
    [('a', 'b'), ('ab', 'c'), ('a', 'bc'), ('b', 'c')]
    """
    index = {token: i for i, token in enumerate(tokens)}  # a repeated token keeps its last id
    ordered = tokens if len(index) == len(tokens) else sorted(index, key=index.__getitem__)
    return [
        (token[:cut], token[cut:])
        for token in ordered
        for cut in range(len(token) - 1, 0, -1)
        if token[:cut] in index and token[cut:] in index
    ]


def tokenizer_files_from_gguf(reader_or_path: Any) -> dict[str, bytes]:
    """The :data:`TOKENIZER_FILES` for a GGUF, given as a path or a ``gguf.GGUFReader``.

    A path is read with a metadata-only parser of this module's (well under a second;
    ``GGUFReader`` spends 20 s and 700 MB indexing Gemma's vocabulary).
    """
    if hasattr(reader_or_path, "fields"):
        fields = reader_or_path.fields
        meta = {k: fields[k].contents() for k in _KEYS if k in fields}
        where = str(getattr(getattr(reader_or_path, "data", None), "filename", "GGUF"))
    else:
        meta, where = _read_gguf_metadata(reader_or_path), os.fspath(reader_or_path)
    try:
        return tokenizer_files_from_metadata(meta)
    except ConversionError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def tokenizer_files_from_metadata(meta: Mapping[str, Any]) -> dict[str, bytes]:
    """The :data:`TOKENIZER_FILES` from GGUF metadata (``tokenizer.ggml.*`` keys)."""
    arch, model = meta.get("general.architecture"), meta.get("tokenizer.ggml.model")
    if model != "llama" or arch not in GEMMA_ARCHITECTURES:
        raise ConversionError(
            f"tokenizer {brief(model)} of architecture {brief(arch)} is not supported; "
            f"supported: SentencePiece ('llama') vocabularies of {', '.join(GEMMA_ARCHITECTURES)}"
        )
    tokens = list(_need(meta, "tokenizer.ggml.tokens"))
    types = list(_need(meta, "tokenizer.ggml.token_type"))
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise ConversionError(f"{len(tokens)} tokens with {len(types)} token types; expected text")
    ids = {name: _token_id(meta, name, len(tokens)) for name in _ID_KEYS}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default
    backend = _backend(tokens, types, ids, meta.get("tokenizer.ggml.merges"), add_bos)
    if meta.get("tokenizer.ggml.add_space_prefix", False):  # as llama.cpp: each text run
        prepend = {"type": "Prepend", "prepend": "▁"}
        backend["normalizer"] = {
            "type": "Sequence",
            "normalizers": [prepend, backend["normalizer"]],
        }
    eot = ids["eot"]
    if eot is None:
        eot = next((i for i, t in enumerate(tokens) if t in END_OF_TURN_TOKENS), None)
    template = meta.get("tokenizer.chat_template")
    config = TokenizerConfig(
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        end_of_turn_id=eot,
        add_bos=add_bos,
        stop_ids=tuple(sorted({ids["eos"]} | ({eot} if eot is not None else set()))),
        bos_token=tokens[ids["bos"]],
        eos_token=tokens[ids["eos"]],
        chat_template=str(template) if template else GEMMA_CHAT_TEMPLATE,
        chat_template_source="gguf" if template else "builtin:gemma",
    )
    return {
        TOKENIZER_FILES[0]: json.dumps(backend, ensure_ascii=False).encode(),
        TOKENIZER_FILES[1]: config.to_json(),
    }


def _backend(
    tokens: list[str],
    types: list[Any],
    ids: Mapping[str, Any],
    merges: Sequence[str] | None,
    add_bos: bool,
) -> dict[str, Any]:
    """The ``tokenizers`` JSON of transformers' ``GemmaTokenizer`` for this vocabulary."""
    # Runs of 2+ spaces are stored as real spaces but looked up as "▁" runs (the
    # normalizer turns every space into "▁"), so respell them before deriving merges.
    vocab_tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    added = [  # control tokens are special; user-defined ones are matched whole as well
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": kind == _CONTROL}
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == _CONTROL or (kind == _USER_DEFINED and t in vocab)
    ]
    bos = tokens[ids["bos"]]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": _bos_template(bos, ids["bos"]) if add_bos else None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[ids["unknown"]] if ids["unknown"] is not None else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges] if merges else derive_merges(vocab_tokens),
        },
    }


_ID_KEYS = ("bos", "eos", "unknown", "eot")
_KEYS = (
    "general.architecture",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
    *(f"tokenizer.ggml.{k}_token_id" for k in _ID_KEYS),
)


def _need(meta: Mapping[str, Any], key: str) -> Any:
    if meta.get(key) is None:
        raise ConversionError(f"GGUF metadata lacks {key!r}; is this a complete model file?")
    return meta[key]


def _token_id(meta: Mapping[str, Any], name: str, n_tokens: int) -> Any:
    key = f"tokenizer.ggml.{name}_token_id"
    value = _need(meta, key) if name in ("bos", "eos") else meta.get(key)
    if value is not None and not (isinstance(value, int) and 0 <= value < n_tokens):
        raise ConversionError(f"{key} is {brief(value)}, not a token id below {n_tokens}")
    return value


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    """``<bos> $A`` (and ``<bos> $A <bos> $B`` for pairs), as transformers writes it."""
    first, second = ({"SpecialToken": {"id": bos, "type_id": n}} for n in (0, 1))
    a, b = ({"Sequence": {"id": s, "type_id": n}} for s, n in (("A", 0), ("B", 1)))
    return {
        "type": "TemplateProcessing",
        "single": [first, a],
        "pair": [first, a, second, b],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


# GGUF value types 0-7 and 10-12 as struct formats (8 is a string, 9 an array)
_SCALARS = dict(zip((*range(8), 10, 11, 12), "BbHhIif?Qqd", strict=True))
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


def _read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :data:`_KEYS` of a GGUF file's metadata (little-endian, version 2 or 3), read
    from a memory map without touching the tensors."""
    try:
        with open_regular(path) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic, version, _, n_keys = struct.unpack_from("<4sIQQ", buf, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"starts {magic!r} version {version}, not GGUF version 2 or 3")
            cursor = _Cursor(buf, 24)
            meta = {}
            for _ in range(n_keys):
                key = cursor.string()
                value = cursor.value(cursor.unpack("I")[0], depth=0)
                if key in _KEYS:
                    meta[key] = value
            return meta
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read the GGUF file ({exc.strerror})") from None
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ConversionError(
            f"{path}: cannot read GGUF metadata (truncated, or not a GGUF file: {exc})"
        ) from None


@dataclasses.dataclass
class _Cursor:
    buf: mmap.mmap
    offset: int

    def unpack(self, fmt: str, count: int = 1) -> tuple[Any, ...]:
        size = struct.calcsize(f"<{fmt}") * count
        if count < 0 or self.offset + size > len(self.buf):
            raise ValueError(f"a value at byte {self.offset} runs past the end of the file")
        values = struct.unpack_from(f"<{count}{fmt}", self.buf, self.offset)
        self.offset += size
        return values

    def string(self) -> str:
        (n,) = _U64.unpack_from(self.buf, self.offset)
        start, self.offset = self.offset + 8, self.offset + 8 + n
        if self.offset > len(self.buf):
            raise ValueError(f"a string at byte {start} runs past the end of the file")
        return self.buf[start : self.offset].decode("utf-8")

    def value(self, kind: int, depth: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY or depth > 1:
            raise ValueError(f"value type {kind} at byte {self.offset} is not a GGUF type")
        item, count = self.unpack("IQ")
        if item in _SCALARS:
            return list(self.unpack(_SCALARS[item], count))
        return [self.value(item, depth + 1) for _ in range(count)]


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """What generation needs besides the ``tokenizers`` file (``tokenizer_config.json``)."""

    bos_id: int
    eos_id: int
    end_of_turn_id: int | None  # Gemma's <end_of_turn>: ends a chat reply
    add_bos: bool  # encode() starts with <bos> unless told otherwise
    stop_ids: tuple[int, ...]  # generation ends at any of these
    bos_token: str
    eos_token: str
    chat_template: str  # Jinja
    chat_template_source: str  # "gguf" or "builtin:gemma"

    def to_json(self) -> bytes:
        body = dataclasses.asdict(self) | {"stop_ids": list(self.stop_ids)}
        head = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION}
        return json.dumps(head | body, indent=1, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> TokenizerConfig:
        """Parse and check a config written by :meth:`to_json`."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{where}: not JSON ({exc}); convert the model again") from None
        found = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (raw, None)
        if found != (CONFIG_FORMAT, CONFIG_VERSION):
            raise ModelFormatError(
                f"{where}: found format {brief(found[0])} version {brief(found[1])}, expected "
                f"{CONFIG_FORMAT} version {CONFIG_VERSION}; convert the model again"
            )
        checks = {name: _is_id for name in ("bos_id", "eos_id")} | {
            "end_of_turn_id": lambda v: v is None or _is_id(v),
            "add_bos": lambda v: isinstance(v, bool),
            "stop_ids": lambda v: isinstance(v, list) and all(_is_id(i) for i in v),
        }
        for field in dataclasses.fields(cls):
            if not checks.get(field.name, lambda v: isinstance(v, str))(raw.get(field.name)):
                raise ModelFormatError(
                    f"{where}: {field.name} is {brief(raw.get(field.name))}, which is not valid "
                    "here; convert the model again"
                )
        return cls(
            **{f.name: raw[f.name] for f in dataclasses.fields(cls)}
            | {"stop_ids": tuple(raw["stop_ids"])}
        )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Tokenizer:
    """A converted model's tokenizer: prompts to ids, chats to ids, ids to text.

    >>> meta = {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama",
    ...     "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "h", "i",
    ...                               "hi", "▁hi", "<0xE2>", "<0x82>", "<0xAC>"],
    ...     "tokenizer.ggml.token_type": [3, 3, 3, 2, 1, 1, 1, 1, 1, 6, 6, 6],
    ...     "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    >>> tok = Tokenizer.from_files(tokenizer_files_from_metadata(meta))
    >>> tok.encode("hi hi€"), tok.decode([2, 7, 8, 9, 10, 11])
    ([2, 7, 8, 9, 10, 11], 'hi hi€')
    >>> stream = tok.stream()
    >>> [stream.push(i) for i in (7, 9, 10, 11, 8)], stream.finish()
    (['hi', '', '', '', '€ hi'], '')
    >>> Tokenizer.from_dir("no/such/model")
    Traceback (most recent call last):
    ...
    edgemind.errors.ModelFormatError: no/such/model: model directory not found
    """

    def __init__(self, backend: Any, config: TokenizerConfig, where: str = "tokenizer") -> None:
        self._tok = backend
        self.config = config
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        for i in (config.bos_id, config.eos_id, config.end_of_turn_id or 0, *config.stop_ids):
            if i >= self.vocab_size:
                raise ModelFormatError(
                    f"{where}: special token id {i} is outside the {self.vocab_size}-token "
                    "vocabulary; convert the model again"
                )
        added = backend.get_added_tokens_decoder()
        self._special = frozenset(i for i, token in added.items() if token.special)
        self._template: Any = None

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], where: str = "tokenizer") -> Tokenizer:
        """A tokenizer from the bytes of :data:`TOKENIZER_FILES` (as converted)."""
        from edgemind.extras import require

        backend_cls = require("tokenizers", "hf", "tokenizing text").Tokenizer
        config = TokenizerConfig.from_json(
            files[TOKENIZER_FILES[1]], f"{where}: {TOKENIZER_FILES[1]}"
        )
        try:
            backend = backend_cls.from_buffer(files[TOKENIZER_FILES[0]])
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelFormatError(
                f"{where}: {TOKENIZER_FILES[0]} cannot be loaded ({str(exc)[:80]}); "
                "convert the model again"
            ) from None
        return cls(backend, config, where)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer ``edgemind convert`` wrote into ``model_dir``."""
        if not Path(model_dir).is_dir():
            raise ModelFormatError(f"{model_dir}: model directory not found")
        files = {}
        for name in TOKENIZER_FILES:
            path = Path(model_dir) / name
            if not path.is_file():
                raise ModelFormatError(
                    f"{path}: not found; run `edgemind convert` on the model's GGUF again "
                    "to write the tokenizer files"
                )
            files[name] = read_bounded(
                path, _FILE_LIMIT_BYTES, what="the tokenizer", error=ModelFormatError
            )
        return cls.from_files(files, os.fspath(model_dir))

    @property
    def bos_id(self) -> int:
        return self.config.bos_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: <eos>, and <end_of_turn> where the vocabulary has it."""
        return self.config.stop_ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens spelled in it (``<start_of_turn>``) are
        parsed as such. ``add_bos`` defaults to the GGUF's ``add_bos_token``."""
        if not isinstance(text, str):
            raise InputError(f"expected text to tokenize, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates from argv or a file
            raise InputError(
                f"the text is not valid UTF-8 (at character {exc.start}); give UTF-8 text"
            ) from None
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.config.add_bos if add_bos is None else add_bos
        return [self.config.bos_id, *ids] if bos else list(ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of ``ids``; control tokens (<bos>, <end_of_turn>...) are left out
        unless ``skip_special`` is false."""
        return str(self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special))

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        """A :class:`StreamDecoder` for ids generated one at a time."""
        return StreamDecoder(self, skip_special=skip_special)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text for ``messages`` (``{"role": ..., "content": ...}`` each) by the
        model's chat template, ending with the opening of the model's turn."""
        if isinstance(messages, (str, Mapping)) or not messages:
            raise InputError("expected a non-empty list of chat messages")
        for i, message in enumerate(messages):
            if not (
                isinstance(message, Mapping)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise InputError(
                    f"chat message {i} is {brief(message)}; give {{'role': str, 'content': str}}"
                )
        jinja2 = _jinja()
        try:
            return str(
                self._compiled().render(
                    messages=[dict(m) for m in messages],
                    bos_token=self.config.bos_token,
                    eos_token=self.config.eos_token,
                    add_generation_prompt=True,
                )
            )
        except jinja2.TemplateError as exc:
            raise InputError(
                f"the chat template ({self.config.chat_template_source}) failed on these "
                f"messages: {type(exc).__name__}: {str(exc)[:120]}"
            ) from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of :meth:`render_chat`; <bos> only if the template did not write it."""
        text = self.render_chat(messages)
        return self.encode(
            text, add_bos=self.config.add_bos and not text.startswith(self.config.bos_token)
        )

    def _compiled(self) -> Any:
        if self._template is None:
            jinja2 = _jinja()
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_exception
            try:
                self._template = env.from_string(self.config.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ModelFormatError(
                    f"the chat template ({self.config.chat_template_source}) is not valid "
                    f"Jinja: {exc.message} (line {exc.lineno})"
                ) from None
        return self._template

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        try:
            checked = [operator.index(i) for i in ids]
        except TypeError:
            raise InputError(f"token ids must be integers, got {brief(ids)}") from None
        bad = next((i for i in checked if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return checked


def _jinja() -> Any:
    """The ``jinja2`` package (with its sandbox), or a one-line error naming the extra."""
    from edgemind.extras import require

    require("jinja2.sandbox", "gguf", "rendering a chat template")
    import jinja2.ext
    import jinja2.sandbox

    return jinja2


def _raise_exception(message: str) -> None:
    """``raise_exception(...)`` of chat templates: the template refuses these messages."""
    raise InputError(f"the chat template refuses these messages: {message}")


class StreamDecoder:
    """Text of generated ids as they arrive: :meth:`push` returns only text that is final.

    Concatenated, ``push`` over ``ids`` then :meth:`finish` equals ``decode(ids)``.
    Byte-fallback tokens (``<0xE2>``) are held until the run of them ends (the next other
    token, or ``finish``), because ``decode`` reads a run as one UTF-8 string: a valid
    one is its characters, an invalid one a U+FFFD per byte.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special
        self._held = bytearray()

    def push(self, token_id: int) -> str:
        """The new printable text after ``token_id`` (often ``""`` while bytes are held)."""
        (token_id,) = self._tokenizer._check_ids([token_id])
        if self._skip and token_id in self._tokenizer._special:
            return ""  # decode drops it before reading byte runs: it does not end one
        piece = self._tokenizer._tok.id_to_token(token_id)
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte is not None:
            self._held.append(int(byte.group(1), 16))
            return ""
        return self.finish() + piece.replace("▁", " ")

    def finish(self) -> str:
        """The text of the bytes still held; call once generation has stopped."""
        run, self._held = bytes(self._held), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)
