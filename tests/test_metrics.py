"""The metrics sink: series built from reports, the HTTP exporter, the textfile."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from edgemind.errors import MemoryQuotaExceeded, MetricsError
from edgemind.metrics import (
    LAYER_LOAD_BUCKETS_S,
    RunMetrics,
    check_textfile_path,
    parse_exposition,
    parse_http_addr,
    sample_value,
    scrape,
    start_http_exporter,
    write_textfile,
)
from edgemind.report_text import ORIGINAL_NAMES, format_report, report_dict
from edgemind.runtime.report import LayerTiming, RunReport

MODEL = "tiny-mlp"
CAPACITY = 50 << 20
M = {"model": MODEL}


def make_report(outcome: str = "complete", **changes: object) -> RunReport:
    """A hand-built report: three layers, the last of which is pinned (nothing read)."""
    layers = (
        LayerTiming("layer0", load_s=0.0004, compute_s=0.0011, bytes_read=1 << 20),
        LayerTiming("layer1", load_s=0.0032, compute_s=0.0009, bytes_read=2 << 20),
        LayerTiming("layer2", load_s=0.0, compute_s=0.0007, bytes_read=0),
    )
    base = RunReport(
        model_name=MODEL,
        outcome="complete",
        exit_level=3,
        num_levels=3,
        capacity_bytes=CAPACITY,
        arena_bytes=6 << 20,
        plan_peak_bytes=7 << 20,
        arena_peak_used_bytes=5 << 20,
        observed_peak_bytes=6 << 20,
        bytes_read=3 << 20,
        latency_s=0.0123,
        layers=layers,
        arena_used_bytes_per_step=(1 << 20, 5 << 20, 4 << 20, 2 << 20),
        step_end_s=(0.001, 0.005, 0.009, 0.012),
        arena_held_bytes=2 << 20,
    )
    if outcome == "early_exit":
        base = dataclasses.replace(
            base,
            outcome="early_exit",
            exit_level=2,
            layers=layers[:2],
            latency_s=0.0081,
            quota_exceeded=True,
            arena_used_bytes_per_step=(1 << 20, 5 << 20, 3 << 20),
        )
    elif outcome == "rejected":
        base = dataclasses.replace(
            base,
            outcome="rejected",
            exit_level=None,
            arena_bytes=0,
            arena_held_bytes=0,
            plan_peak_bytes=80 << 20,
            arena_peak_used_bytes=0,
            observed_peak_bytes=None,
            bytes_read=0,
            latency_s=0.0002,
            layers=(),
            arena_used_bytes_per_step=(),
            step_end_s=(),
            quota_exceeded=True,
        )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"model": MODEL, **labels})


def requests(registry: CollectorRegistry) -> dict[str, float | None]:
    return {
        o: value(registry, "edgemind_requests_total", outcome=o)
        for o in ("complete", "early_exit", "rejected")
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


# --- series from reports -------------------------------------------------------------


def test_series_exist_at_zero_before_any_request(registry: CollectorRegistry) -> None:
    RunMetrics(registry, MODEL)
    assert requests(registry) == {"complete": 0.0, "early_exit": 0.0, "rejected": 0.0}
    assert value(registry, "edgemind_quota_exceeded_total") == 0.0
    assert value(registry, "edgemind_weight_read_bytes_total") == 0.0


def test_complete_run(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    report = make_report()
    metrics.observe(report)
    assert requests(registry) == {"complete": 1.0, "early_exit": 0.0, "rejected": 0.0}
    assert value(registry, "edgemind_quota_exceeded_total") == 0.0
    assert value(registry, "edgemind_weight_read_bytes_total") == 3 << 20
    assert value(registry, "edgemind_arena_capacity_bytes") == CAPACITY
    assert value(registry, "edgemind_arena_used_bytes") == 2 << 20  # held at the end
    assert value(registry, "edgemind_arena_allocated_bytes") == 6 << 20
    assert value(registry, "edgemind_plan_peak_bytes") == 7 << 20
    assert value(registry, "edgemind_arena_peak_used_bytes") == 5 << 20
    assert value(registry, "edgemind_observed_peak_bytes") == 6 << 20
    assert value(registry, "edgemind_exit_level") == 3
    assert value(registry, "edgemind_exit_levels") == 3
    # The pinned layer read nothing: two loads observed, three computes.
    assert value(registry, "edgemind_layer_load_seconds_count") == 2
    assert value(registry, "edgemind_layer_load_seconds_sum") == pytest.approx(report.load_s)
    assert value(registry, "edgemind_layer_compute_seconds_count") == 3
    assert value(registry, "edgemind_layer_compute_seconds_sum") == pytest.approx(report.compute_s)
    latency = "edgemind_inference_latency_seconds"
    assert value(registry, f"{latency}_count", outcome="complete") == 1
    assert value(registry, f"{latency}_sum", outcome="complete") == pytest.approx(0.0123)
    assert value(registry, f"{latency}_count", outcome="early_exit") is None


def test_early_exit_run(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    metrics.observe(make_report("early_exit"))
    assert requests(registry) == {"complete": 0.0, "early_exit": 1.0, "rejected": 0.0}
    assert value(registry, "edgemind_quota_exceeded_total") == 1.0
    assert value(registry, "edgemind_exit_level") == 2
    assert value(registry, "edgemind_exit_levels") == 3
    assert value(registry, "edgemind_inference_latency_seconds_count", outcome="early_exit") == 1
    assert metrics.quota_exceeded_count == 1


def test_rejected_run(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    metrics.observe(make_report("rejected"))
    assert requests(registry) == {"complete": 0.0, "early_exit": 0.0, "rejected": 1.0}
    assert value(registry, "edgemind_quota_exceeded_total") == 1.0
    assert value(registry, "edgemind_exit_level") == 0
    assert value(registry, "edgemind_weight_read_bytes_total") == 0
    assert value(registry, "edgemind_layer_load_seconds_count") is None
    assert value(registry, "edgemind_observed_peak_bytes") is None
    assert value(registry, "edgemind_plan_peak_bytes") == 80 << 20


def test_rejection_from_a_raised_error(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    error = MemoryQuotaExceeded("no", needed_bytes=80 << 20, capacity_bytes=CAPACITY)
    metrics.observe_rejection(error)
    assert requests(registry)["rejected"] == 1.0
    assert value(registry, "edgemind_plan_peak_bytes") == 80 << 20
    assert value(registry, "edgemind_quota_exceeded_total") == 1.0
    assert value(registry, "edgemind_exit_level") == 0
    assert value(registry, "edgemind_arena_capacity_bytes") == CAPACITY
    # The runtime attaches the infeasible plan to the error; its peak and levels are used.
    error.plan = types.SimpleNamespace(peak_bytes=90 << 20, num_levels=3)  # type: ignore[attr-defined]
    metrics.observe_rejection(error)
    assert requests(registry)["rejected"] == 2.0
    assert value(registry, "edgemind_plan_peak_bytes") == 90 << 20
    assert value(registry, "edgemind_exit_levels") == 3


def test_counters_accumulate_gauges_hold_the_last_request(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    for outcome in ("complete", "early_exit", "complete", "rejected"):
        metrics.observe(make_report(outcome))
    assert requests(registry) == {"complete": 2.0, "early_exit": 1.0, "rejected": 1.0}
    assert metrics.quota_exceeded_count == 2
    assert value(registry, "edgemind_weight_read_bytes_total") == 9 << 20
    assert value(registry, "edgemind_layer_load_seconds_count") == 6
    assert value(registry, "edgemind_exit_level") == 0  # the rejection came last
    assert value(registry, "edgemind_observed_peak_bytes") is None  # no stale value
    metrics.observe(make_report())
    assert value(registry, "edgemind_exit_level") == 3
    assert value(registry, "edgemind_observed_peak_bytes") == 6 << 20


def test_load_buckets_resolve_sub_millisecond_to_seconds(registry: CollectorRegistry) -> None:
    assert min(LAYER_LOAD_BUCKETS_S) <= 0.0001 and max(LAYER_LOAD_BUCKETS_S) >= 5.0
    metrics = RunMetrics(registry, MODEL)
    fast = LayerTiming("fast", load_s=0.00008, compute_s=0.0, bytes_read=64)
    slow = LayerTiming("slow", load_s=3.0, compute_s=0.0, bytes_read=64)
    metrics.observe(make_report(layers=(fast, slow)))

    def le(bound: float) -> float | None:
        return value(registry, "edgemind_layer_load_seconds_bucket", le=str(bound))

    assert le(0.0001) == 1  # the 80 us load alone
    assert le(1.0) == 1
    assert le(5.0) == 2


def test_registry_errors_and_no_global_registry(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    with pytest.raises(MetricsError, match="one RunMetrics per registry"):
        RunMetrics(registry, MODEL)
    with pytest.raises(MetricsError, match="other"):
        metrics.observe(make_report(model_name="other"))
    with pytest.raises(MetricsError, match="outcome"):
        metrics.observe(dataclasses.replace(make_report(), outcome="partial"))  # type: ignore[arg-type]
    with pytest.raises(MetricsError):
        RunMetrics(CollectorRegistry(), "")
    metrics.observe(make_report())
    assert not any(m.name.startswith("edgemind") for m in REGISTRY.collect())


# --- the report agrees with the series ---------------------------------------------


@pytest.mark.parametrize("outcome", ["complete", "early_exit", "rejected"])
def test_report_agrees_with_series(registry: CollectorRegistry, outcome: str) -> None:
    metrics = RunMetrics(registry, MODEL)
    report = make_report(outcome)
    metrics.observe(report)
    d = report_dict(report, quota_exceeded_count=metrics.quota_exceeded_count)
    latency_sum = value(registry, "edgemind_inference_latency_seconds_sum", outcome=outcome)
    load_sum = value(registry, "edgemind_layer_load_seconds_sum") or 0.0
    assert d["model_arena_usage_bytes"] == value(registry, "edgemind_arena_used_bytes")
    assert d["model_arena_capacity_bytes"] == value(registry, "edgemind_arena_capacity_bytes")
    assert d["layer_load_time_ms"] == pytest.approx(load_sum * 1000, abs=1e-3)
    assert d["inference_latency_ms"] == pytest.approx((latency_sum or 0) * 1000, abs=1e-3)
    assert d["quota_exceeded_count"] == value(registry, "edgemind_quota_exceeded_total")
    assert d["exit_level"] == value(registry, "edgemind_exit_level")
    assert d["plan_peak_bytes"] == value(registry, "edgemind_plan_peak_bytes")
    json.dumps(d)
    text = format_report(report, quota_exceeded_count=metrics.quota_exceeded_count)
    lines = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.strip()}
    for name in ORIGINAL_NAMES:
        assert lines[name] == str(d[name])


# --- HTTP exporter -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        (" localhost:0 ", ("localhost", 0)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9090", ("::1", 9090)),
        ("metrics-host.local:65535", ("metrics-host.local", 65535)),
    ],
)
def test_parse_http_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_http_addr(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port ''"),
        ("127.0.0.1:http", "port 'http'"),
        ("127.0.0.1:65536", "0 to 65535"),
        ("127.0.0.1:-1", "0 to 65535"),
        ("http://127.0.0.1:9090", "no scheme"),
        ("::1:9090", "brackets"),
        ("[nothost]:9090", "IPv6"),
        ("bad host:9090", "host name"),
        ("", "no port"),
        (":9100", "give a host: 127.0.0.1:9100 serves this machine only"),
        ("a" * 300 + ":9100", "not a host name"),
        ("a" * 64 + ".example:9100", "not a host name"),
    ],
)
def test_parse_http_addr_rejects(text: str, match: str) -> None:
    with pytest.raises(MetricsError, match=match) as info:
        parse_http_addr(text)
    message = str(info.value)
    assert message.startswith("metrics.http_addr") and "\n" not in message


def test_http_scrape_while_up(registry: CollectorRegistry) -> None:
    metrics = RunMetrics(registry, MODEL)
    with start_http_exporter(registry, "127.0.0.1:0") as exporter:
        assert exporter.port > 0
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        for outcome in ("complete", "early_exit", "rejected", "complete"):
            metrics.observe(make_report(outcome))
        families = scrape(exporter.url)
    types = {
        "edgemind_requests": "counter",
        "edgemind_quota_exceeded": "counter",
        "edgemind_weight_read_bytes": "counter",
        "edgemind_arena_used_bytes": "gauge",
        "edgemind_arena_capacity_bytes": "gauge",
        "edgemind_plan_peak_bytes": "gauge",
        "edgemind_arena_peak_used_bytes": "gauge",
        "edgemind_observed_peak_bytes": "gauge",
        "edgemind_exit_level": "gauge",
        "edgemind_layer_load_seconds": "histogram",
        "edgemind_inference_latency_seconds": "histogram",
    }
    assert {name: families[name].type for name in types} == types
    for outcome, count in (("complete", 2), ("early_exit", 1), ("rejected", 1)):
        labels = {**M, "outcome": outcome}
        assert sample_value(families, "edgemind_requests_total", labels) == count
    assert sample_value(families, "edgemind_quota_exceeded_total", M) == 2
    assert sample_value(families, "edgemind_arena_capacity_bytes", M) == CAPACITY
    observed = sample_value(families, "edgemind_observed_peak_bytes", M)
    planned = sample_value(families, "edgemind_plan_peak_bytes", M)
    assert observed is not None and planned is not None and observed <= planned
    assert sample_value(families, "edgemind_exit_level", M) == 3
    # Labels stay bounded: model and outcome, plus le on histogram buckets.
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= {"model", "outcome", "le"}
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(exporter.url, timeout=1).close()


def test_port_already_in_use(registry: CollectorRegistry) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as info:
            start_http_exporter(registry, f"127.0.0.1:{port}")
    assert str(info.value) == (
        f"metrics.http_addr 127.0.0.1:{port}: port already in use; "
        "choose another port or set metrics.enable_http: false"
    )
    with (
        start_http_exporter(registry, "127.0.0.1:0") as first,
        pytest.raises(MetricsError, match="already in use"),
    ):
        start_http_exporter(registry, f"127.0.0.1:{first.port}")


def test_unparseable_address_fails_before_listening(registry: CollectorRegistry) -> None:
    with pytest.raises(MetricsError, match="no port"):
        start_http_exporter(registry, "localhost")


def test_close_is_idempotent(registry: CollectorRegistry) -> None:
    exporter = start_http_exporter(registry, "127.0.0.1:0")
    exporter.close()
    exporter.close()


# --- textfile ------------------------------------------------------------------------


def test_textfile_is_written_atomically(
    registry: CollectorRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RunMetrics(registry, MODEL)
    metrics.observe(make_report("early_exit"))
    path = tmp_path / "edgemind.prom"
    path.write_text("stale\n")
    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def spy(src: str, dst: str) -> None:
        renames.append((str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    monkeypatch.setattr(os, "replace", spy)
    write_textfile(registry, path)
    assert len(renames) == 1
    src, dst = renames[0]
    assert dst == str(path) and Path(src).parent == path.parent and src != dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgemind.prom"]
    families = parse_exposition(path.read_text())
    labels = {**M, "outcome": "early_exit"}
    assert sample_value(families, "edgemind_requests_total", labels) == 1
    assert families["edgemind_layer_load_seconds"].type == "histogram"


def test_textfile_errors(registry: CollectorRegistry, tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="does not exist"):
        write_textfile(registry, tmp_path / "missing" / "edgemind.prom")
    with pytest.raises(MetricsError, match="is a directory"):
        check_textfile_path(tmp_path)
    check_textfile_path(tmp_path / "edgemind.prom")
