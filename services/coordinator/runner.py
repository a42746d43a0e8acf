"""Runs a planned micro-batch through the layer ranges in order (star topology: every hop passes
through here), relaying hidden states as the stages sent them and collecting KV deltas.

It decides nothing and changes nothing of the engine's: it takes an immutable `MicroBatch` and
returns a `BatchOutcome`. A hop that fails because its replica is down or stalled, or because the
replica lost the session's KV, ends that session's step with `lost` (which range, which
replica); the engine places the session again (restored from the KV log, or replayed) and steps
it again. The other sessions of the batch carry on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain

from opentelemetry import trace

from services.common.errors import DeadlineExceeded, Internal, StageDown, VlmeshError, from_status
from services.common.tracing import inject, tracer
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import tensor_pb2

from .batch import BatchOutcome, Lost, MicroBatch, StepOutcome, StepPlan
from .request import HopTimed, Observer
from .stage_client import Mesh

log = logging.getLogger(__name__)
_tracer = tracer("coordinator")
_KV_LOST = ("KV_MISSING", "KV_POSITION_MISMATCH")


@dataclass(slots=True)
class _Progress:
    """One step's results as the ranges return them (the runner's own, turned into a StepOutcome)."""

    plan: StepPlan
    span: trace.Span  # the step's own span, or (an untraced step) the request's
    carrier: tuple[tuple[str, str], ...]  # that span's W3C context (headers): each stage's stage.forward joins it
    hidden: tensor_pb2.Tensor | None = None
    kv_deltas: list[Iterable[tensor_pb2.KVDelta]] = field(default_factory=list)  # each range's, as it sent them
    token: stage_pb2.SampledToken | None = None
    fork_tokens: tuple[stage_pb2.SampledToken, ...] = ()
    error: VlmeshError | None = None
    lost: Lost | None = None

    @property
    def live(self) -> bool:
        return self.error is None and self.lost is None

    def outcome(self) -> StepOutcome:
        return StepOutcome(self.token, tuple(chain.from_iterable(self.kv_deltas)), self.fork_tokens, self.error, self.lost)


class Runner:
    def __init__(self, mesh: Mesh, hop_timeout: float, hop_timeout_per_token: float, observers: tuple[Observer, ...] = ()):
        self.mesh = mesh
        self.hop_timeout = hop_timeout
        self.hop_timeout_per_token = hop_timeout_per_token
        self.observers = observers

    async def execute(self, batch: MicroBatch) -> BatchOutcome:
        began = time.monotonic()
        steps = []
        for p in batch.steps:
            if p.traced:
                span = self._step_span(p, batch)
                steps.append(_Progress(p, span, tuple(inject(trace.set_span_in_context(span)).items())))
            else:
                steps.append(_Progress(p, trace.get_current_span(p.trace_context), p.carrier))
        try:
            for r, rng in enumerate(self.mesh.ranges):
                live = [s for s in steps if s.live]
                if not live:
                    break
                await self._range(r, rng.label, live)
        finally:
            for s in steps:
                if s.error is not None and s.plan.traced:
                    s.span.set_status(trace.Status(trace.StatusCode.ERROR, str(s.error)))
                if s.lost is not None:
                    s.span.add_event("lost", {"vlmesh.replica": s.lost.address, "vlmesh.error": s.lost.why, "vlmesh.start_position": s.plan.start})
                if s.plan.traced:
                    s.span.end()
        return BatchOutcome(batch, tuple(s.outcome() for s in steps), time.monotonic() - began)

    @staticmethod
    def _step_span(p: StepPlan, batch: MicroBatch) -> trace.Span:
        return _tracer.start_span(
            "step",
            context=p.trace_context,
            attributes={
                "session.id": p.session_id,
                "vlmesh.start_position": p.start,
                "vlmesh.tokens": len(p.token_ids),
                "vlmesh.batch_size": len(batch.steps),
                "vlmesh.batch": batch.id,  # which micro-batch: steps sharing it ran together
                "vlmesh.sample": p.sample is not None,
            },
        )

    async def _range(self, r: int, label: str, live: list[_Progress]) -> None:
        """One range's hop for every live step, grouped by the replica that holds each."""
        groups: dict[str, list[_Progress]] = {}
        for s in live:
            groups.setdefault(s.plan.replicas[r], []).append(s)
        first, last = r == 0, r == len(self.mesh.ranges) - 1
        results = await asyncio.gather(*(self._hop(label, addr, group, first, last) for addr, group in groups.items()), return_exceptions=True)
        for (addr, group), res in zip(groups.items(), results):
            if isinstance(res, BaseException):
                if not isinstance(res, VlmeshError):
                    raise res
                for s in group:
                    if isinstance(res, StageDown):
                        s.lost = Lost(r, addr, str(res), replica_down=True)
                    else:
                        s.error = res
                continue
            for s, out in zip(group, res.outputs):
                self._take(r, addr, s, out, last)

    @staticmethod
    def _take(r: int, addr: str, s: _Progress, out: stage_pb2.StepOutput, last: bool) -> None:
        if out.status.code != 0:
            err = from_status(out.status, f"stage {addr}")
            if err.reason in _KV_LOST and s.plan.start > 0:
                s.lost = Lost(r, addr, str(err), replica_down=False)  # the replica is fine but forgot the session
            else:
                s.error = err
            return
        s.kv_deltas.append(out.kv_deltas)
        if last:
            s.token = out.token if out.HasField("token") else None
            s.fork_tokens = tuple(out.fork_tokens)
            if len(s.fork_tokens) != len(s.plan.forks):
                s.error = Internal(f"stage {addr} sampled {len(s.fork_tokens)} tokens for {len(s.plan.forks)} forks")
        else:
            s.hidden = out.hidden_states

    def _request(self, addr: str, group: list[_Progress], first: bool, last: bool) -> stage_pb2.ForwardRequest:
        info = self.mesh.replicas[addr].info
        layers = tuple(info.deepstack_layers) if info is not None else ()  # read once per hop, not per step
        request = stage_pb2.ForwardRequest()
        add = request.steps.add
        for s in group:
            p = s.plan
            step = add(session_id=p.session_id, start_position=p.start, return_kv_delta=p.return_kv_delta, rewind=p.rewind)
            step.position_ids.CopyFrom(p.positions)
            if first:
                step.tokens.ids.extend(p.token_ids)
                if p.visual is not None:
                    step.visual_embeds.CopyFrom(p.visual)
            elif s.hidden is not None:
                step.hidden_states.CopyFrom(s.hidden)
            owned = [k for k in layers if k < len(p.deepstack)] if layers and p.deepstack else ()
            if p.visual_spans and (first or owned):
                step.visual_spans.extend(stage_pb2.Span(start=a, length=n) for a, n in p.visual_spans)
            for k in owned:
                step.deepstack.add(layer=k, embeds=p.deepstack[k])
            if last and p.sample is not None:
                step.sample.CopyFrom(p.sample)
            if p.forks:
                step.fork_session_ids.extend(p.forks)
            if s.carrier:
                context = step.trace_context
                for header, value in s.carrier:
                    context[header] = value
        return request

    def _timeout(self, group: list[_Progress]) -> float:
        timeout = self.hop_timeout + self.hop_timeout_per_token * sum(len(s.plan.token_ids) for s in group)
        deadlines = [s.plan.deadline for s in group if s.plan.deadline is not None]
        if deadlines:
            left = max(deadlines) - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the request's deadline passed")
            timeout = min(timeout, left)
        return timeout

    async def _hop(self, label: str, addr: str, group: list[_Progress], first: bool, last: bool) -> stage_pb2.ForwardResponse:
        """One Forward to one replica. Each step's span gets a `stage` event for it (spans per hop
        per step would cost the coordinator more than the rest of the step's work)."""
        began = time.perf_counter()
        sent = began
        response: stage_pb2.ForwardResponse | None = None
        try:
            request = self._request(addr, group, first, last)
            sent = time.perf_counter()
            response = await self.mesh.replicas[addr].forward(request, self._timeout(group))
            if len(response.outputs) != len(group):
                raise StageDown(f"stage {addr} answered {len(response.outputs)} of {len(group)} steps")
        except VlmeshError as err:
            for s in group:
                s.span.add_event(
                    "stage", {"vlmesh.layers": label, "server.address": addr, "rpc.grpc.status_code": err.code.value[0], "vlmesh.error": str(err)}
                )
            raise
        finally:
            ended = time.perf_counter()
            timed = HopTimed(label, sent - began, ended - sent, response.compute_us / 1e6 if response is not None else None)
            for obs in self.observers:
                obs.on_hop(timed)
        seconds = ended - began
        attrs: dict[str, str | int] = {
            "vlmesh.layers": label,
            "server.address": addr,
            "vlmesh.hop_us": int(seconds * 1e6),
            "vlmesh.compute_us": response.compute_us,
        }
        for s in group:
            if s.plan.traced:
                s.span.add_event("stage", attrs)
        return response
