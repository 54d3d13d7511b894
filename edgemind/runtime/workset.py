"""Measured working sets: what XLA really allocates for one call of a compiled unit.

``memory_analysis()`` sizes a call's outputs and temporaries, but not the scratch that
CPU library kernels (Eigen's GEMM packing, oneDNN/YNNPACK workspaces) allocate for
themselves: MiniLM's encoder at batch 16 x 256 tokens reports 60 MiB and touches 90 MiB
in every call. So the runtime measures it: the unit's executable runs on zero-filled inputs of
its exact shapes (no weight file is read; zero pages are never resident), once to warm
it up and :data:`REPEATS` times measured, and the working set is the largest growth of
the process's peak RSS over its RSS before the call. The plan counts
``max(memory_analysis, measured)``, rounded up to :data:`ROUND_BYTES`.

Measurements are cached on disk, keyed by everything that changes them (see
:func:`cache_key`), so a later ``edgemind plan`` of the same shapes measures nothing.
The cache is one JSON file, ``worksets-v1.json``, in ``$EDGEMIND_CACHE_DIR`` (default
``$XDG_CACHE_HOME/edgemind`` or ``~/.cache/edgemind``); deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from edgemind.errors import EdgemindError
from edgemind.files import atomic_write
from edgemind.layers.cost import Signature, UnitKey
from edgemind.runtime.memory import (
    MMAP_THRESHOLD_BYTES,
    SETTLE_SLACK_BYTES,
    reset_peak_rss,
    sample_rss,
    settle_rss,
)
from edgemind.units import align_up
from edgemind.xla_env import synchronous_dispatch

METHOD = "rss-hwm-v3"  # bump when the way of measuring changes: old entries stop matching
REPEATS = 3
ROUND_BYTES = 64 * 1024
CACHE_FILE = "worksets-v1.json"
ENV_CACHE_DIR = "EDGEMIND_CACHE_DIR"
_MAX_CACHE_FILE_BYTES = 8 * 2**20  # a larger (or unreadable) cache is ignored and replaced


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where measurements are kept: ``$EDGEMIND_CACHE_DIR``, else the user's cache folder."""
    env = os.environ if env is None else env
    if env.get(ENV_CACHE_DIR):
        return Path(env[ENV_CACHE_DIR])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgemind"


def environment() -> dict[str, Any]:
    """What besides the unit changes its working set: versions, flags, threads, allocator."""
    try:
        threads = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        threads = os.cpu_count() or 1
    return {
        "method": METHOD,
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "threads": threads,
        "machine": platform.machine(),
        "mmap_threshold": MMAP_THRESHOLD_BYTES,
        "synchronous_dispatch": synchronous_dispatch(),
        "kernels": kernels_digest(),
    }


@functools.cache
def kernels_digest() -> str:
    """A hash of the layer kinds' source (``edgemind/layers/*.py``): a kernel that changes
    is measured again, whatever the version number says."""
    import edgemind.layers

    digest = hashlib.sha256()
    for path in sorted(Path(edgemind.layers.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_key(key: UnitKey, env: Mapping[str, Any] | None = None) -> str:
    """A stable hash of a unit signature (kind, config, shapes, dtypes) and its environment."""
    blob = json.dumps([repr(key), env or environment()], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def zero_args(key: UnitKey) -> tuple[dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
    """Zero-filled device arrays for a unit's (params, x, ctx).

    ``np.zeros`` of a large array maps fresh pages that read as zeros without becoming
    resident, and aligned NumPy memory reaches JAX without a copy: a unit's weights cost
    address space here, not RSS.
    """

    def arrays(sig: Signature) -> dict[str, jax.Array]:
        return {name: jax.device_put(np.zeros(shape, dtype)) for name, shape, dtype in sig}

    _, _, params, x, ctx = key
    return arrays(params), arrays(x)["x"], arrays(ctx)


def measure(compiled: jax.stages.Compiled, key: UnitKey, repeats: int = REPEATS) -> int | None:
    """Peak RSS growth of one call of ``compiled`` (the worst of ``repeats``), warmed up.

    None where the kernel's RSS high-water mark cannot be read or reset (not Linux).
    """
    if sample_rss() is None or not reset_peak_rss():
        return None
    params, x, ctx = zero_args(key)
    start = sample_rss()
    jax.block_until_ready(compiled(params, x, ctx))  # one-time kernel set-up is not per call
    _WARMED.add(key)
    if start is not None:  # the warm-up's own late frees must not overlap the first measure
        settle_rss(start.rss_bytes + SETTLE_SLACK_BYTES)
    worst = 0
    for _ in range(repeats):
        reset_peak_rss()
        before = sample_rss()
        out = compiled(params, x, ctx)
        jax.block_until_ready(out)
        del out
        if before is None:
            return None
        settle_rss(before.rss_bytes + SETTLE_SLACK_BYTES)  # XLA frees temporaries late
        after = sample_rss()
        if after is None:
            return None
        worst = max(worst, after.hwm_bytes - before.rss_bytes)
    return align_up(worst, ROUND_BYTES)


_WARMED: set[UnitKey] = set()  # signatures this process has run at least once


def warm_up(compiled: jax.stages.Compiled, key: UnitKey) -> None:
    """Run ``compiled`` once on zeros (once per process), so the one-time set-up of its
    kernels happens before a request's RSS baseline is taken, not inside the request."""
    if key not in _WARMED:
        params, x, ctx = zero_args(key)
        jax.block_until_ready(compiled(params, x, ctx))
        _WARMED.add(key)


class WorkingSetMeter:
    """Measures working sets once per signature and environment, remembering them on disk.

    Call it as ``meter(key, compiled) -> bytes | None``; it is what
    :func:`edgemind.layers.cost.cost_table` takes as ``measure``.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.path = (Path(directory) if directory is not None else cache_dir()) / CACHE_FILE
        self.env = environment()
        self.measured = 0  # calls that ran a measurement (not answered from the cache)
        self._entries: dict[str, Any] | None = None  # the file, read once, then kept

    def __call__(self, key: UnitKey, compiled: jax.stages.Compiled) -> int | None:
        digest = cache_key(key, self.env)
        if self._entries is None:
            self._entries = self._load()
        cached = self._entries.get(digest)
        if isinstance(cached, dict) and isinstance(cached.get("bytes"), int):
            return int(cached["bytes"])
        nbytes = measure(compiled, key)
        self.measured += 1
        if nbytes is not None:
            self._store(digest, {"bytes": nbytes, "kind": key[0]})
        return nbytes

    def _load(self) -> dict[str, Any]:
        try:
            if self.path.stat().st_size > _MAX_CACHE_FILE_BYTES:
                return {}
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def _store(self, digest: str, entry: dict[str, Any]) -> None:
        """Add one entry; a cache that cannot be written is skipped, never an error.

        The file is read again first, so entries another process wrote meanwhile stay."""
        data = self._load()
        data[digest] = entry
        self._entries = data
        blob = json.dumps(data).encode()
        with contextlib.suppress(OSError, EdgemindError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda out: out.write(blob), flag="cache", error=EdgemindError)
