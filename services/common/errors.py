"""One exception type per gRPC status code. Raised inside the services as plain exceptions;
the interceptor in `server.py` turns them into statuses at the service edge."""

from __future__ import annotations

import grpc


class VlmeshError(Exception):
    """Base of every error a client may see; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(VlmeshError):
    """Bad image, bad tensor, prompt too long, unknown parameter."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownSession(VlmeshError):
    """A session id that this service does not hold."""

    code = grpc.StatusCode.NOT_FOUND


class KVBudgetFull(VlmeshError):
    """The KV cache (or another bounded resource, e.g. images per request) is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WrongStage(VlmeshError):
    """A step that this stage cannot run: its KV position disagrees, or it asks for a role
    (first/last stage) that this stage does not have."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(VlmeshError):
    """A concurrent use the service refuses, e.g. two turns of one session at once."""

    code = grpc.StatusCode.ABORTED


class Cancelled(VlmeshError):
    """The caller cancelled the request."""

    code = grpc.StatusCode.CANCELLED


class StageDown(VlmeshError):
    """A downstream service cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


def from_rpc_error(err: grpc.RpcError, what: str) -> VlmeshError:
    """Map a status from a downstream service back to our type, so it travels on unchanged."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    for cls in (InvalidInput, UnknownSession, KVBudgetFull, WrongStage, Conflict, StageDown):
        if cls.code == code:
            return cls(f"{what}: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return StageDown(f"{what}: {code.name}: {details}")
    return VlmeshError(f"{what}: {code.name}: {details}")
