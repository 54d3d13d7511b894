"""The generative tokenizer: Gemma 3's GGUF vocabulary against transformers' reference
ids, the chat template, the stream decoder, and the errors users see."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from edgemind.errors import ConversionError, InputError, MissingExtraError, ModelFormatError
from edgemind.tokenizer import (
    GEMMA_CHAT_TEMPLATE,
    TOKENIZER_FILES,
    Tokenizer,
    derive_merges,
    tokenizer_files_from_gguf,
    tokenizer_files_from_metadata,
)

REFERENCE = Path(__file__).parent / "data" / "gemma3" / "gemma3_reference.json"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def toy_meta(tokens: list[str], **extra: object) -> dict[str, object]:
    """GGUF metadata of a Gemma-style vocabulary: the specials, the 256 byte tokens, then
    ``tokens`` (type 4 if only spaces, as Gemma's whitespace runs are, else normal)."""
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [4 if not t.strip() else 1 for t in tokens]
    return {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SPECIALS + BYTES + tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    } | extra


def toy(tokens: list[str], **extra: object) -> Tokenizer:
    return Tokenizer.from_files(tokenizer_files_from_metadata(toy_meta(tokens, **extra)))


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def gemma_files(gemma_gguf_path) -> dict[str, bytes]:
    """The tokenizer files converted from the GGUF (by path: about 3 s)."""
    return tokenizer_files_from_gguf(gemma_gguf_path)


@pytest.fixture(scope="module")
def gemma_dir(gemma_files, tmp_path_factory) -> Path:
    """A model directory holding only the tokenizer files."""
    out = tmp_path_factory.mktemp("gemma-tokenizer")
    for name, data in gemma_files.items():
        (out / name).write_bytes(data)
    return out


@pytest.fixture(scope="module")
def gemma(gemma_dir) -> Tokenizer:
    return Tokenizer.from_dir(gemma_dir)


# --- Gemma 3 270M against the transformers reference -------------------------------------


def test_the_reference_prompts_encode_to_the_reference_ids_and_back(gemma, reference) -> None:
    for prompt in reference["prompts"]:
        ids = gemma.encode(prompt["text"])
        assert ids == prompt["prompt_token_ids"]
        assert gemma.decode(ids) == prompt["text"]
        assert ids[0] == gemma.bos_id == 2
        assert gemma.encode(prompt["text"], add_bos=False) == ids[1:]


def test_the_chat_message_renders_to_the_reference_ids(gemma, reference) -> None:
    chat = reference["chat"]
    messages = [{"role": "user", "content": chat["message"]}]
    assert gemma.render_chat(messages) == chat["rendered"]
    ids = gemma.encode_chat(messages)
    assert ids == chat["token_ids"]
    assert ids.count(gemma.bos_id) == 1  # the template wrote <bos>; encode adds none


def test_the_special_ids_are_gemmas(gemma, reference) -> None:
    special = {name: v["tokenizer_id"] for name, v in reference["special_tokens"].items()}
    assert (gemma.bos_id, gemma.eos_id) == (special["<bos>"], special["<eos>"])
    assert gemma.stop_ids == (special["<eos>"], special["<end_of_turn>"])
    assert gemma.config.chat_template_source == "builtin:gemma"  # the GGUF has none
    assert gemma.vocab_size == reference["config"]["vocab_size"]


def test_generated_ids_stream_to_what_decode_gives(gemma, reference) -> None:
    runs = [p["greedy"] for p in reference["prompts"]] + [reference["chat"]["greedy"]]
    for greedy in runs:
        ids = greedy["token_ids"]
        stream = gemma.stream()
        text = "".join(stream.push(i) for i in ids) + stream.finish()
        assert text == gemma.decode(ids) == greedy["text"]


def test_a_character_split_over_byte_tokens_is_held_until_whole(gemma) -> None:
    ids = gemma.encode("ꙮ ok", add_bos=False)  # U+A66E is not in the vocabulary
    pieces = [gemma._tok.id_to_token(i) for i in ids]
    assert pieces[:3] == ["<0xEA>", "<0x99>", "<0xAE>"]
    stream = gemma.stream()
    assert [stream.push(i) for i in ids] == ["", "", "", "ꙮ ok"]
    assert stream.finish() == ""
    stream = gemma.stream()  # the run ends with the stream: finish() lets it out
    assert [stream.push(i) for i in ids[:3]] == ["", "", ""]
    assert stream.finish() == "ꙮ"


def test_the_stream_equals_decode_on_random_ids(gemma) -> None:
    """Invariant: for any ids, the pushes and finish() concatenate to decode(ids), with
    byte runs both valid and invalid and control tokens inside them."""
    rng = random.Random(14)
    pool = [gemma._tok.token_to_id(b) for b in BYTES] + [1, 2, 105, 106, 138, 139]
    pool += [rng.randrange(gemma.vocab_size) for _ in range(200)]
    for skip in (True, False):
        for _ in range(300):
            ids = [rng.choice(pool) for _ in range(rng.randrange(1, 12))]
            stream = gemma.stream(skip_special=skip)
            text = "".join(stream.push(i) for i in ids) + stream.finish()
            assert text == gemma.decode(ids, skip_special=skip), ids


def test_the_converted_vocabulary_is_respelled_and_merged_by_position(gemma_files) -> None:
    assert set(gemma_files) == set(TOKENIZER_FILES)
    backend = json.loads(gemma_files["tokenizer.json"])
    assert len(backend["model"]["vocab"]) == 262_144
    assert backend["model"]["vocab"]["▁▁▁▁"] == 140  # stored as four real spaces
    assert backend["model"]["merges"][:2] == [["\n", "\n"], ["\n\n", "\n"]]  # by position
    assert len(backend["model"]["merges"]) == 514_906  # as transformers derives them
    assert sum(t["special"] for t in backend["added_tokens"]) == 6249  # the control tokens


# --- conversion on small vocabularies --------------------------------------------------


def test_merges_follow_the_token_order_not_the_scores() -> None:
    # "bc" comes before "ab": "abc" splits a|bc, although the scores favour "ab".
    scores = {"tokenizer.ggml.scores": [0.0] * 262 + [0, 0, 0, -5.0, 5.0]}
    tok = toy(["a", "b", "c", "bc", "ab"], **scores)
    vocab = tok._tok.get_vocab()
    assert tok.encode("abc", add_bos=False) == [vocab["a"], vocab["bc"]]
    assert derive_merges(["a", "b", "c", "bc", "ab"]) == [("b", "c"), ("a", "b")]
    listed = toy(["a", "b", "c", "bc", "ab"], **{"tokenizer.ggml.merges": ["a b"]})
    assert listed.encode("abc", add_bos=False) == [vocab["ab"], vocab["c"]]  # the file's own


def test_space_runs_are_respelled_and_text_has_no_prefix_space() -> None:
    tok = toy(["▁", "a", "b", "  ", "▁b"])
    vocab = tok._tok.get_vocab()
    assert "  " not in vocab and vocab["▁▁"] == 265
    ids = tok.encode("a  b")
    assert ids == [2, vocab["a"], vocab["▁▁"], vocab["b"]]
    assert tok.decode(ids) == "a  b"
    assert tok.encode("b", add_bos=False) == [vocab["b"]]  # not "▁b"


def test_add_space_prefix_prepends_a_space_to_each_text_run() -> None:
    tok = toy(["▁", "a", "▁a"], **{"tokenizer.ggml.add_space_prefix": True})
    vocab = tok._tok.get_vocab()
    assert tok.encode("a<end_of_turn>a", add_bos=False) == [vocab["▁a"], 5, vocab["▁a"]]


def test_unknown_characters_fall_back_to_bytes() -> None:
    tok = toy(["a"])
    assert tok.encode("é", add_bos=False) == [6 + 0xC3, 6 + 0xA9]
    assert tok.decode([6 + 0xC3, 6 + 0xA9]) == "é"
    assert tok.decode([6 + 0xC3, 6 + 0x41]) == "\ufffd\ufffd"  # an invalid run


def test_reading_a_gguf_by_path_equals_reading_it_with_gguf_reader(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    meta = toy_meta(["▁", "a", "b", "ab", "  "])
    path = tmp_path / "toy.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_scores([0.0] * len(meta["tokenizer.ggml.tokens"]))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ bos_token }}{{ messages[0]['content'] }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    by_path = tokenizer_files_from_gguf(path)
    assert by_path == tokenizer_files_from_gguf(gguf.GGUFReader(str(path)))
    config = json.loads(by_path["tokenizer_config.json"])
    assert config["chat_template_source"] == "gguf"
    assert config["stop_ids"] == [1, 5]  # <eos>, and <end_of_turn> found by its spelling

    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError) as exc:
        tokenizer_files_from_gguf(tmp_path / "cut.gguf")
    assert "cut.gguf: cannot read GGUF metadata (truncated" in one_line(exc)


def test_bad_ggufs_say_what_and_where_in_one_line(tmp_path) -> None:
    with pytest.raises(ConversionError) as exc:
        tokenizer_files_from_gguf(tmp_path / "none.gguf")
    assert "none.gguf: cannot read the GGUF file" in one_line(exc)
    (tmp_path / "text.gguf").write_bytes(b"not a gguf file at all, just some text")
    with pytest.raises(ConversionError) as exc:
        tokenizer_files_from_gguf(tmp_path / "text.gguf")
    assert "not GGUF version 2 or 3" in one_line(exc)
    with pytest.raises(ConversionError) as exc:
        tokenizer_files_from_metadata(toy_meta(["a"], **{"general.architecture": "llama"}))
    assert "architecture 'llama' is not supported" in one_line(exc)
    with pytest.raises(ConversionError) as exc:
        tokenizer_files_from_metadata(toy_meta(["a"], **{"tokenizer.ggml.bos_token_id": 99999}))
    assert "tokenizer.ggml.bos_token_id is 99999" in one_line(exc)


# --- the chat template -----------------------------------------------------------------


def test_the_builtin_template_folds_system_maps_assistant_and_trims() -> None:
    tok = toy(["a"])
    assert tok.config.chat_template == GEMMA_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "\nHi\n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.render_chat(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_a_gguf_template_is_sandboxed_and_its_refusals_are_input_errors() -> None:
    refuse = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    tok = toy(["a"], **{"tokenizer.chat_template": refuse + "{{ messages[0]['content'] }}"})
    assert tok.render_chat([{"role": "user", "content": "a"}]) == "a"
    assert tok.encode_chat([{"role": "user", "content": "a"}])[0] == 2  # no <bos>: added
    with pytest.raises(InputError) as exc:
        tok.render_chat([{"role": "model", "content": "a"}])
    assert "refuses these messages: user first" in one_line(exc)
    mutate = toy(["a"], **{"tokenizer.chat_template": "{{ messages.append(1) }}"})
    with pytest.raises(InputError) as exc:
        mutate.render_chat([{"role": "user", "content": "a"}])
    assert "SecurityError" in one_line(exc)
    broken = toy(["a"], **{"tokenizer.chat_template": "{% if %}"})
    with pytest.raises(ModelFormatError) as exc:
        broken.render_chat([{"role": "user", "content": "a"}])
    assert "is not valid Jinja" in one_line(exc)


def test_bad_inputs_are_one_line_input_errors() -> None:
    tok = toy(["a"])
    cases = [
        (lambda: tok.encode(b"a"), "expected text to tokenize, got bytes"),
        (lambda: tok.encode("a\udc80"), "not valid UTF-8 (at character 1)"),
        (lambda: tok.decode([0, 10**6]), "token id 1000000 is outside the vocabulary"),
        (lambda: tok.stream().push(-1), "token id -1 is outside"),
        (lambda: tok.render_chat([]), "non-empty list of chat messages"),
        (lambda: tok.render_chat([{"role": "user"}]), "chat message 0 is"),
    ]
    for call, expected in cases:
        with pytest.raises(InputError) as exc:
            call()
        assert expected in one_line(exc)


# --- loading from a model directory ----------------------------------------------------


def test_missing_or_damaged_tokenizer_files_are_one_line_errors(tmp_path) -> None:
    files = tokenizer_files_from_metadata(toy_meta(["a"]))
    with pytest.raises(ModelFormatError) as exc:
        Tokenizer.from_dir(tmp_path / "absent")
    assert "model directory not found" in one_line(exc)
    with pytest.raises(ModelFormatError) as exc:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json: not found; run `edgemind convert`" in one_line(exc)
    (tmp_path / "tokenizer.json").write_bytes(files["tokenizer.json"])
    with pytest.raises(ModelFormatError) as exc:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer_config.json: not found" in one_line(exc)
    config = json.loads(files["tokenizer_config.json"])
    for damage, expected in [
        ({"version": 99}, "found format 'edgemind-tokenizer' version 99, expected"),
        ({"stop_ids": "1"}, "stop_ids is '1', which is not valid"),
        ({"eos_id": 10**6}, "special token id 1000000 is outside"),
    ]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | damage))
        with pytest.raises(ModelFormatError) as exc:
            Tokenizer.from_dir(tmp_path)
        assert expected in one_line(exc)
    (tmp_path / "tokenizer_config.json").write_bytes(files["tokenizer_config.json"])
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ModelFormatError) as exc:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json cannot be loaded" in one_line(exc)


def test_without_jinja2_a_chat_names_the_extra_to_install(monkeypatch) -> None:
    tok = toy(["a"])
    assert tok.encode("a") == [2, 262]  # encoding needs no Jinja
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(MissingExtraError) as exc:
        tok.render_chat([{"role": "user", "content": "a"}])
    assert "pip install 'edgemind-runtime[gguf]'" in one_line(exc)
