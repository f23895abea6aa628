"""Prometheus metrics (`GET /metrics`), with prometheus_client and a registry of our own.

Counters and histograms are observed where things happen (a request ends, a batch ends);
gauges and the batcher's counters are read from the live state at scrape time by a collector,
so they can never drift from what /info says. Figures measured in the model process (the
compute time of a batch) reach the front inside BatchResult: no second port, no shared files.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

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
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pipeserve_requests", "HTTP requests answered, by route and status.",
            ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "pipeserve_request_duration_seconds", "Time from request received to response, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "pipeserve_queue_wait_seconds", "Time an input waited in the queue before its batch started.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference_seconds = Histogram(
            "pipeserve_inference_seconds", "Compute time of one batch, measured in the model process.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "pipeserve_batch_size", "Inputs per batch.", buckets=_BATCH_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "pipeserve_time_to_first_token_seconds", "From a stream's start to its first token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram(
            "pipeserve_inter_token_seconds", "Mean time between a stream's tokens, one sample per stream.",
            buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter(
            "pipeserve_generated_tokens", "Tokens generated for streams.", registry=self.registry)
        self.streams_ended = Counter(
            "pipeserve_streams", "Generated streams ended, by finish reason (cancelled: the client went "
            "away or its deadline passed).", ["finish_reason"], registry=self.registry)

    def bind(self, batcher: Batcher, supervisors: Sequence[Supervisor], started_at: float,
             streams: Streams) -> None:
        """Expose the live state (gauges, drop counters) at scrape time."""
        self.registry.register(_StateCollector(batcher, supervisors, started_at, streams))

    def observe_request(self, route: str, status: int, seconds: float, asks_the_model: bool = True) -> None:
        if asks_the_model:  # the page's figures leave out probes, scrapes and its own polls
            self.recent.request(status, seconds)
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_batch(self, jobs: Iterable[Job], started_at: float, compute_seconds: float | None) -> None:
        count = 0
        for job in jobs:
            count += 1
            self.queue_wait_seconds.observe(max(0.0, started_at - job.enqueued_at))
        self.batch_size.observe(count)
        if compute_seconds is not None:
            self.inference_seconds.observe(compute_seconds)

    def observe_stream(self, stream: Stream) -> None:
        reason = stream.end.finish_reason if stream.end is not None else "cancelled"
        self.streams_ended.labels(reason).inc()
        self.generated_tokens.inc(stream.tokens)
        if stream.first_token_at is not None:
            self.time_to_first_token.observe(stream.first_token_at - stream.opened_at)
            if stream.tokens > 1:
                self.inter_token.observe((time.monotonic() - stream.first_token_at) / (stream.tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, batcher: Batcher, supervisors: Sequence[Supervisor], started_at: float,
                 streams: Streams) -> None:
        self.streams = streams
        self.batcher = batcher
        self.supervisors = supervisors
        self.started_at = started_at

    def collect(self) -> Iterator[Metric]:
        batcher = self.batcher
        yield _gauge("pipeserve_queue_depth", "Inputs waiting for a worker.", batcher.depth)
        yield _gauge("pipeserve_in_flight", "Inputs in a batch that a worker is running.", batcher.in_flight)
        yield _gauge("pipeserve_running_sequences", "Generated streams open (running or waiting in a worker).",
                     len(self.streams.open))
        dropped = CounterMetricFamily("pipeserve_dropped_jobs", "Inputs dropped before compute, by reason.",
                                      labels=["reason"])
        for dropped_reason in Dropped:
            dropped.add_metric([dropped_reason.value], batcher.dropped[dropped_reason])
        yield dropped
        refused = CounterMetricFamily("pipeserve_refused_requests", "Requests refused with 503 at admission.",
                                      labels=["reason"])
        for refused_reason in Refused:
            refused.add_metric([refused_reason.value], batcher.refused[refused_reason])
        yield refused
        yield CounterMetricFamily("pipeserve_batches", "Batches completed.", value=batcher.batches)
        restarts = CounterMetricFamily("pipeserve_worker_restarts", "Model process restarts.",
                                       labels=["worker"])
        up = GaugeMetricFamily("pipeserve_worker_up", "1 while the worker is loaded and serving.",
                               labels=["worker"])
        load = GaugeMetricFamily("pipeserve_model_load_seconds", "How long the worker took to load and warm up.",
                                 labels=["worker"])
        for supervisor in self.supervisors:
            label = [str(supervisor.index)]
            restarts.add_metric(label, supervisor.restarts)
            up.add_metric(label, 1.0 if supervisor.serving else 0.0)
            if supervisor.ready is not None:
                load.add_metric(label, supervisor.ready.load_seconds)
        yield restarts
        yield up
        yield load
        yield _gauge("pipeserve_uptime_seconds", "Seconds since the front started.",
                     time.time() - self.started_at)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
