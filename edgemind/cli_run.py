"""``edgemind run``: load or make the input, serve the requests, report and save.

The CLI's run command apart from argument parsing: it feeds the metrics (stdout,
Prometheus, textfile), writes ``--output`` and ``--plot`` files atomically, and hands
known errors back to :func:`edgemind.cli.main`, which prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from edgemind.errors import MemoryQuotaExceeded
from edgemind.policy import Policy

MAX_TEXT_FILE_BYTES = 64 << 20  # --text-file: far more text than one batch can hold


def run_command(args: argparse.Namespace, policy: Policy, dims: dict[str, int]) -> bool:
    """``edgemind run``: serve the requests, print the report; True when complete."""
    from prometheus_client import CollectorRegistry

    from edgemind.metrics import RunMetrics, check_textfile_path, start_http_exporter
    from edgemind.runtime import Runtime

    runtime = Runtime.open(args.model_dir, policy)
    policy = runtime.policy
    check_physical_memory(policy.arena_capacity_bytes)
    if args.metrics_textfile:
        check_textfile_path(args.metrics_textfile)
    registry = CollectorRegistry()
    metrics = RunMetrics(registry, runtime.manifest.model_name)
    addr = args.metrics_addr or (policy.metrics_http_addr if policy.metrics_enable_http else None)
    exporter = start_http_exporter(registry, addr) if addr else None
    if exporter is not None and not exporter.loopback_only:  # written explicitly; say so
        print(f"edgemind: metrics {exporter.describe()}", file=sys.stderr, flush=True)
    try:
        with runtime:
            complete = _serve_requests(args, runtime, metrics, dims)
        if exporter is not None and args.linger:  # the arena is released by now
            print(
                f"edgemind: serving metrics at {exporter.url} for {args.linger:g} s, "
                f"{exporter.describe()}",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(args.linger)
    finally:
        if exporter is not None:
            exporter.close()
    return complete


def physical_memory_bytes() -> int | None:
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_physical_memory(capacity_bytes: int) -> None:
    """Refuse, before any allocation, to run with a capacity larger than the machine's RAM.

    Planning for a bigger machine is fine (``edgemind plan`` does not check); running
    is not: the arena could not be backed, and NumPy would fail mid-request.
    """
    from edgemind.errors import PolicyError
    from edgemind.units import format_bytes

    ram = physical_memory_bytes()
    if ram is not None and ram > 0 and capacity_bytes > ram:
        raise PolicyError(
            f"arena capacity {format_bytes(capacity_bytes)} is more than this machine's "
            f"{format_bytes(ram)} of memory; lower model.arena_capacity_mb, --arena-mb or "
            "--arena-bytes"
        )


def _serve_requests(
    args: argparse.Namespace, runtime: Any, metrics: Any, dims: dict[str, int]
) -> bool:
    """Run ``--repeat`` requests, feeding the metrics; print and save the last result, and
    the latency over all of them."""
    import numpy as np

    from edgemind.metrics import write_textfile
    from edgemind.report_text import format_report, report_dict

    texts = _texts(args)
    if texts is not None:
        request = _text_request(runtime, texts)
    else:
        request = _array_request(args, runtime, dims)
    latencies_s: list[float] = []
    try:
        for _ in range(args.repeat):
            start = time.perf_counter()
            try:
                result, output, complete = request()
            except MemoryQuotaExceeded as exc:
                latency = time.perf_counter() - start
                metrics.observe_rejection(exc, getattr(exc, "plan", None), latency_s=latency)
                raise
            metrics.observe(result.report)
            latencies_s.append(result.report.latency_s)
    finally:
        if args.metrics_textfile:
            write_textfile(metrics.registry, args.metrics_textfile)
    if args.output and output is not None:
        _save_output(args.output, np.asarray(output))
    plan = runtime.last_plan
    if args.plot:
        from edgemind.viz import save_timeline

        save_timeline(plan, args.plot, result.report)
    count = metrics.quota_exceeded_count
    written = {"output_path": args.output, "plot_path": args.plot}
    if args.json:
        out = report_dict(result.report, plan, quota_exceeded_count=count)
        if texts is not None:
            from edgemind.embedding import cosine_similarities

            out["truncated"] = list(result.truncated)
            out["seq_len"] = result.seq_len
            out["similarities"] = cosine_similarities(result.vectors).round(6).tolist()
        if args.repeat > 1:
            out["repeat"] = latency_summary(latencies_s)
        out.update({key: path for key, path in written.items() if path})
        print(json.dumps(out, indent=1))
    else:
        if texts is not None:
            from edgemind.embedding import format_embeddings

            print(format_embeddings(texts, result), end="\n\n")
        print(format_report(result.report, plan, quota_exceeded_count=count))
        if args.repeat > 1:
            print(format_latency_summary(latency_summary(latencies_s)))
        if args.output:
            print(f"output written to {args.output}")
        if args.plot:
            print(f"timeline written to {args.plot}")
    return bool(complete)


def latency_summary(latencies_s: list[float]) -> dict[str, Any]:
    """Mean, median and 95th percentile latency of ``--repeat`` requests, in ms.

    >>> latency_summary([0.001, 0.002, 0.003])
    {'requests': 3, 'latency_mean_ms': 2.0, 'latency_p50_ms': 2.0, 'latency_p95_ms': 2.9}
    """
    import numpy as np

    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    return {
        "requests": len(latencies_s),
        "latency_mean_ms": round(float(ms.mean()), 3),
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 3),
        "latency_p95_ms": round(float(np.percentile(ms, 95)), 3),
    }


def format_latency_summary(summary: dict[str, Any]) -> str:
    """One line for the terminal: ``latency over 10 requests: mean 4.1 ms, p50 ...``."""
    return (
        f"latency over {summary['requests']} requests: mean {summary['latency_mean_ms']:.3f} ms, "
        f"p50 {summary['latency_p50_ms']:.3f} ms, p95 {summary['latency_p95_ms']:.3f} ms"
    )


def _texts(args: argparse.Namespace) -> list[str] | None:
    """The texts of ``--text`` and ``--text-file`` (one per line, blank lines skipped)."""
    from edgemind.errors import InputError

    if args.text is None and args.text_file is None:
        return None
    if args.plan:
        raise InputError(
            "--plan applies to array inputs; with --text the shape comes from "
            "the texts (drop --plan)"
        )
    texts = list(args.text or [])
    if args.text_file:
        from edgemind.files import read_bounded

        blob = read_bounded(
            args.text_file,
            MAX_TEXT_FILE_BYTES,
            what="text file",
            error=InputError,
            where=f"--text-file {args.text_file}",
        )
        try:
            lines = blob.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(
                f"--text-file {args.text_file}: not UTF-8 (byte 0x{blob[exc.start]:02x} at "
                f"offset {exc.start}); save the texts as UTF-8"
            ) from None
        texts += [line for line in lines if line.strip()]
    return texts


def _text_request(runtime: Any, texts: list[str]) -> Any:
    from edgemind.embedding import embed

    def request() -> tuple[Any, Any, bool]:
        emb = embed(runtime, texts)
        return emb, emb.vectors, emb.complete

    return request


def _array_request(args: argparse.Namespace, runtime: Any, dims: dict[str, int]) -> Any:
    from edgemind.planner.planfile import check_plan_matches, load_plan
    from edgemind.runtime.runtime import dims_of

    seed = 0 if args.seed is None else args.seed
    inputs = _load_input(runtime.manifest, args.input, seed, dims)
    if args.input:  # the file sets the shape: --batch/--seq may only agree with it
        _check_given_dims(args, dims_of(runtime.manifest, inputs))
    if args.plan:
        plan = load_plan(args.plan)
        check_plan_matches(
            plan,
            runtime.manifest.digest(),
            runtime.policy.digest(),
            inputs[0].shape,
            source=args.plan,
        )
        runtime.use_plan(plan, source=args.plan, **dims_of(runtime.manifest, inputs))

    def request() -> tuple[Any, Any, bool]:
        result = runtime.run(*inputs)
        return result, result.output, result.complete

    return request


def _check_given_dims(args: argparse.Namespace, found: dict[str, int]) -> None:
    """Refuse ``--batch``/``--seq`` that disagree with the ``--input`` file's shape."""
    from edgemind.errors import InputError

    for dim in ("batch", "seq"):
        given = getattr(args, dim)
        if given is not None and dim in found and found[dim] != given:
            raise InputError(
                f"--{dim} {given} disagrees with --input {args.input}, whose {dim} is "
                f"{found[dim]}; the file sets the shape (drop --{dim})"
            )


def _load_input(manifest: Any, path: str | None, seed: int, dims: dict[str, int]) -> tuple:
    """The request's inputs: from a .npy (one input) or .npz (named inputs) file, or seeded
    random values of the planned shape (other inputs, such as a mask, all ones)."""
    if path is None:
        return _random_input(manifest, seed, dims)
    return _file_input(manifest, path)


def _random_input(manifest: Any, seed: int, dims: dict[str, int]) -> tuple:
    import numpy as np

    from edgemind.errors import InputError, ModelFormatError
    from edgemind.units import format_bytes

    rng = np.random.default_rng(seed)
    arrays = []
    ram = physical_memory_bytes()
    for i, spec in enumerate(manifest.inputs):
        try:
            shape = spec.concrete_shape(dims)
        except ModelFormatError as exc:
            raise InputError(str(exc)) from None
        nbytes = math.prod(shape) * np.dtype(spec.dtype).itemsize
        if ram and nbytes > ram:  # refused before NumPy tries (and the OOM killer acts)
            raise InputError(
                f"input {spec.name!r} of shape {shape} takes {format_bytes(nbytes)}, more than "
                f"this machine's {format_bytes(ram)} of memory; lower --batch or --seq"
            )
        if i:
            arrays.append(np.ones(shape, spec.dtype))
        elif np.dtype(spec.dtype).kind in "iu":
            arrays.append(rng.integers(0, 100, size=shape).astype(spec.dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(spec.dtype))
    return tuple(arrays)


def _file_input(manifest: Any, path: str) -> tuple:
    import zipfile

    import numpy as np

    from edgemind.errors import InputError
    from edgemind.files import open_regular

    names = [spec.name for spec in manifest.inputs]
    try:
        with open_regular(path) as f:  # ours to close, whatever np.load makes of it
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                arrays: tuple = (loaded,)
            else:
                missing = [n for n in names if n not in loaded.files]
                if missing:
                    raise InputError(f"--input {path}: missing arrays {missing}; expected {names}")
                arrays = tuple(loaded[n] for n in names)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:120]
        raise InputError(f"--input {path}: cannot read a .npy/.npz array ({detail})") from None
    except MemoryError:
        raise InputError(f"--input {path}: the array does not fit in memory") from None
    for name, array in zip(names, arrays, strict=False):
        if array.size == 0:
            raise InputError(
                f"--input {path}: array {name!r} of shape {array.shape} is empty; give at least "
                "one element along every dim"
            )
    return arrays


def _save_output(path: str, array: Any) -> None:
    """Write ``array`` to ``path`` atomically (:func:`edgemind.files.atomic_write`)."""
    import numpy as np

    from edgemind.errors import EdgemindError
    from edgemind.files import atomic_write

    atomic_write(
        path, lambda f: np.save(f, array, allow_pickle=False), flag="--output", error=EdgemindError
    )
