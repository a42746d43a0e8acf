"""The mesh survives its own parts: replicas killed (kill -9) or stalled (SIGSTOP) mid-generation,
vision instances lost mid-request, the coordinator killed between turns. Every completion equals
the undisturbed run (transformers' generate on the same conversation), token for token."""

from __future__ import annotations

import random
import time

import grpc
import pytest
from conftest import png
from meshutil import images_of, reference, stage_info, to_proto
from procmesh import ProcMesh

from vlmesh.v1 import coordinator_pb2 as cpb

MAX_NEW = 64


def generate(stub, messages, on_token=None, **kw) -> tuple[list[int], cpb.GenerateResponse]:
    ids: list[int] = []
    last = None
    for r in stub.Generate(cpb.GenerateRequest(messages=to_proto(messages), **kw), timeout=120):
        ids += list(r.token_ids)
        last = r
        if on_token is not None and r.token_ids:
            on_token(len(ids))
    return ids, last


class Chaos:
    """Picks a replica that holds the session right now and kills or stalls it; a killed
    replica is restarted, a stalled one resumed, once the round is over."""

    def __init__(self, mesh: ProcMesh, rng: random.Random):
        self.mesh = mesh
        self.rng = rng
        self.hurt: list[tuple[str, str]] = []  # (name, "kill" | "stop")
        self.failovers = 0

    def strike(self, how: str) -> None:
        status = self.mesh.status()
        up_per_range: dict[str, int] = {}
        for r in status.stages:
            key = (r.layers.start, r.layers.end)
            up_per_range[key] = up_per_range.get(key, 0) + (r.state == cpb.REPLICA_STATE_UP)
        holding = [
            r for r in status.stages if r.pinned_sessions > 0 and r.state == cpb.REPLICA_STATE_UP and up_per_range[(r.layers.start, r.layers.end)] > 1
        ]
        if not holding:
            return
        victim = self.mesh.stage_name(self.rng.choice(holding).address)
        (self.mesh.kill if how == "kill" else self.mesh.pause)(victim)
        self.hurt.append((victim, how))
        self.failovers += 1

    def heal(self) -> None:
        for name, how in self.hurt:
            if how == "kill":
                self.mesh.restart(name)
            else:
                self.mesh.resume(name)
        self.hurt.clear()
        deadline = time.monotonic() + 30
        while True:  # the coordinator's watch sees every replica up again
            if all(r.state == cpb.REPLICA_STATE_UP for r in self.mesh.status().stages):
                return
            assert time.monotonic() < deadline, "a replica did not come back"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def chaos_mesh(tiny_models):
    m = ProcMesh(
        str(tiny_models["a"]),
        [(0, 2), (2, 3), (3, 4)],
        replicas=2,
        visions=2,
        coord_args=["--hop-timeout", "2", "--health-interval", "0.3", "--vision-timeout", "4", "--prefix-cache-sessions", "0"],
    ).start()
    m.model_dir = tiny_models["a"]
    yield m
    m.stop()


@pytest.mark.slow
def test_chaos_every_completion_equals_the_undisturbed_run(chaos_mesh, images):
    """20 rounds; each kills -9 or SIGSTOPs the replica holding the session, at a random token of
    a 64-token greedy generation or of a turn of a 3-turn session with an image."""
    mesh = chaos_mesh
    ref = reference(mesh.model_dir)
    rng = random.Random(20261130)
    chaos = Chaos(mesh, rng)
    one_shot = [
        [{"role": "user", "content": "Tell me a long story about shapes and colours."}],
        [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "Describe it at length."}]}],
    ]
    expected_one = [ref.generate_ids(ref.prompt_ids(p), images_of(p), MAX_NEW)[0] for p in one_shot]
    turns = [
        [{"role": "user", "content": [{"type": "image", "image": images["square"]}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "And what colour is it?"}],
        [{"role": "user", "content": "Say more."}],
    ]
    expected_turns, history, ids, pics = [], [], [], []
    for i, new in enumerate(turns):
        ids = ref.prompt_ids(new) if i == 0 else ids + ref.continuation_ids(history, new, ids[-1])
        pics += images_of(new)
        out = ref.generate_ids(ids, pics, MAX_NEW)[0]
        expected_turns.append(out)
        ids = ids + out
        history += new + [{"role": "assistant", "content": ref.processor.tokenizer.decode(out, skip_special_tokens=True)}]

    ch, stub = mesh.stub()
    errors = 0
    with ch:
        for round_ in range(20):
            how = rng.choice(["kill", "stop"])
            at = rng.randint(2, 40)

            def strike(n: int) -> None:
                if n == at:
                    chaos.strike(how)

            try:
                if rng.random() < 0.5:
                    k = rng.randrange(len(one_shot))
                    got, _ = generate(stub, one_shot[k], strike, max_tokens=MAX_NEW)
                    assert got == expected_one[k], f"round {round_}: one-shot {k} after {how} at token {at}"
                else:
                    sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
                    hit = rng.randrange(len(turns))
                    for t, new in enumerate(turns):
                        got, _ = generate(stub, new, strike if t == hit else None, session_id=sid, max_tokens=MAX_NEW)
                        assert got == expected_turns[t], f"round {round_}: turn {t} after {how} at token {at} of turn {hit}"
                    stub.CloseSession(cpb.CloseSessionRequest(session_id=sid))
            except grpc.RpcError as err:
                errors += 1
                raise AssertionError(f"round {round_}: client error {err.code().name}: {err.details()}") from err
            finally:
                chaos.heal()
    assert errors == 0
    assert chaos.failovers >= 15, f"only {chaos.failovers} of 20 rounds hit a replica holding the session"


@pytest.mark.slow
def test_vision_instance_lost_mid_request(chaos_mesh):
    """One vision instance stalled, then killed, while image requests keep coming: the other
    instance answers them all."""
    mesh = chaos_mesh
    ch, stub = mesh.stub()
    with ch:
        mesh.pause("vision0")
        try:
            for seed in range(4):  # new pictures: each is a cache miss that must be encoded
                ids, last = generate(stub, [{"role": "user", "content": [{"type": "image", "image": png(40, 40, 100 + seed)}]}], max_tokens=2)
                assert len(ids) == 2
            mesh.kill("vision0")
            for seed in range(4, 8):
                ids, last = generate(stub, [{"role": "user", "content": [{"type": "image", "image": png(40, 40, 100 + seed)}]}], max_tokens=2)
                assert len(ids) == 2
        finally:
            mesh.restart("vision0")


def three_turns(ref, images) -> tuple[list[list[dict]], list[list[int]]]:
    """A 3-turn conversation with an image and generate()'s answer to each turn."""
    turns = [
        [{"role": "user", "content": [{"type": "image", "image": images["tall"]}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "And what colour is it?"}],
        [{"role": "user", "content": "Say more."}],
    ]
    expected, history, ids, pics = [], [], [], []
    for i, new in enumerate(turns):
        ids = ref.prompt_ids(new) if i == 0 else ids + ref.continuation_ids(history, new, ids[-1])
        pics += images_of(new)
        out = ref.generate_ids(ids, pics, 12)[0]
        expected.append(out)
        ids = ids + out
        history += new + [{"role": "assistant", "content": ref.processor.tokenizer.decode(out, skip_special_tokens=True)}]
    return turns, expected


def test_coordinator_killed_between_turns_loses_nothing(tiny_models, images):
    """kill -9 of the coordinator after turn 1: restarted on the same state directory, the
    session's next turns equal the undisturbed conversation; the KV the dead coordinator left on
    the stages is released when its leases run out (seconds here, a minute by default)."""
    ref = reference(tiny_models["a"])
    turns, expected = three_turns(ref, images)
    mesh = ProcMesh(str(tiny_models["a"]), [(0, 2), (2, 4)], stage_args=["--lease-seconds", "3"]).start()
    try:
        ch, stub = mesh.stub()
        with ch:
            sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
            got, _ = generate(stub, turns[0], session_id=sid, max_tokens=12)
            assert got == expected[0]
            generate(stub, [{"role": "user", "content": "a one-shot request"}], max_tokens=4)  # parked prefix KV
        stages = [c.address for n, c in mesh.children.items() if n.startswith("stage")]
        from meshutil import stage_holds

        assert all(stage_holds(a, sid) for a in stages)
        mesh.kill("coordinator")
        # Nobody renews the dead coordinator's leases: its sessions' KV goes within the lease.
        deadline = time.monotonic() + 15
        while any(stage_info(a).num_sessions for a in stages):
            assert time.monotonic() < deadline, "the stages kept the dead coordinator's KV"
            time.sleep(0.2)
        mesh.spawn("coordinator")
        mesh.wait("coordinator")
        ch, stub = mesh.stub()
        with ch:
            for t in (1, 2):
                got, _ = generate(stub, turns[t], session_id=sid, max_tokens=12)
                assert got == expected[t], f"turn {t + 1} after the restart"
    finally:
        mesh.stop()


def test_restarted_stage_serves_the_next_request_and_idle_sessions_continue(tiny_models, images):
    """One replica per range: a stage is killed while a session is idle between turns and
    restarted on its port. The very next request works, and the idle session's next turn is
    token-exact (its KV is restored from the log onto the new process)."""
    ref = reference(tiny_models["a"])
    turns, expected = three_turns(ref, images)
    mesh = ProcMesh(str(tiny_models["a"]), [(0, 2), (2, 4)], coord_args=["--health-interval", "0.3"]).start()
    try:
        ch, stub = mesh.stub()
        with ch:
            sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
            assert generate(stub, turns[0], session_id=sid, max_tokens=12)[0] == expected[0]
            mesh.restart("stage1.0")
            ids, _ = generate(stub, [{"role": "user", "content": "hello again"}], max_tokens=4)
            assert len(ids) == 4
            for t in (1, 2):
                assert generate(stub, turns[t], session_id=sid, max_tokens=12)[0] == expected[t]
    finally:
        mesh.stop()


def test_replay_without_a_kv_log_equals_the_undisturbed_run(tiny_models, images):
    """With the KV log off, a lost replica's sessions are rebuilt by feeding their tokens again."""
    ref = reference(tiny_models["a"])
    turns, expected = three_turns(ref, images)
    mesh = ProcMesh(
        str(tiny_models["a"]),
        [(0, 2), (2, 4)],
        replicas=2,
        coord_args=["--kv-log-mb", "0", "--health-interval", "0.3", "--prefix-cache-sessions", "0"],
    ).start()
    try:
        ch, stub = mesh.stub()
        with ch:
            sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
            assert generate(stub, turns[0], session_id=sid, max_tokens=12)[0] == expected[0]
            chaos = Chaos(mesh, random.Random(1))

            def strike(n: int) -> None:
                if n == 3:
                    chaos.strike("kill")

            assert generate(stub, turns[1], strike, session_id=sid, max_tokens=12)[0] == expected[1]
            assert chaos.failovers == 1
            assert generate(stub, turns[2], session_id=sid, max_tokens=12)[0] == expected[2]
            chaos.heal()
    finally:
        mesh.stop()
