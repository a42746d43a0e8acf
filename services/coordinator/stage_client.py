"""The coordinator's only way to the stages.

Each layer range may be served by several replicas. Every replica is health-watched (GetInfo
with a short deadline, which also tells its KV use and whether it restarted); each has one
long-lived Forward stream whose requests and responses are matched in order, so several
micro-batches can be in flight on it. A response that does not come within the hop's deadline
counts as a stalled replica: the stream is torn down, its pending steps fail with StageDown,
and the replica is down until it answers a health probe again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from services.common.errors import StageDown, VlmeshError, from_rpc_error
from services.common.server import MeshTLS, mesh_channel
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


@dataclass
class StageReplica:
    address: str
    tls: MeshTLS | None
    channel: grpc.aio.Channel = field(init=False)
    stub: stage_pb2_grpc.StageServiceStub = field(init=False)
    health: replicas.Health = field(default_factory=replicas.Health)
    info: stage_pb2.GetInfoResponse | None = None
    stream: _ForwardStream | None = None

    def __post_init__(self) -> None:
        self.channel = mesh_channel(self.address, self.tls)
        self.stub = stage_pb2_grpc.StageServiceStub(self.channel)

    @property
    def layers(self) -> tuple[int, int] | None:
        return (self.info.layer_start, self.info.layer_end) if self.info is not None else None

    @property
    def up(self) -> bool:
        return self.health.up

    async def probe(self, timeout: float) -> bool:
        """Ask GetInfo; returns True when the replica restarted (its KV is gone)."""
        try:
            # wait_for_ready: a replica that restarted a moment ago is reached as soon as it listens,
            # instead of failing fast while the channel is still backing off.
            info = await self.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            if self.health.mark(False):
                log.warning("stage %s is down: %s", self.address, err.code().name)
            self._drop_stream(StageDown(f"stage {self.address} is down"))
            return False
        restarted = self.info is not None and info.instance_id != self.info.instance_id
        self.info = info
        if self.health.mark(True):
            log.info("stage %s (%d:%d) is up", self.address, info.layer_start, info.layer_end)
        if restarted:
            log.warning("stage %s restarted: the KV it held is gone", self.address)
            self._drop_stream(StageDown(f"stage {self.address} restarted"))
        return restarted

    def mark_down(self, err: VlmeshError) -> None:
        if self.health.mark(False):
            log.warning("stage %s is down: %s", self.address, err)
        self._drop_stream(err)

    def _drop_stream(self, err: VlmeshError) -> None:
        if self.stream is not None:
            self.stream.fail(err)
            self.stream = None

    async def forward(self, request: stage_pb2.ForwardRequest, timeout: float) -> stage_pb2.ForwardResponse:
        if self.stream is None or self.stream.broken is not None:
            self.stream = _ForwardStream(self.stub, self.address)
        try:
            return await self.stream.send(request, timeout)
        except VlmeshError as err:
            if isinstance(err, StageDown):
                self.mark_down(err)
            raise

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
                self.mark_down(failure)
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
        self._drop_stream(StageDown(f"stage {self.address} closed"))
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


class Mesh:
    """Every stage replica, grouped by layer range. The ranges are fixed when the mesh first
    covers the model; a replica that joins later must serve one of them."""

    def __init__(
        self,
        spec: str,
        tls: MeshTLS | None,
        num_layers: int,
        watch_interval: float = 1.0,
        probe_timeout: float = 1.0,
        on_restart: Callable[[StageReplica], None] | None = None,
    ):
        self.entries = replicas.split_entries(spec)
        self.tls = tls
        self.num_layers = num_layers
        self.watch_interval = watch_interval
        self.probe_timeout = probe_timeout
        self.on_restart = on_restart
        self.replicas: dict[str, StageReplica] = {}
        self.ranges: list[StageRange] = []
        self._watch: asyncio.Task | None = None

    async def connect(self, wait: float = 120.0) -> None:
        """Find every replica and its range; wait until the ranges cover the model exactly once
        with at least one replica each, then keep watching."""
        deadline = time.monotonic() + wait
        last_note = ""
        while True:
            await self._sync(await replicas.resolve(self.entries))
            await self._probe_all()
            note = self._coverage()
            if not note:
                break
            if note != last_note:
                log.info("waiting for stages: %s", note)
                last_note = note
            if time.monotonic() > deadline:
                raise StageDown(f"the stages do not cover the model after {wait:.0f}s: {note}")
            await asyncio.sleep(0.2)
        spans = sorted({r.layers for r in self.replicas.values() if r.layers is not None})
        self.ranges = [StageRange(a, b) for a, b in spans]
        for r in self.replicas.values():
            self._place(r)
        log.info("stages: %s", ", ".join(f"{g.label} x{len(g.replicas)}" for g in self.ranges))
        self._watch = asyncio.get_running_loop().create_task(
            replicas.watch(self.watch_interval, self.entries, self._sync, self._probe_all)
        )

    def _coverage(self) -> str:
        """'' when the up replicas' ranges tile [0, num_layers); else what is wrong."""
        spans = sorted({r.layers for r in self.replicas.values() if r.up and r.layers is not None})
        at = 0
        for a, b in spans:
            if a != at:
                return f"{'overlap' if a < at else 'gap'} at layer {at} ({a}:{b})"
            at = b
        if at != self.num_layers:
            return f"layers {at}:{self.num_layers} have no replica up"
        return ""

    def _place(self, r: StageReplica) -> None:
        if not self.ranges or r.layers is None:
            return
        for g in self.ranges:
            if (g.start, g.end) == r.layers:
                if r not in g.replicas:
                    g.replicas.append(r)
                return
        log.error("stage %s serves layers %d:%d, which is not one of the mesh's ranges; ignored", r.address, *r.layers)

    async def _sync(self, addresses: list[str]) -> None:
        for a in addresses:
            if a not in self.replicas:
                self.replicas[a] = StageReplica(a, self.tls)
                log.info("stage replica %s added", a)

    async def _probe_all(self) -> None:
        reps = list(self.replicas.values())
        restarted = await asyncio.gather(*(r.probe(self.probe_timeout) for r in reps))
        for r, again in zip(reps, restarted):
            self._place(r)
            if again and self.on_restart is not None:
                self.on_restart(r)

    async def refresh(self, index: int) -> None:
        """Probe range `index`'s replicas now instead of at the next watch round: a replica
        that restarted a moment ago serves the very next request."""
        reps = self.ranges[index].replicas
        restarted = await asyncio.gather(*(r.probe(self.probe_timeout) for r in reps))
        for r, again in zip(reps, restarted):
            if again and self.on_restart is not None:
                self.on_restart(r)

    def pick(self, index: int, exclude: frozenset[str] | set[str] = frozenset(), load: Callable[[StageReplica], int] | None = None) -> StageReplica:
        """An up replica of range `index` for a new session: the least loaded."""
        g = self.ranges[index]
        candidates = [r for r in g.up() if r.address not in exclude]
        if not candidates:
            raise StageDown(f"no replica of layers {g.label} is up")
        return min(candidates, key=load or (lambda r: r.info.kv_used_bytes if r.info else 0))

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.gather(*(r.close() for r in self.replicas.values()))
