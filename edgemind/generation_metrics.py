"""Generation metrics: time to first token, per-token latency, tokens by finish reason.

:class:`GenerationMetrics` turns each finished generation
(:class:`~edgemind.runtime.generation.Generation`) into series on a registry the
caller passes in, beside :class:`~edgemind.metrics.RunMetrics`' (the same names'
conventions; ``docs/metrics.md`` lists both).

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> metrics = GenerationMetrics(registry, "gemma")
>>> registry.get_sample_value(
...     "edgemind_generated_tokens_total", {"model": "gemma", "finish_reason": "stop"})
0.0
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgemind.errors import MetricsError, brief
from edgemind.metrics import LATENCY_BUCKETS_S, NAMESPACE
from edgemind.runtime.generation import Generation
from edgemind.sampling import FINISH_REASONS

# A resident small model decodes a token in milliseconds; streamed from disk, seconds.
TOKEN_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class GenerationMetrics:
    """The generation series of one model on a registry (label ``model``)."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise MetricsError(f"metrics: expected a model name, got {brief(model_name)}")
        self.model_name = model_name
        model = ("model",)
        try:
            self._ttft = Histogram(
                "generation_time_to_first_token_seconds",
                "From the request to its first generated token (prefill included).",
                model,
                buckets=LATENCY_BUCKETS_S,
                namespace=NAMESPACE,
                registry=registry,
            )
            self._token = Histogram(
                "generation_token_seconds",
                "Wall time of one decode step (one token for every row of the batch).",
                model,
                buckets=TOKEN_BUCKETS_S,
                namespace=NAMESPACE,
                registry=registry,
            )
            self._tokens = Counter(
                "generated_tokens",
                "Tokens generated, by the finish reason of their sequence.",
                ("model", "finish_reason"),
                namespace=NAMESPACE,
                registry=registry,
            )
            self._prompt_tokens = Counter(
                "prompt_tokens",
                "Prompt tokens prefilled (padding included).",
                model,
                namespace=NAMESPACE,
                registry=registry,
            )
            self._kv = Gauge(
                "kv_cache_bytes",
                "KV cache planned for the last generation.",
                model,
                namespace=NAMESPACE,
                registry=registry,
            )
            self._read_per_token = Gauge(
                "generation_read_bytes_per_token",
                "Weight bytes read per decode step in the last generation.",
                model,
                namespace=NAMESPACE,
                registry=registry,
            )
            self._bytes_read = Counter(
                "generation_weight_read_bytes",
                "Weight bytes read while generating.",
                model,
                namespace=NAMESPACE,
                registry=registry,
            )
        except ValueError as exc:  # a name already registered
            raise MetricsError(
                f"metrics: the registry already holds these series ({exc})"
            ) from None
        for reason in FINISH_REASONS:
            self._tokens.labels(model_name, reason)

    def observe(self, generation: Generation) -> None:
        """Add one finished generation to the series."""
        model, r = self.model_name, generation.report
        self._ttft.labels(model).observe(r.time_to_first_token_s)
        for seconds in r.decode_step_s:
            self._token.labels(model).observe(seconds)
        for ids, reason in zip(generation.token_ids, generation.finish_reasons, strict=True):
            self._tokens.labels(model, reason).inc(len(ids))
        self._prompt_tokens.labels(model).inc(r.prompt_tokens * r.batch)
        self._kv.labels(model).set(r.kv_bytes)
        self._read_per_token.labels(model).set(r.bytes_read_per_token)
        self._bytes_read.labels(model).inc(r.bytes_read_prefill + r.bytes_read_decode)
