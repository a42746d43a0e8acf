"""A Generate call in its two halves: what the handler hands the engine (`RequestSpec`, frozen),
and the engine's own state of it (`RequestState`, written by the engine's loop alone). The
handler reads only its `Stream`: responses as they come, then one `RequestSummary`."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from opentelemetry import context as otel_context

from services.common.errors import VlmeshError
from vlmesh.internal.v1 import vision_pb2
from vlmesh.v1 import coordinator_pb2, tensor_pb2

from .detokenizer import IncrementalDetokenizer
from .session import Session
from .tools import Tools
from .visual import VisualRows

Message = dict[str, Any]  # a chat-template message: {"role": ..., "content": [parts]}


@dataclass(frozen=True)
class GenerateParams:
    """What a Generate call asks for, validated by the handler."""

    sampling: tensor_pb2.SamplingParams
    max_tokens: int  # 0 = the default
    stop: tuple[str, ...]
    logprobs: int
    include_stop_token_text: bool
    n: int = 1  # continuations sharing the prompt's prefill


@dataclass(frozen=True)
class RequestSpec:
    """One Generate call as the handler validated it. Never changed after it is made."""

    id: str
    session_id: str  # "" = one-shot
    owner: str
    messages: tuple[Message, ...]  # template messages of this turn
    inputs: tuple[vision_pb2.VisualInput, ...]  # its images and videos, in prompt order
    params: GenerateParams
    deadline: float | None  # engine clock time by which the client wants the answer
    trace_context: otel_context.Context | None
    arrival: float  # engine clock time the call arrived
    tools: Tools | None = None  # functions the model may call (rendered into the prompt)
    prompt: str = ""  # a raw prompt (no chat template) instead of messages


@dataclass(frozen=True)
class RequestSummary:
    """How a request ended, for the handler's log line and span and for metrics."""

    id: str
    session_id: str  # "" for a one-shot request
    arrival: float
    started_at: float | None  # its first step scheduled
    first_token_at: float | None
    ended_at: float
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    finish: coordinator_pb2.FinishReason.ValueType | None  # set when it ended well
    error: VlmeshError | None


StreamItem = coordinator_pb2.GenerateResponse | VlmeshError | None  # None: the stream's end


@dataclass(eq=False)
class Stream:
    """The handler's end of a request: the engine writes, the handler reads."""

    items: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)
    summary: asyncio.Future[RequestSummary] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    open: int = 1  # continuations writing to it that have not ended (n > 1: the forks add theirs)


class Phase(enum.Enum):
    PREPARING = "preparing"  # template, vision, M-RoPE (a task)
    READY = "ready"  # in the scheduler's queue (stepping, or waiting for placement or rows)
    ENDED = "ended"


@dataclass(frozen=True)
class Turn:
    """What a turn changes in its session: enough to undo it if it fails."""

    tokens: int
    visual_positions: int
    visuals: int
    messages: int
    rope_delta: int
    cached: int


@dataclass(eq=False)
class RequestState:
    """The engine's state of one request; every field is written by the engine's loop only."""

    spec: RequestSpec
    stream: Stream
    session: Session
    turn: Turn
    carrier: tuple[tuple[str, str], ...] = ()  # the request's trace context as W3C headers
    phase: Phase = Phase.PREPARING
    task: asyncio.Task[None] | None = None  # preparing, placing, fetching visual rows or evicting
    in_flight: bool = False
    abort: VlmeshError | None = None  # why the engine must end it when its step returns
    avoid: frozenset[str] = frozenset()  # replicas that just failed its step: placed elsewhere if possible
    recoveries: int = 0  # consecutive steps lost to a replica
    rows: VisualRows | None = None  # the visual embeddings this request may still feed
    positions: torch.Tensor | None = None  # [3, L] M-RoPE positions of the history at prepare time
    sampling: tensor_pb2.SamplingParams = field(default_factory=tensor_pb2.SamplingParams)
    max_tokens: int = 0
    detok: IncrementalDetokenizer | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # the reply as streamed
    seen: set[int] = field(default_factory=set)  # distinct tokens so far (repetition penalty)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    index: int = 0  # which continuation of the call (n > 1)
    group: str = ""  # the call's id (its first continuation's request id)
    forks: tuple[str, ...] = ()  # session ids the first continuation forks its prefill into

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def feedable(self) -> bool:
        return self.phase is Phase.READY and not self.in_flight and self.task is None and self.abort is None

    @property
    def remaining(self) -> int:
        return len(self.session.token_ids) - self.session.cached


@dataclass(frozen=True)
class TokenEmitted:
    """A request produced a token (for metrics)."""

    request_id: str
    arrival: float
    at: float
    previous_at: float | None  # the request's previous token; None for its first


@dataclass(frozen=True, slots=True)
class HopTimed:
    """One Forward to one replica, as the runner timed it (seconds), for the step profile's
    coordinator / transport / compute rows."""

    label: str  # the layer range, "A:B"
    build_s: float  # building the ForwardRequest (the coordinator's share of the hop)
    rpc_s: float  # from sending it to its answer: transport, the stage's queue and its compute
    compute_s: float | None  # what the stage reports it computed for (compute_us); None when the hop failed


class Observer(Protocol):
    """Told what happened, on the engine's loop; writes nothing of the engine's (metrics)."""

    def on_token(self, event: TokenEmitted) -> None: ...

    def on_end(self, summary: RequestSummary) -> None: ...

    def on_hop(self, hop: HopTimed) -> None: ...

    def on_round(self, seconds: float) -> None: ...  # one engine round: applying what arrived, scheduling, planning
