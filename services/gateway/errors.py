"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the HTTP status
of each failure, including those the coordinator reports as gRPC statuses."""

from __future__ import annotations

from typing import Any

import grpc

from vlmesh import VlmeshError

# gRPC status -> (HTTP status, OpenAI error type, code when the server gave no ErrorInfo reason)
_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", None),
    grpc.StatusCode.ABORTED: (409, "conflict_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "resource_exhausted"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    # The coordinator cancels calls when it shuts down; the caller may simply try again.
    grpc.StatusCode.CANCELLED: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
}


class ApiError(Exception):
    """A failed request as the API reports it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.trace_id = trace_id

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400: the request itself is wrong."""
    return ApiError(400, message, param=param, code=code)


def from_vlmesh_error(err: VlmeshError) -> ApiError:
    """The API error for a failed coordinator call (its ErrorInfo reason becomes the code)."""
    status, kind, code = _BY_STATUS.get(err.code, (500, "server_error", None))
    if err.reason and code != "invalid_api_key":  # clients look for OpenAI's own code on a 401
        code = err.reason.lower()
    return ApiError(status, err.details, type=kind, code=code, trace_id=err.trace_id)
