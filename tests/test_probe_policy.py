"""The probe policy against real processes: a stage replica SIGSTOPped mid-stream for less than the
policy tolerates keeps its session (no failover: a GC pause or a long prefill chunk must not move
sessions), one stalled for longer is marked down by its probes, well before the hop timeout, and
the stream continues on the other replica. Both answers equal transformers' generate()."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from meshutil import reference, stage_holds, to_proto, wait_until
from procmesh import ProcMesh

from services.coordinator.replicas import ProbePolicy
from vlmesh.v1 import coordinator_pb2 as cpb

HEALTH_INTERVAL = 0.3
# The coordinator's policy: --health-interval and the default probe failures and timeout.
POLICY = ProbePolicy(interval=HEALTH_INTERVAL)
# Midway between a stall that surely misses a probe (one deadline after the next round began: a
# policy that fails over at the first miss would move the session) and the longest one the policy
# tolerates. The long one outlasts the policy's detection by seconds.
SHORT_STALL = (POLICY.interval + POLICY.deadline() + POLICY.tolerated_stall()) / 2
LONG_STALL = POLICY.detected_within() + 4.0
MAX_NEW = 48
STRIKE_AT = 3  # tokens into the answer
PROMPT = [{"role": "user", "content": "Tell me a long story about shapes and colours."}]


@dataclass(frozen=True)
class StalledRun:
    ids: list[int]
    victim: str  # address of the replica that was stopped
    other: str  # the other replica of its layer range
    pause: float  # the longest wait between two tokens after the SIGSTOP: how long the stream stood still
    log: str  # what the coordinator logged during the run


@pytest.fixture(scope="module")
def mesh(tiny_models):
    m = ProcMesh(
        str(tiny_models["a"]),
        [(0, 2), (2, 4)],
        replicas=2,
        # The hop timeout stays at its default (30 s): what moves a stalled replica's session here is the probes.
        coord_args=["--health-interval", str(HEALTH_INTERVAL), "--prefix-cache-sessions", "0"],
    ).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def expected(tiny_models) -> list[int]:
    ref = reference(tiny_models["a"])
    return ref.generate_ids(ref.prompt_ids(PROMPT), [], MAX_NEW)[0]


def all_up(mesh: ProcMesh, timeout: float = 30.0) -> cpb.GetMeshStatusResponse:
    deadline = time.monotonic() + timeout
    while True:
        status = mesh.status()
        if all(r.state == cpb.REPLICA_STATE_UP for r in status.stages):
            return status
        assert time.monotonic() < deadline, "a replica did not come back"
        time.sleep(0.2)


def stalled_turn(mesh: ProcMesh, session_id: str, stall: float) -> StalledRun:
    """One turn of the session; at its STRIKE_AT-th token a replica holding the session is
    SIGSTOPped, and resumed `stall` seconds later."""
    coordinator_log = Path(str(mesh.children["coordinator"].log))
    log_from = coordinator_log.stat().st_size
    ch, stub = mesh.stub()
    ids: list[int] = []
    struck: list[float] = []  # when the replica was stopped, then when each later token came
    victim = other = ""
    timer: threading.Timer | None = None
    with ch:
        for r in stub.Generate(cpb.GenerateRequest(messages=to_proto(PROMPT), session_id=session_id, max_tokens=MAX_NEW), timeout=120):
            if struck and r.token_ids:
                struck.append(time.monotonic())
            ids += list(r.token_ids)
            if len(ids) >= STRIKE_AT and not struck:
                stages = mesh.status().stages
                holder = next(s for s in stages if stage_holds(s.address, session_id))
                victim = holder.address
                other = next(s.address for s in stages if s.layers == holder.layers and s.address != victim)
                mesh.pause(mesh.stage_name(victim))
                struck.append(time.monotonic())
                timer = threading.Timer(stall, mesh.resume, args=(mesh.stage_name(victim),))
                timer.start()
    assert timer is not None, f"the answer has fewer than {STRIKE_AT} tokens"
    timer.join()
    pause = max((b - a for a, b in zip(struck, struck[1:])), default=0.0)
    return StalledRun(ids, victim, other, pause, coordinator_log.read_text()[log_from:])


def close(mesh: ProcMesh, session_id: str) -> None:
    ch, stub = mesh.stub()
    with ch:
        stub.CloseSession(cpb.CloseSessionRequest(session_id=session_id), timeout=10)


def pinned(mesh: ProcMesh, address: str) -> int:
    return next(s.pinned_sessions for s in all_up(mesh).stages if s.address == address)


def test_a_stall_shorter_than_the_policy_tolerates_does_not_fail_over(mesh, expected):
    ch, stub = mesh.stub()
    with ch:
        sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
    try:
        run = stalled_turn(mesh, sid, SHORT_STALL)
        assert run.pause > SHORT_STALL / 2, "the stall did not hold the stream up: the answer was done before it"
        assert run.ids == expected
        # The probes saw it (a policy that marks down at the first miss would have moved the session) ...
        assert f"stage {run.victim} missed a probe" in run.log
        # ... but nothing moved: the session is still on the replica that stalled, and only there.
        assert f"stage {run.victim} is down" not in run.log
        assert pinned(mesh, run.victim) == 1 and pinned(mesh, run.other) == 0
        assert stage_holds(run.victim, sid) and not stage_holds(run.other, sid)
        print(f"\nstall of {SHORT_STALL}s, tolerated: the stream stood still {run.pause:.2f}s and went on on the same replica")
    finally:
        close(mesh, sid)


def test_a_longer_stall_fails_over_through_the_probes_with_the_same_answer(mesh, expected):
    ch, stub = mesh.stub()
    with ch:
        sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
    try:
        run = stalled_turn(mesh, sid, LONG_STALL)
        assert run.ids == expected
        assert f"stage {run.victim} is down: no answer" in run.log  # the probes, not the 30 s hop timeout
        assert run.pause < LONG_STALL  # it went on without waiting for the stalled replica
        assert pinned(mesh, run.other) == 1 and pinned(mesh, run.victim) == 0  # (both up again)
        assert stage_holds(run.other, sid)
        # The stalled replica answers again with the moved session's KV: it is given back at once,
        # not when its lease runs out (60 s).
        wait_until(lambda: not stage_holds(run.victim, sid), 5, f"{run.victim} to release the session moved away from it")
        print(
            f"\nstall of {LONG_STALL}s: the stream stood still {run.pause:.2f}s and went on on the other replica "
            f"(policy: tolerates {POLICY.tolerated_stall():.1f}s, down within {POLICY.detected_within():.1f}s)"
        )
    finally:
        close(mesh, sid)
