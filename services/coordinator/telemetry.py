"""What the engine reports to Prometheus: per-request latencies and token counts, in vLLM's
series (services/common/metrics.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from services.common.errors import VlmeshError
from services.common.metrics import CoordinatorMetrics
from vlmesh.v1 import coordinator_pb2

if TYPE_CHECKING:
    from .engine import Engine, Request

FINISH_NAMES: dict[int, str] = {
    coordinator_pb2.FINISH_REASON_STOP: "stop",
    coordinator_pb2.FINISH_REASON_LENGTH: "length",
    coordinator_pb2.FINISH_REASON_STOP_STRING: "stop",
}


class EngineMetrics:
    """An engine observer: on_token and on_end are called from the engine's loop."""

    def __init__(self, metrics: CoordinatorMetrics, engine: Engine):
        self.m = metrics
        metrics.requests_running.set_function(lambda: engine.status()["running"])
        metrics.requests_waiting.set_function(lambda: engine.status()["waiting"])
        engine.runner.on_hop = lambda label, seconds: metrics.stage_hop_latency.labels(label).observe(seconds)

    def on_token(self, r: Request, now: float) -> None:
        if r.last_token_at is None:
            self.m.time_to_first_token.observe(now - r.arrival)
        else:
            self.m.inter_token_latency.observe(now - r.last_token_at)
        r.last_token_at = now

    def on_end(self, r: Request, finish: int | None, error: VlmeshError | None) -> None:  # finish: a FinishReason
        now = time.monotonic()
        self.m.e2e_request_latency.observe(now - r.arrival)
        if r.started_at is not None:
            self.m.request_queue_time.observe(r.started_at - r.arrival)
        self.m.prompt_tokens.inc(r.prompt_tokens)
        self.m.generation_tokens.inc(len(r.generated))
        if finish is not None:
            self.m.request_success.labels(FINISH_NAMES.get(finish, "stop")).inc()
        elif error is not None and error.code.name == "CANCELLED":
            self.m.request_success.labels("abort").inc()
