"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the HTTP status
of each failure: the gateway's own, and those the coordinator reports, by their class in the mesh's
one error vocabulary (`vlmesh.errors`)."""

from __future__ import annotations

from typing import Any

from vlmesh import errors as mesh

# Error class -> (HTTP status, OpenAI error type, code when the server gave no ErrorInfo reason).
# Looked up along the error's class hierarchy, so what happened (a subclass) can answer otherwise
# than its gRPC code: 429 is for quotas and load only, which the openai SDK retries; a message
# too large or too many images would fail the same way again.
_HTTP: dict[type[mesh.VlmeshError], tuple[int, str, str | None]] = {
    mesh.InvalidArgument: (400, "invalid_request_error", None),
    mesh.OutOfRange: (400, "invalid_request_error", None),
    mesh.FailedPrecondition: (400, "invalid_request_error", None),
    mesh.TooManyImages: (400, "invalid_request_error", None),
    mesh.Unauthenticated: (401, "authentication_error", "invalid_api_key"),
    mesh.PermissionDenied: (403, "permission_error", None),
    mesh.NotFound: (404, "not_found_error", None),
    mesh.Aborted: (409, "conflict_error", None),
    mesh.AlreadyExists: (409, "conflict_error", None),
    mesh.MessageTooLarge: (413, "invalid_request_error", "request_too_large"),
    mesh.ResourceExhausted: (429, "rate_limit_error", "resource_exhausted"),
    mesh.Unimplemented: (501, "server_error", None),
    mesh.Unavailable: (503, "server_error", "unavailable"),
    # The coordinator cancels calls when it shuts down; the caller may simply try again.
    mesh.Cancelled: (503, "server_error", "unavailable"),
    mesh.DeadlineExceeded: (504, "timeout_error", "timeout"),
}
_SERVER_ERROR = (500, "server_error", None)


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


def http_status(err: mesh.VlmeshError) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI error type, default code) of a mesh error."""
    return next((_HTTP[cls] for cls in type(err).__mro__ if cls in _HTTP), _SERVER_ERROR)


def from_vlmesh_error(err: mesh.VlmeshError) -> ApiError:
    """The API error for a failed coordinator call (its ErrorInfo reason becomes the code)."""
    status, kind, code = http_status(err)
    if err.reason and code != "invalid_api_key":  # clients look for OpenAI's own code on a 401
        code = err.reason.lower()
    return ApiError(status, err.details, type=kind, code=code, trace_id=err.trace_id)
