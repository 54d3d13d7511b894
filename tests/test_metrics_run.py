"""Metrics from real runs: an HTTP scrape while the exporter is up, and the CLI's
stdout report agreeing with the Prometheus series."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edgemind.cli import EXIT_EARLY_EXIT, EXIT_INFEASIBLE, EXIT_OK, main
from edgemind.errors import MemoryQuotaExceeded
from edgemind.metrics import (
    RunMetrics,
    parse_exposition,
    sample_value,
    scrape,
    start_http_exporter,
)
from edgemind.runtime import Runtime
from edgemind.units import MIB

MODEL = {"model": "toy-ffn-10"}


def outcome(name: str) -> dict[str, str]:
    return {**MODEL, "outcome": name}


def test_real_run_scraped_over_http(toy_model):
    registry = CollectorRegistry()
    metrics = RunMetrics(registry, "toy-ffn-10")
    x = np.ones((2, 1024), np.float32)
    with start_http_exporter(registry, "127.0.0.1:0") as exporter:
        with Runtime.open(toy_model) as rt:
            result = rt.run(x)
        metrics.observe(result.report)
        families = scrape(exporter.url)
    report = result.report
    assert families["edgemind_arena_capacity_bytes"].type == "gauge"
    assert families["edgemind_requests"].type == "counter"
    assert families["edgemind_layer_load_seconds"].type == "histogram"
    capacity = sample_value(families, "edgemind_arena_capacity_bytes", MODEL)
    assert capacity == rt.policy.arena_capacity_bytes == 50 * MIB
    plan_peak = sample_value(families, "edgemind_plan_peak_bytes", MODEL)
    arena_peak = sample_value(families, "edgemind_arena_peak_used_bytes", MODEL)
    assert plan_peak == report.plan_peak_bytes
    assert arena_peak is not None and plan_peak is not None and arena_peak <= plan_peak
    observed = sample_value(families, "edgemind_observed_peak_bytes", MODEL)
    if report.observed_peak_bytes is not None:
        assert observed == report.observed_peak_bytes
    assert sample_value(families, "edgemind_requests_total", outcome("complete")) == 1
    assert sample_value(families, "edgemind_requests_total", outcome("early_exit")) == 0
    assert sample_value(families, "edgemind_exit_level", MODEL) == 3
    assert sample_value(families, "edgemind_weight_read_bytes_total", MODEL) == report.bytes_read
    loads = sample_value(families, "edgemind_layer_load_seconds_count", MODEL)
    assert loads == sum(1 for t in report.layers if t.bytes_read)
    # the exporter is gone after close
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(exporter.url, timeout_s=1.0)


def test_early_exit_and_rejection_move_their_counters(toy_model):
    registry = CollectorRegistry()
    metrics = RunMetrics(registry, "toy-ffn-10")
    x = np.ones((1, 1024), np.float32)
    with Runtime.open(toy_model, arena_capacity_bytes=24 * MIB) as rt:
        metrics.observe(rt.run(x).report)
    get = registry.get_sample_value
    assert get("edgemind_requests_total", outcome("early_exit")) == 1
    assert get("edgemind_quota_exceeded_total", MODEL) == 1
    assert get("edgemind_exit_level", MODEL) == 2
    with Runtime.open(toy_model, arena_capacity_bytes=2 * MIB) as rt:
        with pytest.raises(MemoryQuotaExceeded) as info:
            rt.run(x)
        metrics.observe_rejection(info.value)
    assert get("edgemind_requests_total", outcome("rejected")) == 1
    assert get("edgemind_quota_exceeded_total", MODEL) == 2
    assert get("edgemind_exit_level", MODEL) == 0
    assert get("edgemind_weight_read_bytes_total", MODEL) > 0  # from the early exit only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_metrics_while_lingering(toy_model, capsys):
    port = _free_port()
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(
            main(
                [
                    "run",
                    str(toy_model),
                    "--random-input",
                    "--repeat",
                    "2",
                    "--metrics-addr",
                    f"127.0.0.1:{port}",
                    "--linger",
                    "3",
                ]
            )
        )
    )
    thread.start()
    families = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        try:
            families = scrape(f"http://127.0.0.1:{port}/metrics", timeout_s=1.0)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
            continue
        if sample_value(families, "edgemind_requests_total", outcome("complete")) == 2:
            break
        time.sleep(0.05)
    thread.join(timeout=60)
    assert codes == [EXIT_OK]
    assert families is not None
    assert sample_value(families, "edgemind_requests_total", outcome("complete")) == 2
    capsys.readouterr()


def test_stdout_report_agrees_with_textfile_series(toy_model, tmp_path, capsys):
    prom = tmp_path / "edgemind.prom"
    code = main(
        [
            "run",
            str(toy_model),
            "--random-input",
            "--arena-mb",
            "24",
            "--json",
            "--metrics-textfile",
            str(prom),
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_EARLY_EXIT
    families = parse_exposition(prom.read_text())
    assert out["exit_level"] == sample_value(families, "edgemind_exit_level", MODEL) == 2
    assert out["model_arena_capacity_bytes"] == sample_value(
        families, "edgemind_arena_capacity_bytes", MODEL
    )
    assert out["model_arena_usage_bytes"] == sample_value(
        families, "edgemind_arena_used_bytes", MODEL
    )
    assert (
        out["quota_exceeded_count"]
        == sample_value(families, "edgemind_quota_exceeded_total", MODEL)
        == 1
    )
    latency = sample_value(
        families, "edgemind_inference_latency_seconds_sum", outcome("early_exit")
    )
    assert latency is not None
    assert out["inference_latency_ms"] == pytest.approx(latency * 1e3, abs=1e-3)
    load = sample_value(families, "edgemind_layer_load_seconds_sum", MODEL)
    assert load is not None
    assert out["layer_load_time_ms"] == pytest.approx(load * 1e3, abs=1e-3)
    for name in (
        "model_arena_usage_bytes",
        "model_arena_capacity_bytes",
        "layer_load_time_ms",
        "inference_latency_ms",
        "quota_exceeded_count",
        "exit_level",
    ):
        assert name in out


def test_rejected_cli_run_still_writes_its_metrics(toy_model, tmp_path, capsys):
    prom = tmp_path / "edgemind.prom"
    code = main(
        [
            "run",
            str(toy_model),
            "--random-input",
            "--arena-mb",
            "2",
            "--metrics-textfile",
            str(prom),
        ]
    )
    capsys.readouterr()
    assert code == EXIT_INFEASIBLE
    families = parse_exposition(prom.read_text())
    assert sample_value(families, "edgemind_requests_total", outcome("rejected")) == 1
    assert sample_value(families, "edgemind_exit_level", MODEL) == 0


def test_taken_port_fails_before_the_run(toy_model, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(
            ["run", str(toy_model), "--random-input", "--metrics-addr", f"127.0.0.1:{port}"]
        )
    err = capsys.readouterr().err
    assert code == 1 and "in use" in err and len(err.strip().splitlines()) == 1
