"""The coordinator's way to the vision service: several instances, health-watched; an Encode
that finds its instance down or stalled is sent to the next one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import mesh_channel
from services.common.errors import DeadlineExceeded, StageDown, from_rpc_error
from services.common.tls import MeshTLS
from vlmesh.internal.v1 import vision_pb2, vision_pb2_grpc

from . import replicas

log = logging.getLogger(__name__)


class VisionInstance(replicas.Replica):
    kind = "vision"

    def __init__(self, address: str, tls: MeshTLS | None):
        super().__init__(address)
        self.tls = tls
        self.channel = mesh_channel(address, tls)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.stats: vision_pb2.GetStatsResponse | None = None  # written by refresh_stats

    async def check(self, timeout: float) -> replicas.Probe:
        try:
            resp = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            return replicas.classify(err, self.channel)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return replicas.Probe(replicas.Outcome.GONE, detail=health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
        return replicas.Probe(replicas.Outcome.ANSWERED)

    async def refresh_stats(self, timeout: float = 2.0) -> None:
        try:
            self.stats = await self.stub.GetStats(vision_pb2.GetStatsRequest(), timeout=timeout)
        except grpc.RpcError:
            pass

    async def close(self) -> None:
        await super().close()
        await self.channel.close()


class VisionPool(replicas.ReplicaPool[VisionInstance]):
    kind = "vision"

    def __init__(
        self,
        spec: str,
        tls: MeshTLS | None,
        watch_interval: float = 1.0,
        probe_timeout: float = 1.0,
        policy: replicas.ProbePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        """`policy` (when given) replaces watch_interval and probe_timeout; clock and sleep are for tests."""
        super().__init__(spec, policy or replicas.ProbePolicy(interval=watch_interval, timeout=probe_timeout), clock=clock, sleep=sleep)
        self.tls = tls
        self._next = 0

    def _make(self, address: str) -> VisionInstance:
        return VisionInstance(address, self.tls)

    @property
    def instances(self) -> dict[str, VisionInstance]:
        return self.replicas

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
                inst.mark_down(str(failure))
                log.warning("vision %s failed (%s); trying another instance", inst.address, failure)
                last = failure
        raise StageDown(f"no vision instance could encode the request: {last}") if last else StageDown("no vision instance")
