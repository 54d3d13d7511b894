"""Process memory as the kernel sees it: resident set size and its high-water mark.

Linux only (``/proc/self/status``). Writing ``5`` to ``/proc/self/clear_refs``
resets the high-water mark, so one request's peak can be read on its own.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclasses.dataclass(frozen=True)
class RssSample:
    rss_bytes: int
    hwm_bytes: int  # peak RSS since start or the last reset


def sample_rss() -> RssSample | None:
    """Current and peak RSS, or None where /proc is not available."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    if len(values) != 2:
        return None
    return RssSample(values["VmRSS"], values["VmHWM"])


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


SETTLE_SLACK_BYTES = 256 * 1024
SETTLE_TIMEOUT_S = 0.05


def settle_rss(target_bytes: int, timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
    """Wait until RSS is at most ``target_bytes``; False on timeout or without /proc.

    XLA frees a call's temporaries on one of its own threads shortly *after* the call's
    output is ready (measured: 26 MiB still resident right after an encoder call, gone
    0.5 ms later). Starting the next unit at once would hold two units' working sets, so
    the executor waits here for the previous call's memory to go back first. Settled,
    this costs one /proc read (~20 us).
    """
    deadline = time.perf_counter() + timeout_s
    while True:
        sample = sample_rss()
        if sample is None:
            return False
        if sample.rss_bytes <= target_bytes:
            return True
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.0001)


class PeakRssMeter:
    """Peak RSS above a baseline taken at construction (after warm-up).

    Call :meth:`reset_peak` before each measured stretch (a request): the kernel's
    high-water mark then covers only that stretch, still measured from the baseline.

    >>> meter = PeakRssMeter()
    >>> meter.peak_above_baseline() is None or meter.peak_above_baseline() >= 0
    True
    """

    def __init__(self) -> None:
        self.enabled = reset_peak_rss()
        sample = sample_rss() if self.enabled else None
        self.baseline_bytes = sample.rss_bytes if sample else 0
        self.stretch_start_bytes = self.baseline_bytes
        self.enabled = sample is not None

    def reset_peak(self) -> None:
        """Start a measured stretch: the high-water mark and the stretch's own start."""
        if self.enabled:
            reset_peak_rss()
            sample = sample_rss()
            self.stretch_start_bytes = sample.rss_bytes if sample else self.baseline_bytes

    def growth_in_stretch(self) -> int | None:
        """Peak RSS since :meth:`reset_peak` above the RSS at that moment.

        Unlike :meth:`peak_above_baseline` it ignores what the host process allocated
        between stretches (and what edgemind kept, pinned layers): the guard's measure.
        """
        if not self.enabled:
            return None
        sample = sample_rss()
        return None if sample is None else max(0, sample.hwm_bytes - self.stretch_start_bytes)

    def peak_above_baseline(self) -> int | None:
        if not self.enabled:
            return None
        sample = sample_rss()
        return None if sample is None else max(0, sample.hwm_bytes - self.baseline_bytes)


BOUND_ALLOWANCE_BYTES = 4 * 2**20
"""The one fixed allowance of the bound: observed model memory <= plan peak + this.

It covers what no plan can place and that does not grow with the request's shape:
Python objects of the request (the report, the result's small output copy), the
prefetch thread's touched stack, glibc's small-chunk heap and page rounding. It is the
same figure in the runtime's guard, the tests, ``make bench`` and the docs.
"""

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, pinned so it cannot drift upwards


def configure_malloc() -> bool:
    """Make the process's RSS follow what is live; False where glibc is not there.

    Three process-wide settings, each for a measured reason:

    * one malloc arena (``M_ARENA_MAX=1``): XLA runs a call on worker threads, glibc gives
      threads their own arenas, and memory freed in one is not reused by another, so a
      streaming loop's RSS crept several MiB above what was live;
    * a fixed mmap threshold (``M_MMAP_THRESHOLD=128 KiB``): by default glibc raises the
      threshold to the size of each large block freed, after which XLA's multi-MiB
      temporaries come from the heap, fragment it, and stay resident when freed. MiniLM at
      batch 8 x 256 tokens observed 21-36 MiB above its plan that way, 0.6 MiB with the
      threshold fixed: every large block is its own mapping, returned when freed;
    * a trim threshold of the same size, so the heap's free top goes back too.

    Measured working sets (:mod:`edgemind.runtime.workset`) are taken under these
    settings, so the runtime applies them before measuring or running anything.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(
            bool(libc.mallopt(param, value))
            for param, value in (
                (_M_ARENA_MAX, 1),
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                (_M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES),
            )
        )
    except (OSError, AttributeError):
        return False
