"""vlmesh client: talk to a vlmesh coordinator over gRPC.

    from vlmesh import Client

    with Client("127.0.0.1:50051") as client:
        print(client.chat("Hello!").text)

Depends only on grpcio (with its health and status packages), protobuf and pillow (no torch,
no transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The services install this package too (for vlmesh.v1) and import it on every start; loading
# the client lazily keeps `import vlmesh.v1...` cheap there and isolates them from client code.
_EXPORTS = {
    "load_image": "._messages",
    "load_video": "._messages",
    "ChatEvent": "._results",
    "ChatResult": "._results",
    "ToolCall": "._results",
    "Prompt": "._messages",
    "ModelInfo": "._results",
    "TokenLogprob": "._results",
    "TokenLogprobs": "._results",
    "Usage": "._results",
    "DEFAULT_ADDRESS": ".client",
    "AsyncClient": ".client",
    "AsyncSession": ".client",
    "Client": ".client",
    "SamplingOptions": ".sampling",
    "GenerateOptions": ".client",
    "Session": ".client",
    "VlmeshError": ".errors",
    "Cancelled": ".errors",
    "Unknown": ".errors",
    "InvalidArgument": ".errors",
    "DeadlineExceeded": ".errors",
    "NotFound": ".errors",
    "AlreadyExists": ".errors",
    "PermissionDenied": ".errors",
    "ResourceExhausted": ".errors",
    "FailedPrecondition": ".errors",
    "Aborted": ".errors",
    "OutOfRange": ".errors",
    "Unimplemented": ".errors",
    "Internal": ".errors",
    "Unavailable": ".errors",
    "DataLoss": ".errors",
    "Unauthenticated": ".errors",
    "UnknownSession": ".errors",
    "KVBudgetFull": ".errors",
    "QuotaExceeded": ".errors",
    "TooManyImages": ".errors",
    "MessageTooLarge": ".errors",
    "WrongStage": ".errors",
    "SessionBusy": ".errors",
    "StageDown": ".errors",
    "ShuttingDown": ".errors",
}

if TYPE_CHECKING:
    from ._messages import load_image, load_video
    from ._results import ChatEvent, ChatResult, ModelInfo, TokenLogprob, TokenLogprobs, Usage
    from .client import DEFAULT_ADDRESS, AsyncClient, AsyncSession, Client, GenerateOptions, Session
    from .errors import (
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
    )
    from .sampling import SamplingOptions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "SamplingOptions",
    "DEFAULT_ADDRESS",
    "Client",
    "AsyncClient",
    "Session",
    "AsyncSession",
    "GenerateOptions",
    "ChatResult",
    "ToolCall",
    "Prompt",
    "ChatEvent",
    "Usage",
    "TokenLogprob",
    "TokenLogprobs",
    "ModelInfo",
    "load_image",
    "load_video",
    "VlmeshError",
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
    "UnknownSession",
    "KVBudgetFull",
    "QuotaExceeded",
    "TooManyImages",
    "MessageTooLarge",
    "WrongStage",
    "SessionBusy",
    "StageDown",
    "ShuttingDown",
]
