"""Make the pooling parity reference: a tiny random BERT pooled by sentence-transformers.

This script is the provenance of ``pooling/``. It builds a random
``transformers.BertModel`` (seeded, float32, eager attention), saves it as a Hugging Face
checkpoint (``pooling/checkpoint/``: ``config.json`` + ``model.safetensors``), and pools
its token states after every encoder layer with sentence-transformers' own ``Pooling``
and ``Normalize`` modules, for each variant in :data:`VARIANTS` (the pooling config a
checkpoint's ``1_Pooling/config.json`` carries, and whether ``modules.json`` lists
``Normalize``). The tests assemble a sentence-transformers checkpoint per variant from
these files, convert it and compare. torch is not an edgemind dependency: run this once,
in a separate environment, and commit its outputs::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors sentence-transformers
    /tmp/refvenv/bin/python tests/data/make_pooling_reference.py

Outputs, in ``pooling/`` next to this script:

- ``checkpoint/config.json``, ``checkpoint/model.safetensors``: the random BERT;
- ``reference.json``: the variants, the versions that made the reference;
- ``reference.npz``: ``input_ids``/``attention_mask`` (batch, seq) int32 (padded rows
  included) and, per variant, ``<name>`` (levels, batch, hidden) float32, level k =
  pooled after encoder layer k.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# torch, transformers and sentence-transformers are imported inside main(): pytest's
# doctest collection imports this module in edgemind's own environment.

HERE = Path(__file__).resolve().parent / "pooling"
CONFIG = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "vocab_size": 120,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
_OFF = {
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": False,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}
# name -> (the pooling config key that is on, Normalize in modules.json)
VARIANTS = {
    "cls": ("pooling_mode_cls_token", False),
    "cls_normalize": ("pooling_mode_cls_token", True),
    "mean": ("pooling_mode_mean_tokens", False),
    "mean_normalize": ("pooling_mode_mean_tokens", True),
    "max": ("pooling_mode_max_tokens", False),
    "mean_sqrt_len": ("pooling_mode_mean_sqrt_len_tokens", False),
}


def pooling_config(name: str) -> dict[str, Any]:
    """The ``1_Pooling/config.json`` of variant ``name``."""
    key, _ = VARIANTS[name]
    return {"word_embedding_dimension": CONFIG["hidden_size"], **_OFF, key: True}


def main() -> None:
    import sentence_transformers
    import torch
    import transformers
    from safetensors.torch import save_file
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    torch.manual_seed(0)
    config = transformers.BertConfig(**CONFIG)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # larger than the init's 0.02, so pooling modes differ clearly
        for p in model.parameters():
            p.mul_(10.0 if p.dim() > 1 else 1.0)
    model.config._attn_implementation = "eager"
    (HERE / "checkpoint").mkdir(parents=True, exist_ok=True)
    (HERE / "checkpoint" / "config.json").write_text(json.dumps(CONFIG, indent=1) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(HERE / "checkpoint" / "model.safetensors"))

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, CONFIG["vocab_size"], (4, 9), generator=gen)
    lengths = torch.tensor([9, 5, 1, 7])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0 where the mask is 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    states = out.hidden_states[1:]  # [0] is the embeddings' output

    arrays: dict[str, np.ndarray] = {
        "input_ids": ids.numpy().astype(np.int32),
        "attention_mask": mask.numpy().astype(np.int32),
    }
    for name, (_, normalize) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as folder:  # loaded as a checkpoint's 1_Pooling
            (Path(folder) / "config.json").write_text(json.dumps(pooling_config(name)))
            pooling = Pooling.load(folder)
        levels = []
        for h in states:
            features = pooling({"token_embeddings": h, "attention_mask": mask})
            if normalize:
                features = Normalize()(features)
            levels.append(features["sentence_embedding"].numpy().astype(np.float32))
        arrays[name] = np.stack(levels)
    np.savez_compressed(HERE / "reference.npz", **arrays)
    info = {
        "variants": {
            name: {"pooling": pooling_config(name), "normalize": VARIANTS[name][1]}
            for name in VARIANTS
        },
        "levels": "level k (1-based) = pooled after encoder layer k; the last is the full model",
        "made_by": "tests/data/make_pooling_reference.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "attn_implementation": "eager",
    }
    (HERE / "reference.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {len(VARIANTS)} variants, {len(states)} levels, batch {ids.shape[0]}")


if __name__ == "__main__":
    main()
