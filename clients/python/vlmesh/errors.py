"""Exceptions the client raises for failed RPCs.

Every `grpc.RpcError` from the coordinator is re-raised as a `VlmeshError` subclass chosen by
its status code, with the original error kept as `__cause__`, so callers can catch e.g.
`NotFound` without importing grpc. Problems found locally before any RPC (a bad message, an
unreadable image, an out-of-range parameter) are plain `ValueError`s instead.

The coordinator says more than a status code where it can: a `google.rpc.Status` in the standard
`grpc-status-details-bin` trailer with a `google.rpc.ErrorInfo` (domain "vlmesh.dev", reason an
UPPER_SNAKE word such as "KV_BUDGET_FULL"), and the request's trace id in the `vlmesh-trace-id`
trailer. Both land on the exception as `reason` and `trace_id`.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "VlmeshError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Unauthenticated",
    "ERROR_DOMAIN",
    "TRACE_ID_KEY",
    "from_rpc_error",
]

#: ErrorInfo.domain of the mesh's own errors.
ERROR_DOMAIN = "vlmesh.dev"
#: Trailing metadata key of the request's trace id.
TRACE_ID_KEY = "vlmesh-trace-id"


class VlmeshError(Exception):
    """A failed call to the coordinator.

    Attributes:
        code: the gRPC status code.
        details: the server's (or gRPC's) description of the failure.
        reason: the machine-readable cause the server attached (ErrorInfo.reason, e.g.
            "KV_BUDGET_FULL", "QUOTA_EXCEEDED"), or None.
        trace_id: the failed request's trace id (hex), or None when the server sent none.
    """

    #: Status code that instances of this class carry unless told otherwise.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        reason: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        self.reason: str | None = reason
        self.trace_id: str | None = trace_id
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


class Unauthenticated(VlmeshError):
    """No API key, or one the coordinator does not accept."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


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
        Unauthenticated,
    )
}


def _reason(err: grpc.RpcError) -> str | None:
    """ErrorInfo.reason from the status details (the mesh's own domain first), if any."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError, DecodeError):
        # Details that contradict the call's own code or message, or no call at all: ignore them.
        return None
    if status is None:
        return None
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    infos.sort(key=lambda i: i.domain != ERROR_DOMAIN)
    return next((i.reason for i in infos if i.reason), None)


def _trace_id(err: grpc.RpcError) -> str | None:
    trailing = getattr(err, "trailing_metadata", None)
    items: Iterable[tuple[str, str | bytes]] = (trailing() if callable(trailing) else None) or ()
    for key, value in items:
        if key == TRACE_ID_KEY:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return None


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
    return cls(details or str(err) or code.name, code, reason=_reason(err), trace_id=_trace_id(err))
