"""What the benchmarks share: running a function in a fresh child process, the machine
description, medians and table formatting.

Memory figures are per process (RSS high-water marks, address-space limits), so every
memory measurement runs in a child: ``python -m bench.common MODULE FUNC JSON`` calls
``bench.MODULE.FUNC(**json)`` and prints its dict as the last line of stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import import_module, metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "


@dataclasses.dataclass(frozen=True)
class ChildResult:
    """How a child ended and what it reported."""

    returncode: int  # negative: killed by that signal
    payload: dict[str, Any] | None  # the function's dict, if it got that far
    stderr_tail: str

    @property
    def how(self) -> str:
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit {self.returncode}"


def run_child(
    module: str,
    func: str,
    kwargs: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600,
) -> ChildResult:
    """Call ``bench.<module>.<func>(**kwargs)`` in a fresh interpreter (``env`` added)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.setdefault("PYTHONWARNINGS", "ignore")
    cmd = [sys.executable, "-m", "bench.common", module, func, json.dumps(dict(kwargs))]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    payload = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            payload = json.loads(line[len(RESULT_PREFIX) :])
            break
    return ChildResult(proc.returncode, payload, proc.stderr[-2000:])


def child_main(argv: Sequence[str]) -> int:
    """The child side of :func:`run_child`; exits with the dict's ``exit_code`` (or 0)."""
    module, func, kwargs = argv
    result = getattr(import_module(f"bench.{module}"), func)(**json.loads(kwargs))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return int(result.get("exit_code", 0))


# ---------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    """CPU, cores, RAM, OS and the versions that matter."""
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_mem_total_bytes() / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "numpy": _version("numpy"),
        "edgemind": _version("edgemind-runtime"),
    }


# ---------------------------------------------------------------------------- figures


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "**MISS**"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
