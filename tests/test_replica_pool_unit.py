"""The replica pool that stages and vision share: the probe policy (a connected replica is down only
after K unanswered probes in a row, a refused one at once), the events it tells subscribers, and
the watch's cadence, on a fake clock with scripted probes; then the probe's classification and
its step-derived deadline against real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.coordinator.replicas import (
    Outcome,
    Probe,
    ProbePolicy,
    Replica,
    ReplicaEvent,
    ReplicaPool,
    ReplicaRecovered,
    ReplicaRestarted,
)
from services.coordinator.stage_client import Mesh, StageReplica
from services.coordinator.vision_client import VisionInstance
from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

ANSWER = Probe(Outcome.ANSWERED, instance="one")
SILENT = Probe(Outcome.NO_ANSWER, detail="no answer")
REFUSED = Probe(Outcome.GONE, detail="UNAVAILABLE")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Stop(Exception):
    """Ends a watch after the rounds a test wanted."""


class Scripted(Replica):
    """Answers its probes from a script (ANSWER once the script is used up)."""

    kind = "fake"

    def __init__(self, address: str, script: list[Probe] | None = None):
        super().__init__(address)
        self.script = deque(script or [])
        self.deadlines: list[float] = []
        self.losses: list[str] = []

    async def check(self, timeout: float) -> Probe:
        self.deadlines.append(timeout)
        return self.script.popleft() if self.script else ANSWER

    def lost(self, why: str) -> None:
        self.losses.append(why)


class Stalling(Replica):
    """A replica stalled from `t0` for `length` seconds of the fake clock: a probe started in the
    stall is answered when it ends, or gives up at its deadline, and the clock moves with it."""

    kind = "fake"

    def __init__(self, address: str, clock: Clock, t0: float, length: float):
        super().__init__(address)
        self.clock, self.t0, self.t1 = clock, t0, t0 + length

    async def check(self, timeout: float) -> Probe:
        s = self.clock.now
        if not self.t0 <= s < self.t1:
            return ANSWER
        if self.t1 <= s + timeout:
            self.clock.now = self.t1
            return ANSWER
        self.clock.now = s + timeout
        return SILENT


class Pool(ReplicaPool[Replica]):
    kind = "fake"

    def __init__(self, make: Callable[[str], Replica], policy: ProbePolicy, spec: str = "127.0.0.1:1", **kw):
        super().__init__(spec, policy, **kw)
        self.make = make

    def _make(self, address: str) -> Replica:
        return self.make(address)


def pool_of(rep: Replica, policy: ProbePolicy = ProbePolicy(), **kw) -> tuple[Pool, list[ReplicaEvent]]:
    pool = Pool(lambda a: rep, policy, spec=rep.address, **kw)
    events: list[ReplicaEvent] = []
    pool.subscribe(events.append)
    return pool, events


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------- the policy


def test_a_connected_replica_is_down_only_after_k_unanswered_probes_in_a_row():
    rep = Scripted("r:1", [ANSWER, SILENT, SILENT, ANSWER, SILENT, SILENT, SILENT])
    pool, events = pool_of(rep, ProbePolicy(failures=3))

    async def go() -> list[tuple[bool, int]]:
        seen = []
        for _ in range(7):
            await pool.round()
            seen.append((rep.up, rep.health.missed))
        return seen

    seen = run(go())
    # Two misses, then an answer: still up, the count starts again; three misses: down, once.
    assert seen == [(True, 0), (True, 1), (True, 2), (True, 0), (True, 1), (True, 2), (False, 3)]
    assert len(rep.losses) == 1 and "down" in rep.losses[0]
    assert events == []


def test_a_refused_connection_is_down_at_once_and_so_is_a_broken_call():
    rep = Scripted("r:1", [ANSWER, REFUSED])
    pool, _ = pool_of(rep, ProbePolicy(failures=5))

    async def go() -> None:
        await pool.round()
        assert rep.up
        await pool.round()
        assert not rep.up and len(rep.losses) == 1
        await pool.round()  # answers again
        assert rep.up
        rep.mark_down("stage r:1 closed the stream")  # what a broken Forward stream does
        assert not rep.up and rep.losses[-1] == "stage r:1 closed the stream"

    run(go())


def test_a_replica_that_answers_again_as_the_same_process_is_recovered_and_a_new_one_restarted():
    two, three = Probe(Outcome.ANSWERED, instance="two"), Probe(Outcome.ANSWERED, instance="three")
    rep = Scripted("r:1", [ANSWER, SILENT, SILENT, ANSWER, REFUSED, two, three])
    pool, events = pool_of(rep, ProbePolicy(failures=2))

    async def go() -> None:
        for _ in range(7):
            await pool.round()
        rep.mark_down("step past the hop timeout")
        rep.script.append(three)
        await pool.round()  # the same process answers again

    run(go())
    # down (2 misses) -> same id: recovered; refused -> new id: restarted; up and a new id at
    # once (restarted between two probes): restarted; marked down by a call -> same id: recovered.
    assert events == [ReplicaRecovered("r:1"), ReplicaRestarted("r:1"), ReplicaRestarted("r:1"), ReplicaRecovered("r:1")]
    assert sum("restarted" in w for w in rep.losses) == 2  # its stream is dropped: the KV behind it is gone


def test_a_service_without_instance_ids_is_recovered_never_restarted():
    rep = Scripted("v:1", [Probe(Outcome.ANSWERED), REFUSED, Probe(Outcome.ANSWERED)])
    pool, events = pool_of(rep)

    async def go() -> None:
        for _ in range(3):
            await pool.round()

    run(go())
    assert events == [ReplicaRecovered("v:1")]


def test_subscribers_each_get_every_event_and_one_that_raises_harms_nothing(caplog):
    rep = Scripted("r:1", [ANSWER, REFUSED, ANSWER, REFUSED, ANSWER])
    pool, first = pool_of(rep)
    later: list[ReplicaEvent] = []

    def broken(event: ReplicaEvent) -> None:
        raise RuntimeError("subscriber bug")

    pool.subscribe(broken)
    unsubscribe = pool.subscribe(later.append)

    async def go() -> None:
        for _ in range(3):
            await pool.round()
        unsubscribe()
        for _ in range(2):
            await pool.round()

    with caplog.at_level(logging.ERROR):
        run(go())
    assert first == [ReplicaRecovered("r:1")] * 2
    assert later == [ReplicaRecovered("r:1")]  # until it unsubscribed
    assert sum("subscriber" in r.getMessage() and r.exc_info is not None for r in caplog.records) == 2


def test_a_probe_on_demand_brings_a_replica_up_but_never_counts_a_miss_and_a_stale_failure_is_ignored():
    """A refresh overlaps the watch's round: its silence must not double a stall's misses, and
    the round's failure, sent before the refresh's answer, must not mark down what just answered."""

    class Gated(Scripted):
        def __init__(self, address: str):
            super().__init__(address)
            self.gates: deque[tuple[asyncio.Event, Probe]] = deque()

        async def check(self, timeout: float) -> Probe:
            gate, probe = self.gates.popleft()
            await gate.wait()
            return probe

    async def go() -> list[tuple[bool, int]]:
        clock = Clock()
        rep = Gated("r:1")
        pool, _ = pool_of(rep, ProbePolicy(failures=2), clock=clock)
        seen = []
        first, second = asyncio.Event(), asyncio.Event()
        rep.gates.extend([(first, ANSWER)])
        first.set()
        await pool.probe([rep])
        seen.append((rep.up, rep.health.missed))
        rep.gates.extend([(asyncio.Event(), SILENT)])
        rep.gates[0][0].set()
        await pool.probe([rep], count_misses=False)  # a refresh that got no answer
        seen.append((rep.up, rep.health.missed))
        # The round's probe is sent, then a refresh's; the refresh is answered first, the round's gives up.
        rep.gates.extend([(second, REFUSED), (first, ANSWER)])
        clock.now += 1
        round_ = asyncio.ensure_future(pool.probe([rep]))
        await asyncio.sleep(0)
        clock.now += 0.5
        await pool.probe([rep], count_misses=False)
        second.set()
        await round_
        seen.append((rep.up, rep.health.missed))
        return seen

    assert run(go()) == [(True, 0), (True, 0), (True, 0)]


def test_policy_settings_are_checked():
    for bad in (dict(failures=0), dict(interval=0), dict(timeout=-1), dict(step_factor=-1)):
        with pytest.raises(ValueError):
            ProbePolicy(**bad)


# ---------------------------------------------------------------------------------------------- the watch on a fake clock


def watch_until(pool: Pool, clock: Clock, until: float, sleeps: list[float] | None = None) -> None:
    async def sleep(d: float) -> None:
        if sleeps is not None:
            sleeps.append(d)
        clock.now += d
        if clock.now > until:
            raise Stop

    pool._sleep = sleep  # the pool was built with the real sleep; the watch reads it per round

    async def go() -> None:
        with pytest.raises(Stop):
            await pool.watch()

    run(go())


def stall_outcome(policy: ProbePolicy, length: float, phase: float) -> float | None:
    """Watch a replica stalled for `length` s that begins `phase` s after its second round began
    (its first was answered); returns when it was marked down (seconds after the stall began), or None."""
    clock = Clock()
    t0 = clock.now + policy.interval + phase
    rep = Stalling("r:1", clock, t0, length)
    down_at: list[float] = []

    class Watched(Pool):
        def _probed(self, r: Replica, change) -> None:
            if change is not None and change.name == "DOWN":
                down_at.append(clock.now - t0)

    pool = Watched(lambda a: rep, policy, spec="r:1", clock=clock)
    watch_until(pool, clock, t0 + length + 5 * policy.interval + 5 * policy.timeout)
    return down_at[0] if down_at else None


@pytest.mark.parametrize("phase", [0.0, 0.05, 0.15, 0.29])
def test_a_stall_below_the_policys_threshold_never_fails_over_and_a_longer_one_does_in_time(phase):
    policy = ProbePolicy(interval=0.3, failures=3, timeout=1.0)
    assert policy.tolerated_stall() == pytest.approx(3.0)
    assert stall_outcome(policy, 1.5, phase) is None  # one missed probe
    assert stall_outcome(policy, policy.tolerated_stall() - 0.01, phase) is None
    down = stall_outcome(policy, policy.detected_within() + 0.01, phase)
    assert down is not None and policy.tolerated_stall() <= down <= policy.detected_within()
    down = stall_outcome(policy, 60.0, phase)
    assert down is not None and down <= policy.detected_within()


def test_without_the_policy_a_short_stall_fails_over():
    """The same 1.5 s stall under 'down at the first unanswered probe' fails over: what the
    policy prevents."""
    assert stall_outcome(ProbePolicy(interval=0.3, failures=1, timeout=1.0), 1.5, 0.1) is not None


def test_defaults_tolerate_a_3s_stall_and_detect_one_within_4s():
    policy = ProbePolicy()
    assert (policy.interval, policy.failures, policy.timeout) == (1.0, 3, 1.0)
    assert (policy.tolerated_stall(), policy.detected_within()) == (3.0, 4.0)
    assert stall_outcome(policy, 2.9, 0.5) is None
    down = stall_outcome(policy, 30.0, 0.5)
    assert down is not None and 3.0 <= down <= 4.0


def test_rounds_start_every_interval_and_a_failing_round_does_not_end_the_watch():
    clock = Clock()

    class Flaky(Scripted):
        async def check(self, timeout: float) -> Probe:
            self.deadlines.append(timeout)
            if len(self.deadlines) == 2:
                raise RuntimeError("a bug in one round")
            if len(self.deadlines) == 3:
                clock.now += timeout  # a probe that waited for its deadline
                return SILENT
            return ANSWER

    rep = Flaky("r:1")
    pool, _ = pool_of(rep, ProbePolicy(interval=0.5, timeout=2.0), clock=clock)
    sleeps: list[float] = []
    watch_until(pool, clock, clock.now + 4.0, sleeps)
    assert len(rep.deadlines) >= 5  # the round that raised did not end the watch
    assert sleeps[:4] == [0.5, 0.5, 0.0, 0.5]  # after the 2 s probe the next round starts at once


# ---------------------------------------------------------------------------------------------- real gRPC servers


class FakeStage(stage_pb2_grpc.StageServiceServicer):
    """GetInfo that can be made to hang (a stalled process on a live connection), and a Forward
    whose steps report `compute_us`."""

    def __init__(self, compute_us: int = 0):
        self.stalled = asyncio.Event()
        self.compute_us = compute_us

    async def GetInfo(self, request, context):
        if self.stalled.is_set():
            await asyncio.sleep(3600)
        return stage_pb2.GetInfoResponse(layer_start=0, layer_end=2, num_layers=2, instance_id="stage-a")

    async def Forward(self, request_iterator, context):
        async for request in request_iterator:
            yield stage_pb2.ForwardResponse(outputs=[stage_pb2.StepOutput() for _ in request.steps], compute_us=self.compute_us)


async def serve_stage(servicer: FakeStage) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_silent_stage_is_no_answer_and_a_stopped_one_is_gone():
    async def go() -> tuple[Outcome, Outcome, Outcome]:
        servicer = FakeStage()
        server, address = await serve_stage(servicer)
        rep = StageReplica(address, None)
        try:
            answered = (await rep.check(2.0)).outcome
            assert rep.layers == (0, 2)
            servicer.stalled.set()
            silent = (await rep.check(0.3)).outcome
            await server.stop(0)
            gone = (await rep.check(0.5)).outcome
        finally:
            await rep.close()
        return answered, silent, gone

    assert run(go()) == (Outcome.ANSWERED, Outcome.NO_ANSWER, Outcome.GONE)


def test_a_stage_with_slow_steps_gets_a_longer_probe_deadline():
    async def go() -> tuple[float, float]:
        server, address = await serve_stage(FakeStage(compute_us=3_000_000))
        rep = StageReplica(address, None)
        policy = ProbePolicy(timeout=1.0, step_factor=2.0)
        try:
            before = rep.probe_deadline(policy)
            req = stage_pb2.ForwardRequest()
            req.steps.add(session_id="s")
            await rep.forward(req, timeout=5.0)
            return before, rep.probe_deadline(policy)
        finally:
            await rep.close()
            await server.stop(0)

    assert run(go()) == (1.0, 6.0)


def test_the_mesh_waits_for_coverage_and_prefers_a_replica_that_answered_its_last_probe():
    async def go() -> tuple[str, str, str]:
        a, b = FakeStage(), FakeStage()
        (sa, addr_a), (sb, addr_b) = await serve_stage(a), await serve_stage(b)
        mesh = Mesh(f"{addr_a},{addr_b}", None, num_layers=2, policy=ProbePolicy(interval=60.0, timeout=0.3, failures=3))
        try:
            await mesh.connect(10.0)
            assert [(g.label, len(g.replicas)) for g in mesh.ranges] == [("0:2", 2)]
            load = {addr_a: 0, addr_b: 1}
            least = mesh.pick(0, load=lambda r: load[r.address]).address
            a.stalled.set()  # the least loaded one stops answering: a round's miss, still up
            await mesh.probe_all()
            assert mesh.replicas[addr_a].up and mesh.replicas[addr_a].health.suspect
            suspect = mesh.pick(0, load=lambda r: load[r.address]).address
            a.stalled.clear()
            await mesh.refresh(0)  # answered again
            again = mesh.pick(0, load=lambda r: load[r.address]).address
            return least, suspect, again
        finally:
            await mesh.close()
            await asyncio.gather(sa.stop(0), sb.stop(0))

    least, suspect, again = run(go())
    assert least != suspect and least == again


def test_a_vision_instance_that_says_not_serving_is_down():
    async def go() -> tuple[Outcome, Outcome]:
        server = grpc.aio.server()
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        inst = VisionInstance(f"127.0.0.1:{port}", None)
        try:
            await hs.set("", health_pb2.HealthCheckResponse.SERVING)
            serving = (await inst.check(2.0)).outcome
            await hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            not_serving = (await inst.check(2.0)).outcome
        finally:
            await inst.close()
            await server.stop(0)
        return serving, not_serving

    assert run(go()) == (Outcome.ANSWERED, Outcome.GONE)


def test_connect_gives_up_with_what_is_missing():
    from services.common.errors import StageDown

    clock = Clock()

    async def sleep(d: float) -> None:
        clock.now += d

    rep = Scripted("r:1", [REFUSED] * 100)
    pool = Pool(lambda a: rep, ProbePolicy(), spec="r:1", clock=clock, sleep=sleep)
    with pytest.raises(StageDown, match="no fake replica of r:1 is up after 5s"):
        run(pool.connect(5.0))
    assert len(rep.script) < 100 - 5 / 0.2  # it tried every 0.2 s of the fake clock until the wait was over
