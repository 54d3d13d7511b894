"""The llama.cpp peer row: prefill and decode speed and peak RSS of llama-cpp-python on a GGUF.

Runs in the bench venv (``bash bench/llamacpp_venv.sh`` builds it and prints its path),
not in edgemind's: it imports only the standard library, ``llama_cpp`` and NumPy (a
dependency of ``llama_cpp``). For a fixed prompt it times, around llama.cpp's own
``eval`` calls, the prefill of the prompt tokens and ``--tokens`` greedy decode steps
(argmax of the last logits, read straight from the context), after ``--warmup`` untimed
rounds; medians over ``--repeats``. Memory is this process's: RSS after importing
``llama_cpp`` but before the model loads, and the high-water mark (``VmHWM`` and
``getrusage``) after the runs. Last, the streaming bound reference: a plain ``readinto``
of the whole GGUF from the page cache into a preallocated buffer (warm once, median of 5),
measured after the peak so its buffer does not count in it.

Prints one JSON object on stdout; when ``llama_cpp`` does not import it prints
``{"peer": "llama.cpp", "skipped": "<reason>"}`` and exits 0. Exit 1 on a bad GGUF path.

    VENV=$(bash bench/llamacpp_venv.sh)
    "$VENV/bin/python" bench/bench_llamacpp.py --gguf /tmp/gemma.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# About 100 English tokens for the Gemma 3 tokenizer; fixed so runs compare.
DEFAULT_PROMPT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after "
    "decades of salt wind and winter storms. Every evening the keeper climbed the narrow "
    "spiral stairs, trimmed the wick, and watched the beam sweep across the dark water. "
    "Ships passing in the night relied on that steady light to find the harbor, and the "
    "fishermen in the village below said they could set their clocks by it. One autumn, "
    "a letter arrived announcing that the light would soon be replaced by an automatic "
    "beacon, and the keeper"
)
GREEDY_IDS_SHOWN = 16
READINTO_REPEATS = 5


def _status_bytes(field: str) -> int | None:
    """A ``kB`` line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def _greedy_id(llama_cpp: Any, llm: Any, np: Any) -> int:
    """The argmax of the last evaluated position's logits (temperature 0)."""
    logits_ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    n_vocab = llm.n_vocab()
    if np is not None:
        return int(np.ctypeslib.as_array(logits_ptr, shape=(n_vocab,)).argmax())
    return max(range(n_vocab), key=logits_ptr.__getitem__)


def _one_round(llama_cpp: Any, llm: Any, np: Any, prompt_ids: list[int], n_decode: int):
    """Prefill the prompt from an empty cache, then decode greedily; (prefill_s, decode_s, ids)."""
    llm.reset()  # n_tokens = 0; the next eval drops every cached position
    start = time.perf_counter()
    llm.eval(prompt_ids)
    next_id = _greedy_id(llama_cpp, llm, np)
    prefill_s = time.perf_counter() - start
    generated = [next_id]
    start = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([next_id])
        next_id = _greedy_id(llama_cpp, llm, np)
        generated.append(next_id)
    decode_s = time.perf_counter() - start
    return prefill_s, decode_s, generated


def _llama_perf(llama_cpp: Any, llm: Any) -> dict[str, float] | None:
    """llama.cpp's own timings over the timed rounds, a cross-check of the wall times."""
    if not hasattr(llama_cpp, "llama_perf_context"):
        return None
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {
        "prefill_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms else 0.0,
        "decode_tok_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms else 0.0,
        "n_p_eval": perf.n_p_eval,
        "n_eval": perf.n_eval,
    }


def _readinto_s(path: Path, repeats: int) -> float:
    """Median seconds to ``readinto`` the whole file from the page cache (warmed once)."""
    size_bytes = path.stat().st_size
    buffer = bytearray(size_bytes)  # zero-filled, so its pages are already faulted in
    view = memoryview(buffer)

    def read_all() -> None:
        with open(path, "rb", buffering=0) as raw:
            done_bytes = 0
            while done_bytes < size_bytes:
                got = raw.readinto(view[done_bytes:])
                if not got:
                    raise OSError(f"{path}: short read at {done_bytes} of {size_bytes} bytes")
                done_bytes += got

    read_all()
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_all()
        times_s.append(time.perf_counter() - start)
    return float(statistics.median(times_s))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF model file")
    parser.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch")
    parser.add_argument("--ctx", type=int, default=512, help="n_ctx (prompt + decode must fit)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text (default ~100 tokens)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--mmap", action=argparse.BooleanOptionalAction, default=True, help="llama.cpp use_mmap"
    )
    return parser


def _measure(llama_cpp: Any, np: Any, args: argparse.Namespace) -> dict[str, Any]:
    load_average_1m = os.getloadavg()[0]  # other work on the machine skews every figure
    rss_before_load_bytes = _status_bytes("VmRSS")
    load_start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(args.gguf),
        n_ctx=args.ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        use_mmap=args.mmap,
        verbose=False,
    )
    load_s = time.perf_counter() - load_start
    prompt_ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True)
    if len(prompt_ids) + args.tokens + 1 > args.ctx:
        raise ValueError(
            f"{len(prompt_ids)} prompt + {args.tokens} decode tokens exceed n_ctx {args.ctx};"
            " raise --ctx or lower --tokens"
        )
    for _ in range(args.warmup):
        _one_round(llama_cpp, llm, np, prompt_ids, args.tokens)
    if hasattr(llama_cpp, "llama_perf_context_reset"):
        llama_cpp.llama_perf_context_reset(llm.ctx)
    rounds = [_one_round(llama_cpp, llm, np, prompt_ids, args.tokens) for _ in range(args.repeats)]
    peak_rss_bytes = _status_bytes("VmHWM")
    peak_maxrss_bytes = _maxrss_bytes()
    prefill_s = [r[0] for r in rounds]
    decode_s = [r[1] for r in rounds]
    if any(r[2] != rounds[0][2] for r in rounds):
        raise ValueError("greedy decoding differed between rounds; the run is not deterministic")
    return {
        "peer": "llama.cpp",
        "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "gguf": str(args.gguf),
        "gguf_bytes": args.gguf.stat().st_size,
        "use_mmap": args.mmap,
        "threads": args.threads,
        "load_average_1m": load_average_1m,
        "n_ctx": args.ctx,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_s": load_s,
        "prompt_tokens": len(prompt_ids),
        "decode_tokens": args.tokens,
        "prefill_s": statistics.median(prefill_s),
        "prefill_tok_s": len(prompt_ids) / statistics.median(prefill_s),
        "decode_s": statistics.median(decode_s),
        "prefill_s_rounds": prefill_s,
        "decode_s_rounds": decode_s,
        "decode_tok_s": args.tokens / statistics.median(decode_s),
        "rss_before_load_bytes": rss_before_load_bytes,
        "peak_rss_bytes": peak_rss_bytes if peak_rss_bytes is not None else peak_maxrss_bytes,
        "peak_rss_getrusage_bytes": peak_maxrss_bytes,
        "llama_perf": _llama_perf(llama_cpp, llm),
        "greedy_ids": rounds[0][2][:GREEDY_IDS_SHOWN],
        "greedy_text": llm.detokenize(rounds[0][2][:GREEDY_IDS_SHOWN]).decode("utf-8", "replace"),
        "prompt_ids": prompt_ids,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import llama_cpp
    except Exception as exc:  # any import failure means this row is skipped, not an error
        print(json.dumps({"peer": "llama.cpp", "skipped": f"llama_cpp not importable: {exc}"}))
        return 0
    try:
        import numpy as np
    except ImportError:
        np = None
    if not args.gguf.is_file():
        print(f"error: GGUF {args.gguf} is not a file; pass --gguf PATH", file=sys.stderr)
        return 1
    if min(args.threads, args.tokens, args.repeats, args.ctx) < 1 or args.warmup < 0:
        print("error: --threads, --tokens, --repeats, --ctx must be >= 1", file=sys.stderr)
        return 2
    try:
        result = _measure(llama_cpp, np, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result["readinto_file_s"] = _readinto_s(args.gguf, READINTO_REPEATS)
    result["readinto_file_gb_s"] = result["gguf_bytes"] / result["readinto_file_s"] / 1e9
    result["cpus_available"] = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
