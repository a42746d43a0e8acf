"""A mesh of real processes for failure tests: every service a `vlmesh serve` child that a test
can kill -9, SIGSTOP, SIGCONT and restart on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshutil import certs_dir, coordinator_tls
from services.common.server import wait_healthy
from services.launcher import free_port
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import coordinator_pb2_grpc as cgrpc

VLMESH = [sys.executable, "-m", "services.cli"]


@dataclass
class Child:
    name: str
    args: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ProcMesh:
    model: str
    ranges: list[tuple[int, int]]
    replicas: int = 1
    visions: int = 1
    coord_args: list[str] = field(default_factory=list)
    stage_args: list[str] = field(default_factory=list)
    log_dir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")) / f"procmesh-{os.getpid()}-{time.monotonic_ns()}")
    children: dict[str, Child] = field(default_factory=dict)
    state_dir: str = ""

    def _tls(self, service: str) -> list[str]:
        d = certs_dir()
        return ["--mesh-ca", f"{d}/ca.crt", "--mesh-cert", f"{d}/{service}.crt", "--mesh-key", f"{d}/{service}.key"]

    def start(self) -> ProcMesh:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.state_dir or str(self.log_dir / "state")
        for v in range(self.visions):
            self._add(f"vision{v}", ["vision", "--model", self.model, *self._tls("vision")])
        for i, (a, b) in enumerate(self.ranges):
            for r in range(self.replicas):
                self._add(f"stage{i}.{r}", ["stage", "--model", self.model, "--layers", f"{a}:{b}", *self._tls("stage"), *self.stage_args])
        for c in list(self.children.values()):
            self.spawn(c.name)
        for c in list(self.children.values()):
            self.wait(c.name)
        stages = ",".join(c.address for c in self.children.values() if c.name.startswith("stage"))
        visions = ",".join(c.address for c in self.children.values() if c.name.startswith("vision"))
        self._add(
            "coordinator",
            ["coordinator", "--model", self.model, "--stages", stages, "--vision", visions, "--state-dir", self.state_dir, *self._tls("coordinator"), *self.coord_args],
        )
        self.spawn("coordinator")
        self.wait("coordinator")
        return self

    def _add(self, name: str, args: list[str]) -> None:
        port = free_port()
        self.children[name] = Child(name, ["serve", *args, "--port", str(port)], port, self.log_dir / f"{name}.log")

    def spawn(self, name: str) -> None:
        c = self.children[name]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        with open(c.log, "a") as out:
            c.proc = subprocess.Popen([*VLMESH, *c.args], stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait(self, name: str, timeout: float = 120.0) -> None:
        c = self.children[name]
        tls = None if name == "coordinator" else coordinator_tls()
        deadline = time.monotonic() + timeout
        while True:
            if c.proc is not None and c.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {c.proc.returncode}; log: {c.log.read_text()[-3000:]}")
            try:
                wait_healthy(c.address, timeout=2.0, tls=tls)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def kill(self, name: str) -> None:
        c = self.children[name]
        assert c.proc is not None
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(30)

    def pause(self, name: str) -> None:
        self.children[name].proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self, name: str) -> None:
        self.children[name].proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    def restart(self, name: str) -> None:
        c = self.children[name]
        if c.proc is not None and c.proc.poll() is None:
            self.kill(name)
        self.spawn(name)
        self.wait(name)

    @property
    def address(self) -> str:
        return self.children["coordinator"].address

    def stub(self) -> tuple[grpc.Channel, cgrpc.CoordinatorServiceStub]:
        ch = grpc.insecure_channel(self.address)
        return ch, cgrpc.CoordinatorServiceStub(ch)

    def status(self) -> cpb.GetMeshStatusResponse:
        ch, stub = self.stub()
        with ch:
            return stub.GetMeshStatus(cpb.GetMeshStatusRequest(), timeout=10)

    def stage_name(self, address: str) -> str:
        return next(c.name for c in self.children.values() if c.address == address)

    def stop(self) -> None:
        for c in self.children.values():
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGCONT)
                c.proc.terminate()
        for c in self.children.values():
            if c.proc is not None:
                try:
                    c.proc.wait(15)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
