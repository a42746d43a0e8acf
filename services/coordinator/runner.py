"""Runs planned steps through the stages in order (star topology: every hop passes through
here), relaying hidden states as they arrived and collecting KV deltas. Decides nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common import tensors
from services.common.errors import VlmeshError
from services.common.tracing import inject, tracer
from vlmesh.v1 import stage_pb2, tensor_pb2

from .stage_client import Mesh

_tracer = tracer("coordinator")


@dataclass
class StepPlan:
    session_id: str
    start_position: int
    token_ids: list[int]  # [T]
    positions: torch.Tensor  # [3, T] int64
    visual: torch.Tensor | None  # [N, H]: rows for the placeholder tokens of token_ids, in order
    sampling: tensor_pb2.SamplingParams
    top_logprobs: int = 0
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: [N, H] for decoder layer i, i < k
    turn_start: bool = False
    trace_context: otel_context.Context | None = None


@dataclass
class StepOutcome:
    output: stage_pb2.StepOutput | None  # the last stage's answer (token, logprobs)
    kv_deltas: list[tensor_pb2.KVDelta] = field(default_factory=list)  # every stage's, in layer order
    error: VlmeshError | None = None


class Runner:
    def __init__(self, mesh: Mesh, return_kv_delta: bool):
        self.mesh = mesh
        self.return_kv_delta = return_kv_delta

    def execute(self, plans: list[StepPlan]) -> list[StepOutcome]:
        spans = [
            _tracer.start_span(
                "step",
                context=p.trace_context,
                attributes={
                    "vlmesh.session_id": p.session_id,
                    "vlmesh.start_position": p.start_position,
                    "vlmesh.tokens": len(p.token_ids),
                    "vlmesh.batch_size": len(plans),
                },
            )
            for p in plans
        ]
        try:
            return self._run(plans, spans)
        except VlmeshError as err:
            for span in spans:
                span.record_exception(err)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(err)))
            return [StepOutcome(None, error=err) for _ in plans]
        finally:
            for span in spans:
                span.end()

    def _run(self, plans: list[StepPlan], spans: list[trace.Span]) -> list[StepOutcome]:
        outcomes = [StepOutcome(None) for _ in plans]
        hidden: list[tensor_pb2.Tensor | None] = [None] * len(plans)
        positions = [tensors.to_proto(p.positions) for p in plans]
        deepstack = [[tensors.to_proto(t) for t in p.deepstack or []] for p in plans]
        for i, stage in enumerate(self.mesh.stages):
            info = stage.info
            request = stage_pb2.ForwardRequest()
            hops = []
            for j, p in enumerate(plans):
                hop = _tracer.start_span(
                    f"stage {info.layer_start}:{info.layer_end}",
                    context=trace.set_span_in_context(spans[j]),
                    attributes={"vlmesh.stage": i, "vlmesh.address": stage.address},
                )
                hops.append(hop)
                step = request.steps.add(
                    session_id=p.session_id,
                    start_position=p.start_position,
                    return_kv_delta=self.return_kv_delta,
                    turn_start=p.turn_start,
                )
                step.position_ids.CopyFrom(positions[j])
                # DeepStack features go to whichever stages own their layers, with the token ids
                # the stage finds the visual positions in.
                features = [(layer, deepstack[j][layer]) for layer in info.deepstack_layers if layer < len(deepstack[j])]
                for layer, feature in features:
                    step.deepstack.add(layer=layer, embeds=feature)
                if info.is_first or info.is_last or features:
                    step.token_ids.extend(p.token_ids)
                if info.is_first:
                    if p.visual is not None:
                        step.visual_embeds.CopyFrom(tensors.to_proto(p.visual))
                else:
                    step.hidden_states.CopyFrom(hidden[j])
                if info.is_last:
                    step.sampling.CopyFrom(p.sampling)
                    step.top_logprobs = p.top_logprobs
                ctx = trace.set_span_in_context(hop)
                token = otel_context.attach(ctx)
                try:
                    step.trace_context.update(inject())
                finally:
                    otel_context.detach(token)
            try:
                response = stage.forward(request)
            finally:
                for hop in hops:
                    hop.end()
            if len(response.outputs) != len(plans):
                raise VlmeshError(f"stage {stage.address} answered {len(response.outputs)} of {len(plans)} steps")
            for j, out in enumerate(response.outputs):
                outcomes[j].kv_deltas.extend(out.kv_deltas)
                hidden[j] = out.hidden_states
                if info.is_last:
                    outcomes[j].output = out
        return outcomes
