"""The metrics sink: run reports as Prometheus series, and the two ways out of the process.

:class:`RunMetrics` turns each :class:`~edgemind.runtime.report.RunReport` into series
on a registry the caller passes in (never the global one). :func:`start_http_exporter`
serves that registry over HTTP for the life of the process; :func:`write_textfile`
writes it atomically for node_exporter's textfile collector. ``docs/metrics.md`` maps
the original EdgeMind names of the stdout report to these.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> metrics = RunMetrics(registry, "tiny")
>>> registry.get_sample_value("edgemind_requests_total", {"model": "tiny", "outcome": "rejected"})
0.0
>>> parse_http_addr("127.0.0.1:9090")
('127.0.0.1', 9090)
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from edgemind.errors import MemoryQuotaExceeded, MetricsError, brief
from edgemind.planner.plan import Plan
from edgemind.report_text import arena_usage_bytes, exit_level_value
from edgemind.runtime.report import RunReport

NAMESPACE = "edgemind"
OUTCOMES: tuple[str, ...] = ("complete", "early_exit", "rejected")
# A layer read from a page-cached file takes tens of microseconds; a cold read of a
# large layer from an SD card, seconds. Roughly 1-2.5-5 steps from 100 us to 10 s.
LAYER_LOAD_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# A whole request: a tiny model in memory is sub-millisecond; disk offload of a large
# one runs to tens of seconds (Accelerate's 10.7 s/token).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class RunMetrics:
    """The edgemind series of one model on a registry: counters accumulate, gauges hold
    the last request.

    Every series has a ``model`` label; requests and latency add ``outcome``. Build one
    per model and registry; a second on the same registry raises :class:`MetricsError`.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise MetricsError(f"metrics: expected a model name, got {brief(model_name)}")
        self.registry = registry
        self.model_name = model_name
        try:
            self._build(registry)
        except ValueError as exc:  # a name already registered
            raise MetricsError(
                f"metrics: the registry already holds edgemind series ({exc}); "
                "use one RunMetrics per registry"
            ) from None
        for outcome in OUTCOMES:  # so rate() and absent() work before the first request
            self._requests.labels(model_name, outcome)
        for series in (self._quota_exceeded, self._bytes_read):
            series.labels(model_name)

    def _build(self, registry: CollectorRegistry) -> None:
        model = ("model",)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, model, namespace=NAMESPACE, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = model) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(
                name, doc, labels, namespace=NAMESPACE, registry=registry, buckets=buckets
            )

        self._arena_used = gauge(
            "arena_used_bytes", "Arena bytes in use when the last request ended."
        )
        self._capacity = gauge("arena_capacity_bytes", "Arena capacity set by the policy.")
        self._arena_allocated = gauge(
            "arena_allocated_bytes", "Arena bytes allocated: the plan's extent."
        )
        self._plan_peak = gauge(
            "plan_peak_bytes", "Planned peak of the last request: arena + largest working set."
        )
        self._arena_peak = gauge(
            "arena_peak_used_bytes", "Most arena bytes held at once in the last request."
        )
        self._observed_peak = gauge(
            "observed_peak_bytes",
            "Process peak RSS above the warmed-up baseline in the last request.",
        )
        self._exit_level = gauge(
            "exit_level", "Exit level the last request reached; 0 when rejected."
        )
        self._num_levels = gauge(
            "exit_levels", "Exit levels of the model; the deepest is the complete run."
        )
        self._requests = counter("requests", "Requests by outcome.", ("model", "outcome"))
        self._quota_exceeded = counter(
            "quota_exceeded", "Requests whose complete run did not fit the arena."
        )
        self._bytes_read = counter("weight_read_bytes", "Weight bytes read from disk.")
        self._layer_load = histogram(
            "layer_load_seconds",
            "Time to read one layer's weights from disk.",
            model,
            LAYER_LOAD_BUCKETS_S,
        )
        self._layer_compute = histogram(
            "layer_compute_seconds", "Time to run one layer.", model, LAYER_LOAD_BUCKETS_S
        )
        self._latency = histogram(
            "inference_latency_seconds",
            "Wall time of one request.",
            ("model", "outcome"),
            LATENCY_BUCKETS_S,
        )

    def observe(self, report: RunReport) -> None:
        """Add one request's report to the series."""
        _check_report(report, self.model_name)
        model = self.model_name
        self._requests.labels(model, report.outcome).inc()
        if report.quota_exceeded:
            self._quota_exceeded.labels(model).inc()
        self._bytes_read.labels(model).inc(report.bytes_read)
        for timing in report.layers:
            if timing.bytes_read > 0 or timing.load_s > 0:  # pinned layers load nothing
                self._layer_load.labels(model).observe(timing.load_s)
            self._layer_compute.labels(model).observe(timing.compute_s)
        self._latency.labels(model, report.outcome).observe(report.latency_s)
        self._arena_used.labels(model).set(arena_usage_bytes(report))
        self._capacity.labels(model).set(report.capacity_bytes)
        self._arena_allocated.labels(model).set(report.arena_bytes)
        self._plan_peak.labels(model).set(report.plan_peak_bytes)
        self._arena_peak.labels(model).set(report.arena_peak_used_bytes)
        if report.observed_peak_bytes is None:  # no stale value from an earlier request
            self._observed_peak.remove(model)
        else:
            self._observed_peak.labels(model).set(report.observed_peak_bytes)
        self._exit_level.labels(model).set(exit_level_value(report))
        self._num_levels.labels(model).set(report.num_levels)

    def observe_rejection(
        self, error: MemoryQuotaExceeded, plan: Plan | None = None, *, latency_s: float = 0.0
    ) -> None:
        """Count a request the runtime rejected by raising :class:`MemoryQuotaExceeded`.

        ``plan`` defaults to the one the runtime attaches to the error (``error.plan``);
        the planned-peak gauge takes its peak, else ``error.needed_bytes``.
        """
        plan = plan if plan is not None else getattr(error, "plan", None)
        peak = plan.peak_bytes if plan is not None and plan.peak_bytes else error.needed_bytes
        self.observe(
            RunReport(
                model_name=self.model_name,
                outcome="rejected",
                exit_level=None,
                num_levels=plan.num_levels if plan is not None else 0,
                capacity_bytes=error.capacity_bytes,
                arena_bytes=0,
                plan_peak_bytes=peak,
                arena_peak_used_bytes=0,
                observed_peak_bytes=None,
                bytes_read=0,
                latency_s=latency_s,
                quota_exceeded=True,
            )
        )

    @property
    def quota_exceeded_count(self) -> int:
        """Requests so far whose complete run did not fit: ``quota_exceeded_count``."""
        labels = {"model": self.model_name}
        value = self.registry.get_sample_value(f"{NAMESPACE}_quota_exceeded_total", labels)
        return int(value or 0)


def _check_report(report: RunReport, model_name: str) -> None:
    where = f"metrics for model {brief(model_name)}"
    if report.model_name != model_name:
        raise MetricsError(f"{where}: got a report of model {brief(report.model_name)}")
    if report.outcome not in OUTCOMES:
        raise MetricsError(f"{where}: unknown outcome {report.outcome!r}; expected {OUTCOMES}")
    if report.bytes_read < 0 or report.latency_s < 0:
        raise MetricsError(f"{where}: negative bytes_read or latency_s in the report")


# --- HTTP exporter -------------------------------------------------------------------

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def parse_http_addr(text: str) -> tuple[str, int]:
    """Split ``metrics.http_addr`` into ``(host, port)``.

    Accepts ``host:port`` and ``[ipv6]:port``; port 0 asks the system for a free port.
    The host must be written: ``:port`` is refused rather than read as every interface,
    so serving beyond this machine (``0.0.0.0:port``) is always a deliberate choice.

    >>> parse_http_addr("[::1]:0")
    ('::1', 0)
    """
    hint = "expected 'host:port', such as 127.0.0.1:9090"
    if not isinstance(text, str):
        raise MetricsError(f"metrics.http_addr {brief(text)}: {hint}")
    addr = text.strip()

    def bad(why: str) -> MetricsError:
        return MetricsError(f"metrics.http_addr {brief(text, 60)}: {why}; {hint}")

    if "://" in addr or "/" in addr:
        raise bad("give no scheme or path")
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise bad("no port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise bad(f"port {brief(port_text, 20)} is not a number from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise bad(f"{host} is not an IPv6 address") from None
    elif ":" in host:
        raise bad("write an IPv6 host in brackets, as [::1]:9090")
    elif host == "":
        raise bad(
            f"give a host: 127.0.0.1:{port_text} serves this machine only, "
            f"0.0.0.0:{port_text} every interface"
        )
    elif not _HOST_RE.match(host) or len(host) > 253 or any(len(p) > 63 for p in host.split(".")):
        raise bad(f"{brief(host, 40)} is not a host name or IP address")
    return host, int(port_text)


class MetricsExporter:
    """A running HTTP exporter: ``url`` to scrape, ``close()`` to stop it (idempotent)."""

    def __init__(self, server: Any, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        """Where to scrape from this machine (every interface includes loopback)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}/metrics"

    @property
    def loopback_only(self) -> bool:
        """True when only this machine can connect (a loopback address or localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: whatever it resolves to, not assumed private
            return False

    def describe(self) -> str:
        """What is really bound, for a message: ``listening on 0.0.0.0:9100 (...)``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.loopback_only:
            scope = "this machine only"
        elif self.host in ("0.0.0.0", "::"):
            scope = "every interface: reachable from other machines"
        else:
            scope = "beyond loopback: reachable from other machines"
        return f"listening on {host}:{self.port} ({scope})"

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_http_exporter(registry: CollectorRegistry, addr: str) -> MetricsExporter:
    """Serve ``registry`` at ``http://addr/metrics`` from a daemon thread.

    Fails with a one-line :class:`MetricsError` when the address does not parse, the
    host does not resolve, or the port is taken: call it before the run starts.
    """
    host, port = parse_http_addr(addr)
    where = f"metrics.http_addr {addr}"
    fix = "choose another port or set metrics.enable_http: false"
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except socket.gaierror as exc:
        raise MetricsError(f"{where}: cannot resolve host {host!r} ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsError(f"{where}: port already in use; {fix}") from None
        raise MetricsError(f"{where}: cannot listen ({exc.strerror}); {fix}") from None
    return MetricsExporter(server, thread, host)


# --- textfile and scraping -----------------------------------------------------------


def check_textfile_path(path: str | os.PathLike[str]) -> None:
    """Fail early (before a run) when ``path`` cannot be a metrics textfile."""
    target = Path(path)
    if target.is_dir():
        raise MetricsError(f"--metrics-textfile {target}: is a directory; give a file path")
    if not target.parent.is_dir():
        raise MetricsError(f"--metrics-textfile {target}: directory {target.parent} does not exist")


def write_textfile(registry: CollectorRegistry, path: str | os.PathLike[str]) -> None:
    """Write the exposition to ``path`` atomically (a temporary file beside it, renamed).

    node_exporter's textfile collector reads only files ending in ``.prom``.
    """
    from edgemind.files import atomic_write

    check_textfile_path(path)
    exposition = generate_latest(registry)
    atomic_write(path, lambda f: f.write(exposition), flag="--metrics-textfile", error=MetricsError)


def parse_exposition(text: str) -> dict[str, Metric]:
    """Parse Prometheus text into families by name (counters lose ``_total``)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, Metric]:
    """GET an exposition over HTTP and parse it: ``scrape(exporter.url)``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse_exposition(response.read().decode("utf-8"))


def sample_value(
    families: dict[str, Metric], name: str, labels: dict[str, str] | None = None
) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in parsed families, or None."""
    wanted = labels or {}
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return float(sample.value)
    return None
