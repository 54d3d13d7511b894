"""What a request returns: the output, how far it got, and what it measured.

Pure data. The executor fills it; :mod:`edgemind.metrics` turns it into series.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Outcome = Literal["complete", "early_exit", "rejected"]


@dataclasses.dataclass(frozen=True)
class LayerTiming:
    """One unit of a run: how long its weights took to read and it took to compute."""

    layer: str
    load_s: float  # wall time reading this unit's weights (0 when pinned and already loaded)
    compute_s: float  # wall time from dispatch to block_until_ready of its apply
    bytes_read: int  # weight bytes read from disk for this unit in this request


@dataclasses.dataclass(frozen=True)
class RunReport:
    """Measurements of one request, planned figures beside observed ones."""

    model_name: str
    outcome: Outcome
    exit_level: int | None  # level reached; None when rejected
    num_levels: int
    capacity_bytes: int  # the policy's arena capacity
    arena_bytes: int  # the arena allocated (the plan's extent)
    plan_peak_bytes: int  # arena + largest working set, as planned
    arena_peak_used_bytes: int  # most arena bytes the ledger held at once
    observed_peak_bytes: int | None  # process peak RSS above the warmed-up baseline, if read
    bytes_read: int  # weight bytes read from disk in this request
    latency_s: float  # the whole request, wall time
    layers: tuple[LayerTiming, ...] = ()
    arena_used_bytes_per_step: tuple[int, ...] = ()  # ledger's bytes during each step (pre-free)
    step_end_s: tuple[float, ...] = ()  # seconds since the request began, at each step's end
    quota_exceeded: bool = False  # the complete run did not fit (early exit or rejection)
    arena_held_bytes: int = 0  # ledger bytes still held after the request (pinned layers)

    @property
    def load_s(self) -> float:
        return sum(t.load_s for t in self.layers)

    @property
    def compute_s(self) -> float:
        return sum(t.compute_s for t in self.layers)


@dataclasses.dataclass(frozen=True)
class Result:
    """A request's output and its report.

    ``output`` is a NumPy array owned by the caller (copied out of the arena).
    """

    output: np.ndarray | None  # None when rejected
    complete: bool
    exit_level: int | None
    report: RunReport
