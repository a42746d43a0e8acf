"""The coordinator's way to the vision service: several instances, health-watched; an Encode
that finds its instance down or stalled is sent to the next one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import DeadlineExceeded, StageDown, from_rpc_error
from services.common.server import MeshTLS, mesh_channel
from vlmesh.internal.v1 import vision_pb2, vision_pb2_grpc

from . import replicas

log = logging.getLogger(__name__)


@dataclass
class VisionInstance:
    address: str
    tls: MeshTLS | None
    channel: grpc.aio.Channel = field(init=False)
    stub: vision_pb2_grpc.VisionServiceStub = field(init=False)
    health: replicas.Health = field(default_factory=replicas.Health)
    stats: vision_pb2.GetStatsResponse | None = None

    def __post_init__(self) -> None:
        self.channel = mesh_channel(self.address, self.tls)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)

    async def probe(self, timeout: float) -> None:
        try:
            resp = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True)
            up = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            up = False
        if self.health.mark(up):
            (log.info if up else log.warning)("vision %s is %s", self.address, "up" if up else "down")

    async def refresh_stats(self, timeout: float = 2.0) -> None:
        try:
            self.stats = await self.stub.GetStats(vision_pb2.GetStatsRequest(), timeout=timeout)
        except grpc.RpcError:
            pass


class VisionPool:
    def __init__(self, spec: str, tls: MeshTLS | None, watch_interval: float = 1.0, probe_timeout: float = 1.0):
        self.entries = replicas.split_entries(spec)
        self.tls = tls
        self.watch_interval = watch_interval
        self.probe_timeout = probe_timeout
        self.instances: dict[str, VisionInstance] = {}
        self._next = 0
        self._watch: asyncio.Task | None = None

    async def connect(self, wait: float = 120.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            await self._sync(await replicas.resolve(self.entries))
            await self._probe_all()
            if any(i.health.up for i in self.instances.values()):
                break
            if time.monotonic() > deadline:
                raise StageDown(f"no vision instance of {', '.join(self.entries)} is up after {wait:.0f}s")
            await asyncio.sleep(0.2)
        self._watch = asyncio.get_running_loop().create_task(
            replicas.watch(self.watch_interval, self.entries, self._sync, self._probe_all)
        )

    async def _sync(self, addresses: list[str]) -> None:
        for a in addresses:
            if a not in self.instances:
                self.instances[a] = VisionInstance(a, self.tls)

    async def _probe_all(self) -> None:
        await asyncio.gather(*(i.probe(self.probe_timeout) for i in self.instances.values()))

    def _order(self) -> list[VisionInstance]:
        """Up instances first, round-robin among them; down ones last (they may be back)."""
        insts = list(self.instances.values())
        self._next = (self._next + 1) % max(1, len(insts))
        insts = insts[self._next :] + insts[: self._next]
        return [i for i in insts if i.health.up] + [i for i in insts if not i.health.up]

    async def encode(
        self, inputs: list[vision_pb2.VisualInput], deadline: float | None, attempt_timeout: float, metadata
    ) -> vision_pb2.EncodeResponse:
        """Encode on an up instance; on UNAVAILABLE, or no answer within attempt_timeout (a stalled
        instance), try the next. `deadline` (time.monotonic(); None = none) bounds all attempts."""
        last: Exception | None = None
        for inst in self._order():
            timeout = attempt_timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded("the request's deadline passed while encoding its images")
                timeout = min(timeout, left)
            try:
                return await inst.stub.Encode(vision_pb2.EncodeRequest(inputs=inputs), timeout=timeout, metadata=metadata)
            except grpc.RpcError as err:
                failure = from_rpc_error(err, f"vision {inst.address}")
                if not isinstance(failure, StageDown):
                    raise failure from None
                inst.health.mark(False)
                log.warning("vision %s failed (%s); trying another instance", inst.address, failure)
                last = failure
        raise StageDown(f"no vision instance could encode the request: {last}") if last else StageDown("no vision instance")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.gather(*(i.channel.close() for i in self.instances.values()))
