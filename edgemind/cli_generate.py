"""``edgemind generate``: text generation with a decoder model (a converted GGUF).

Text streams to stdout as it is generated (one prompt), or each row's text is printed
when done (several prompts, decoded together); the closing report goes to stderr.
``--json`` prints one object instead: with one prompt its ``prompt_token_ids``,
``token_ids``, ``text``, ``finish_reason`` and ``logprobs`` at the top level, with
several a ``choices`` list of those; and the plan's figures and the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgemind.units import format_bytes


def add_parser(sub: Any, parents: list[argparse.ArgumentParser], types: dict[str, Any]) -> None:
    """The ``generate`` subcommand (``types``: the CLI's checked argument types)."""
    gen = sub.add_parser(
        "generate",
        parents=parents,
        help="generate text with a decoder model (edgemind convert MODEL.gguf DIR)",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR")
    gen.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="prompt (repeat it for several prompts, decoded together as a batch)",
    )
    gen.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user turn of the chat template"
    )
    gen.add_argument("--max-tokens", type=types["positive"], default=64, metavar="N")
    gen.add_argument(
        "--temperature",
        type=types["nonnegative"],
        default=0.0,
        metavar="T",
        help="0 (the default) is greedy",
    )
    gen.add_argument("--top-k", type=types["count"], default=0, metavar="K", help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1: off")
    gen.add_argument("--min-p", type=float, default=0.0, metavar="P", help="0: off")
    gen.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="1: off")
    gen.add_argument("--seed", type=types["seed"], metavar="S", help="same seed, same tokens")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string")
    gen.add_argument(
        "--top-logprobs", type=types["count"], default=0, metavar="K", help="with --json"
    )
    gen.add_argument(
        "--chunk", type=types["positive"], default=64, metavar="N", help="prefill tokens per step"
    )
    gen.add_argument(
        "--context",
        type=types["positive"],
        metavar="N",
        help="positions to plan the KV cache for (default: the prompt + --max-tokens)",
    )
    gen.add_argument(
        "--kv-dtype", choices=("float32", "bfloat16"), help="the KV cache's element type"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write the generation metrics here (Prometheus text, node_exporter's collector)",
    )


def generate_command(args: argparse.Namespace, policy: Any) -> int:
    """Run ``edgemind generate``; returns the exit code (0, or 3 on finish_reason memory)."""
    from edgemind.runtime import Runtime
    from edgemind.sampling import SamplingParams
    from edgemind.textgen import generate_text
    from edgemind.tokenizer import Tokenizer

    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        top_logprobs=args.top_logprobs,
    )
    if args.metrics_textfile:
        from edgemind.metrics import check_textfile_path

        check_textfile_path(args.metrics_textfile)
    tokenizer = Tokenizer.from_dir(args.model_dir)
    stream = not args.json and len(args.prompt) == 1

    def show(_: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with Runtime.open(args.model_dir, policy) as runtime:
        out = generate_text(
            runtime,
            tokenizer,
            args.prompt,
            sampling,
            chat=args.chat,
            chunk=args.chunk,
            context=args.context,
            on_text=show if stream else None,
        )
    gen = out.generation
    if args.metrics_textfile:
        from prometheus_client import CollectorRegistry

        from edgemind.generation_metrics import GenerationMetrics
        from edgemind.metrics import write_textfile

        registry = CollectorRegistry()
        GenerationMetrics(registry, gen.report.model_name).observe(gen)
        write_textfile(registry, args.metrics_textfile)
    if args.json:
        print(json.dumps(generation_dict(out), indent=1))
    else:
        if stream:
            print()
        else:
            for row, choice in enumerate(out.choices):
                print(f"--- prompt {row + 1} ({choice.finish_reason})\n{choice.text}")
        print(report_text(gen), file=sys.stderr)
    return 3 if any(c.finish_reason == "memory" for c in out.choices) else 0


def _choice_dict(choice: Any) -> dict[str, Any]:
    return {
        "prompt_token_ids": list(choice.prompt_token_ids),
        "token_ids": list(choice.token_ids),
        "text": choice.text,
        "finish_reason": choice.finish_reason,
        "logprobs": [
            {
                "id": t.id,
                "logprob": t.logprob,
                "top_logprobs": [{"id": a.id, "logprob": a.logprob} for a in t.top],
            }
            for t in choice.logprobs
        ],
    }


def generation_dict(out: Any) -> dict[str, Any]:
    """The ``--json`` object: the choice(s), the plan's figures and the report."""
    gen = out.generation
    r = gen.report
    body: dict[str, Any] = (
        _choice_dict(out.choices[0])
        if len(out.choices) == 1
        else {"choices": [_choice_dict(c) for c in out.choices]}
    )
    body["plan"] = {
        "capacity_bytes": r.capacity_bytes,
        "arena_bytes": r.arena_bytes,
        "peak_bytes": r.plan_peak_bytes,
        "kv_bytes": r.kv_bytes,
        "pinned_bytes": r.pinned_bytes,
        "context": r.context,
        "chunk": r.chunk,
        "batch": r.batch,
        "streamed_bytes_per_token": gen.plan.streamed_bytes,
        "pinned_layers": list(gen.plan.pinned_layers),
        "notes": list(gen.plan.notes),
    }
    body["report"] = {
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": r.generated_tokens,
        "time_to_first_token_s": r.time_to_first_token_s,
        "prefill_s": r.prefill_s,
        "decode_s": r.decode_s,
        "prefill_tokens_per_s": r.prefill_tokens_per_s,
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "bytes_read_prefill": r.bytes_read_prefill,
        "bytes_read_per_token": r.bytes_read_per_token,
        "planned_peak_bytes": r.plan_peak_bytes,
        "observed_peak_bytes": r.observed_peak_bytes,
    }
    return body


def report_text(gen: Any) -> str:
    """The closing report: speed, bytes read and memory, planned against observed."""
    r = gen.report
    observed = "n/a" if r.observed_peak_bytes is None else format_bytes(r.observed_peak_bytes)
    return (
        f"edgemind: {r.batch} x ({r.prompt_tokens} prompt + {r.generated_tokens} generated) "
        f"tokens, context {r.context}; first token {r.time_to_first_token_s:.2f} s; prefill "
        f"{r.prefill_tokens_per_s:.1f} tok/s, decode {r.decode_tokens_per_s:.2f} tok/s; read "
        f"{format_bytes(int(r.bytes_read_per_token))}/token; KV cache {format_bytes(r.kv_bytes)}, "
        f"pinned {format_bytes(r.pinned_bytes)}; peak planned {format_bytes(r.plan_peak_bytes)}, "
        f"observed {observed} (capacity {format_bytes(r.capacity_bytes)})"
    )


def session_plan_command(args: argparse.Namespace, policy: Any) -> int:
    """``edgemind plan MODEL --context N``: a generation session's plans and what fits.

    ``--batch`` rows, ``--seq`` prompt tokens per prefill step (default 64). Exit 0
    when the session fits, 4 when it does not (the largest context that does is shown).
    """
    from edgemind.cli_text import format_plan, plan_dict
    from edgemind.runtime import Runtime
    from edgemind.runtime.generation import largest_context, vocab_size

    batch = args.batch or 1
    chunk = min(args.seq or 64, args.context)
    with Runtime.open(args.model_dir, policy) as runtime:
        vocab_size(runtime.manifest)  # a decoder, or a one-line error
        session = runtime.session(batch, args.context, chunk)
        largest = largest_context(runtime, batch, chunk, args.context + 1)
        summary = session_dict(session, largest)
    if args.json:
        summary["decode_plan"] = plan_dict(session.decode_plan)
        summary["prefill_plan"] = plan_dict(session.prefill_plan)
        print(json.dumps(summary, indent=1))
    else:
        print(format_plan(session.decode_plan, policy, buffers=args.buffers))
        print()
        for key, value in summary.items():
            shown = format_bytes(value) if key.endswith("_bytes") else value
            print(f"{key.replace('_', ' ')}: {shown}")
    if args.plot:
        from edgemind.viz import save_timeline

        save_timeline(session.decode_plan, args.plot)
    return 0 if session.feasible else 4


def session_dict(session: Any, largest: int) -> dict[str, Any]:
    """A session's figures: KV cache, tiles, what is streamed per token, what is pinned."""
    plan = session.decode_plan
    tiled = sorted({s.layer for s in plan.steps if s.tile is not None})
    return {
        "verdict": "fits" if session.feasible else "does not fit",
        "batch": session.batch,
        "context": session.context,
        "prefill_chunk": session.chunk,
        "capacity_bytes": session.capacity_bytes,
        "session_peak_bytes": session.peak_bytes,
        "session_arena_bytes": session.arena_bytes,
        "kv_cache_bytes": session.kv_bytes,
        "pinned_bytes": sum(b.nbytes for b in plan.buffers if b.role == "pinned"),
        "pinned_layers": len(plan.pinned_layers),
        "streamed_per_token_bytes": plan.streamed_bytes,
        "tiled_units": ", ".join(
            f"{u} ({sum(1 for s in plan.steps if s.layer == u and s.tile)} tiles)" for u in tiled
        )
        or "none",
        "largest_context_that_fits": largest,
    }
