"""The gateway service: OpenAI's chat completions API (and the legacy completions API) over HTTP (FastAPI + uvicorn), answered by
a coordinator through `vlmesh.AsyncClient`.

Each caller's ``Authorization: Bearer KEY`` travels on as the coordinator call's
``authorization`` metadata; the gateway keeps no keys and no state of its own. A caller that
disconnects cancels its generation: the client library cancels the gRPC call, and the
coordinator frees the request's KV on the stages. Each API request is a span of its own, which
starts a trace or continues the caller's (a W3C ``traceparent`` header).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace
from starlette.exceptions import HTTPException

from services.common.config import ServiceConfig, add_config_arguments, config_from_args, field
from services.common.logs import setup_logging
from services.common.tracing import metadata as trace_metadata
from services.common.tracing import setup_tracing, shutdown_tracing, trace_id_hex
from vlmesh import AsyncClient, ChatEvent, Usage, VlmeshError

from .errors import ApiError, from_vlmesh_error, invalid
from .request import ChatRequest, json_body, parse_chat_request, parse_completion_request
from .response import CompletionReply, Reply, sse, tool_call
from .tokens import TokenPieces

log = logging.getLogger(__name__)
_T = TypeVar("_T")
TRACE_HEADER = "vlmesh-trace-id"
# The coordinator's default --max-message-mb: a body the gateway takes must fit in the one gRPC
# message it becomes (a base64 data URL shrinks to 3/4 there; text does not grow).
COORDINATOR_MAX_MESSAGE_MB = 32


@dataclass(kw_only=True)
class GatewayConfig(ServiceConfig):
    coordinator: str = field(help="coordinator address host:port")
    port: int = field(8000, "HTTP port to bind")
    model: str = field(
        "",
        "checkpoint directory: its name is the model id, its tokenizer.json gives logprobs their token strings and bytes (nothing else is read)",
    )
    served_model_name: str = field("", "model id to serve under (default: the --model directory's name, else the model type)")
    request_timeout: float = field(600.0, "seconds a request may take at the coordinator (0 = no limit); past it: 504")
    max_request_mb: int = field(
        COORDINATOR_MAX_MESSAGE_MB,
        "largest request body, in MiB (images travel inside as data URLs); at most the coordinator's --max-message-mb, "
        "which refuses larger requests (413 either way)",
    )
    allow_private_urls: str = field("", "let image URLs reach non-public addresses: 'all', or comma-separated networks (default: public hosts only)")
    coordinator_tls: bool = field(False, "talk to the coordinator over TLS")
    coordinator_ca_cert: str = field("", "CA certificate (PEM) to verify the coordinator with; implies TLS")


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class Gateway:
    """What every request shares: the coordinator client, the model id and its token pieces."""

    def __init__(self, cfg: GatewayConfig) -> None:
        allow = cfg.allow_private_urls.strip()
        self.client = AsyncClient(
            cfg.coordinator,
            api_key="",  # never the gateway's own environment: each caller brings its key
            timeout=cfg.request_timeout or None,
            tls=cfg.coordinator_tls,
            root_certificates=cfg.coordinator_ca_cert or None,
            allow_private_urls=True if allow.lower() == "all" else allow,
        )
        self.pieces = TokenPieces(cfg.model) if cfg.model else None
        self.max_body = cfg.max_request_mb << 20
        self.created = int(time.time())
        name = os.path.basename(os.path.normpath(cfg.model)) if cfg.model else ""
        self._model_id = cfg.served_model_name or name

    async def model_id(self, client: AsyncClient) -> str:
        if not self._model_id:
            self._model_id = (await _call(client.model_info())).model_type
        return self._model_id


async def _call(work: Awaitable[_T]) -> _T:
    """Await a client call; its failures become API errors."""
    try:
        return await work
    except VlmeshError as e:
        raise from_vlmesh_error(e) from e
    except ValueError as e:  # the client library's checks of messages, images and options
        raise invalid(str(e)) from e


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result, or `_ClientGone` (with `work` cancelled) if the caller leaves first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone
    finally:
        for t in (task, gone):
            t.cancel()
        # Let the cancelled call unwind (the gRPC call is cancelled in its finally).
        await asyncio.gather(task, gone, return_exceptions=True)


def _api_key(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is None:
        return ""
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401,
            "the Authorization header must be 'Bearer <API key>'",
            type="authentication_error",
            code="invalid_api_key",
        )
    return key.strip()


def _client(gateway: Gateway, request: Request) -> AsyncClient:
    """The caller's client: its key, and the context of the request's span (the coordinator's
    spans join its trace)."""
    try:
        return gateway.client.with_options(api_key=_api_key(request), metadata=trace_metadata())
    except ValueError as e:
        raise ApiError(401, str(e), type="authentication_error", code="invalid_api_key") from e


async def _json_body(request: Request, limit: int) -> Any:
    too_large = ApiError(413, f"the request body is larger than {limit >> 20} MiB", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return json_body(b"".join(chunks))


def _trace(trace_id: str | None) -> dict[str, str]:
    return {TRACE_HEADER: trace_id} if trace_id else {}


class _ChatChunks:
    """chat.completion.chunk objects of one stream: per continuation a role chunk first, then its
    content and tool-call deltas (as OpenAI streams a call: id and name, then the arguments) and
    its finish chunk."""

    def __init__(self, reply: Reply, n: int, with_usage: bool):
        self.reply, self.n, self.with_usage = reply, n, with_usage
        self.calls = [0] * n

    def opening(self) -> list[dict[str, Any]]:
        return [self.reply.chunk({"role": "assistant", "content": ""}, index=i, with_usage=self.with_usage) for i in range(self.n)]

    def of(self, event: ChatEvent) -> list[dict[str, Any]]:
        i, u, out = event.index, self.with_usage, []
        if event.text or event.logprobs:
            out.append(self.reply.chunk({"content": event.text}, index=i, entries=event.logprobs, with_usage=u))
        for call in event.tool_calls:
            head = tool_call(call, self.calls[i])
            head["function"]["arguments"] = ""
            out.append(self.reply.chunk({"tool_calls": [head]}, index=i, with_usage=u))
            args = {"index": self.calls[i], "function": {"arguments": call.arguments}}
            out.append(self.reply.chunk({"tool_calls": [args]}, index=i, with_usage=u))
            self.calls[i] += 1
        if event.finish_reason is not None:
            out.append(self.reply.chunk({}, index=i, finish=event.finish_reason, with_usage=u))
        return out


class _CompletionChunks:
    """text_completion objects of one stream: text chunks (with legacy logprobs), a finish chunk."""

    def __init__(self, reply: CompletionReply, n: int, with_usage: bool):
        self.reply, self.with_usage = reply, with_usage
        self.offsets = [0] * n

    def opening(self) -> list[dict[str, Any]]:
        return []

    def of(self, event: ChatEvent) -> list[dict[str, Any]]:
        i, out = event.index, []
        if event.text or event.logprobs:
            out.append(self.reply.chunk(event.text, index=i, entries=event.logprobs, offset=self.offsets[i], with_usage=self.with_usage))
            self.offsets[i] += len(event.text)
        if event.finish_reason is not None:
            out.append(self.reply.chunk("", index=i, finish=event.finish_reason, with_usage=self.with_usage))
        return out


async def _events(events: AsyncIterator[ChatEvent], first: ChatEvent, chat: ChatRequest, reply: Reply | CompletionReply) -> AsyncIterator[bytes]:
    """The SSE body: each continuation's chunks as they come, usage if asked, [DONE].
    Cancelled (the caller left), it closes `events`, which cancels the gRPC call."""
    n = chat.options.get("n", 1)
    chunks = _ChatChunks(reply, n, chat.include_usage) if isinstance(reply, Reply) else _CompletionChunks(reply, n, chat.include_usage)
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        for c in chunks.opening():
            yield sse(c)
        finals: dict[int, ChatEvent] = {}
        event: ChatEvent | None = first
        try:
            while event is not None:
                if not 0 <= event.index < n:
                    raise VlmeshError(f"the coordinator answered for continuation {event.index} of {n}")
                for c in chunks.of(event):
                    yield sse(c)
                if event.finish_reason is not None:
                    finals[event.index] = event
                event = await anext(events, None)
        except VlmeshError as e:
            # Headers are gone already: the error travels as an event (the openai SDK raises it).
            err = from_vlmesh_error(e)
            log.warning("%s failed mid-stream: %s %s", reply.id, err.status, err.message)
            yield sse(err.body())
            return
        if len(finals) < n:
            yield sse(ApiError(502, "the coordinator ended the stream without a finish reason", type="server_error").body())
            return
        if chat.include_usage and all(e.usage is not None for e in finals.values()):
            first_usage = finals[0].usage
            assert first_usage is not None
            done = sum(e.usage.completion_tokens for e in finals.values() if e.usage is not None)
            yield sse(reply.usage_chunk(Usage(first_usage.prompt_tokens, done, first_usage.cached_tokens)))
        yield sse("[DONE]")


async def _stream(request: Request, client: AsyncClient, chat: ChatRequest, reply: Reply | CompletionReply) -> Response:
    events = client.stream_events(chat.messages, **chat.options)
    try:
        # The first event before the headers: a request the mesh refuses gets its real status.
        first = await _unless_disconnected(request, _call(anext(events, None)))
    except BaseException:
        await events.aclose()
        raise
    if first is None:
        raise ApiError(502, "the coordinator ended the stream without a reply", type="server_error")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_trace(first.trace_id)}
    return StreamingResponse(_events(events, first, chat, reply), media_type="text/event-stream", headers=headers)


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    """Health probes (a supervisor's, every second) would flood the trace store."""
    return scope.get("path") == "/health"


def _error_response(err: ApiError) -> JSONResponse:
    # Refused before the coordinator named a trace: the gateway's own span names it.
    trace_id = err.trace_id or trace_id_hex(trace.get_current_span())
    return JSONResponse(err.body(), status_code=err.status, headers=_trace(trace_id))


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"Unknown request URL: {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error_response(ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


async def _check_model(gateway: Gateway, client: AsyncClient, chat: ChatRequest) -> str:
    served = await gateway.model_id(client)
    if chat.model != served:
        raise ApiError(
            404,
            f"The model '{chat.model}' does not exist; this server serves '{served}'",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    if chat.top_logprobs is not None and gateway.pieces is None:
        raise invalid("logprobs need the gateway's --model (the checkpoint's tokenizer)", "logprobs")
    return served


async def _answer(request: Request, client: AsyncClient, chat: ChatRequest, reply: Reply | CompletionReply) -> Response:
    log.info("%s user=%r stream=%s", reply.id, chat.user, chat.stream)
    try:
        if chat.stream:
            return await _stream(request, client, chat, reply)
        results = await _unless_disconnected(request, _call(client.chat_choices(chat.messages, **chat.options)))
    except _ClientGone:
        log.info("%s: the client disconnected; generation cancelled", reply.id)
        return Response(status_code=499)
    return JSONResponse(reply.completion(results), headers=_trace(results[0].trace_id))


def _add_completions(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        client = _client(gateway, request)
        chat = parse_chat_request(await _json_body(request, gateway.max_body))
        served = await _check_model(gateway, client, chat)
        return await _answer(
            request, client, chat, Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served, chat.top_logprobs, gateway.pieces)
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        client = _client(gateway, request)
        chat = parse_completion_request(await _json_body(request, gateway.max_body))
        served = await _check_model(gateway, client, chat)
        reply = CompletionReply(f"cmpl-{uuid.uuid4().hex}", int(time.time()), served, chat.top_logprobs, gateway.pieces)
        return await _answer(request, client, chat, reply)


def create_app(cfg: GatewayConfig) -> FastAPI:
    gateway = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await gateway.client.close()

    # FastAPI's own OpenTelemetry spans: one SERVER span per request ("POST /v1/chat/completions"),
    # a child of the caller's W3C traceparent if it sent one, around the whole response (a stream's
    # last event included); the coordinator call inside it joins the same trace.
    telemetry: TelemetryConfig = {"exclude": _untraced, "operation_spans": False}
    app = FastAPI(title="vlmesh gateway", lifespan=lifespan, docs_url=None, redoc_url=None, telemetry=telemetry)

    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        status = await _call(gateway.client.health())
        if status != "SERVING":
            raise ApiError(503, f"the coordinator is {status}", type="server_error", code="unavailable")
        return {"status": "ok"}

    async def model_object(request: Request) -> dict[str, Any]:
        client = _client(gateway, request)
        # Asked of the coordinator with the caller's key: a refused key is a 401 here too.
        info = await _call(client.model_info())
        model = await gateway.model_id(client)
        return {
            "id": model,
            "object": "model",
            "created": gateway.created,
            "owned_by": "vlmesh",
            "max_model_len": info.max_sequence_length,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [await model_object(request)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict[str, Any]:
        found = await model_object(request)
        if model != found["id"]:
            raise ApiError(
                404,
                f"The model '{model}' does not exist",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return found

    _add_completions(app, gateway)
    return app


def main(argv: list[str] | None = None) -> int:
    """`vlmesh serve gateway`: config from flags and environment, serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="vlmesh serve gateway", description="OpenAI-compatible HTTP gateway of a coordinator.")
    add_config_arguments(parser, GatewayConfig)
    cfg = config_from_args(GatewayConfig, parser.parse_args(argv))
    setup_logging(cfg.log_level, cfg.log_format)
    setup_tracing(cfg.service_name or "vlmesh-gateway", cfg.trace_exporter, cfg.otlp_endpoint)
    app = create_app(cfg)
    log.info("serving the OpenAI API on http://%s:%d/v1 for coordinator %s", cfg.host, cfg.port, cfg.coordinator)
    # log_config=None: uvicorn logs through the handlers setup_logging installed.
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, log_level=cfg.log_level.lower(), timeout_graceful_shutdown=5)
    finally:
        shutdown_tracing()  # the last batch of spans reaches the collector
    return 0
