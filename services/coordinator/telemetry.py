"""What the engine reports to Prometheus: per-request latencies and token counts, in vLLM's
series (services/common/metrics.py). An observer: it is told what happened and writes nothing of
the engine's."""

from __future__ import annotations

from collections.abc import Callable

from services.common.metrics import CoordinatorMetrics
from vlmesh.v1 import coordinator_pb2

from .request import HopTimed, RequestSummary, TokenEmitted

FINISH_NAMES: dict[int, str] = {
    coordinator_pb2.FINISH_REASON_STOP: "stop",
    coordinator_pb2.FINISH_REASON_LENGTH: "length",
    coordinator_pb2.FINISH_REASON_STOP_STRING: "stop",
    coordinator_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


class EngineMetrics:
    def __init__(self, metrics: CoordinatorMetrics):
        self.m = metrics

    def watch_counts(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Gauges read at scrape time (from the metrics server's thread: `running`/`waiting`
        must read a published snapshot, never live engine state)."""
        self.m.requests_running.set_function(running)
        self.m.requests_waiting.set_function(waiting)

    def on_hop(self, hop: HopTimed) -> None:
        self.m.stage_hop_latency.labels(hop.label).observe(hop.build_s + hop.rpc_s)
        self.m.stage_request_build.labels(hop.label).observe(hop.build_s)
        if hop.compute_s is not None:
            self.m.stage_compute.labels(hop.label).observe(hop.compute_s)
            self.m.stage_hop_overhead.labels(hop.label).observe(max(0.0, hop.rpc_s - hop.compute_s))

    def on_round(self, seconds: float) -> None:
        self.m.engine_round.observe(seconds)

    def on_token(self, event: TokenEmitted) -> None:
        if event.previous_at is None:
            self.m.time_to_first_token.observe(event.at - event.arrival)
        else:
            self.m.inter_token_latency.observe(event.at - event.previous_at)

    def on_end(self, summary: RequestSummary) -> None:
        self.m.e2e_request_latency.observe(summary.ended_at - summary.arrival)
        if summary.started_at is not None:
            self.m.request_queue_time.observe(summary.started_at - summary.arrival)
        self.m.prompt_tokens.inc(summary.prompt_tokens)
        self.m.generation_tokens.inc(summary.generated_tokens)
        if summary.finish is not None:
            self.m.request_success.labels(FINISH_NAMES.get(summary.finish, "stop")).inc()
        elif summary.error is not None and summary.error.code.name == "CANCELLED":
            self.m.request_success.labels("abort").inc()
