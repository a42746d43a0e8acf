"""Prometheus series of every service, named the way vLLM names its own (`vllm:` -> `vlmesh:`), so
a vLLM dashboard translates by replacing the prefix.

Each process makes its own metrics object on its own CollectorRegistry (never the global default
registry), so several services can run in one test process, and serves that registry:

    metrics = StageMetrics.create()
    metrics.track_kv("0:14", used=lambda: backend.kv_used, budget=budget_bytes, sessions=lambda: backend.sessions)
    server = serve_metrics(metrics.registry, cfg.metrics_port, cfg.host)   # None when the port is 0

Times are seconds; histogram buckets are vLLM's where vLLM has the series (so dashboards'
quantile panels read the same), and finer ones for the per-hop latency, which is sub-millisecond
on one machine. The series, by the service that exposes them:

every service   vlmesh:request_errors_total{code}                       RPCs that ended in a non-OK gRPC status
coordinator     vlmesh:time_to_first_token_seconds                      request arrival -> first token sent
                vlmesh:inter_token_latency_seconds                      between consecutive tokens of one request
                vlmesh:e2e_request_latency_seconds                      request arrival -> last token sent
                vlmesh:request_queue_time_seconds                       arrival -> first scheduled into a step
                vlmesh:prompt_tokens_total                              prompt tokens prefilled (cached history excluded)
                vlmesh:generation_tokens_total                          tokens generated
                vlmesh:request_success_total{finished_reason}           requests finished: stop | length | ...
                vlmesh:num_requests_running                             requests in the step loop now
                vlmesh:num_requests_waiting                             requests waiting for a batch slot
                vlmesh:stage_hop_latency_seconds{stage}                 one stage round trip seen by the coordinator
                vlmesh:stage_compute_seconds{stage}                     the compute the stage reports for that round trip
                vlmesh:stage_hop_overhead_seconds{stage}                the round trip less that compute: transport, queueing, protobuf
                vlmesh:stage_request_build_seconds{stage}               the coordinator building the round trip's request
                vlmesh:engine_round_seconds                             one engine round: applying results, scheduling, planning
stage           vlmesh:kv_cache_usage_bytes{layers}                     KV bytes held
                vlmesh:kv_cache_budget_bytes{layers}                    KV byte budget (--kv-budget-mb)
                vlmesh:kv_cache_usage_perc{layers}                      usage / budget, 0..1 (vLLM's name for a fraction)
                vlmesh:num_sessions{layers}                             sessions holding KV
vision          vlmesh:vision_cache_hits_total                          images and videos served from the cache
                vlmesh:vision_cache_misses_total                        images and videos that ran the encoder
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "vlmesh:"

# vLLM's buckets for the same series (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# A hop is ~1.5 ms on one machine (README benchmarks) and compute-bound on big stages.
HOP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _errors(registry: CollectorRegistry) -> Counter:
    return Counter(PREFIX + "request_errors", "RPCs that ended in a non-OK gRPC status.", ["code"], registry=registry)


@dataclass(frozen=True)
class CoordinatorMetrics:
    registry: CollectorRegistry
    request_errors: Counter  # {code}: grpc.StatusCode name, e.g. UNAVAILABLE
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_request_latency: Histogram
    request_queue_time: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter  # {finished_reason}
    requests_running: Gauge
    requests_waiting: Gauge
    stage_hop_latency: Histogram  # {stage}: its layer range "A:B"
    stage_compute: Histogram  # {stage}: the compute the stage reports for the hop
    stage_hop_overhead: Histogram  # {stage}: the round trip less that compute (transport, the stage's queue, protobuf)
    stage_request_build: Histogram  # {stage}: the coordinator building the hop's request
    engine_round: Histogram  # the coordinator's engine rounds (applying results, scheduling, planning)

    @classmethod
    def create(cls) -> CoordinatorMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            request_errors=_errors(r),
            time_to_first_token=Histogram(
                PREFIX + "time_to_first_token_seconds", "Time to first token in seconds.", buckets=TTFT_BUCKETS, registry=r
            ),
            inter_token_latency=Histogram(
                PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens in seconds.", buckets=ITL_BUCKETS, registry=r
            ),
            e2e_request_latency=Histogram(
                PREFIX + "e2e_request_latency_seconds", "End-to-end request latency in seconds.", buckets=REQUEST_BUCKETS, registry=r
            ),
            request_queue_time=Histogram(
                PREFIX + "request_queue_time_seconds", "Time a request waited before its first step, in seconds.", buckets=REQUEST_BUCKETS, registry=r
            ),
            prompt_tokens=Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled.", registry=r),
            generation_tokens=Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r),
            request_success=Counter(PREFIX + "request_success", "Requests finished, by finish reason.", ["finished_reason"], registry=r),
            requests_running=Gauge(PREFIX + "num_requests_running", "Requests in the step loop.", registry=r),
            requests_waiting=Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a batch slot.", registry=r),
            stage_hop_latency=Histogram(
                PREFIX + "stage_hop_latency_seconds",
                "One stage round trip seen by the coordinator, in seconds.",
                ["stage"],
                buckets=HOP_BUCKETS,
                registry=r,
            ),
            stage_compute=Histogram(
                PREFIX + "stage_compute_seconds",
                "The compute a stage reports for one Forward, in seconds.",
                ["stage"],
                buckets=HOP_BUCKETS,
                registry=r,
            ),
            stage_hop_overhead=Histogram(
                PREFIX + "stage_hop_overhead_seconds",
                "One stage round trip less the compute the stage reports (transport, queueing, protobuf), in seconds.",
                ["stage"],
                buckets=HOP_BUCKETS,
                registry=r,
            ),
            stage_request_build=Histogram(
                PREFIX + "stage_request_build_seconds",
                "The coordinator building one Forward request, in seconds.",
                ["stage"],
                buckets=HOP_BUCKETS,
                registry=r,
            ),
            engine_round=Histogram(
                PREFIX + "engine_round_seconds",
                "One round of the coordinator's engine (applying results, scheduling, planning), in seconds.",
                buckets=HOP_BUCKETS,
                registry=r,
            ),
        )


@dataclass(frozen=True)
class StageMetrics:
    registry: CollectorRegistry
    request_errors: Counter
    kv_cache_usage_bytes: Gauge  # {layers}: the stage's range "A:B"
    kv_cache_budget_bytes: Gauge
    kv_cache_usage_perc: Gauge
    num_sessions: Gauge

    @classmethod
    def create(cls) -> StageMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            request_errors=_errors(r),
            kv_cache_usage_bytes=Gauge(PREFIX + "kv_cache_usage_bytes", "KV cache bytes held.", ["layers"], registry=r),
            kv_cache_budget_bytes=Gauge(PREFIX + "kv_cache_budget_bytes", "KV cache byte budget.", ["layers"], registry=r),
            kv_cache_usage_perc=Gauge(PREFIX + "kv_cache_usage_perc", "KV cache usage. 1 means 100 percent usage.", ["layers"], registry=r),
            num_sessions=Gauge(PREFIX + "num_sessions", "Sessions holding KV on this stage.", ["layers"], registry=r),
        )

    def track_kv(self, layers: str, used: Callable[[], float], budget: float, sessions: Callable[[], float]) -> None:
        """Read KV use and sessions when scraped (always current, nothing to update per step)."""
        self.kv_cache_usage_bytes.labels(layers).set_function(used)
        self.kv_cache_budget_bytes.labels(layers).set(budget)
        self.kv_cache_usage_perc.labels(layers).set_function(lambda: used() / budget if budget else 0.0)
        self.num_sessions.labels(layers).set_function(sessions)


@dataclass(frozen=True)
class VisionMetrics:
    registry: CollectorRegistry
    request_errors: Counter
    cache_hits: Counter
    cache_misses: Counter

    @classmethod
    def create(cls) -> VisionMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            request_errors=_errors(r),
            cache_hits=Counter(PREFIX + "vision_cache_hits", "Images and videos served from the embedding cache.", registry=r),
            cache_misses=Counter(PREFIX + "vision_cache_misses", "Images and videos that ran through the encoder.", registry=r),
        )


@dataclass
class MetricsServer:
    """The HTTP exporter of one registry: GET /metrics (any path answers)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer | None:
    """Serve `registry` over HTTP on host:port in a daemon thread; port 0 = no exporter (None).
    A port in use raises PortInUse naming it."""
    if port == 0:
        return None
    from .ports import PortInUse

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise PortInUse(f"metrics port {port} on {host}: {e.strerror or e}") from None
    return MetricsServer(server, thread)
