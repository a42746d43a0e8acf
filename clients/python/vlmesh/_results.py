"""Plain-Python result types, and their construction from the wire responses."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from vlmesh.v1 import coordinator_pb2 as pb

from .errors import VlmeshError

__all__ = ["ToolCall", "Usage", "TokenLogprob", "TokenLogprobs", "ChatEvent", "ChatResult", "ModelInfo"]

_FINISH_REASONS: dict[int, str] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_STRING: "stop_string",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made to one of the request's tools."""

    #: "call_..." ; a later tool message's tool_call_id refers to it.
    id: str
    #: The function's name.
    name: str
    #: The arguments, a JSON object as text (json.loads it).
    arguments: str

    def to_openai(self) -> dict:
        """This call as an OpenAI assistant message's tool_calls entry (to send it back)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Usage:
    """Token counts of one turn."""

    #: Tokens fed to the model this turn (only the new ones, in a continued session).
    prompt_tokens: int = 0
    #: Tokens generated.
    completion_tokens: int = 0
    #: Tokens of the session already cached on the stages before this turn.
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One candidate token and its natural-log probability."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token, its log-probability, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ChatEvent:
    """One streamed response of a Generate call."""

    #: New text since the previous event (may be empty, e.g. mid-UTF-8 or on the last event).
    text: str
    #: Token ids generated since the previous event.
    token_ids: list[int]
    #: "stop", "length" or "stop_string" on the last event; None before.
    finish_reason: str | None
    #: Set on the last event only.
    usage: Usage | None
    #: Per token of `token_ids` when logprobs were requested; empty otherwise.
    logprobs: list[TokenLogprobs]
    #: The session of this turn ("" for one-shot requests).
    session_id: str
    #: Trace id of the request (hex), for the tracing UI.
    trace_id: str
    #: Tool calls completed in this event (their text is not in `text`).
    tool_calls: list[ToolCall] = field(default_factory=list)
    #: Which continuation (0 .. n-1) of an n > 1 request this event belongs to.
    index: int = 0


@dataclass(frozen=True)
class ChatResult:
    """A complete reply: all streamed events joined."""

    text: str
    token_ids: list[int]
    #: "stop" (end-of-turn token), "length" (max_tokens), "stop_string" or "tool_calls".
    finish_reason: str
    usage: Usage
    #: One entry per generated token when `logprobs` was requested, else None.
    logprobs: list[TokenLogprobs] | None
    #: The session of this turn ("" for one-shot requests).
    session_id: str
    trace_id: str
    #: The model's calls of the request's tools (empty without tools).
    tool_calls: list[ToolCall] = field(default_factory=list)

    def message(self) -> dict:
        """This reply as an assistant message for the next turn (OpenAI's shape)."""
        msg: dict = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


@dataclass(frozen=True)
class ModelInfo:
    """Model and mesh description (GetModelInfo)."""

    #: Model family, e.g. "qwen2_vl".
    model_type: str
    num_layers: int
    #: Layer ranges of the stages, in order, as (start, end): layers start..end-1.
    stage_layers: list[tuple[int, int]]
    #: Longest sequence the model accepts.
    max_sequence_length: int


def _finish_reason(value: int) -> str | None:
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    # A value newer than this client's protos still ends the stream; don't lose that fact.
    return _FINISH_REASONS.get(value, f"unknown_{value}")


def _logprobs(details: object) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(
            token_id=d.token.token_id,
            logprob=d.token.logprob,
            top=[TokenLogprob(t.token_id, t.logprob) for t in d.top],
        )
        for d in details  # type: ignore[attr-defined]
    ]


def event_from_response(resp: pb.GenerateResponse) -> ChatEvent:
    """The `ChatEvent` for one GenerateResponse."""
    usage = None
    if resp.HasField("usage"):
        u = resp.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    return ChatEvent(
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=_finish_reason(resp.finish_reason),
        usage=usage,
        logprobs=_logprobs(resp.logprobs),
        session_id=resp.session_id,
        trace_id=resp.trace_id,
        tool_calls=[ToolCall(c.id, c.name, c.arguments_json) for c in resp.tool_calls],
        index=resp.index,
    )


def model_info_from_response(resp: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_type=resp.model_type,
        num_layers=resp.num_layers,
        stage_layers=[(r.start, r.end) for r in resp.stage_layers],
        max_sequence_length=resp.max_sequence_length,
    )


class Accumulator:
    """Joins the events of one Generate stream into a `ChatResult`."""

    def __init__(self, *, want_logprobs: bool, session_id: str = "") -> None:
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] | None = [] if want_logprobs else None
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._session_id = session_id
        self._trace_id = ""
        self._tool_calls: list[ToolCall] = []

    def add(self, event: ChatEvent) -> None:
        self._text.append(event.text)
        self._token_ids.extend(event.token_ids)
        if self._logprobs is not None:
            self._logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self._finish_reason = event.finish_reason
        if event.usage is not None:
            self._usage = event.usage
        self._session_id = event.session_id or self._session_id
        self._trace_id = event.trace_id or self._trace_id
        self._tool_calls.extend(event.tool_calls)

    def result(self) -> ChatResult:
        """The joined reply.

        Raises:
            VlmeshError: (INTERNAL) the stream ended without a finish reason, i.e. the server
                broke the protocol; a truncated reply must not pass for a complete one.
        """
        if self._finish_reason is None:
            raise VlmeshError("Generate stream ended without a finish reason", grpc.StatusCode.INTERNAL)
        return ChatResult(
            text="".join(self._text),
            token_ids=self._token_ids,
            finish_reason=self._finish_reason,
            usage=self._usage or Usage(),
            logprobs=self._logprobs,
            session_id=self._session_id,
            trace_id=self._trace_id,
            tool_calls=self._tool_calls,
        )
