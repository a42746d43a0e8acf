"""One exception type per gRPC status code. Raised inside the services as plain exceptions;
the interceptor in `server.py` turns them into statuses at the service edge, with a
`google.rpc.ErrorInfo` whose `reason` programs can test instead of matching message text."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "vlmesh.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class VlmeshError(Exception):
    """Base of every error a client may see; `code` is its gRPC status, `reason` its ErrorInfo
    reason (UPPER_SNAKE_CASE, stable across releases)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or self.default_reason

    def to_status(self) -> status_pb2.Status:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        return status_pb2.Status(code=self.code.value[0], message=str(self), details=[info])


class InvalidInput(VlmeshError):
    """Bad image, bad tensor, prompt too long, unknown parameter."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_INPUT"


class Unauthenticated(VlmeshError):
    """No API key, or one the service does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class UnknownSession(VlmeshError):
    """A session id that this service does not hold (or that belongs to another key)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "UNKNOWN_SESSION"


class KVBudgetFull(VlmeshError):
    """A bounded resource is full: the KV cache, images per request, a per-key quota."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "KV_BUDGET_FULL"


class WrongStage(VlmeshError):
    """A step that this stage cannot run: its KV position disagrees, or it asks for a role
    (first/last stage) that this stage does not have."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "WRONG_STAGE"


class Conflict(VlmeshError):
    """A concurrent use the service refuses, e.g. two turns of one session at once."""

    code = grpc.StatusCode.ABORTED
    default_reason = "SESSION_BUSY"


class Cancelled(VlmeshError):
    """The caller cancelled the request."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class DeadlineExceeded(VlmeshError):
    """The caller's deadline passed before the request finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class StageDown(VlmeshError):
    """A downstream service cannot be reached (or every replica of it is down)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "STAGE_UNAVAILABLE"


_BY_CODE: dict[grpc.StatusCode, type[VlmeshError]] = {
    cls.code: cls
    for cls in (InvalidInput, Unauthenticated, UnknownSession, KVBudgetFull, WrongStage, Conflict, Cancelled, DeadlineExceeded, StageDown)
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def short(identifier: str, limit: int = 40) -> str:
    """An identifier as it may appear in a message: client-chosen strings can be any size."""
    return repr(identifier if len(identifier) <= limit else identifier[:limit] + "...")


def reason_of(status: status_pb2.Status) -> str | None:
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info.reason
    return None


def from_status(status: status_pb2.Status, what: str) -> VlmeshError:
    """The error a downstream service reported (an RPC's status or a step's), as our type."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, VlmeshError)
    return cls(f"{what}: {status.message}", reason=reason_of(status))


def from_rpc_error(err: grpc.RpcError, what: str) -> VlmeshError:
    """Map a failed call to a downstream service back to our type, so it travels on unchanged."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    reason = None
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            reason = reason_of(status_pb2.Status.FromString(value))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return StageDown(f"{what}: {code.name}: {details}")
    cls = _BY_CODE.get(code, VlmeshError)
    return cls(f"{what}: {details}", reason=reason)
