"""Runs planned steps through the layer ranges in order (star topology: every hop passes through
here), relaying hidden states as the stages sent them and collecting KV deltas.

It decides nothing: which replica holds a session is the engine's, and so is what to do when a
replica is lost. A hop that fails because its replica is down or stalled, or because the
replica lost the session's KV, asks the engine's `recover` for a replica that holds the
session again (restored from the KV log) and sends the same hop there: the step continues
where it was. When no replica can be restored, the step's outcome says `replay`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common import tensors
from services.common.errors import DeadlineExceeded, StageDown, VlmeshError, from_status
from services.common.tracing import inject, tracer
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import tensor_pb2

from .session import Session
from .stage_client import Mesh, StageReplica

log = logging.getLogger(__name__)
_tracer = tracer("coordinator")
_KV_LOST = ("KV_MISSING", "KV_POSITION_MISMATCH")
MAX_RECOVERIES = 3


@dataclass
class StepPlan:
    session: Session
    start: int  # positions already cached
    token_ids: list[int]  # [T]
    positions: torch.Tensor  # [3, T] int64
    visual_spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in the step
    visual: tensor_pb2.Tensor | None = None  # [M, H], M = the spans' total length
    deepstack: list[tensor_pb2.Tensor] = field(default_factory=list)  # [M, H] per DeepStack layer 0..k-1
    sample: stage_pb2.SampleRequest | None = None  # the step ends the feed: sample the next token
    rewind: bool = False
    return_kv_delta: bool = True
    trace_context: otel_context.Context | None = None
    deadline: float | None = None  # time.monotonic() by which the client wants its answer


@dataclass
class StepOutcome:
    token: stage_pb2.SampledToken | None = None  # when the plan asked for a sample
    kv_deltas: list[tensor_pb2.KVDelta] = field(default_factory=list)  # every range's, in layer order
    error: VlmeshError | None = None
    replay: bool = False  # KV lost and not restorable: feed the session's history again


Recover = Callable[[StepPlan, int, StageReplica | None], Awaitable[StageReplica | None]]


class Runner:
    def __init__(self, mesh: Mesh, hop_timeout: float, hop_timeout_per_token: float):
        self.mesh = mesh
        self.recover: Recover = _no_recovery  # the engine installs its own
        self.hop_timeout = hop_timeout
        self.hop_timeout_per_token = hop_timeout_per_token
        self.on_hop: Callable[[str, float], None] | None = None  # (range label, seconds): metrics
        self._batches = 0

    async def execute(self, plans: list[StepPlan]) -> list[StepOutcome]:
        self._batches += 1
        outcomes = [StepOutcome() for _ in plans]
        spans = [
            _tracer.start_span(
                "step",
                context=p.trace_context,
                attributes={
                    "session.id": p.session.id,
                    "vlmesh.start_position": p.start,
                    "vlmesh.tokens": len(p.token_ids),
                    "vlmesh.batch_size": len(plans),
                    "vlmesh.batch": self._batches,  # which micro-batch: steps sharing it ran together
                    "vlmesh.sample": p.sample is not None,
                },
            )
            for p in plans
        ]
        hidden: list[tensor_pb2.Tensor | None] = [None] * len(plans)
        positions = [tensors.to_proto(p.positions) for p in plans]
        try:
            for r, rng in enumerate(self.mesh.ranges):
                live = [j for j, o in enumerate(outcomes) if o.error is None and not o.replay]
                if not live:
                    break
                await self._range(r, rng.label, live, plans, outcomes, hidden, positions, spans)
        finally:
            for span, o in zip(spans, outcomes):
                if o.error is not None:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(o.error)))
                if o.replay:
                    span.add_event("replay", {"vlmesh.reason": "KV lost and the KV log cannot restore it"})
                span.end()
        return outcomes

    async def _range(self, r, label, live, plans, outcomes, hidden, positions, spans) -> None:
        first, last = r == 0, r == len(self.mesh.ranges) - 1
        todo = list(live)
        for _attempt in range(MAX_RECOVERIES + 1):
            groups: dict[str, list[int]] = {}
            for j in todo:
                groups.setdefault(plans[j].session.replicas[r], []).append(j)
            results = await asyncio.gather(
                *(self._hop(r, label, addr, js, plans, hidden, positions, spans, first, last) for addr, js in groups.items()),
                return_exceptions=True,
            )
            lost: list[tuple[int, StageReplica | None]] = []
            for (addr, js), res in zip(groups.items(), results):
                replica = self.mesh.replicas.get(addr)
                if isinstance(res, BaseException):
                    if not isinstance(res, VlmeshError):
                        raise res
                    for j in js:
                        if isinstance(res, StageDown):
                            spans[j].add_event("retry", {"vlmesh.replica": addr, "vlmesh.error": str(res)})
                            lost.append((j, replica))
                        else:
                            outcomes[j].error = res
                    continue
                for j, out in zip(js, res.outputs):
                    if out.status.code != 0:
                        err = from_status(out.status, f"stage {addr}")
                        if err.reason in _KV_LOST and plans[j].start > 0:
                            spans[j].add_event("retry", {"vlmesh.replica": addr, "vlmesh.error": str(err)})
                            lost.append((j, None))  # the replica is fine but forgot the session
                        else:
                            outcomes[j].error = err
                        continue
                    outcomes[j].kv_deltas.extend(out.kv_deltas)
                    if last:
                        outcomes[j].token = out.token if out.HasField("token") else None
                    else:
                        hidden[j] = out.hidden_states
            if not lost:
                return
            todo = []
            recovered = await asyncio.gather(*(self.recover(plans[j], r, dead) for j, dead in lost), return_exceptions=True)
            for (j, _), rep in zip(lost, recovered):
                if isinstance(rep, StageReplica):
                    todo.append(j)
                elif isinstance(rep, VlmeshError) and not isinstance(rep, StageDown):
                    outcomes[j].error = rep
                else:
                    outcomes[j].replay = True
            if not todo:
                return
        for j in todo:
            outcomes[j].error = StageDown(f"layers {label}: the step failed on {MAX_RECOVERIES + 1} replicas in a row")

    async def _hop(self, r, label, addr, js, plans, hidden, positions, spans, first, last) -> stage_pb2.ForwardResponse:
        replica = self.mesh.replicas[addr]
        request = stage_pb2.ForwardRequest()
        hops = []
        deadline = None
        tokens = 0
        for j in js:
            p = plans[j]
            tokens += len(p.token_ids)
            if p.deadline is not None:
                deadline = p.deadline if deadline is None else max(deadline, p.deadline)
            hop = _tracer.start_span(
                f"stage {label}",
                context=trace.set_span_in_context(spans[j]),
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": "vlmesh.internal.v1.StageService",
                    "rpc.method": "Forward",
                    "server.address": addr,
                    "vlmesh.layers": label,
                },
            )
            hops.append(hop)
            step = request.steps.add(session_id=p.session.id, start_position=p.start, return_kv_delta=p.return_kv_delta, rewind=p.rewind)
            step.position_ids.CopyFrom(positions[j])
            if first:
                step.tokens.ids.extend(p.token_ids)
                if p.visual is not None:
                    step.visual_embeds.CopyFrom(p.visual)
            else:
                step.hidden_states.CopyFrom(hidden[j])
            info = replica.info
            owned = [k for k in (info.deepstack_layers if info else ()) if k < len(p.deepstack)]
            if p.visual_spans and (first or owned):
                step.visual_spans.extend(stage_pb2.Span(start=a, length=n) for a, n in p.visual_spans)
            for k in owned:
                step.deepstack.add(layer=k, embeds=p.deepstack[k])
            if last and p.sample is not None:
                step.sample.CopyFrom(p.sample)
            token = otel_context.attach(trace.set_span_in_context(hop))
            try:
                step.trace_context.update(inject())
            finally:
                otel_context.detach(token)
        timeout = self.hop_timeout + self.hop_timeout_per_token * tokens
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                for hop in hops:
                    hop.end()
                raise DeadlineExceeded("the request's deadline passed")
            timeout = min(timeout, left)
        began = time.perf_counter()
        try:
            response = await replica.forward(request, timeout)
        except VlmeshError as err:
            for hop in hops:
                hop.set_status(trace.Status(trace.StatusCode.ERROR, str(err)))
                hop.set_attribute("rpc.grpc.status_code", err.code.value[0])
                hop.end()
            raise
        finally:
            if self.on_hop is not None:
                self.on_hop(label, time.perf_counter() - began)
        for hop, out in zip(hops, response.outputs):
            hop.set_attribute("rpc.grpc.status_code", 0)
            hop.set_attribute("vlmesh.compute_us", response.compute_us)
            if out.status.code != 0:
                hop.set_status(trace.Status(trace.StatusCode.ERROR, out.status.message))
            hop.end()
        if len(response.outputs) != len(js):
            raise StageDown(f"stage {addr} answered {len(response.outputs)} of {len(js)} steps")
        return response


async def _no_recovery(plan: StepPlan, index: int, dead: StageReplica | None) -> StageReplica | None:
    return None
