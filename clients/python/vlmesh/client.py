"""Sync and async clients of the vlmesh coordinator (CoordinatorService).

Only grpcio (with grpcio-health-checking and grpcio-status), protobuf, pillow and the standard
library are used here: this module must stay importable without torch or transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import os
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import coordinator_pb2_grpc as pb_grpc
from vlmesh.v1 import tensor_pb2

from ._messages import MessagesLike, Prompt, to_proto_messages
from ._results import (
    Accumulator,
    ChatEvent,
    ChatResult,
    ModelInfo,
    TokenLogprob,
    TokenLogprobs,
    Usage,
    event_from_response,
    model_info_from_response,
)
from ._tools import ResponseFormatLike, ToolChoiceLike, ToolsLike, response_format_constraint, to_proto_tool_choice, to_proto_tools
from ._urls import AllowPrivate, allowed_networks

# The error classes are the package's (vlmesh.errors), exported from `vlmesh` itself.
from .errors import VlmeshError, from_rpc_error
from .sampling import SamplingOptions

if TYPE_CHECKING:
    from typing import Self

    from typing_extensions import Unpack

    from vlmesh.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "AsyncClient",
    "Session",
    "AsyncSession",
    "GenerateOptions",
    "ChatResult",
    "ChatEvent",
    "Usage",
    "TokenLogprob",
    "TokenLogprobs",
    "ModelInfo",
    "API_KEY_ENV",
    "build_request",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Environment variable the API key is read from when a client is given none.
API_KEY_ENV = "VLMESH_API_KEY"

#: gRPC call metadata: a mapping or (key, value) pairs; keys must be lowercase.
Metadata = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]

# KV log deltas of long prompts and large images easily pass gRPC's 4 MB default; the mesh's
# servers allow 1 GiB, so the client does too.
_MESSAGE_LIMIT = 1 << 30
_DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.max_send_message_length": _MESSAGE_LIMIT,
    "grpc.max_receive_message_length": _MESSAGE_LIMIT,
}
_INT32_MAX = 2**31 - 1
_T = TypeVar("_T")
# RFC 6750 bearer tokens are visible ASCII; anything else would break or smuggle metadata.
_API_KEY = re.compile(r"[\x21-\x7e]+")


class _Keep(enum.Enum):
    """`with_options` default: keep the value of the client it derives from."""

    KEEP = 0


class GenerateOptions(TypedDict, total=False):
    """Generation keyword arguments shared by every chat/stream method (see `Client.chat`)."""

    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    stop: str | Sequence[str] | None
    logprobs: int
    include_stop_token_text: bool
    constraint: tensor_pb2.Constraint | None
    response_format: ResponseFormatLike | None
    tools: ToolsLike | None
    tool_choice: ToolChoiceLike | None
    parallel_tool_calls: bool | None
    n: int


def build_request(
    messages: MessagesLike,
    *,
    session_id: str | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logprobs: int = 0,
    include_stop_token_text: bool = False,
    allow_private_urls: AllowPrivate = False,
    constraint: tensor_pb2.Constraint | None = None,
    response_format: ResponseFormatLike | None = None,
    tools: ToolsLike | None = None,
    tool_choice: ToolChoiceLike | None = None,
    parallel_tool_calls: bool | None = None,
    n: int = 1,
) -> pb.GenerateRequest:
    """The GenerateRequest for a conversation and options (see `Client.chat`).

    Everything is validated here, before any RPC, so a bad argument costs no round trip.
    `allow_private_urls` as for `vlmesh.load_image`.

    Raises:
        ValueError: bad messages, unloadable image, or an out-of-range option.
    """
    fmt = response_format_constraint(response_format)
    if fmt is not None and constraint is not None:
        raise ValueError("give either response_format or constraint, not both")
    options = SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=() if stop is None else stop,
        logprobs=logprobs,
        include_stop_token_text=include_stop_token_text,
        constraint=constraint if fmt is None else fmt,
    )
    request = options.to_proto()
    request.session_id = session_id or ""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise ValueError(f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}")
    if n > 1 and session_id:
        raise ValueError("n > 1 is one-shot: it cannot continue a session")
    request.n = n if n > 1 else 0
    if isinstance(messages, Prompt):
        if not messages.text:
            raise ValueError("the prompt is empty")
        if tools:
            raise ValueError("tools need messages (the chat template renders them), not a raw Prompt")
        request.prompt = messages.text
        return request
    request.tools.extend(to_proto_tools(tools))
    choice = to_proto_tool_choice(tool_choice)
    if choice is not None:
        request.tool_choice.CopyFrom(choice)
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = bool(parallel_tool_calls)
    request.messages.extend(to_proto_messages(messages, allow_private_urls=allow_private_urls))
    return request


def _normalize_metadata(metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...] | None:
    if metadata is None:
        return None
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((str(k), v) for k, v in items)


def _user_metadata(metadata: Metadata | None, api_key: str | None) -> tuple[tuple[str, str | bytes], ...]:
    """`metadata` without its authorization entry when the key is given separately."""
    items = _normalize_metadata(metadata) or ()
    if api_key is None:
        return items
    if any(k.lower() == "authorization" for k, _ in items):
        raise ValueError("give the API key either as api_key or as 'authorization' metadata, not both")
    return items


def _resolve_api_key(metadata: Metadata | None, api_key: str | None) -> str:
    """The key to send: `api_key`, else $VLMESH_API_KEY unless `metadata` authorizes already."""
    if api_key is None:
        items = _normalize_metadata(metadata) or ()
        if any(k.lower() == "authorization" for k, _ in items):
            return ""
        api_key = os.environ.get(API_KEY_ENV, "")
    if api_key and not _API_KEY.fullmatch(api_key):
        raise ValueError("api_key must be printable ASCII without spaces")
    return api_key


def _call_metadata(user: tuple[tuple[str, str | bytes], ...], api_key: str) -> tuple[tuple[str, str | bytes], ...] | None:
    items = (*user, ("authorization", f"Bearer {api_key}")) if api_key else user
    return items or None


def _derive_metadata(derived: Client | AsyncClient, user: tuple[tuple[str, str | bytes], ...], api_key: str | None, extra: Metadata | None) -> None:
    """A `with_options` copy's key and metadata: `extra` is added to the user's metadata (never
    an authorization entry: the key is `api_key`'s to give)."""
    if extra is not None:
        added = _normalize_metadata(extra) or ()
        if any(k.lower() == "authorization" for k, _ in added):
            raise ValueError("give the API key as api_key, not as 'authorization' metadata")
        derived._user_metadata = (*user, *added)
    if api_key is not None:
        derived._api_key = _resolve_api_key(None, api_key)
    derived._metadata = _call_metadata(derived._user_metadata, derived._api_key)


def _channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    tls: bool,
    root_certificates: bytes | str | os.PathLike[str] | None,
) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return credentials
    if credentials is not None:
        raise ValueError("give either credentials or tls / root_certificates, not both")
    pem = root_certificates
    if pem is not None and not isinstance(pem, bytes):
        try:
            with open(os.path.expanduser(os.fspath(pem)), "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ValueError(f"cannot read root certificates {os.fspath(pem)!r}: {e}") from e
    # None: the system's (gRPC's bundled) roots.
    return grpc.ssl_channel_credentials(root_certificates=pem)


def _health_status(resp: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _channel_options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    merged = dict(_DEFAULT_CHANNEL_OPTIONS)
    merged.update(options or ())
    return list(merged.items())


def _result(request: pb.GenerateRequest) -> Accumulator:
    return Accumulator(want_logprobs=request.logprobs > 0, session_id=request.session_id)


#: Most continuations one request may ask for (`n`), as the coordinator allows.
MAX_CHOICES = 16


def _one_choice(n: int) -> None:
    if n != 1:
        raise ValueError("chat returns one reply; chat_choices returns n of them")


class _Choices:
    """Joins the events of an n > 1 stream into one `ChatResult` per continuation."""

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.accs = [_result(request) for _ in range(max(request.n, 1))]

    def add(self, event: ChatEvent) -> None:
        if not 0 <= event.index < len(self.accs):
            raise VlmeshError(f"the coordinator answered for continuation {event.index} of {len(self.accs)}", grpc.StatusCode.INTERNAL)
        self.accs[event.index].add(event)

    def results(self) -> list[ChatResult]:
        return [a.result() for a in self.accs]


# ----------------------------------------------------------------------------------------------
# Sync
# ----------------------------------------------------------------------------------------------


class Client:
    """Blocking client of a vlmesh coordinator.

    Example::

        with Client("127.0.0.1:50051", api_key="...") as client:
            print(client.chat("Hello!").text)

    Args:
        address: the coordinator's ``host:port`` (any gRPC target string works).
        timeout: deadline of every RPC in seconds (for a Generate stream: the whole reply);
            None = no deadline.
        metadata: gRPC metadata sent with every RPC (e.g. headers a proxy wants).
        api_key: sent as ``authorization: Bearer <api_key>`` metadata with every RPC; None =
            ``$VLMESH_API_KEY`` if set (unless `metadata` has an authorization entry), "" = none.
        tls: connect over TLS, verifying the server against the system's root certificates.
        root_certificates: PEM bytes, or the path of a PEM file, of the CA(s) to verify the
            server against (implies `tls`).
        credentials: ready-made channel credentials, instead of `tls` / `root_certificates`;
            None and no `tls` = plaintext.
        options: extra gRPC channel options, overriding the client's defaults.
        allow_private_urls: let image and video URLs reach non-public addresses (see
            `vlmesh.load_image`); by default they may only name public hosts.

    Raises:
        ValueError: a malformed `api_key`, an unreadable `root_certificates` file, or
            `credentials` together with `tls` / `root_certificates`.

    A Client is thread-safe; a `Session` is not (one turn at a time).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        allow_private_urls: AllowPrivate = False,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.allow_private_urls = allow_private_urls
        allowed_networks(allow_private_urls)  # a bad network fails here, not on the first URL
        self._user_metadata = _user_metadata(metadata, api_key)
        self._api_key = _resolve_api_key(metadata, api_key)
        self._metadata = _call_metadata(self._user_metadata, self._api_key)
        creds = _channel_credentials(credentials, tls, root_certificates)
        opts = _channel_options(options)
        if creds is None:
            self._channel = grpc.insecure_channel(address, options=opts)
        else:
            self._channel = grpc.secure_channel(address, creds, options=opts)
        self._owns_channel = True
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)

    def with_options(
        self,
        *,
        api_key: str | None = None,
        timeout: float | None | _Keep = _Keep.KEEP,
        metadata: Metadata | None = None,
    ) -> Client:
        """A client on this one's channel that sends another API key, more metadata and/or has
        another timeout.

        Cheap (no new connection): for a server that calls the coordinator with each of its
        own callers' keys (and trace context: `metadata`, added to this client's). `api_key`
        None keeps this client's key, "" sends none. Closing the copy leaves the shared channel
        open.
        """
        derived = copy.copy(self)
        derived._owns_channel = False
        _derive_metadata(derived, self._user_metadata, api_key, metadata)
        if not isinstance(timeout, _Keep):
            derived.timeout = timeout
        return derived

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled (a `with_options` copy closes nothing)."""
        if self._owns_channel:
            self._channel.close()

    def _unary(self, method: Callable[..., _T], request: object) -> _T:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _events(self, request: pb.GenerateRequest) -> Generator[ChatEvent, None, None]:
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            for resp in call:
                yield event_from_response(resp)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            # The caller may stop reading early (break, exception): stop generation server-side.
            call.cancel()

    def chat(
        self,
        messages: MessagesLike,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int = 0,
        session_id: str | None = None,
        include_stop_token_text: bool = False,
        constraint: tensor_pb2.Constraint | None = None,
        response_format: ResponseFormatLike | None = None,
        tools: ToolsLike | None = None,
        tool_choice: ToolChoiceLike | None = None,
        parallel_tool_calls: bool | None = None,
        n: int = 1,
    ) -> ChatResult:
        """Generate a complete reply.

        Args:
            messages: the conversation: a list of ``{"role": ..., "content": ...}`` dicts in the
                Qwen/transformers or OpenAI format, or a plain string (one user message).
                With `session_id`, only the new messages of this turn.
            max_tokens: most tokens to generate; None = the coordinator's default.
            temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
            top_k: keep the k most likely tokens; 0 = off.
            top_p: nucleus sampling mass; 1 (or 0) = off.
            repetition_penalty: HF-style penalty; 1 (or 0) = off.
            seed: sampling seed; same seed => same tokens. None = random.
            stop: string(s) that end generation; not included in the text.
            logprobs: return each token's log-probability and this many alternatives.
            session_id: continue this session (see `session()` for the managed way).
            include_stop_token_text: keep the end-of-turn token's text in the reply.
            constraint: structured output (JSON schema, JSON object, regex, choice or grammar);
                a constraint that does not compile is `InvalidArgument`.
            response_format: OpenAI's ``{"type": "json_object"}`` or ``{"type": "json_schema",
                "json_schema": {"name": ..., "schema": {...}}}`` (instead of `constraint`).
            tools: functions the model may call, in OpenAI's shape (``{"type": "function",
                "function": {"name", "description", "parameters"}}``); the reply's calls are in
                `ChatResult.tool_calls` (finish_reason "tool_calls").
            tool_choice: "auto" (default), "none", "required" or ``{"type": "function",
                "function": {"name": ...}}``; required and named calls are enforced by a grammar.
            parallel_tool_calls: False = at most one call.
            n: must be 1 here; `chat_choices` returns n replies.

        Raises:
            ValueError: invalid messages/options (before any RPC).
            VlmeshError: the RPC failed (`NotFound` for an unknown session, ...).
        """
        _one_choice(n)
        request = build_request(
            messages,
            session_id=session_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            include_stop_token_text=include_stop_token_text,
            allow_private_urls=self.allow_private_urls,
            constraint=constraint,
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )
        acc = _result(request)
        for event in self._events(request):
            acc.add(event)
        return acc.result()

    def chat_choices(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> list[ChatResult]:
        """`n` complete replies to one prompt (``n=4``: its prefill is shared; each is sampled
        with a seed of its own, so greedy ones are alike). Arguments and errors as for `chat`;
        one-shot."""
        request = build_request(messages, allow_private_urls=self.allow_private_urls, **options)
        choices = _Choices(request)
        for event in self._events(request):
            choices.add(event)
        return choices.results()

    def stream_events(self, messages: MessagesLike, *, session_id: str | None = None, **options: Unpack[GenerateOptions]) -> Iterator[ChatEvent]:
        """Generate a reply and yield every streamed response as a `ChatEvent`.

        The last event carries `finish_reason` and `usage`. Arguments as for `chat`; they are
        validated (and images loaded) here, before iteration starts. Stopping iteration early
        cancels the generation.
        """
        request = build_request(messages, session_id=session_id, allow_private_urls=self.allow_private_urls, **options)
        return self._events(request)

    def stream(self, messages: MessagesLike, *, session_id: str | None = None, **options: Unpack[GenerateOptions]) -> Iterator[str]:
        """Generate a reply and yield its text deltas as they arrive (empty deltas skipped).

        Arguments as for `chat`. Stopping iteration early cancels the generation.
        """
        events = self.stream_events(messages, session_id=session_id, **options)
        return _texts(events)

    def create_session(self) -> str:
        """Open a session on the coordinator and return its id (prefer `session()`)."""
        return self._unary(self._stub.CreateSession, pb.CreateSessionRequest()).session_id

    def close_session(self, session_id: str) -> bool:
        """Close a session; False if it did not exist (closing is idempotent)."""
        return self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id)).existed

    def session(self, session_id: str | None = None) -> Session:
        """Open a multi-turn session (CreateSession now, CloseSession on exit/close).

        With `session_id`, attach to an existing session instead of creating one.
        """
        return Session(self, session_id if session_id is not None else self.create_session())

    def model_info(self) -> ModelInfo:
        """The model and mesh description."""
        return model_info_from_response(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))

    def health(self, service: str = "") -> str:
        """The coordinator's grpc.health.v1 status: "SERVING", "NOT_SERVING", ... ("" = the
        server as a whole; "vlmesh.v1.CoordinatorService" = the API).

        Raises:
            VlmeshError: `Unavailable` when it cannot be reached, `NotFound` for an unknown service.
        """
        stub = health_pb2_grpc.HealthStub(self._channel)
        return _health_status(self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service)))


def _texts(events: Iterator[ChatEvent]) -> Iterator[str]:
    with contextlib.closing(events):  # type: ignore[type-var]
        for event in events:
            if event.text:
                yield event.text


class Session:
    """A multi-turn conversation held on the mesh (its KV cache stays on the stages).

    Each turn sends only its new messages. Use as a context manager so the session (and its
    cache) is freed on exit::

        with client.session() as s:
            s.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                  {"type": "text", "text": "What is this?"}]}])
            print(s.chat("And its colour?").text)

    Not thread-safe: run one turn at a time.
    """

    def __init__(self, client: Client, session_id: str) -> None:
        self._client = client
        self._id = session_id
        self._closed = False

    @property
    def id(self) -> str:
        """The session id."""
        return self._id

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"session {self._id} is closed")

    def chat(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> ChatResult:
        """Run one turn and return the complete reply.

        `messages` are this turn's new messages (a plain string = one user text message);
        options as for `Client.chat`.
        """
        self._check_open()
        return self._client.chat(messages, session_id=self._id, **options)

    def stream(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> Iterator[str]:
        """Run one turn and yield the reply's text deltas (see `Client.stream`)."""
        self._check_open()
        return self._client.stream(messages, session_id=self._id, **options)

    def stream_events(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> Iterator[ChatEvent]:
        """Run one turn and yield every streamed response (see `Client.stream_events`)."""
        self._check_open()
        return self._client.stream_events(messages, session_id=self._id, **options)

    def close(self) -> None:
        """Close the session and free its cache; later calls do nothing."""
        if not self._closed:
            self._client.close_session(self._id)
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        # Don't let a failing CloseSession (often the same outage) hide the real error.
        with contextlib.suppress(VlmeshError):
            self.close()

    def __repr__(self) -> str:
        return f"Session(id={self._id!r}, closed={self._closed})"


# ----------------------------------------------------------------------------------------------
# Async
# ----------------------------------------------------------------------------------------------


class _AioChannel:
    """An aio channel opened on first use, shared by an AsyncClient and its `with_options` copies."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> None:
        self.address = address
        self.credentials = credentials
        self.options = options
        self.channel: grpc.aio.Channel | None = None
        self._stub: CoordinatorServiceAsyncStub | None = None

    def open(self) -> grpc.aio.Channel:
        # Created lazily: an aio channel binds to the event loop current at creation, and
        # users often construct clients before asyncio.run().
        if self.channel is None:
            if self.credentials is None:
                self.channel = grpc.aio.insecure_channel(self.address, options=self.options)
            else:
                self.channel = grpc.aio.secure_channel(self.address, self.credentials, options=self.options)
            self._stub = None
        return self.channel

    def stub(self) -> CoordinatorServiceAsyncStub:
        channel = self.open()
        if self._stub is None:
            self._stub = pb_grpc.CoordinatorServiceStub(channel)  # type: ignore[assignment]
        return self._stub  # type: ignore[return-value]

    async def close(self) -> None:
        if self.channel is not None:
            channel, self.channel, self._stub = self.channel, None, None
            await channel.close()


class AsyncClient:
    """asyncio client of a vlmesh coordinator (grpc.aio); same surface as `Client`.

    Example::

        async with AsyncClient() as client:
            async for delta in client.stream("Tell me a story"):
                print(delta, end="", flush=True)

    Arguments as for `Client`. The channel is opened on first use, in the running event loop;
    use one AsyncClient per event loop.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        allow_private_urls: AllowPrivate = False,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.allow_private_urls = allow_private_urls
        allowed_networks(allow_private_urls)
        self._user_metadata = _user_metadata(metadata, api_key)
        self._api_key = _resolve_api_key(metadata, api_key)
        self._metadata = _call_metadata(self._user_metadata, self._api_key)
        creds = _channel_credentials(credentials, tls, root_certificates)
        self._conn = _AioChannel(address, creds, _channel_options(options))
        self._owns_channel = True

    def with_options(
        self,
        *,
        api_key: str | None = None,
        timeout: float | None | _Keep = _Keep.KEEP,
        metadata: Metadata | None = None,
    ) -> AsyncClient:
        """A client on this one's channel with another API key, more metadata and/or another
        timeout (see `Client.with_options`)."""
        derived = copy.copy(self)
        derived._owns_channel = False
        _derive_metadata(derived, self._user_metadata, api_key, metadata)
        if not isinstance(timeout, _Keep):
            derived.timeout = timeout
        return derived

    @property
    def _stub(self) -> CoordinatorServiceAsyncStub:
        return self._conn.stub()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled (a `with_options` copy closes nothing)."""
        if self._owns_channel:
            await self._conn.close()

    async def _unary(self, method: Callable[..., Awaitable[_T]], request: object) -> _T:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def _build(self, messages: MessagesLike, session_id: str | None, options: GenerateOptions) -> pb.GenerateRequest:
        # Loading images may read files or download URLs: keep that off the event loop.
        return await asyncio.to_thread(build_request, messages, session_id=session_id, allow_private_urls=self.allow_private_urls, **options)

    async def _events(self, request: pb.GenerateRequest) -> AsyncGenerator[ChatEvent, None]:
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            async for resp in call:
                yield event_from_response(resp)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    async def chat(
        self,
        messages: MessagesLike,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int = 0,
        session_id: str | None = None,
        include_stop_token_text: bool = False,
        constraint: tensor_pb2.Constraint | None = None,
        response_format: ResponseFormatLike | None = None,
        tools: ToolsLike | None = None,
        tool_choice: ToolChoiceLike | None = None,
        parallel_tool_calls: bool | None = None,
        n: int = 1,
    ) -> ChatResult:
        """Generate a complete reply; arguments and errors as for `Client.chat`."""
        _one_choice(n)
        options: GenerateOptions = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
            "stop": stop,
            "logprobs": logprobs,
            "include_stop_token_text": include_stop_token_text,
            "constraint": constraint,
            "response_format": response_format,
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
        }
        request = await self._build(messages, session_id, options)
        acc = _result(request)
        async with contextlib.aclosing(self._events(request)) as events:
            async for event in events:
                acc.add(event)
        return acc.result()

    async def chat_choices(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> list[ChatResult]:
        """`n` complete replies to one prompt (see `Client.chat_choices`)."""
        request = await self._build(messages, None, options)
        choices = _Choices(request)
        async with contextlib.aclosing(self._events(request)) as events:
            async for event in events:
                choices.add(event)
        return choices.results()

    async def stream_events(
        self, messages: MessagesLike, *, session_id: str | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncGenerator[ChatEvent, None]:
        """Async-iterate over every streamed response (see `Client.stream_events`).

        Arguments are validated when iteration starts.
        """
        request = await self._build(messages, session_id, options)
        async with contextlib.aclosing(self._events(request)) as events:
            async for event in events:
                yield event

    async def stream(self, messages: MessagesLike, *, session_id: str | None = None, **options: Unpack[GenerateOptions]) -> AsyncGenerator[str, None]:
        """Async-iterate over the reply's text deltas (see `Client.stream`)."""
        request = await self._build(messages, session_id, options)
        async with contextlib.aclosing(self._events(request)) as events:
            async for event in events:
                if event.text:
                    yield event.text

    async def create_session(self) -> str:
        """Open a session and return its id (prefer `session()`)."""
        return (await self._unary(self._stub.CreateSession, pb.CreateSessionRequest())).session_id

    async def close_session(self, session_id: str) -> bool:
        """Close a session; False if it did not exist."""
        return (await self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))).existed

    def session(self, session_id: str | None = None) -> AsyncSession:
        """A multi-turn session: ``async with client.session() as s`` or ``s = await client.session()``.

        The session is created (CreateSession) on entry/await and closed on exit. With
        `session_id`, attach to an existing session instead.
        """
        return AsyncSession(self, session_id)

    async def model_info(self) -> ModelInfo:
        """The model and mesh description."""
        return model_info_from_response(await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))

    async def health(self, service: str = "") -> str:
        """The coordinator's grpc.health.v1 status (see `Client.health`)."""
        stub = health_pb2_grpc.HealthStub(self._conn.open())
        return _health_status(await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service)))


class AsyncSession:
    """Async twin of `Session`, from `AsyncClient.session()`."""

    def __init__(self, client: AsyncClient, session_id: str | None = None) -> None:
        self._client = client
        self._id = session_id
        self._closed = False

    async def open(self) -> AsyncSession:
        """Create the session on the coordinator unless it has an id already; returns self."""
        if self._id is None:
            self._id = await self._client.create_session()
        return self

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self.open().__await__()

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            await self.close()
            return
        with contextlib.suppress(VlmeshError):
            await self.close()

    @property
    def id(self) -> str:
        """The session id (RuntimeError before the session is opened)."""
        if self._id is None:
            raise RuntimeError("session not opened yet: use 'async with' or 'await client.session()'")
        return self._id

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._closed

    def _check_open(self) -> str:
        session_id = self.id
        if self._closed:
            raise RuntimeError(f"session {session_id} is closed")
        return session_id

    async def chat(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> ChatResult:
        """Run one turn and return the complete reply (see `Session.chat`)."""
        return await self._client.chat(messages, session_id=self._check_open(), **options)

    async def stream(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> AsyncGenerator[str, None]:
        """Run one turn and async-iterate over the reply's text deltas."""
        session_id = self._check_open()
        async with contextlib.aclosing(self._client.stream(messages, session_id=session_id, **options)) as it:
            async for delta in it:
                yield delta

    async def stream_events(self, messages: MessagesLike, **options: Unpack[GenerateOptions]) -> AsyncGenerator[ChatEvent, None]:
        """Run one turn and async-iterate over every streamed response."""
        session_id = self._check_open()
        async with contextlib.aclosing(self._client.stream_events(messages, session_id=session_id, **options)) as it:
            async for event in it:
                yield event

    async def close(self) -> None:
        """Close the session and free its cache; later calls (or never-opened sessions) do nothing."""
        if not self._closed and self._id is not None:
            await self._client.close_session(self._id)
        self._closed = True

    def __repr__(self) -> str:
        return f"AsyncSession(id={self._id!r}, closed={self._closed})"
