"""Exceptions the client raises for failed RPCs.

Every `grpc.RpcError` from the coordinator is re-raised as a `VlmeshError` subclass chosen by
its status code, with the original error kept as `__cause__`, so callers can catch e.g.
`NotFound` without importing grpc. Problems found locally before any RPC (a bad message, an
unreadable image, an out-of-range parameter) are plain `ValueError`s instead.
"""

from __future__ import annotations

import grpc

__all__ = [
    "VlmeshError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "from_rpc_error",
]


class VlmeshError(Exception):
    """A failed call to the coordinator.

    Attributes:
        code: the gRPC status code.
        details: the server's (or gRPC's) description of the failure.
    """

    #: Status code that instances of this class carry unless told otherwise.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        super().__init__(f"{self.code.name}: {details}")


class InvalidArgument(VlmeshError):
    """The request was rejected: bad image, prompt too long, bad parameter."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VlmeshError):
    """Unknown session id (never created, closed, or evicted)."""

    default_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(VlmeshError):
    """The mesh is out of a bounded resource (KV cache, images per request, ...)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(VlmeshError):
    """The mesh is not in a state to run the request (e.g. stages disagree on a session)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(VlmeshError):
    """The coordinator (or a service behind it) cannot be reached."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(VlmeshError):
    """The call took longer than the client's timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(VlmeshError):
    """The call was cancelled (by the client or the server)."""

    default_code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[VlmeshError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
    )
}


def from_rpc_error(err: grpc.RpcError) -> VlmeshError:
    """The `VlmeshError` for a gRPC error; the caller raises it `from err`."""
    # grpc.RpcError itself has no code()/details(); the concrete call objects (sync
    # _InactiveRpcError/_MultiThreadedRendezvous, aio AioRpcError) all do.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, VlmeshError)
    return cls(details or str(err) or code.name, code)
