"""The ``edgemind`` command: inspect, plan and run models from a terminal.

Exit codes: 0 success (a complete run, a feasible plan); 1 a known error, reported
on one line without a traceback; 2 bad usage; 3 the plan or run exits early (a
generation stopped by its context: finish_reason "memory"); 4 the request is
infeasible and rejected; 5 out of memory while running. Only the CLI modules print.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from edgemind.cli_checks import check_model_dir, check_outputs, ignored_flags
from edgemind.errors import EdgemindError, MemoryBoundExceeded, MemoryQuotaExceeded, brief

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_EARLY_EXIT, EXIT_INFEASIBLE = 0, 1, 2, 3, 4
EXIT_OUT_OF_MEMORY = 5  # a running request broke the bound: an allocation failed, or the guard


def _residency(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


def _number(kind: type, minimum: float, what: str, maximum: float = 2**63 - 1) -> Any:
    """An argparse type: a number of ``kind`` from ``minimum`` to ``maximum`` (usage error else).

    The maximum keeps every flag finite and inside what the OS and NumPy take (a seed,
    a sleep, a capacity); library checks still bound what they receive.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:  # also an int of more than 4,300 digits
            raise argparse.ArgumentTypeError(f"expected {what}, got {brief(text, 40)}") from None
        if not minimum <= value <= maximum:  # also rejects nan and inf
            raise argparse.ArgumentTypeError(f"expected {what}, got {brief(text, 40)}")
        return value

    return parse


POSITIVE_INT = _number(int, 1, "a positive integer")
COUNT = _number(int, 0, "an integer >= 0")
SEED = _number(int, 0, "a seed from 0 to 2**63 - 1")
SECONDS = _number(float, 0.0, "seconds from 0 to 86400", 86400.0)
NONNEGATIVE = _number(float, 0.0, "a number >= 0", 1e6)


def _arena_size(text: str) -> int:
    """``--arena-mb``: a size in bytes from ``50`` (MiB), ``50MB`` (MB means MiB), ``50MiB``..."""
    from edgemind.units import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size from 1 B to 1 PiB such as 50 (MiB), 50MB or 1.5GiB, got "
            f"{brief(text, 40)}"
        ) from None


CAPACITY_BYTES = _number(int, 1, "a number of bytes from 1 to 2**50 (1 PiB)", 2**50)


class _Parser(argparse.ArgumentParser):
    """argparse, with bad usage reported on one line (exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())[:300]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _policy_flags() -> _Parser:
    flags = _Parser(add_help=False)
    group = flags.add_argument_group("policy (flags override policy.yaml and the environment)")
    group.add_argument("--policy", metavar="YAML", help="policy file (default: built-in defaults)")
    size = group.add_mutually_exclusive_group()
    size.add_argument(
        "--arena-mb",
        type=_arena_size,
        dest="arena_size_bytes",
        metavar="SIZE",
        help="arena capacity: 50 (MiB), 50MB, 50MiB or 1.5GiB; MB means MiB",
    )
    size.add_argument("--arena-bytes", type=CAPACITY_BYTES, metavar="N", help="capacity in bytes")
    group.add_argument(
        "--keep-resident",
        type=_residency,
        metavar="N|auto",
        help="layers' weights resident at once (prefetch aside); auto pins spare",
    )
    group.add_argument("--prefetch-depth", type=COUNT, metavar="N", help="staging slots (0: none)")
    group.add_argument(
        "--read-mode",
        choices=("buffered", "direct"),
        help="direct: O_DIRECT reads that bypass the page cache (needs filesystem support)",
    )
    group.add_argument(
        "--on-quota",
        choices=("early_exit", "reject_request"),
        help="what to do when the complete run does not fit",
    )
    group.add_argument(
        "--tiling",
        choices=("auto", "off"),
        help="auto: run units whose weights do not fit in tiles (row ranges) instead",
    )
    group.add_argument(
        "--batch",
        type=POSITIVE_INT,
        help="batch size (default 1; with --input it must match the file; refused with --text)",
    )
    group.add_argument(
        "--seq",
        type=POSITIVE_INT,
        help="sequence length, for models with one (as --batch: must match --input; no --text)",
    )
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(
        prog="edgemind",
        description="Run neural networks under a hard memory budget by streaming weights.",
        epilog=(
            "exit codes: 0 ok, 1 error, 2 usage, 3 early exit, 4 infeasible/rejected, "
            "5 out of memory while running"
        ),
    )
    parser.add_argument("--version", action="version", version=f"edgemind {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="list a model's layers, tensors and bytes")
    inspect.add_argument("model_dir", metavar="MODEL_DIR")
    inspect.add_argument("--verify", action="store_true", help="recompute every checksum")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    convert = sub.add_parser(
        "convert", help="convert a safetensors checkpoint (BERT encoders) or a GGUF file"
    )
    convert.add_argument(
        "src", metavar="CHECKPOINT", help="a folder with config.json + *.safetensors, or a .gguf"
    )
    convert.add_argument("out", metavar="MODEL_DIR", help="the edgemind model directory to write")
    convert.add_argument("--name", help="model name (default: the checkpoint folder's name)")
    convert.add_argument(
        "--alignment-bytes",
        type=int,
        default=4096,
        metavar="N",
        help="payload alignment in the weight files (default 4096)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if present")
    convert.add_argument(
        "--quantize",
        choices=("q8_0", "q5_0", "q4_0"),
        help="store a safetensors model's weight matrices as GGUF blocks (GGUF keeps its own)",
    )

    plan = sub.add_parser("plan", parents=[_policy_flags()], help="print the memory plan")
    plan.add_argument("model_dir", metavar="MODEL_DIR")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.add_argument("--out", metavar="PLAN", help="write the plan file (plan.msgpack)")
    plan.add_argument("--buffers", action="store_true", help="also list every buffer")
    plan.add_argument(
        "--plot", metavar="PNG", help="draw the residency timeline (needs matplotlib)"
    )
    plan.add_argument(
        "--context",
        type=POSITIVE_INT,
        metavar="N",
        help="decoder models: plan a generation session of N positions (KV cache, tiles, "
        "what is streamed per token, the largest context that fits); --seq is the chunk",
    )

    run = sub.add_parser("run", parents=[_policy_flags()], help="run a model on an input")
    run.add_argument("model_dir", metavar="MODEL_DIR")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="X.npy", help="input array (.npy, or .npz by name)")
    source.add_argument("--random-input", action="store_true", help="a seeded random input")
    source.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="text to embed (repeatable; text models such as MiniLM)",
    )
    source.add_argument("--text-file", metavar="FILE", help="texts to embed, one per line")
    run.add_argument(
        "--seed", type=SEED, help="seed for --random-input (default 0; refused without it)"
    )
    run.add_argument("--output", metavar="OUT.npy", help="write the output array here")
    run.add_argument("--plan", metavar="PLAN", help="use a plan file made by `edgemind plan`")
    run.add_argument("--repeat", type=POSITIVE_INT, default=1, metavar="N", help="run N requests")
    run.add_argument("--verify", action="store_true", help="check payload checksums as read")
    run.add_argument("--json", action="store_true", help="print the report as one JSON object")
    run.add_argument("--plot", metavar="PNG", help="draw the timeline with observed usage")
    metrics = run.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (overrides metrics.http_addr)",
    )
    metrics.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write the exposition here (node_exporter textfile collector)",
    )
    metrics.add_argument(
        "--linger",
        type=SECONDS,
        default=0.0,
        metavar="S",
        help="keep the metrics endpoint up S seconds after the last request",
    )
    from edgemind.cli_generate import add_parser as add_generate

    types = {"positive": POSITIVE_INT, "count": COUNT, "seed": SEED, "nonnegative": NONNEGATIVE}
    add_generate(sub, [_policy_flags()], types)
    return parser


def _version() -> str:
    from edgemind import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never calls sys.exit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        ignored = ignored_flags(args)
        if ignored:
            parser.error(ignored)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return int(exc.code or 0)
    commands = {
        "inspect": _cmd_inspect,
        "convert": _cmd_convert,
        "plan": _cmd_plan,
        "run": _cmd_run,
        "generate": _cmd_generate,
    }
    try:
        return commands[args.command](args)
    except MemoryBoundExceeded as exc:  # raised while running, not by the plan
        _print_failure_json(args, "out_of_memory", exc)
        print(f"edgemind: out of memory: {exc}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except MemoryQuotaExceeded as exc:
        _print_failure_json(args, "rejected", exc)
        print(f"edgemind: rejected: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except EdgemindError as exc:  # MetricsError, PolicyError, ModelFormatError...
        print(f"edgemind: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("edgemind: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgemind plan ... | head`: the reader left, nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _print_failure_json(args: argparse.Namespace, verdict: str, exc: MemoryQuotaExceeded) -> None:
    """With ``--json``, a failed request is one JSON object on stdout too (before stderr's line)."""
    if not getattr(args, "json", False):
        return
    from edgemind.cli_text import failure_dict

    print(json.dumps(failure_dict(verdict, str(exc), getattr(exc, "plan", None)), indent=1))


# ---------------------------------------------------------------------------- commands


def _policy(args: argparse.Namespace, *, tiling: str | None = None) -> Any:
    """The policy: the file (or defaults) with the flags given on top; ``tiling`` is the
    command's own default for ``--tiling`` (generation tiles the LM head)."""
    from edgemind.policy import load_policy

    arena = args.arena_bytes if args.arena_size_bytes is None else args.arena_size_bytes
    return load_policy(
        args.policy,
        overrides={
            "arena_capacity_bytes": arena,
            "keep_resident_layers": args.keep_resident,
            "prefetch_depth": args.prefetch_depth,
            "on_memory_quota_exceeded": args.on_quota,
            "read_mode": args.read_mode,
            "tiling": args.tiling or tiling,
            "kv_dtype": getattr(args, "kv_dtype", None),
            "verify_checksums": True if getattr(args, "verify", False) else None,
        },
    )


def _dims(args: argparse.Namespace) -> dict[str, int]:
    dims = {"batch": 1 if args.batch is None else args.batch}
    if args.seq is not None:
        dims["seq"] = args.seq
    return dims


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edgemind.cli_text import format_manifest, manifest_dict
    from edgemind.weights.manifest import load_manifest
    from edgemind.weights.reader import verify_model

    check_model_dir(args.model_dir)
    manifest = load_manifest(args.model_dir)
    if args.verify:
        problems = verify_model(args.model_dir, manifest)
        if problems:
            for problem in problems:
                print(f"edgemind: error: {problem}", file=sys.stderr)
            print(
                f"edgemind: {len(problems)} problem(s) in {args.model_dir}; convert or "
                "copy the model again",
                file=sys.stderr,
            )
            return EXIT_ERROR
    if args.json:
        print(json.dumps(manifest_dict(manifest, verified=args.verify), indent=1))
    else:
        print(format_manifest(manifest, verified=args.verify))
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from edgemind.errors import ConversionError
    from edgemind.units import format_bytes
    from edgemind.weights.convert import convert_safetensors
    from edgemind.weights.gguf_source import convert_gguf
    from edgemind.weights.manifest import load_manifest

    common = {
        "alignment_bytes": args.alignment_bytes,
        "overwrite": args.overwrite,
        "model_name": args.name,
    }
    if str(args.src).lower().endswith(".gguf"):
        if args.quantize:
            raise ConversionError("--quantize is for safetensors checkpoints; a GGUF keeps its own")
        from edgemind.extras import require

        require("gguf", "gguf", "converting a GGUF file")
        out = convert_gguf(args.src, args.out, **common)
    else:
        out = convert_safetensors(args.src, args.out, quantize=args.quantize, **common)
    manifest = load_manifest(out)
    shared = sum(t.nbytes for layer in manifest.layers if layer.shares for t in layer.tensors)
    print(
        f"converted {args.src} -> {out}: {manifest.model_name}, {len(manifest.layers)} layers, "
        f"{manifest.num_levels} exit levels, {format_bytes(manifest.nbytes - shared)} stored"
    )
    return EXIT_OK


def _plan_exit(plan: Any) -> int:
    return {"feasible": EXIT_OK, "early_exit": EXIT_EARLY_EXIT}.get(plan.status, EXIT_INFEASIBLE)


def _cmd_plan(args: argparse.Namespace) -> int:
    from edgemind.cli_text import format_plan, plan_dict
    from edgemind.runtime import Runtime

    check_model_dir(args.model_dir)
    check_outputs(args)
    if args.context is not None:
        from edgemind.cli_generate import session_plan_command

        return session_plan_command(args, _policy(args, tiling="auto"))
    runtime = Runtime.open(args.model_dir, _policy(args))
    plan = runtime.plan(**_dims(args))
    if args.out:
        _save_plan(plan, args.out)
    if args.plot:
        from edgemind.viz import save_timeline

        save_timeline(plan, args.plot)
    if args.json:
        out = plan_dict(plan)
        if plan.status == "infeasible":
            from edgemind.runtime.runtime import quota_message

            out["message"] = quota_message(plan, runtime.policy)
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(plan, runtime.policy, buffers=args.buffers))
        if args.out:
            print(f"plan written to {args.out}")
        if args.plot:
            print(f"timeline written to {args.plot}")
    return _plan_exit(plan)


def _save_plan(plan: Any, path: str) -> None:
    """``save_plan`` (atomic, fsynced), then the mode the umask gives a new file."""
    import os

    from edgemind.errors import PlanError
    from edgemind.files import new_file_mode, write_failure
    from edgemind.planner.planfile import save_plan

    try:
        save_plan(plan, path)
        os.chmod(path, new_file_mode())  # save_plan's mkstemp made it 0600
    except OSError as exc:
        raise PlanError(f"--out {path}: cannot write the plan ({write_failure(exc)})") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    from edgemind.cli_generate import generate_command

    check_model_dir(args.model_dir)
    return generate_command(args, _policy(args, tiling="auto"))


def _cmd_run(args: argparse.Namespace) -> int:
    from edgemind.cli_run import run_command

    check_model_dir(args.model_dir)
    check_outputs(args)
    complete = run_command(args, _policy(args), _dims(args))
    return EXIT_OK if complete else EXIT_EARLY_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
