"""The coordinator's session limits on a real mesh: a global cap on live sessions and a per-client
rate of creation, each refused with RESOURCE_EXHAUSTED and a reason, while the mesh keeps serving."""

from __future__ import annotations

import grpc
import pytest
from meshutil import start_mesh

from services.common.errors import reason_of
from services.shapes import SHIPPED_MODEL
from vlmesh.v1 import coordinator_pb2 as cpb

QUESTION = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def mesh():
    # Five creations at once, then one per 100 s; at most three live sessions.
    m = start_mesh(SHIPPED_MODEL, [(0, 4)], coord_kw={"max_sessions": 3, "session_rate": 0.01, "session_burst": 5})
    yield m
    m.stop()


def _refusal(call) -> tuple[grpc.StatusCode, str | None, str]:
    from google.rpc import status_pb2

    with pytest.raises(grpc.RpcError) as err:
        call()
    e = err.value
    trailer = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")
    reason = reason_of(status_pb2.Status.FromString(trailer)) if trailer else None
    return e.code(), reason, e.details()


def test_the_session_cap_and_the_creation_rate_refuse_and_the_mesh_keeps_serving(mesh):
    create = lambda: mesh.stub.CreateSession(cpb.CreateSessionRequest(), timeout=10).session_id  # noqa: E731
    live = [create() for _ in range(3)]
    code, reason, details = _refusal(create)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_LIMIT") and "--max-sessions" in details
    # The cap refuses new sessions only: the live ones and one-shot requests are served.
    _, text, last = mesh.generate(QUESTION, session_id=live[0], max_tokens=3)
    assert last.usage.completion_tokens > 0
    assert mesh.generate(QUESTION, max_tokens=3)[2].usage.completion_tokens > 0
    assert mesh.stub.CloseSession(cpb.CloseSessionRequest(session_id=live.pop()), timeout=10).existed
    live.append(create())  # room again (the fifth creation of the burst)
    assert mesh.stub.CloseSession(cpb.CloseSessionRequest(session_id=live.pop()), timeout=10).existed
    code, reason, details = _refusal(create)  # the burst is spent: the rate refuses, not the cap
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_RATE") and "--session-rate" in details
    assert mesh.generate(QUESTION, session_id=live[0], max_tokens=3)[2].usage.completion_tokens > 0
