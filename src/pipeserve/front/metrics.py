"""Prometheus metrics (`GET /metrics`), with prometheus_client and a registry of our own.

Counters and histograms are observed where things happen (a request ends, a batch ends);
gauges and the batcher's counters are read from the live state at scrape time by a collector,
so they can never drift from what /info says. Figures measured in the model process (the
compute time of a batch) reach the front inside BatchResult: no second port, no shared files.
One registry for the server; every figure of one model carries a `model` label.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pipeserve.front.batcher import Batcher, Dropped, Job, Refused
from pipeserve.front.live import Recent
from pipeserve.front.streams import Stream, Streams
from pipeserve.front.supervisor import Supervisor

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self) -> None:
        # A `_created` series beside every counter and histogram doubles the scrape for a
        # timestamp that dashboards do not read.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.recent = Recent()  # what GET /stats summarises for the page
        self.started_at = time.time()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pipeserve_requests", "HTTP requests answered, by route, status and model (\"\" where none).",
            ["route", "status", "model"], registry=self.registry)
        self.request_seconds = Histogram(
            "pipeserve_request_duration_seconds", "Time from request received to response, by route and model.",
            ["route", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "pipeserve_queue_wait_seconds", "Time an input waited in the queue before its batch started.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference_seconds = Histogram(
            "pipeserve_inference_seconds", "Compute time of one batch, measured in the model process.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "pipeserve_batch_size", "Inputs per batch.", ["model"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "pipeserve_time_to_first_token_seconds", "From a stream's start to its first token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram(
            "pipeserve_inter_token_seconds", "Mean time between a stream's tokens, one sample per stream.",
            ["model"], buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter(
            "pipeserve_generated_tokens", "Tokens generated for streams.", ["model"], registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "pipeserve_cached_prompt_tokens", "Prompt tokens of streams not prefilled: a kept prefix's keys and "
            "values served them (--prefix-cache-bytes).", ["model"], registry=self.registry)
        self.model_loads = Counter(
            "pipeserve_model_loads", "Models loaded after start, by reason (request: on demand; reload: SIGHUP).",
            ["model", "reason"], registry=self.registry)
        self.model_unloads = Counter(
            "pipeserve_model_unloads", "Models unloaded, by reason (lru: to make room; keep_alive: idle too long; "
            "reload: SIGHUP removed or replaced it).", ["model", "reason"], registry=self.registry)
        self.streams_ended = Counter(
            "pipeserve_streams", "Generated streams ended, by finish reason (cancelled: the client went "
            "away or its deadline passed).", ["model", "finish_reason"], registry=self.registry)
        self._state = _StateCollector(self.started_at)
        self.registry.register(self._state)

    def model(self, name: str) -> ModelMetrics:
        """What one model's batches and streams report to."""
        return ModelMetrics(self, name)

    def bind(self, name: str, batcher: Batcher, supervisors: Callable[[], Sequence[Supervisor]],
             streams: Streams, loaded: Callable[[], bool]) -> None:
        """Expose a model's live state (gauges, drop counters) at scrape time."""
        self._state.models[name] = (batcher, supervisors, streams, loaded)

    def unbind(self, name: str) -> None:
        """A model no longer served (a reload removed it)."""
        self._state.models.pop(name, None)

    def observe_request(self, route: str, status: int, seconds: float, asks_the_model: bool = True,
                        model: str = "") -> None:
        if asks_the_model:  # the page's figures leave out probes, scrapes and its own polls
            self.recent.request(status, seconds)
        self.requests.labels(route, str(status), model).inc()
        self.request_seconds.labels(route, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    def __init__(self, metrics: Metrics, name: str) -> None:
        self.metrics = metrics
        self.name = name

    def observe_batch(self, jobs: Iterable[Job], started_at: float, compute_seconds: float | None) -> None:
        metrics, count = self.metrics, 0
        wait = metrics.queue_wait_seconds.labels(self.name)
        for job in jobs:
            count += 1
            wait.observe(max(0.0, started_at - job.enqueued_at))
        metrics.batch_size.labels(self.name).observe(count)
        if compute_seconds is not None:
            metrics.inference_seconds.labels(self.name).observe(compute_seconds)

    def observe_stream(self, stream: Stream) -> None:
        metrics = self.metrics
        reason = stream.end.finish_reason if stream.end is not None else "cancelled"
        metrics.streams_ended.labels(self.name, reason).inc()
        metrics.generated_tokens.labels(self.name).inc(stream.tokens)
        if stream.end is not None:
            metrics.cached_prompt_tokens.labels(self.name).inc(stream.end.cached_tokens)
        if stream.first_token_at is not None:
            metrics.time_to_first_token.labels(self.name).observe(stream.first_token_at - stream.opened_at)
            if stream.tokens > 1:
                metrics.inter_token.labels(self.name).observe(
                    (time.monotonic() - stream.first_token_at) / (stream.tokens - 1))


class _StateCollector(Collector):
    def __init__(self, started_at: float) -> None:
        self.models: dict[str, tuple[Batcher, Callable[[], Sequence[Supervisor]], Streams, Callable[[], bool]]] = {}
        self.started_at = started_at

    def collect(self) -> Iterator[Metric]:
        def family(kind: type[Any], name: str, documentation: str, *labels: str) -> Any:
            return kind(name, documentation, labels=["model", *labels])

        depth = family(GaugeMetricFamily, "pipeserve_queue_depth", "Inputs waiting for a worker.")
        in_flight = family(GaugeMetricFamily, "pipeserve_in_flight", "Inputs in a batch that a worker is running.")
        sequences = family(GaugeMetricFamily, "pipeserve_running_sequences",
                           "Generated streams open (running or waiting in a worker).")
        dropped = family(CounterMetricFamily, "pipeserve_dropped_jobs", "Inputs dropped before compute, by reason.",
                         "reason")
        refused = family(CounterMetricFamily, "pipeserve_refused_requests", "Requests refused with 503 at admission.",
                         "reason")
        batches = family(CounterMetricFamily, "pipeserve_batches", "Batches completed.")
        restarts = family(CounterMetricFamily, "pipeserve_worker_restarts", "Model process restarts.", "worker")
        up = family(GaugeMetricFamily, "pipeserve_worker_up", "1 while the worker is loaded and serving.", "worker")
        draining = family(GaugeMetricFamily, "pipeserve_worker_draining",
                          "1 while the worker finishes its work before a restart past --max-worker-memory.", "worker")
        load = family(GaugeMetricFamily, "pipeserve_model_load_seconds",
                      "How long the worker took to load and warm up.", "worker")
        loaded = family(GaugeMetricFamily, "pipeserve_model_loaded", "1 while the model is loaded (its processes up).")
        for name, (batcher, supervisors, streams, is_loaded) in self.models.items():
            loaded.add_metric([name], 1.0 if is_loaded() else 0.0)
            depth.add_metric([name], batcher.depth)
            in_flight.add_metric([name], batcher.in_flight)
            sequences.add_metric([name], len(streams.open))
            for dropped_reason in Dropped:
                dropped.add_metric([name, dropped_reason.value], batcher.dropped[dropped_reason])
            for refused_reason in Refused:
                refused.add_metric([name, refused_reason.value], batcher.refused[refused_reason])
            batches.add_metric([name], batcher.batches)
            for supervisor in supervisors():
                label = [name, str(supervisor.index)]
                restarts.add_metric(label, supervisor.restarts)
                up.add_metric(label, 1.0 if supervisor.serving else 0.0)
                draining.add_metric(label, 1.0 if supervisor.draining else 0.0)
                if supervisor.ready is not None:
                    load.add_metric(label, supervisor.ready.load_seconds)
        yield from (loaded, depth, in_flight, sequences, dropped, refused, batches, restarts, up, draining, load)
        yield GaugeMetricFamily("pipeserve_uptime_seconds", "Seconds since the front started.",
                                value=time.time() - self.started_at)
