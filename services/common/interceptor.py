"""Our exceptions become gRPC statuses in one place: the error interceptor every service's server
runs, and `abort` for a handler that ends a call itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter

from .errors import STATUS_DETAILS_KEY, TRACE_ID_KEY, Internal, InvalidArgument, VlmeshError

log = logging.getLogger(__name__)


def error_trailers(err: VlmeshError, trace_id: str = "") -> tuple[tuple[str, str | bytes], ...]:
    trailers: list[tuple[str, str | bytes]] = [(STATUS_DETAILS_KEY, err.to_status().SerializeToString())]
    if trace_id:
        trailers.append((TRACE_ID_KEY, trace_id))
    return tuple(trailers)


async def abort(context: grpc.aio.ServicerContext, err: VlmeshError, trace_id: str = "") -> None:
    await context.abort(err.code, str(err), trailing_metadata=error_trailers(err, trace_id))


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException, errors: Counter | None = None) -> None:
    if errors is not None:
        errors.labels(exc.code.name if isinstance(exc, VlmeshError) else "INTERNAL").inc()
    if isinstance(exc, VlmeshError):
        await abort(context, exc, getattr(exc, "trace_id", ""))
    log.error("unexpected error", exc_info=exc)
    await abort(context, Internal(f"internal error: {type(exc).__name__}: {exc}"), getattr(exc, "trace_id", ""))


_UNDECODABLE = object()  # a request message the deserializer rejected


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps our exception types to gRPC statuses in one place, for every RPC shape of our own
    services (health and reflection are left as they are), and counts them by code."""

    def __init__(self, errors: Counter | None = None):
        self.errors = errors

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: Any = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith("/vlmesh."):
            return handler
        handler = handler._replace(request_deserializer=_decoded(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary(handler.unary_unary, self.errors))
        if handler.unary_stream:
            return handler._replace(unary_stream=_streaming(handler.unary_stream, self.errors))
        if handler.stream_unary:
            return handler._replace(stream_unary=_unary(handler.stream_unary, self.errors, stream_in=True))
        if handler.stream_stream:
            return handler._replace(stream_stream=_streaming(handler.stream_stream, self.errors, stream_in=True))
        return handler


def _decoded(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # gRPC answers INTERNAL for a request its deserializer rejects; a malformed message is the
    # caller's mistake, so it is passed on as a marker and refused as INVALID_ARGUMENT.
    def safe(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _UNDECODABLE

    return safe


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in requests:
        if r is _UNDECODABLE:
            raise InvalidArgument("a message of the request stream is not a valid protobuf message of its type")
        yield r


def _request(request: Any, stream_in: bool) -> Any:
    if stream_in:
        return _checked(request)
    if request is _UNDECODABLE:
        raise InvalidArgument("the request is not a valid protobuf message of its type")
    return request


def _unary(fn: Callable[..., Awaitable[Any]], errors: Counter | None, stream_in: bool = False) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(_request(request, stream_in), context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _abort_with(context, exc, errors)

    return wrapper


def _streaming(fn: Callable[..., AsyncIterator[Any]], errors: Counter | None, stream_in: bool = False) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(_request(request, stream_in), context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_with(context, exc, errors)

    return wrapper
