"""The engine with no model and no network: a fake runner, a fake mesh, a fake preparer and an
injected clock. Each test drives the engine's loop through its inbox and checks what it applies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from services.common import tensors
from services.common.errors import DeadlineExceeded, ResourceExhausted, StageDown, UnknownSession, VlmeshError
from services.coordinator.batch import BatchOutcome, Lost, MicroBatch, StepOutcome
from services.coordinator.engine import Engine, EngineConfig
from services.coordinator.kv_log import KVLog
from services.coordinator.prepare import Prepared
from services.coordinator.replicas import ReplicaRecovered, ReplicaRestarted
from services.coordinator.request import GenerateParams, RequestSpec, Stream
from services.coordinator.scheduler import SchedulerConfig
from services.coordinator.stage_client import StageRange
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import coordinator_pb2, tensor_pb2

LAYERS = ((0, 2), (2, 4))
TEXT_CONFIG = SimpleNamespace(num_key_value_heads=1, head_dim=2, hidden_size=4, num_attention_heads=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeReplica:
    address: str
    layers: tuple[int, int]
    up: bool = True
    restored: list[tuple[str, int]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None  # restores wait on it when set

    @property
    def info(self):
        return SimpleNamespace(dtype="float32", kv_budget_bytes=1 << 30, lease_seconds=60.0, deepstack_layers=())

    async def restore(self, session_id: str, positions: int, entries, timeout: float) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.restored.append((session_id, positions))

    async def release(self, session_id: str) -> None:
        self.released.append(session_id)

    async def renew(self, ids: list[str]) -> list[str]:
        return []


class FakeMesh:
    def __init__(self, replicas_per_range: int = 2):
        self.ranges = [StageRange(a, b) for a, b in LAYERS]
        self.replicas: dict[str, FakeReplica] = {}
        for g in self.ranges:
            for k in range(replicas_per_range):
                rep = FakeReplica(f"r{g.start}-{k}", (g.start, g.end))
                g.replicas.append(rep)  # type: ignore[arg-type]
                self.replicas[rep.address] = rep
        self.subscribers: list = []

    def subscribe(self, fn) -> None:
        self.subscribers.append(fn)

    async def refresh(self, index: int) -> None:
        pass

    def pick(self, index: int, exclude=frozenset(), load=None):
        up = [r for r in self.ranges[index].up() if r.address not in exclude]
        if not up:
            raise StageDown(f"no replica of layers {self.ranges[index].label} is up")
        return min(up, key=load) if load else up[0]


class FakePreparer:
    """Tokens are the prompt's characters; positions are text positions."""

    max_positions = 4096
    deepstack_layers = 0
    prompts = SimpleNamespace(placeholder_ids=set())

    gate: asyncio.Event | None = None  # prepare waits on it when set

    async def prepare(self, spec: RequestSpec, s) -> Prepared:
        if self.gate is not None:
            await self.gate.wait()
        text = "".join(p["text"] for m in spec.messages for p in m["content"])
        new = tuple(ord(c) for c in text)
        history = len(s.token_ids) + len(new)
        return Prepared(new, (), 0, (), torch.arange(history).expand(3, -1).clone(), 0)

    async def encode(self, inputs, deadline, ctx):
        return []


class Tokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(chr(i) for i in ids)


def _delta(layer: int, start: int, n: int) -> tensor_pb2.KVDelta:
    t = tensors.to_proto(torch.zeros(1, n, 2))
    return tensor_pb2.KVDelta(layer=layer, start_position=start, key=t, value=t)


class FakeRunner:
    """Samples token 'x' (120) every time; KV deltas for every layer; may lose a step once."""

    hop_timeout = 1.0

    def __init__(self) -> None:
        self.batches: list[MicroBatch] = []
        self.lose: dict[int, tuple[int, bool]] = {}  # the n-th step executed (0-based) -> (range lost, replica down)
        self.steps = 0
        self.gate: asyncio.Event | None = None
        self.mesh: FakeMesh | None = None  # told when a replica goes down

    async def execute(self, batch: MicroBatch) -> BatchOutcome:
        self.batches.append(batch)
        if self.gate is not None:
            await self.gate.wait()
        out = []
        for p in batch.steps:
            lose = self.lose.pop(self.steps, None)
            self.steps += 1
            if lose is not None:
                index, down = lose
                address = p.replicas[index]
                if down and self.mesh is not None:
                    self.mesh.replicas[address].up = False
                out.append(StepOutcome(lost=Lost(index, address, "down" if down else "forgot", replica_down=down)))
                continue
            deltas = tuple(_delta(layer, p.start, len(p.token_ids)) for layer in range(4))
            token = stage_pb2.SampledToken(token_id=120) if p.sample is not None else None
            out.append(StepOutcome(token=token, kv_deltas=deltas))
        return BatchOutcome(batch, tuple(out), 0.01)


def _engine(clock: Clock, runner: FakeRunner | None = None, mesh: FakeMesh | None = None, **cfg) -> tuple[Engine, FakeRunner, FakeMesh]:
    runner = runner or FakeRunner()
    mesh = mesh or FakeMesh()
    runner.mesh = mesh
    config = EngineConfig(scheduler=SchedulerConfig(chunk_tokens=64), prefix_cache_sessions=0, **cfg)
    engine = Engine(config, mesh, FakePreparer(), Tokenizer(), {0}, KVLog(1 << 20), None, runner, TEXT_CONFIG, clock=clock)  # type: ignore[arg-type]
    return engine, runner, mesh


def _spec(clock: Clock, text: str = "hi", *, session_id: str = "", max_tokens: int = 3, rid: str = "", deadline: float | None = None) -> RequestSpec:
    params = GenerateParams(tensor_pb2.SamplingParams(), max_tokens, (), 0, False)
    messages = ({"role": "user", "content": [{"type": "text", "text": text}]},)
    return RequestSpec(rid or f"req-{text}-{clock.now}", session_id, "", messages, (), params, deadline, None, clock.now)


async def _drain(stream: Stream, timeout: float = 5.0) -> tuple[str, object]:
    """(streamed text, the final response or the error)."""
    text, last = "", None
    while True:
        item = await asyncio.wait_for(stream.items.get(), timeout)
        if item is None:
            return text, last
        if isinstance(item, VlmeshError) or item.finish_reason:
            last = item
        else:
            text += item.text


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_request_runs_to_its_length_and_the_runner_sees_only_ids():
    async def main():
        clock = Clock()
        engine, runner, _ = _engine(clock)
        engine.start()
        text, final = await _drain(engine.add(_spec(clock, "hi", max_tokens=3)))
        await engine.stop()
        return text, final, runner.batches

    text, final, batches = _run(main())
    assert text == "xxx"
    assert final.finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
    assert final.usage.prompt_tokens == 2 and final.usage.completion_tokens == 3
    first = batches[0].steps[0]
    assert first.token_ids == (ord("h"), ord("i")) and first.start == 0 and first.sample is not None
    assert len(first.replicas) == 2 and all(isinstance(a, str) for a in first.replicas)
    assert [b.steps[0].start for b in batches] == [0, 2, 3]  # prompt, then two decode steps


def test_a_lost_hop_restores_the_range_elsewhere_and_steps_again_with_rewind():
    async def main():
        clock = Clock()
        engine, runner, mesh = _engine(clock)
        runner.lose[1] = (1, True)  # the second step (the first decode) loses range 1: its replica is down
        engine.start()
        stream = engine.add(_spec(clock, "hey", max_tokens=3))
        text, final = await _drain(stream)
        dead = runner.batches[0].steps[0].replicas[1]
        await engine.stop()
        return text, final, runner.batches, mesh, dead

    text, final, batches, mesh, dead = _run(main())
    assert text == "xxx" and final.finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
    retry = batches[2].steps[0]
    assert retry.start == batches[1].steps[0].start == 3 and retry.rewind
    assert retry.replicas[1] != dead
    other = mesh.replicas[retry.replicas[1]]
    assert other.restored and other.restored[0][1] == 3  # restored from the KV log, no replay
    assert batches[3].steps[0].rewind is False


def test_a_restore_does_not_stall_the_sessions_batched_beside_it():
    async def main():
        clock = Clock()
        engine, runner, mesh = _engine(clock)
        engine.start()
        slow = engine.add(_spec(clock, "aa", max_tokens=4, rid="slow"))
        fast = engine.add(_spec(clock, "bb", max_tokens=4, rid="fast"))
        gate = asyncio.Event()
        for rep in mesh.replicas.values():
            rep.gate = gate  # every restore waits until we open it
        runner.lose[2] = (1, False)  # slow's first decode: the replica forgot its KV
        fast_text, _ = await _drain(fast)  # finishes while the other's restore is still blocked
        gate.set()
        slow_text, _ = await _drain(slow)
        await engine.stop()
        return fast_text, slow_text

    fast_text, slow_text = _run(main())
    assert fast_text == "xxxx" and slow_text == "xxxx"


def test_a_step_lost_more_than_max_recoveries_times_fails_the_request():
    async def main():
        clock = Clock()
        engine, runner, _ = _engine(clock)
        for n in range(10):
            runner.lose[n] = (0, False)
        engine.start()
        _, err = await _drain(engine.add(_spec(clock, "a")))
        await engine.stop()
        return err

    err = _run(main())
    assert isinstance(err, StageDown) and "in a row" in str(err)


def test_deadlines_and_idle_sessions_follow_the_injected_clock():
    async def main():
        clock = Clock()
        runner = FakeRunner()
        runner.gate = asyncio.Event()  # steps never return until opened
        engine, _, _ = _engine(clock, runner=runner, session_ttl=60.0, housekeeping_s=0.01)
        engine.start()
        sid = await engine.create_session("")
        stream = engine.add(_spec(clock, "a", deadline=clock.now + 5))
        while not runner.batches:
            await asyncio.sleep(0)
        clock.now += 10  # past the deadline and nothing else
        await asyncio.sleep(0.05)
        runner.gate.set()
        _, err = await _drain(stream)
        assert await engine.session_id_for(sid, "") == sid  # 10 s idle < ttl
        clock.now += 61
        await asyncio.sleep(0.05)
        with pytest.raises(UnknownSession):
            await engine.session_id_for(sid, "")
        await engine.stop()
        return err

    assert isinstance(_run(main()), DeadlineExceeded)


def test_the_session_cap_refuses_with_resource_exhausted_and_the_engine_keeps_serving():
    async def main():
        clock = Clock()
        engine, _, _ = _engine(clock, max_sessions=2)
        engine.start()
        a = await engine.create_session("")
        await engine.create_session("")
        with pytest.raises(ResourceExhausted) as refused:
            await engine.create_session("")
        text, _ = await _drain(engine.add(_spec(clock, "hi", session_id=a, max_tokens=1)))
        assert await engine.close_session(a, "")
        b = await engine.create_session("")  # room again
        await engine.stop()
        return refused.value, text, b

    err, text, b = _run(main())
    assert err.reason == "SESSION_LIMIT" and "--max-sessions" in str(err)
    assert text == "x" and b


def test_a_restarted_replica_unpins_its_sessions_and_a_recovered_one_gets_its_moved_kv_released():
    async def main():
        clock = Clock()
        engine, runner, mesh = _engine(clock)
        engine.start()
        sid = await engine.create_session("")
        await _drain(engine.add(_spec(clock, "hi", session_id=sid, max_tokens=1)))
        first = runner.batches[-1].steps[0].replicas
        # A stall: range 0's replica stops answering; the next turn moves the session away.
        mesh.replicas[first[0]].up = False
        await _drain(engine.add(_spec(clock, "again", session_id=sid, max_tokens=1)))
        moved = runner.batches[-1].steps[0].replicas
        stalled = mesh.replicas[first[0]]
        assert moved[0] != first[0] and sid not in stalled.released
        stalled.up = True
        engine.post(ReplicaRecovered(first[0]))
        await asyncio.sleep(0.01)
        released = list(stalled.released)
        # A restart of the replica that holds it now: the next turn restores it there or elsewhere.
        engine.post(ReplicaRestarted(moved[1]))
        mesh.replicas[moved[1]].restored.clear()
        await _drain(engine.add(_spec(clock, "more", session_id=sid, max_tokens=1)))
        restored = [r for r in mesh.replicas.values() if r.layers == (2, 4) and r.restored]
        await engine.stop()
        return released, restored, sid

    released, restored, sid = _run(main())
    assert released == [sid]
    assert restored and restored[0].restored[-1][0] == sid


def test_a_busy_session_refuses_a_second_turn_and_a_runner_bug_fails_only_its_batch():
    class Broken(FakeRunner):
        async def execute(self, batch):
            if len(self.batches) == 0:
                self.batches.append(batch)
                raise RuntimeError("boom")
            return await super().execute(batch)

    async def main():
        clock = Clock()
        engine, _, _ = _engine(clock, runner=Broken())
        engine.start()
        _, err = await _drain(engine.add(_spec(clock, "a")))
        text, _ = await _drain(engine.add(_spec(clock, "b")))
        await engine.stop()
        return err, text

    err, text = _run(main())
    assert "boom" in str(err) and text == "xxx"
