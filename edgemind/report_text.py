"""The run report for people and scripts: a compact table and a JSON-able dict.

Both keep the original EdgeMind names (``model_arena_usage_bytes``,
``model_arena_capacity_bytes``, ``layer_load_time_ms``, ``inference_latency_ms``,
``quota_exceeded_count``, ``exit_level``) with the same values as the Prometheus series
of :mod:`edgemind.metrics` (``docs/metrics.md`` maps one set of names to the other).
Pure functions: the CLI prints what they return.

>>> from edgemind.runtime.report import LayerTiming, RunReport
>>> report = RunReport(
...     model_name="tiny", outcome="complete", exit_level=2, num_levels=2,
...     capacity_bytes=1 << 20, arena_bytes=4096, plan_peak_bytes=8192,
...     arena_peak_used_bytes=4096, observed_peak_bytes=None, bytes_read=2048,
...     latency_s=0.0125, layers=(LayerTiming("l0", 0.002, 0.001, 2048),),
...     arena_used_bytes_per_step=(4096, 1024), arena_held_bytes=1024)
>>> d = report_dict(report)
>>> d["layer_load_time_ms"], d["inference_latency_ms"], d["model_arena_usage_bytes"]
(2.0, 12.5, 1024)
"""

from __future__ import annotations

from typing import Any

from edgemind.planner.plan import Plan
from edgemind.runtime.report import RunReport
from edgemind.units import format_bytes

# The original names, in the order the report shows them.
ORIGINAL_NAMES: tuple[str, ...] = (
    "model_arena_usage_bytes",
    "model_arena_capacity_bytes",
    "layer_load_time_ms",
    "inference_latency_ms",
    "quota_exceeded_count",
    "exit_level",
)


def arena_usage_bytes(report: RunReport) -> int:
    """Arena bytes in use when the request ended: what the ledger still holds.

    What stays held between requests (pinned layers); 0 when nothing ran (a rejection).
    The peak during the request is ``report.arena_peak_used_bytes``.
    """
    return report.arena_held_bytes


def exit_level_value(report: RunReport) -> int:
    """The level reached, 0 when the request was rejected (no level ran)."""
    return report.exit_level if report.exit_level is not None else 0


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def report_dict(
    report: RunReport, plan: Plan | None = None, *, quota_exceeded_count: int | None = None
) -> dict[str, Any]:
    """The report as one JSON-able object, the original names first.

    ``quota_exceeded_count`` defaults to this request's (0 or 1); a caller that ran
    several requests passes the running count (``RunMetrics.quota_exceeded_count``).
    Times named ``_ms`` are milliseconds rounded to the microsecond; sizes are bytes.
    """
    count = int(report.quota_exceeded) if quota_exceeded_count is None else quota_exceeded_count
    out: dict[str, Any] = {
        "model_arena_usage_bytes": arena_usage_bytes(report),
        "model_arena_capacity_bytes": report.capacity_bytes,
        "layer_load_time_ms": _ms(report.load_s),
        "inference_latency_ms": _ms(report.latency_s),
        "quota_exceeded_count": count,
        "exit_level": exit_level_value(report),
        "model": report.model_name,
        "outcome": report.outcome,
        "num_levels": report.num_levels,
        "layer_compute_time_ms": _ms(report.compute_s),
        "arena_bytes": report.arena_bytes,
        "arena_peak_used_bytes": report.arena_peak_used_bytes,
        "plan_peak_bytes": report.plan_peak_bytes,
        "observed_peak_bytes": report.observed_peak_bytes,
        "headroom_bytes": report.capacity_bytes - report.plan_peak_bytes,
        "bytes_read": report.bytes_read,
        "planned_bytes_read": plan.streamed_bytes if plan is not None else None,
        "layers": [
            {
                "layer": t.layer,
                "layer_load_time_ms": _ms(t.load_s),
                "layer_compute_time_ms": _ms(t.compute_s),
                "bytes_read": t.bytes_read,
            }
            for t in report.layers
        ],
    }
    return out


def _peak_line(report: RunReport) -> str:
    planned = report.plan_peak_bytes
    observed = report.observed_peak_bytes
    if observed is None:
        return f"peak: planned {format_bytes(planned)}, observed not measured"
    if observed <= planned:
        verdict = "within plan"
    else:  # XLA's unreported library scratch and heap slack: see docs/design.md
        verdict = f"{format_bytes(observed - planned)} above plan"
    return f"peak: planned {format_bytes(planned)}, observed {format_bytes(observed)} ({verdict})"


def _layer_table(report: RunReport) -> list[str]:
    width = max([len("total"), len("layer"), *(len(t.layer) for t in report.layers)])
    row = "  {:<{w}}  {:>10}  {:>10}  {:>11}"
    lines = [row.format("layer", "load ms", "compute ms", "bytes read", w=width)]
    for t in report.layers:
        lines.append(
            row.format(
                t.layer,
                f"{t.load_s * 1000:.3f}",
                f"{t.compute_s * 1000:.3f}",
                format_bytes(t.bytes_read),
                w=width,
            )
        )
    lines.append(
        row.format(
            "total",
            f"{report.load_s * 1000:.3f}",
            f"{report.compute_s * 1000:.3f}",
            format_bytes(sum(t.bytes_read for t in report.layers)),
            w=width,
        )
    )
    return lines


def format_report(
    report: RunReport, plan: Plan | None = None, *, quota_exceeded_count: int | None = None
) -> str:
    """A compact table for stdout: per-layer times, the six original names, the peaks.

    The values beside the original names are exactly those of :func:`report_dict`.
    """
    d = report_dict(report, plan, quota_exceeded_count=quota_exceeded_count)
    level = f"exit level {d['exit_level']} of {report.num_levels}"
    if report.exit_level is None:
        level = "no level ran"
    lines = [f"{report.model_name}: {report.outcome.replace('_', ' ')}, {level}"]
    if report.layers:
        lines.extend(_layer_table(report))
    notes = {
        "model_arena_usage_bytes": (
            f"{format_bytes(d['model_arena_usage_bytes'])} at the end, "
            f"peak {format_bytes(report.arena_peak_used_bytes)}"
        ),
        "model_arena_capacity_bytes": format_bytes(report.capacity_bytes),
        "exit_level": "0: rejected" if report.exit_level is None else f"of {report.num_levels}",
    }
    for name in ORIGINAL_NAMES:
        note = f"  ({notes[name]})" if name in notes else ""
        lines.append(f"{name:<27} {d[name]}{note}")
    lines.append(_peak_line(report))
    planned_read = "" if plan is None else f" (planned {format_bytes(plan.streamed_bytes)})"
    lines.append(f"bytes read: {format_bytes(report.bytes_read)}{planned_read}")
    headroom = d["headroom_bytes"]
    capacity = format_bytes(report.capacity_bytes)
    if headroom >= 0:
        lines.append(f"headroom: {format_bytes(headroom)} of {capacity} (capacity - planned peak)")
    else:
        lines.append(f"over capacity: planned peak exceeds {capacity} by {format_bytes(-headroom)}")
    return "\n".join(lines)
