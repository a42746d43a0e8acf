"""Preparing a turn: the chat template, the vision service, tokenising and M-RoPE positions. Runs
as a task of the engine's, reads a snapshot of the session and changes nothing: the engine
applies the `Prepared` it returns."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common.errors import Internal, InvalidArgument
from services.common.tracing import metadata, tracer
from vlmesh.internal.v1 import vision_pb2

from .prompt import PromptBuilder, PromptText
from .request import RequestSpec
from .rope import RopeIndex
from .session import Session
from .vision_client import VisionPool
from .visual import Visual

_tracer = tracer("coordinator")


@dataclass(frozen=True)
class Prepared:
    new_ids: tuple[int, ...]  # [N] the turn's tokens after the history
    new_visuals: tuple[Visual, ...]
    first_visual: int  # index of the first visual whose rows the turn may still feed
    embeddings: tuple[vision_pb2.VisualEmbedding, ...]  # of visuals first_visual.. (old ones first, then the new)
    positions: torch.Tensor  # [3, L] M-RoPE positions of the whole history
    rope_delta: int


class Preparer:
    def __init__(
        self,
        prompts: PromptBuilder,
        rope: RopeIndex,
        vision: VisionPool,
        max_positions: int,
        max_images: int,
        vision_timeout: float,
        deepstack_layers: int,
    ):
        self.prompts = prompts
        self.rope = rope
        self.vision = vision
        self.max_positions = max_positions
        self.max_images = max_images
        self.vision_timeout = vision_timeout
        self.deepstack_layers = deepstack_layers

    async def prepare(self, spec: RequestSpec, s: Session) -> Prepared:
        """Template, vision and M-RoPE for the turn, from the session as it is now (a busy session:
        nothing else changes it while its turn prepares)."""
        if spec.prompt:  # a raw prompt: the caller wrote the template's text itself
            prompt = PromptText(spec.prompt, [])
        else:
            last = s.token_ids[-1] if s.token_ids else None
            prompt = self.prompts.new_text(list(s.messages), list(spec.messages), spec.tools)
            prompt.text = self.prompts.closing(last) + prompt.text
        # Embeddings are needed for every visual with rows still to feed: the new ones, and old
        # ones when the session's KV must be rebuilt.
        k0 = s.visual_index_of_row(s.visual_rows_from(s.cached))
        old = list(s.visuals[k0:])
        history_ids = list(s.token_ids)
        embeddings = await self.encode([v.source for v in old] + list(spec.inputs), spec.deadline, spec.trace_context)
        new_visuals = [Visual.from_encoding(src, e) for src, e in zip(spec.inputs, embeddings[len(old) :])]
        new_ids = await asyncio.to_thread(self.prompts.tokenize, prompt, new_visuals, not history_ids)
        history = history_ids + new_ids
        if len(history) >= self.max_positions:
            raise InvalidArgument(f"prompt of {len(history)} tokens leaves no room within the model's limit of {self.max_positions}")
        positions, delta = await asyncio.to_thread(self.rope.positions, history, list(s.visuals) + new_visuals)
        return Prepared(tuple(new_ids), tuple(new_visuals), k0, tuple(embeddings), positions, delta)

    async def encode(
        self, inputs: list[vision_pb2.VisualInput], deadline: float | None, ctx: otel_context.Context | None
    ) -> list[vision_pb2.VisualEmbedding]:
        if not inputs:
            return []
        # Rebuilding a long session may need more visuals than one request may carry.
        size = self.max_images
        parts = [inputs[i : i + size] for i in range(0, len(inputs), size)]
        with _tracer.start_as_current_span(
            "vision",
            context=ctx,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "vlmesh.internal.v1.VisionService",
                "rpc.method": "Encode",
                "vlmesh.inputs": len(inputs),
            },
        ) as span:
            resps = await asyncio.gather(*(self.vision.encode(p, deadline, self.vision_timeout, metadata()) for p in parts))
            out = [e for resp in resps for e in resp.embeddings]
            span.set_attribute("vlmesh.cache_hits", sum(e.cache_hit for e in out))
        if len(out) != len(inputs):
            raise Internal(f"vision answered {len(out)} of {len(inputs)} inputs")
        layers = {len(e.deepstack) for e in out}
        if len(layers) != 1 or layers.pop() != self.deepstack_layers:
            raise Internal("vision returned DeepStack features that do not match the model")
        return out
