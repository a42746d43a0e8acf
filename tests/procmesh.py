"""A mesh of real processes for failure tests, through the launcher's public API
(services.launcher.LocalMesh): every service a `vlmesh serve` child that a test can kill -9,
SIGSTOP, SIGCONT and restart on the same port. Nothing supervises it: what a test kills stays
dead until the test restarts it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
from meshutil import certs_dir

from services.launcher import Child, LocalMesh
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import coordinator_pb2_grpc as cgrpc


class ProcMesh:
    """`children` is keyed by the tests' names: "vision0", "stage1.0" (range 1, replica 0),
    "coordinator"."""

    def __init__(
        self,
        model: str,
        ranges: list[tuple[int, int]],
        replicas: int = 1,
        visions: int = 1,
        coord_args: list[str] | tuple[str, ...] = (),
        stage_args: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"procmesh-{os.getpid()}-{time.monotonic_ns()}"
        self.state_dir = str(self.log_dir / "state")
        self.mesh = LocalMesh(
            model,
            ranges,
            replicas=replicas,
            visions=visions,
            log_dir=str(self.log_dir),
            state_dir=self.state_dir,
            certs=certs_dir(),  # the tests' own CA: meshutil's channels reach the stages with it
            env={"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
            service_args={"coordinator": list(coord_args), "stage": list(stage_args)},
        )
        self._names = {f"vision{v}": "vision" if visions == 1 else f"vision{v}" for v in range(visions)}
        for i in range(len(ranges)):
            for r in range(replicas):
                self._names[f"stage{i}.{r}"] = f"stage{i}" if replicas == 1 else f"stage{i}r{r}"
        self._names["coordinator"] = "coordinator"

    def start(self, timeout: float = 120.0) -> ProcMesh:
        self.mesh.start(timeout=timeout)
        return self

    @property
    def children(self) -> dict[str, Child]:
        return {ours: self.mesh.children[theirs] for ours, theirs in self._names.items()}

    def kill(self, name: str) -> None:
        self.mesh.kill(self._names[name])

    def pause(self, name: str) -> None:
        self.mesh.pause(self._names[name])

    def resume(self, name: str) -> None:
        self.mesh.resume(self._names[name])

    def spawn(self, name: str) -> None:
        self.mesh.respawn(self._names[name], wait=False)

    def wait(self, name: str, timeout: float = 120.0) -> None:
        self.mesh.wait_serving(self._names[name], timeout)

    def restart(self, name: str) -> None:
        self.mesh.respawn(self._names[name], timeout=120.0)

    @property
    def address(self) -> str:
        return self.mesh.address

    def stub(self) -> tuple[grpc.Channel, cgrpc.CoordinatorServiceStub]:
        ch = grpc.insecure_channel(self.address)
        return ch, cgrpc.CoordinatorServiceStub(ch)

    def status(self) -> cpb.GetMeshStatusResponse:
        ch, stub = self.stub()
        with ch:
            return stub.GetMeshStatus(cpb.GetMeshStatusRequest(), timeout=10)

    def stage_name(self, address: str) -> str:
        return next(ours for ours, c in self.children.items() if c.address == address)

    def stop(self) -> None:
        self.mesh.stop()
