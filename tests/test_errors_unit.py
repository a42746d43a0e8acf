"""The one error vocabulary (`vlmesh.errors`, used by the services, the client and the gateway):
every class survives a real gRPC round trip as itself, what happened picks the subclass only under
its own code, gRPC's own size refusal is a MessageTooLarge, downstream failures keep their code and
reason as the coordinator passes them on, and each class has its HTTP status at the gateway."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status

import services.common.errors as server_errors
import vlmesh
from services.gateway.errors import from_vlmesh_error
from vlmesh import errors

pytestmark = pytest.mark.timeout(60)

METHOD = "/test.Errors/Fail"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


class _Failing:
    """A real gRPC server whose one method aborts with what the test put in `self.error`, as a
    service's interceptor does (the google.rpc.Status trailer and the trace id trailer)."""

    def __init__(self, max_message_bytes: int | None = None) -> None:
        self.error: errors.VlmeshError | None = None
        options = [] if max_message_bytes is None else [("grpc.max_receive_message_length", max_message_bytes)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
        handler = grpc.unary_unary_rpc_method_handler(self._fail, request_deserializer=bytes, response_serializer=bytes)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Errors", {"Fail": handler})])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        assert self.error is not None
        status = rpc_status.to_status(self.error.to_status())
        context.abort_with_status(_Status(status.code, status.details, (*status.trailing_metadata, (errors.TRACE_ID_KEY, TRACE_ID))))
        return b""

    def call(self, payload: bytes = b"") -> grpc.RpcError:
        with grpc.insecure_channel(self.address) as channel:
            try:
                channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)(payload, timeout=10)
            except grpc.RpcError as err:
                return err
        raise AssertionError("the call succeeded")


@pytest.fixture(scope="module")
def failing() -> Iterator[_Failing]:
    server = _Failing(max_message_bytes=1 << 10)
    yield server
    server.server.stop(None)


# Every class the vocabulary exports.
RAISED = [
    c
    for c in (getattr(errors, n) for n in errors.__all__)
    if isinstance(c, type) and issubclass(c, errors.VlmeshError) and c is not errors.VlmeshError
]


@pytest.mark.parametrize("cls", RAISED, ids=lambda c: c.__name__)
def test_every_class_survives_a_round_trip(failing: _Failing, cls: type[errors.VlmeshError]) -> None:
    failing.error = cls("it went wrong")
    got = errors.from_rpc_error(failing.call())
    assert type(got) is cls
    assert (got.code, got.details, got.reason, got.trace_id) == (cls.code, "it went wrong", cls.default_reason, TRACE_ID)
    assert str(got) == "it went wrong"  # no code prefix to pile up as services pass it on


def test_a_reason_picks_its_class_only_under_its_own_code(failing: _Failing) -> None:
    failing.error = errors.ResourceExhausted("odd", reason="UNKNOWN_SESSION")  # NOT_FOUND's reason
    got = errors.from_rpc_error(failing.call())
    assert type(got) is errors.ResourceExhausted and got.reason == "UNKNOWN_SESSION"
    # A reason the vocabulary has no class for keeps its code's class, and the reason.
    failing.error = errors.NotFound("no such model", reason="MODEL_NOT_FOUND")
    got = errors.from_rpc_error(failing.call())
    assert type(got) is errors.NotFound and got.reason == "MODEL_NOT_FOUND"
    # A more precise cause of a thing the vocabulary names is that thing.
    failing.error = errors.NotFound("no KV", reason="KV_MISSING")
    got = errors.from_rpc_error(failing.call())
    assert type(got) is errors.UnknownSession and got.reason == "KV_MISSING"
    # Quota and KV budget: one code, two things that happened, both caught as ResourceExhausted.
    for cls in (errors.QuotaExceeded, errors.KVBudgetFull):
        failing.error = cls("full")
        with pytest.raises(vlmesh.ResourceExhausted) as info:
            raise errors.from_rpc_error(failing.call())
        assert type(info.value) is cls


def test_grpc_size_refusal_is_message_too_large(failing: _Failing) -> None:
    err = failing.call(b"x" * (2 << 10))  # over the server's 1 KiB
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own, no ErrorInfo
    got = errors.from_rpc_error(err)
    assert type(got) is errors.MessageTooLarge and got.reason == "MESSAGE_TOO_LARGE"
    assert "larger than max" in got.details
    assert from_vlmesh_error(got).status == 413
    # Passed on by a service, it stays what it is.
    passed = server_errors.from_rpc_error(err, "vision 127.0.0.1:1")
    assert type(passed) is errors.MessageTooLarge and passed.details.startswith("vision 127.0.0.1:1: ")


def test_downstream_failures_pass_on_unchanged(failing: _Failing) -> None:
    failing.error = errors.UnknownSession("no such session")
    got = server_errors.from_rpc_error(failing.call(), "stage 127.0.0.1:2")
    assert type(got) is errors.UnknownSession and got.reason == "UNKNOWN_SESSION"
    assert str(got) == "stage 127.0.0.1:2: no such session"
    # A callee that is gone, whatever it said why, is a StageDown the coordinator retries.
    for cls in (errors.ShuttingDown, errors.DeadlineExceeded, errors.Cancelled):
        failing.error = cls("bye")
        got = server_errors.from_rpc_error(failing.call(), "stage 127.0.0.1:2")
        assert type(got) is errors.StageDown, cls
    with grpc.insecure_channel("127.0.0.1:1") as channel:  # nobody listens
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(METHOD)(b"", timeout=5)
    got = server_errors.from_rpc_error(info.value, "stage 127.0.0.1:1")
    assert type(got) is errors.StageDown and got.reason == "STAGE_UNAVAILABLE"
    # A step's status (a stage answers each step of a batch with its own).
    step = errors.WrongStage("KV at 7, step at 9", reason="KV_POSITION_MISMATCH").to_status()
    got = server_errors.from_status(step, "stage 127.0.0.1:2")
    assert type(got) is errors.WrongStage and (got.reason, got.details) == ("KV_POSITION_MISMATCH", "stage 127.0.0.1:2: KV at 7, step at 9")
    # No ErrorInfo: the class's own reason, as if raised here (the wire always names one).
    got = server_errors.from_status(status_pb2.Status(code=grpc.StatusCode.ABORTED.value[0], message="busy"), "x")
    assert type(got) is errors.Aborted and got.reason == "ABORTED"


def test_wire_reasons_are_unchanged() -> None:
    # Programs match these strings (README, tests, users): they are the wire's.
    assert {
        cls.__name__: cls("x").reason
        for cls in (
            errors.InvalidArgument,
            errors.Unauthenticated,
            errors.UnknownSession,
            errors.KVBudgetFull,
            errors.WrongStage,
            errors.SessionBusy,
            errors.Cancelled,
            errors.DeadlineExceeded,
            errors.StageDown,
            errors.VlmeshError,
        )
    } == {
        "InvalidArgument": "INVALID_INPUT",
        "Unauthenticated": "UNAUTHENTICATED",
        "UnknownSession": "UNKNOWN_SESSION",
        "KVBudgetFull": "KV_BUDGET_FULL",
        "WrongStage": "WRONG_STAGE",
        "SessionBusy": "SESSION_BUSY",
        "Cancelled": "CANCELLED",
        "DeadlineExceeded": "DEADLINE_EXCEEDED",
        "StageDown": "STAGE_UNAVAILABLE",
        "VlmeshError": "INTERNAL",
    }
    # One hierarchy: the client's classes are the services'.
    assert vlmesh.StageDown is server_errors.StageDown and issubclass(vlmesh.ShuttingDown, vlmesh.Unavailable)


@pytest.mark.parametrize(
    "error, status, code",
    [
        (errors.InvalidArgument("bad"), 400, "invalid_input"),
        (errors.TooManyImages("17 images"), 400, "too_many_images"),  # the same request fails again
        (errors.Unauthenticated("who?"), 401, "invalid_api_key"),
        (errors.UnknownSession("gone"), 404, "unknown_session"),
        (errors.SessionBusy("busy"), 409, "session_busy"),
        (errors.MessageTooLarge("big"), 413, "message_too_large"),
        (errors.QuotaExceeded("quota"), 429, "quota_exceeded"),
        (errors.KVBudgetFull("full"), 429, "kv_budget_full"),
        (errors.ShuttingDown("draining"), 503, "shutting_down"),
        (errors.StageDown("down"), 503, "stage_unavailable"),
        (errors.DeadlineExceeded("slow"), 504, "deadline_exceeded"),
        (errors.Internal("bug"), 500, "internal"),
        (errors.VlmeshError("unclassified"), 500, "internal"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_http_status_of_each_class(error: errors.VlmeshError, status: int, code: str) -> None:
    api = from_vlmesh_error(error)
    assert (api.status, api.code) == (status, code)
    # 429 (which the openai SDK retries) is for quotas and load only.
    assert (api.status == 429) == isinstance(error, (errors.QuotaExceeded, errors.KVBudgetFull))
