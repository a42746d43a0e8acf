"""The mesh's one error vocabulary, shared by the services, this client and the HTTP gateway.

A class per gRPC status code, named after it (`InvalidArgument`, `NotFound`, `ResourceExhausted`,
`Unavailable`, ...), and below those, classes named after what happened (`QuotaExceeded` and
`KVBudgetFull` are both `ResourceExhausted`; `ShuttingDown` and `StageDown` both `Unavailable`).
What happened travels on the wire as the `reason` of a `google.rpc.ErrorInfo` (domain
"vlmesh.dev", an UPPER_SNAKE word such as "KV_BUDGET_FULL") inside the standard
`grpc-status-details-bin` trailer; the request's trace id travels in the `vlmesh-trace-id`
trailer. Both land on the exception as `reason` and `trace_id`.

The client re-raises every `grpc.RpcError` from the coordinator as the class its code and reason
name (the original error kept as `__cause__`), so callers can catch `NotFound`, or more narrowly
`QuotaExceeded`, without importing grpc. Problems found locally before any RPC (a bad message, an
unreadable image, an out-of-range parameter) are plain `ValueError`s instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "VlmeshError",
    # One class per gRPC status code.
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    # What happened, under its code.
    "UnknownSession",
    "KVBudgetFull",
    "QuotaExceeded",
    "TooManyImages",
    "MessageTooLarge",
    "WrongStage",
    "SessionBusy",
    "StageDown",
    "ShuttingDown",
    "ERROR_DOMAIN",
    "STATUS_DETAILS_KEY",
    "TRACE_ID_KEY",
    "error_for",
    "reason_of",
    "from_rpc_error",
]

#: ErrorInfo.domain of the mesh's own errors.
ERROR_DOMAIN = "vlmesh.dev"
#: Trailing metadata key of the google.rpc.Status (gRPC's standard rich-error trailer).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: Trailing metadata key of the request's trace id.
TRACE_ID_KEY = "vlmesh-trace-id"


class VlmeshError(Exception):
    """A failed call, or (inside the services) a failure that will become one.

    `str(err)` is `details`, the human message that travels as the status message: a prefix of
    the code there would pile up each time a service passes a downstream error on.

    Attributes:
        code: the gRPC status code.
        details: the server's (or gRPC's) description of the failure.
        reason: the machine-readable cause (ErrorInfo.reason, e.g. "KV_BUDGET_FULL",
            "QUOTA_EXCEEDED"): the class's own unless told otherwise; on an error decoded from
            the wire, what the server attached, or None if it attached none.
        trace_id: the failed request's trace id (hex), or None when the server sent none.
    """

    #: Status code that instances of this class carry unless told otherwise. An error nobody
    #: classified is the server's own fault.
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: ErrorInfo reason that instances of this class carry unless told otherwise.
    default_reason: ClassVar[str] = "INTERNAL"
    #: Other reasons that name this class on the wire (more precise causes of the same thing).
    other_reasons: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        reason: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(details)
        if code is not None:
            self.code = code
        self.details: str = details
        self.reason: str | None = reason if reason is not None else self.default_reason
        self.trace_id: str | None = trace_id

    def to_status(self) -> status_pb2.Status:
        """This error as a google.rpc.Status with its ErrorInfo (what a server sends in the
        `grpc-status-details-bin` trailer, and a stage in each failed step)."""
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason or self.default_reason, domain=ERROR_DOMAIN))
        return status_pb2.Status(code=self.code.value[0], message=self.details, details=[info])


# --- one class per gRPC status code ------------------------------------------------------------


class Cancelled(VlmeshError):
    """The call was cancelled (by the client or the server)."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unknown(VlmeshError):
    """A failure gRPC could not classify (e.g. a server that raised outside its error mapping)."""

    code = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"


class InvalidArgument(VlmeshError):
    """The request was rejected: bad image, bad tensor, prompt too long, bad parameter."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_INPUT"  # the wire's name since the first release


class DeadlineExceeded(VlmeshError):
    """The call took longer than the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class NotFound(VlmeshError):
    """Something the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(VlmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(VlmeshError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(VlmeshError):
    """A bounded resource is used up: KV cache, a quota, images per request, message size."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(VlmeshError):
    """The mesh is not in a state to run the request (e.g. stages disagree on a session)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(VlmeshError):
    """A concurrent use the service refused."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class OutOfRange(VlmeshError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Unimplemented(VlmeshError):
    """A method this server does not serve."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(VlmeshError):
    """A bug or an inconsistency inside the mesh."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


class Unavailable(VlmeshError):
    """The service (or one behind it) cannot be reached now; trying again later may work."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(VlmeshError):
    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unauthenticated(VlmeshError):
    """No API key, or one the service does not accept."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


# --- what happened, under its code -------------------------------------------------------------


class UnknownSession(NotFound):
    """A session id the service does not hold: never created, closed, evicted, or another key's
    (a stage without the session's KV: KV_MISSING; a session without a KV log: NO_KV_LOG)."""

    default_reason = "UNKNOWN_SESSION"
    other_reasons = ("KV_MISSING", "NO_KV_LOG")


class KVBudgetFull(ResourceExhausted):
    """The KV cache of a stage cannot take the step."""

    default_reason = "KV_BUDGET_FULL"


class QuotaExceeded(ResourceExhausted):
    """A limit of the caller's API key (sessions, requests in flight, tokens)."""

    default_reason = "QUOTA_EXCEEDED"


class TooManyImages(ResourceExhausted):
    """More images and videos in one request than the service takes."""

    default_reason = "TOO_MANY_IMAGES"


class MessageTooLarge(ResourceExhausted):
    """A message larger than the receiver accepts (gRPC's own size refusal included). Sending it
    again cannot help, unlike the other `ResourceExhausted` errors."""

    default_reason = "MESSAGE_TOO_LARGE"


class WrongStage(FailedPrecondition):
    """A step this stage cannot run: its KV position disagrees, or it asks for a role (first or
    last stage) that this stage does not have."""

    default_reason = "WRONG_STAGE"
    other_reasons = ("KV_POSITION_MISMATCH",)


class SessionBusy(Aborted):
    """Two turns of one session at once."""

    default_reason = "SESSION_BUSY"


class StageDown(Unavailable):
    """A downstream service cannot be reached (or every replica of a layer range is down; a
    replica that did not answer in time: STAGE_STALLED)."""

    default_reason = "STAGE_UNAVAILABLE"
    other_reasons = ("STAGE_STALLED",)


class ShuttingDown(Unavailable):
    """The service is draining for a stop; another instance (or a restart) will answer."""

    default_reason = "SHUTTING_DOWN"


_CODE_CLASSES: tuple[type[VlmeshError], ...] = (
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
)
_REASON_CLASSES: tuple[type[VlmeshError], ...] = (
    UnknownSession,
    KVBudgetFull,
    QuotaExceeded,
    TooManyImages,
    MessageTooLarge,
    WrongStage,
    SessionBusy,
    StageDown,
    ShuttingDown,
)
_BY_CODE: dict[grpc.StatusCode, type[VlmeshError]] = {cls.code: cls for cls in _CODE_CLASSES}
_BY_REASON: dict[str, type[VlmeshError]] = {r: cls for cls in _REASON_CLASSES for r in (cls.default_reason, *cls.other_reasons)}
# gRPC's own refusal of an oversized message ("Received message larger than max (N vs. M)",
# "Sent message larger than max ..."): a RESOURCE_EXHAUSTED without details.
_TOO_LARGE = re.compile(r"message larger than max", re.IGNORECASE)


def error_for(code: grpc.StatusCode, details: str, reason: str | None = None, trace_id: str | None = None) -> VlmeshError:
    """The error of a status: the class its reason names if that class has this code, else its
    code's class; `reason` is kept as given (None: the status carried none)."""
    cls = _BY_REASON.get(reason or "")
    if cls is None or cls.code != code:
        cls = _BY_CODE.get(code, VlmeshError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason is None and _TOO_LARGE.search(details):
        cls, reason = MessageTooLarge, MessageTooLarge.default_reason
    err = cls(details, code, trace_id=trace_id)
    err.reason = reason
    return err


def reason_of(status: status_pb2.Status) -> str | None:
    """ErrorInfo.reason of a google.rpc.Status (the mesh's own domain first), if any."""
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    infos.sort(key=lambda i: i.domain != ERROR_DOMAIN)
    return next((i.reason for i in infos if i.reason), None)


def _reason(err: grpc.RpcError) -> str | None:
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError, DecodeError):
        # Details that contradict the call's own code or message, or no call at all: ignore them.
        return None
    return None if status is None else reason_of(status)


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
    return error_for(code, details or str(err) or code.name, _reason(err), _trace_id(err))
