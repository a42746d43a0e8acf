"""`vlmesh up` supervises its children (real processes, one mesh for the module): a stage
replica, the vision service or the coordinator killed with kill -9 is restarted at its address
and flags, the answers stay what they would have been, and `vlmesh up` keeps running; a child
that exits at once on every start is given up on after its backoff, with one line, and the rest
of the mesh keeps serving. Stopping it removes its throwaway certificates."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import png
from meshutil import stage_info, to_proto

from services.common.channels import wait_healthy
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import coordinator_pb2_grpc as cgrpc

VLMESH = [sys.executable, "-m", "services.cli"]
BACK_WITHIN_S = 30.0
LONG = [{"role": "user", "content": "Tell me a long story about shapes and colours."}]


class Up:
    """`vlmesh up` as a child process; its stderr read by a thread into `lines`."""

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [*VLMESH, "up", "--model", str(model), "--stages", "3", "--replicas", "2", "--port", "0", "--threads", "1", "--log-dir", str(log_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None and self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()
        first = self.proc.stdout.readline()
        if not first:
            self.proc.wait(30)
            pytest.fail("vlmesh up exited:\n" + "\n".join(self.lines))
        self.addresses = json.loads(first)

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def pid_at(self, address: str) -> int:
        port = address.rsplit(":", 1)[1]
        for p in psutil.Process(self.proc.pid).children():
            cmd = p.cmdline()
            if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
                return p.pid
        raise LookupError(f"no child serves {address}")

    def kill_at(self, address: str) -> None:
        psutil.Process(self.pid_at(address)).send_signal(signal.SIGKILL)

    def wait_line(self, *words: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if all(w in line for w in words):
                    return line
            assert self.proc.poll() is None, "vlmesh up exited:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no line with {words}:\n" + "\n".join(self.lines)
            time.sleep(0.1)


@pytest.fixture(scope="module")
def up(tiny_models, tmp_path_factory):
    # A copy of the model: the crash-loop test takes it away so that a restarted child fails at once.
    root = tmp_path_factory.mktemp("supervise")
    model = root / "model"
    shutil.copytree(tiny_models["a"], model)
    u = Up(model, root / "logs")
    u.model = model
    yield u
    if u.proc.poll() is None:
        u.proc.kill()
        u.proc.wait(30)


def generate(stub, messages, on_token=None, **kw) -> list[int]:
    ids: list[int] = []
    for r in stub.Generate(cpb.GenerateRequest(messages=to_proto(messages), **kw), timeout=120):
        ids += list(r.token_ids)
        if on_token is not None and r.token_ids:
            on_token(len(ids))
    return ids


def serving_within(address: str, tls, timeout: float) -> float:
    """Seconds until `address` answers health SERVING (fresh channels: a kept one sits in backoff)."""
    t0 = time.monotonic()
    while True:
        try:
            wait_healthy(address, timeout=2.0, tls=tls)
            return time.monotonic() - t0
        except TimeoutError:
            assert time.monotonic() - t0 < timeout, f"{address} not back within {timeout:.0f} s"


def coordinator_sees_vision_up(stub, timeout: float) -> None:
    """The coordinator's own probe found the restarted instance (its channel reconnected)."""
    deadline = time.monotonic() + timeout
    while not all(v.state == cpb.REPLICA_STATE_UP for v in stub.GetMeshStatus(cpb.GetMeshStatusRequest(), timeout=10).vision):
        assert time.monotonic() < deadline, "the coordinator did not see the vision service back"
        time.sleep(0.2)


def mesh_tls(up: Up):
    from meshutil import coordinator_tls

    return coordinator_tls(up.addresses["certs"])


def test_stage_replica_killed_mid_stream(up):
    with grpc.insecure_channel(up.addresses["coordinator"]) as ch:
        stub = cgrpc.CoordinatorServiceStub(ch)
        expected = generate(stub, LONG, max_tokens=64)
        killed: dict[str, object] = {}

        def strike(n: int) -> None:
            if n == 3 and not killed:
                status = stub.GetMeshStatus(cpb.GetMeshStatusRequest(), timeout=10)
                victim = next(r.address for r in status.stages if r.pinned_sessions > 0)
                up.kill_at(victim)
                killed.update(address=victim, at=n)

        got = generate(stub, LONG, strike, max_tokens=64)
        assert killed, "no replica held the stream"
        assert got == expected
        assert len(got) > 3  # the kill came mid-stream
        address = str(killed["address"])
        serving_within(address, mesh_tls(up), BACK_WITHIN_S)
        up.wait_line(address, "exited with code -9", "restarting in", timeout=5)
        up.wait_line(address, "back at", timeout=BACK_WITHIN_S)
        assert up.proc.poll() is None
        # The restarted replica serves again, and so does the mesh.
        assert stage_info(address, up.addresses["certs"]).layer_end > 0
        assert generate(stub, LONG, max_tokens=64) == expected


def test_vision_killed(up):
    address = up.addresses["vision"]
    ask = [{"role": "user", "content": [{"type": "image", "image": png(40, 40, 7)}, {"type": "text", "text": "What is it?"}]}]
    with grpc.insecure_channel(up.addresses["coordinator"]) as ch:
        stub = cgrpc.CoordinatorServiceStub(ch)
        expected = generate(stub, ask, max_tokens=8)
        up.kill_at(address)
        up.wait_line(address, "exited with code -9", timeout=10)
        serving_within(address, mesh_tls(up), BACK_WITHIN_S)
        up.wait_line(address, "back at", timeout=BACK_WITHIN_S)
        coordinator_sees_vision_up(stub, BACK_WITHIN_S)
        # A picture it has not seen: the restarted vision service encodes it.
        fresh = [{"role": "user", "content": [{"type": "image", "image": png(40, 40, 8)}, {"type": "text", "text": "What is it?"}]}]
        assert generate(stub, fresh, max_tokens=8)
        assert generate(stub, ask, max_tokens=8) == expected
    assert up.proc.poll() is None


def test_coordinator_killed_between_turns(up):
    address = up.addresses["coordinator"]
    turns = [[{"role": "user", "content": "What is a triangle?"}], [{"role": "user", "content": "And a circle?"}]]
    with grpc.insecure_channel(address) as ch:
        stub = cgrpc.CoordinatorServiceStub(ch)
        undisturbed = stub.CreateSession(cpb.CreateSessionRequest()).session_id
        expected = [generate(stub, t, session_id=undisturbed, max_tokens=12) for t in turns]
        sid = stub.CreateSession(cpb.CreateSessionRequest()).session_id
        assert generate(stub, turns[0], session_id=sid, max_tokens=12) == expected[0]
    up.kill_at(address)
    up.wait_line(f"coordinator at {address} exited with code -9", timeout=10)
    serving_within(address, None, BACK_WITHIN_S)
    up.wait_line(f"coordinator back at {address}", timeout=BACK_WITHIN_S)
    with grpc.insecure_channel(address) as ch:  # the restarted coordinator restored the session from its --state-dir
        assert generate(cgrpc.CoordinatorServiceStub(ch), turns[1], session_id=sid, max_tokens=12) == expected[1]
    assert up.proc.poll() is None


def test_a_crash_loop_is_given_up_with_one_line(up):
    # Without its model directory a restarted stage exits at once (no config.json), every time.
    up.model.rename(up.model.with_name("model-gone"))
    victim = up.addresses["stages"][-1]
    up.kill_at(victim)
    line = up.wait_line(victim, "gave up", timeout=120)
    assert "the rest of the mesh keeps running" in line
    time.sleep(2)
    assert sum("gave up" in x for x in up.lines) == 1, "\n".join(up.lines)
    restarts = [x for x in up.lines if victim in x and "restarting in" in x]
    delays = [float(x.rsplit("restarting in ", 1)[1].split(" ")[0]) for x in restarts]
    assert delays[-4:] == sorted(delays[-4:]) and delays[-1] > delays[-4]  # the backoff grew
    assert up.proc.poll() is None
    with grpc.insecure_channel(up.addresses["coordinator"]) as ch:  # its sibling serves the range
        assert generate(cgrpc.CoordinatorServiceStub(ch), LONG, max_tokens=8)
    status = subprocess.run([*VLMESH, "status", "--address", up.addresses["coordinator"]], capture_output=True, text=True, timeout=60)
    assert "gave up" in status.stdout, status.stdout + status.stderr


def test_stop_removes_the_throwaway_certificates(up):
    certs = Path(up.addresses["certs"])
    assert (certs / "ca.key").exists()
    status_file = Path(up.addresses["status"])
    assert status_file.exists()
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, "\n".join(up.lines)
    time.sleep(0.5)  # the reader thread takes the last lines
    assert any(x.startswith("mesh stopped") for x in up.lines), "\n".join(up.lines)
    assert not certs.exists()
    assert not status_file.exists()


def test_a_killed_runs_certificates_are_removed_at_the_next_start(tmp_path):
    from services.launcher import CERTS_PREFIX, OWNER_FILE, remove_stale_certs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    dead, alive, foreign = (tmp_path / f"{CERTS_PREFIX}{n}" for n in ("dead", "alive", "foreign"))
    for d, owner in ((dead, gone.pid), (alive, psutil.Process().pid), (foreign, None)):
        d.mkdir()
        (d / "ca.key").write_text("secret")
        if owner is not None:
            (d / OWNER_FILE).write_text(f"{owner}\n")
    assert remove_stale_certs(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.exists() and foreign.exists()  # a directory without an owner is not judged
