"""The coordinator's only way to the stages.

Each layer range may be served by several replicas. Every replica is health-watched under the
pool's probe policy (replicas.py: GetInfo, which also tells its KV use and whether it restarted); each has one
long-lived Forward stream whose requests and responses are matched in order, so several
micro-batches can be in flight on it. A response that does not come within the hop's deadline
counts as a stalled replica: the stream is torn down, its pending steps fail with StageDown,
and the replica is down until it answers a health probe again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from services.common.channels import mesh_channel
from services.common.errors import StageDown, VlmeshError, from_rpc_error
from services.common.tls import MeshTLS
from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

from . import replicas
from .kv_log import Entry, chunks

log = logging.getLogger(__name__)


class _ForwardStream:
    """One Forward stream: requests written in order, responses matched to them in order."""

    def __init__(self, stub: stage_pb2_grpc.StageServiceStub, address: str):
        self.address = address
        self.call = stub.Forward()
        self.pending: deque[asyncio.Future[stage_pb2.ForwardResponse]] = deque()
        self._write = asyncio.Lock()
        self.broken: VlmeshError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    raise StageDown(f"stage {self.address} closed the stream")
                fut = self.pending.popleft()
                if not fut.done():
                    fut.set_result(resp)
        except asyncio.CancelledError:
            self.fail(StageDown(f"stage {self.address}: stream closed"))
        except grpc.RpcError as err:
            self.fail(from_rpc_error(err, f"stage {self.address}"))
        except VlmeshError as err:
            self.fail(err)
        except Exception as err:  # noqa: BLE001 - a broken stream fails its pending steps, nothing more
            self.fail(StageDown(f"stage {self.address}: {type(err).__name__}: {err}"))

    def fail(self, err: VlmeshError) -> None:
        if self.broken is None:
            self.broken = err
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(err)
        self.call.cancel()
        self._reader.cancel()

    async def send(self, request: stage_pb2.ForwardRequest, timeout: float) -> stage_pb2.ForwardResponse:
        if self.broken is not None:
            raise self.broken
        fut: asyncio.Future[stage_pb2.ForwardResponse] = asyncio.get_running_loop().create_future()
        async with self._write:
            self.pending.append(fut)
            try:
                await self.call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError) as err:
                self.fail(StageDown(f"stage {self.address}: cannot write: {err}"))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self.fail(StageDown(f"stage {self.address} did not answer within {timeout:.1f}s", reason="STAGE_STALLED"))
            raise self.broken or StageDown(f"stage {self.address} stalled") from None


class StageReplica(replicas.Replica):
    """One stage replica: its channel, its Forward stream, what its last GetInfo said."""

    kind = "stage"

    def __init__(self, address: str, tls: MeshTLS | None):
        super().__init__(address)
        self.tls = tls
        self.channel = mesh_channel(address, tls)
        self.stub = stage_pb2_grpc.StageServiceStub(self.channel)
        self.info: stage_pb2.GetInfoResponse | None = None  # written by check
        self.stream: _ForwardStream | None = None  # written by forward and lost
        # Compute seconds of its last few steps (written by forward): a busy replica's probes get longer to answer.
        self._steps: deque[float] = deque(maxlen=8)

    @property
    def layers(self) -> tuple[int, int] | None:
        return (self.info.layer_start, self.info.layer_end) if self.info is not None else None

    def probe_deadline(self, policy: replicas.ProbePolicy) -> float:
        return policy.deadline(max(self._steps, default=0.0))

    async def check(self, timeout: float) -> replicas.Probe:
        """GetInfo, which also tells its layers, KV use and instance id (a new id: it restarted)."""
        try:
            # wait_for_ready: a replica that restarted a moment ago is reached as soon as it listens,
            # instead of failing fast while the channel is still backing off.
            info = await self.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            return replicas.classify(err, self.channel)
        self.info = info
        return replicas.Probe(replicas.Outcome.ANSWERED, instance=info.instance_id)

    def lost(self, why: str) -> None:
        if self.stream is not None:
            self.stream.fail(StageDown(why))
            self.stream = None

    async def forward(self, request: stage_pb2.ForwardRequest, timeout: float) -> stage_pb2.ForwardResponse:
        if self.stream is None or self.stream.broken is not None:
            self.stream = _ForwardStream(self.stub, self.address)
        try:
            response = await self.stream.send(request, timeout)
        except VlmeshError as err:
            if isinstance(err, StageDown):
                self.mark_down(str(err))  # a broken stream or a step past the hop timeout: down at once
            raise
        self._steps.append(response.compute_us / 1e6)
        return response

    async def restore(self, session_id: str, length: int, entries: list[Entry], timeout: float) -> None:
        def messages():
            yield stage_pb2.RestoreSessionRequest(header=stage_pb2.RestoreHeader(session_id=session_id, length=length))
            for group in chunks(entries):
                for e in group:
                    m = stage_pb2.RestoreSessionRequest()
                    m.entry.layer, m.entry.start_position = e.layer, e.start
                    m.entry.key.CopyFrom(e.key)
                    m.entry.value.CopyFrom(e.value)
                    yield m

        try:
            await self.stub.RestoreSession(messages(), timeout=timeout)
        except grpc.RpcError as err:
            failure = from_rpc_error(err, f"restore on stage {self.address}")
            if isinstance(failure, StageDown):
                self.mark_down(str(failure))
            raise failure from None

    async def release(self, session_id: str) -> None:
        try:
            await self.stub.ReleaseSession(stage_pb2.ReleaseSessionRequest(session_id=session_id), timeout=5.0)
        except grpc.RpcError as err:
            log.info("release on %s failed (%s); its lease will expire", self.address, err.code().name)

    async def renew(self, session_ids: list[str]) -> list[str]:
        resp = await self.stub.RenewLeases(stage_pb2.RenewLeasesRequest(session_ids=session_ids), timeout=5.0)
        return list(resp.unknown_session_ids)

    async def close(self) -> None:
        await super().close()
        await self.channel.close()


@dataclass
class StageRange:
    start: int
    end: int
    replicas: list[StageReplica] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.start}:{self.end}"

    def up(self) -> list[StageReplica]:
        return [r for r in self.replicas if r.up]


class Mesh(replicas.ReplicaPool[StageReplica]):
    """Every stage replica, grouped by layer range. The ranges are fixed when the mesh first
    covers the model; a replica that joins later must serve one of them."""

    kind = "stage"

    def __init__(
        self,
        spec: str,
        tls: MeshTLS | None,
        num_layers: int,
        watch_interval: float = 1.0,
        probe_timeout: float = 1.0,
        policy: replicas.ProbePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        """`policy` (when given) replaces watch_interval and probe_timeout; clock and sleep are for tests."""
        super().__init__(spec, policy or replicas.ProbePolicy(interval=watch_interval, timeout=probe_timeout), clock=clock, sleep=sleep)
        self.tls = tls
        self.num_layers = num_layers
        self.ranges: list[StageRange] = []

    def _make(self, address: str) -> StageReplica:
        return StageReplica(address, self.tls)

    def _missing(self) -> str:
        """'' when the up replicas' ranges tile [0, num_layers); else what is wrong."""
        spans = sorted({r.layers for r in self.replicas.values() if r.up and r.layers is not None})
        at = 0
        for a, b in spans:
            if a != at:
                return f"the stages do not cover the model: {'overlap' if a < at else 'gap'} at layer {at} ({a}:{b})"
            at = b
        if at != self.num_layers:
            return f"the stages do not cover the model: layers {at}:{self.num_layers} have no replica up"
        return ""

    def _connected(self) -> None:
        spans = sorted({r.layers for r in self.replicas.values() if r.up and r.layers is not None})
        self.ranges = [StageRange(a, b) for a, b in spans]
        for r in self.replicas.values():
            self._place(r)
        log.info("stages: %s", ", ".join(f"{g.label} x{len(g.replicas)}" for g in self.ranges))

    def _probed(self, rep: StageReplica, change: replicas.Change | None) -> None:
        self._place(rep)

    def _place(self, r: StageReplica) -> None:
        if not self.ranges or r.layers is None:
            return
        for g in self.ranges:
            if (g.start, g.end) == r.layers:
                if r not in g.replicas:
                    g.replicas.append(r)
                return
        log.error("stage %s serves layers %d:%d, which is not one of the mesh's ranges; ignored", r.address, *r.layers)

    async def refresh(self, index: int) -> None:
        """Probe range `index`'s replicas now instead of at the next watch round: a replica
        that restarted a moment ago serves the very next request."""
        await self.probe(self.ranges[index].replicas, count_misses=False)

    def pick(self, index: int, exclude: frozenset[str] | set[str] = frozenset(), load: Callable[[StageReplica], int] | None = None) -> StageReplica:
        """An up replica of range `index` for a new session: the least loaded, and one whose last
        probe was answered over one that missed it (it may be stalling)."""
        g = self.ranges[index]
        candidates = [r for r in g.up() if r.address not in exclude]
        if not candidates:
            raise StageDown(f"no replica of layers {g.label} is up")
        key = load or (lambda r: r.info.kv_used_bytes if r.info else 0)
        return min(candidates, key=lambda r: (r.health.suspect, key(r)))
