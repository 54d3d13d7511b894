"""The stdout and JSON report: the original names, per-layer times, planned vs observed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgemind.planner.plan import Plan
from edgemind.report_text import (
    ORIGINAL_NAMES,
    arena_usage_bytes,
    format_report,
    report_dict,
)
from edgemind.runtime.report import LayerTiming, RunReport

REPORT = RunReport(
    model_name="tiny",
    outcome="complete",
    exit_level=2,
    num_levels=2,
    capacity_bytes=10 << 20,
    arena_bytes=3 << 20,
    plan_peak_bytes=4 << 20,
    arena_peak_used_bytes=3 << 20,
    observed_peak_bytes=(7 << 19),
    bytes_read=3 << 20,
    latency_s=0.0201234,
    layers=(
        LayerTiming("embed", load_s=0.00025, compute_s=0.0005, bytes_read=1 << 20),
        LayerTiming("block_0", load_s=0.0125, compute_s=0.002, bytes_read=2 << 20),
    ),
    arena_used_bytes_per_step=(1 << 20, 3 << 20, 1 << 20),
    arena_held_bytes=1 << 20,
)


def make_plan(streamed_bytes: int) -> Plan:
    return Plan(
        model_name="tiny",
        input_shape=(1, 8),
        capacity_bytes=10 << 20,
        alignment_bytes=64,
        status="feasible",
        exit_level=2,
        num_levels=2,
        units=("embed", "block_0"),
        buffers=(),
        steps=(),
        arena_bytes=3 << 20,
        peak_bytes=4 << 20,
        lower_bound_bytes=3 << 20,
        naive_bytes=5 << 20,
        streamed_bytes=streamed_bytes,
        unpinned_streamed_bytes=streamed_bytes,
        pinned_layers=(),
        prefetch_depth=1,
        min_capacity_bytes=4 << 20,
        witness=None,
    )


def test_dict_has_the_original_names_first_with_units_in_names() -> None:
    d = report_dict(REPORT)
    assert tuple(d)[: len(ORIGINAL_NAMES)] == ORIGINAL_NAMES
    assert d["model_arena_usage_bytes"] == 1 << 20  # still held when the request ended
    assert d["model_arena_capacity_bytes"] == 10 << 20
    assert d["layer_load_time_ms"] == 12.75
    assert d["inference_latency_ms"] == 20.123
    assert d["quota_exceeded_count"] == 0
    assert d["exit_level"] == 2
    assert d["headroom_bytes"] == 6 << 20
    assert [layer["layer_load_time_ms"] for layer in d["layers"]] == [0.25, 12.5]
    assert d["planned_bytes_read"] is None
    assert json.loads(json.dumps(d)) == d


def test_dict_with_plan_and_running_quota_count() -> None:
    d = report_dict(REPORT, make_plan(3 << 20), quota_exceeded_count=4)
    assert d["planned_bytes_read"] == 3 << 20
    assert d["quota_exceeded_count"] == 4


def test_rejected_report() -> None:
    rejected = dataclasses.replace(
        REPORT,
        outcome="rejected",
        exit_level=None,
        layers=(),
        arena_used_bytes_per_step=(),
        plan_peak_bytes=12 << 20,
        quota_exceeded=True,
        arena_held_bytes=0,
    )
    assert arena_usage_bytes(rejected) == 0
    d = report_dict(rejected)
    assert (d["exit_level"], d["quota_exceeded_count"], d["layer_load_time_ms"]) == (0, 1, 0)
    text = format_report(rejected)
    assert "rejected, no level ran" in text
    assert "planned peak exceeds 10.0 MiB by 2.0 MiB" in text


def test_table_shows_layers_totals_and_the_six_names() -> None:
    text = format_report(REPORT, make_plan(3 << 20))
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()}
    assert rows["embed"][:2] == ["0.250", "0.500"]
    assert rows["block_0"][:2] == ["12.500", "2.000"]
    assert rows["total"][:2] == ["12.750", "2.500"]
    d = report_dict(REPORT)
    for name in ORIGINAL_NAMES:
        assert rows[name][0] == str(d[name])
    assert "peak: planned 4.0 MiB, observed 3.5 MiB (within plan)" in text
    assert "bytes read: 3.0 MiB (planned 3.0 MiB)" in text
    assert "headroom: 6.0 MiB of 10.0 MiB" in text


@pytest.mark.parametrize(
    ("observed", "expected"),
    [(None, "observed not measured"), (5 << 20, "observed 5.0 MiB (1.0 MiB above plan)")],
)
def test_observed_peak_against_planned(observed: int | None, expected: str) -> None:
    text = format_report(dataclasses.replace(REPORT, observed_peak_bytes=observed))
    assert expected in text
