"""The services' side of the mesh's one error vocabulary.

The classes are the client library's (`vlmesh.errors`: one per gRPC code, and below those one per
thing that happened); the services raise them as plain exceptions, and the interceptor turns them
into statuses at the service edge (`VlmeshError.to_status`: a `google.rpc.ErrorInfo` whose
`reason` programs can test instead of matching message text). What this module adds is the
services' own concern: turning a downstream service's failure (a failed RPC, or the status of one
step of a batch) back into that vocabulary, so it travels on unchanged.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from vlmesh.errors import (
    ERROR_DOMAIN,
    STATUS_DETAILS_KEY,
    TRACE_ID_KEY,
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KVBudgetFull,
    MessageTooLarge,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QuotaExceeded,
    ResourceExhausted,
    SessionBusy,
    ShuttingDown,
    StageDown,
    TooManyImages,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    UnknownSession,
    VlmeshError,
    WrongStage,
    error_for,
    reason_of,
)
from vlmesh.errors import from_rpc_error as _decode

__all__ = [
    "ERROR_DOMAIN",
    "STATUS_DETAILS_KEY",
    "TRACE_ID_KEY",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "KVBudgetFull",
    "MessageTooLarge",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QuotaExceeded",
    "ResourceExhausted",
    "SessionBusy",
    "ShuttingDown",
    "StageDown",
    "TooManyImages",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UnknownSession",
    "VlmeshError",
    "WrongStage",
    "from_rpc_error",
    "from_status",
    "reason_of",
    "short",
]

_CODES = {c.value[0]: c for c in grpc.StatusCode}
# A downstream service that is down, stalled or went away mid-call: the coordinator retries
# another replica, whatever the callee said about why.
_DOWNSTREAM_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def short(identifier: str, limit: int = 40) -> str:
    """An identifier as it may appear in a message: client-chosen strings can be any size."""
    return repr(identifier if len(identifier) <= limit else identifier[:limit] + "...")


def _passed_on(code: grpc.StatusCode, details: str, reason: str | None) -> VlmeshError:
    err = error_for(code, details, reason)
    if err.reason is None:  # the callee attached none: the class's own, as if raised here
        err.reason = err.default_reason
    return err


def from_status(status: status_pb2.Status, what: str) -> VlmeshError:
    """The error a downstream service reported for one step (a `google.rpc.Status`), as ours;
    `what` (e.g. "stage 127.0.0.1:50061") prefixes its message."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.UNAVAILABLE:
        return StageDown(f"{what}: {status.message}", reason=reason_of(status))
    return _passed_on(code, f"{what}: {status.message}", reason_of(status))


def from_rpc_error(err: grpc.RpcError, what: str) -> VlmeshError:
    """A failed call to a downstream service, as ours: a callee that is gone (UNAVAILABLE,
    DEADLINE_EXCEEDED, CANCELLED) is a `StageDown` the coordinator retries elsewhere; anything
    else keeps its code and reason."""
    got = _decode(err)
    if got.code in _DOWNSTREAM_GONE:
        return StageDown(f"{what}: {got.code.name}: {got.details}")
    return _passed_on(got.code, f"{what}: {got.details}", got.reason)
