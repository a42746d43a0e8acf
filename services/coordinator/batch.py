"""What the engine hands the runner and what the runner hands back: immutable descriptions of a
micro-batch, built by the engine's plan phase. The runner never sees a live session or request,
so nothing it does can change the engine's state; the engine alone applies an outcome.

What goes on the wire is in wire form already (positions, visual rows): encoded once, when the
step is planned, never per hop. Plans and outcomes are slotted: one of each per session per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry import context as otel_context

from services.common.errors import VlmeshError
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import tensor_pb2


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One session's part of a micro-batch."""

    session_id: str
    replicas: tuple[str, ...]  # [R] the replica address that holds the session's KV, per layer range
    start: int  # positions already cached
    token_ids: tuple[int, ...]  # [T]
    positions: tensor_pb2.Tensor  # [3, T] int64 M-RoPE positions, as the wire Tensor
    visual_spans: tuple[tuple[int, int], ...] = ()  # (offset, length) in the step
    visual: tensor_pb2.Tensor | None = None  # [M, H], M = the spans' total length
    deepstack: tuple[tensor_pb2.Tensor, ...] = ()  # [M, H] per DeepStack layer 0..k-1
    sample: stage_pb2.SampleRequest | None = None  # the step ends the feed: sample the next token
    rewind: bool = False  # the replicas may hold positions past `start`: drop them first
    return_kv_delta: bool = True
    trace_context: otel_context.Context | None = None  # the request's (its generate span)
    traced: bool = True  # the step gets a span of its own; else its stages' spans join the request's
    carrier: tuple[tuple[str, str], ...] = ()  # trace_context as W3C headers (made once per request)
    deadline: float | None = None  # time.monotonic() by which the client wants its answer
    # [n-1] sessions that start as copies of this one after the step (n > 1 continuations of the
    # prompt); the sample carries a seed for each
    forks: tuple[str, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        """Tokens of this step that are prompt (a decode step's single token is not)."""
        return len(self.token_ids) if self.sample is None or len(self.token_ids) > 1 else 0


@dataclass(frozen=True)
class MicroBatch:
    id: int  # the engine's count of micro-batches: steps sharing it ran together
    steps: tuple[StepPlan, ...]  # [B]


@dataclass(frozen=True)
class Lost:
    """A hop failed because its replica is down or stalled, or forgot the session's KV: the range
    needs the session placed again (restored from the KV log, or replayed) before it steps."""

    range_index: int
    address: str
    why: str
    replica_down: bool  # False: the replica answers but no longer holds the session


@dataclass(frozen=True, slots=True)
class StepOutcome:
    token: stage_pb2.SampledToken | None = None  # when the plan asked for a sample
    kv_deltas: tuple[tensor_pb2.KVDelta, ...] = ()  # every range's, in layer order
    fork_tokens: tuple[stage_pb2.SampledToken, ...] = ()  # [n-1] one per plan.forks
    error: VlmeshError | None = None
    lost: Lost | None = None


@dataclass(frozen=True)
class BatchOutcome:
    batch: MicroBatch
    steps: tuple[StepOutcome, ...] = field(default=())  # [B], in the batch's order
    wall_s: float = 0.0
