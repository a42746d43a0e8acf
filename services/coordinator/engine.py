"""The engine: the one owner of sessions and requests (vLLM v1's loop: schedule, execute, update).

Everything reaches the engine as a message in its inbox: what handlers ask (add a request,
cancel it, create or close a session, a status snapshot), what the mesh saw (a replica restarted
or answers again), and what the engine's own tasks found (a turn prepared, a session placed, a
micro-batch run, leases renewed). One loop takes them in order and alone applies them, so every
field of a session or request has one writer: `_run` and the methods it calls. Tasks do the
waiting (vision, the stages, the KV log's restores) and change nothing.

A round of the loop: apply the inbox, then plan (`_plan`: which requests step, as an immutable
`MicroBatch`), execute (a task: `Runner.execute`), and, when its outcome arrives, update
(`_apply_step`). Every way a turn can end (finish, error, client gone, deadline, cancel in any
phase) goes through `_end`, which releases it at once."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import secrets
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from services.common import tensors
from services.common.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    KVBudgetFull,
    QuotaExceeded,
    ResourceExhausted,
    SessionBusy,
    ShuttingDown,
    StageDown,
    UnknownSession,
    VlmeshError,
    short,
)
from services.common.geometry import KVGeometry
from services.common.tracing import inject
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import coordinator_pb2, tensor_pb2

from . import inbox
from .auth import Quota
from .batch import BatchOutcome, MicroBatch, StepOutcome, StepPlan
from .detokenizer import Decoder, IncrementalDetokenizer
from .kv_log import KVLog
from .placement import Placement, Placer
from .prefix import PrefixCache
from .prepare import Prepared, Preparer
from .replicas import ReplicaRecovered, ReplicaRestarted
from .request import Observer, Phase, RequestSpec, RequestState, RequestSummary, Stream, TokenEmitted, Turn
from .scheduler import Scheduler, SchedulerConfig
from .session import Session
from .stage_client import Mesh, StageReplica
from .store import SessionStore
from .visual import VisualRows

log = logging.getLogger(__name__)

FINISH_STOP = coordinator_pb2.FINISH_REASON_STOP
FINISH_LENGTH = coordinator_pb2.FINISH_REASON_LENGTH
FINISH_STOP_STRING = coordinator_pb2.FINISH_REASON_STOP_STRING
MAX_RECOVERIES = 3  # steps of one request lost to replicas in a row before it fails


@dataclass(frozen=True)
class EngineConfig:
    default_max_tokens: int = 256
    max_images: int = 16  # per request
    vision_timeout: float = 300.0
    session_ttl: float = 1800.0
    max_sessions: int = 4096  # live persistent sessions, all keys together (0 = no cap)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_cache_sessions: int = 64  # finished one-shot sessions kept with their KV (0 = off)
    quotas: dict[str, Quota] = field(default_factory=dict)  # API key name -> its quotas
    housekeeping_s: float = 1.0
    trace_decode_every: int = 16  # a decode step gets its own span for the first and every Nth token (1 = every step)


class Execute(Protocol):
    """What runs a micro-batch (the Runner; a fake in unit tests)."""

    hop_timeout: float

    async def execute(self, batch: MicroBatch) -> BatchOutcome: ...


class Engine:
    def __init__(
        self,
        cfg: EngineConfig,
        mesh: Mesh,
        preparer: Preparer,
        tokenizer: Decoder,
        eos_token_ids: set[int],
        kv_log: KVLog,
        store: SessionStore | None,
        runner: Execute,
        text_config: Any,  # the checkpoint's text config (KV geometry)
        observers: tuple[Observer, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.mesh = mesh
        self.preparer = preparer
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_positions: int = preparer.max_positions
        self.kv_log = kv_log
        self.store = store
        self.runner = runner
        self.geometry = KVGeometry.from_text_config(text_config)
        self.observers = observers
        self.clock = clock
        self.scheduler = Scheduler(cfg.scheduler)
        self.placer = Placer(mesh, kv_log, self._load, lambda positions: runner.hop_timeout + 1e-3 * positions)
        self.prefix = PrefixCache(cfg.prefix_cache_sessions)
        self._token_text: dict[int, str] = {}  # token id -> its text alone: every request's detokenizer shares it
        self.sessions: dict[str, Session] = {}
        self.requests: dict[str, RequestState] = {}
        self.counts = inbox.Counts(0, 0, 0)  # republished every round: read by other threads (metrics)
        self._moved: dict[str, set[str]] = {}  # replica address -> sessions moved away from it while it held their KV
        self._batches: dict[int, tuple[str, ...]] = {}  # micro-batch id -> its requests, while in flight
        self._batch_count = 0
        self._last_renew = 0.0
        self._inbox: deque[inbox.Message] = deque()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one that may touch the state (set by start)
        mesh.subscribe(self.post)
        if store is not None:
            for s in store.load():
                self.sessions[s.id] = s

    # ------------------------------------------------------------------ the one door

    def post(self, message: inbox.Message) -> None:
        """The one way in. From another thread (a metrics scrape, a test) it hops onto the loop."""
        if self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self.post, message)
            return
        self._inbox.append(message)
        self._wake.set()

    def add(self, spec: RequestSpec) -> Stream:
        stream = Stream()
        self.post(inbox.AddRequest(spec, stream))
        return stream

    def cancel(self, request_id: str, why: VlmeshError) -> None:
        self.post(inbox.CancelRequest(request_id, why))

    async def create_session(self, owner: str) -> str:
        """A new persistent session's id."""
        return await self._ask(lambda f: inbox.CreateSession(owner, f))

    async def close_session(self, session_id: str, owner: str) -> bool:
        return await self._ask(lambda f: inbox.CloseSession(session_id, owner, f))

    async def session_id_for(self, session_id: str, owner: str) -> str:
        """The id of a session of this owner; NOT_FOUND for any other (no existence leak)."""
        return await self._ask(lambda f: inbox.LookupSession(session_id, owner, f))

    async def snapshot(self) -> inbox.Snapshot:
        return await self._ask(inbox.SnapshotAsked)

    async def _ask(self, make: Callable[[asyncio.Future[Any]], inbox.Message]) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.post(make(reply))
        return await reply

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        _freeze_heap()
        loop = self._loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self._run())
        self._tasks.add(loop.create_task(self._ticks()))

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for r in list(self.requests.values()):
            self._end(r, error=ShuttingDown("the coordinator is shutting down"))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self.round()
            except Exception:  # noqa: BLE001 - the loop must survive anything one round does
                log.exception("engine round failed")

    def round(self) -> None:
        """Apply what arrived, then start what can start."""
        assert self._loop is None or _running_loop() is self._loop, "engine state touched off its loop"
        began = time.perf_counter()
        while self._inbox:
            self._apply(self._inbox.popleft())
        self._place_waiting()
        while (picked := self.scheduler.next_batch(len(self._batches))) and (batch := self._plan(picked)) is not None:
            self._spawn(self._execute(batch))
        self.counts = self._count()
        seconds = time.perf_counter() - began
        for obs in self.observers:
            obs.on_round(seconds)

    def _apply(self, m: inbox.Message) -> None:
        handlers: dict[type, Callable[[Any], None]] = {
            inbox.AddRequest: self._on_add,
            inbox.CancelRequest: self._on_cancel_message,
            inbox.CreateSession: self._on_create_session,
            inbox.CloseSession: self._on_close_session,
            inbox.LookupSession: self._on_lookup,
            inbox.SnapshotAsked: lambda m: _reply(m.reply, lambda: inbox.Snapshot(self._count(), self._pinned())),
            inbox.PrepareDone: self._on_prepared,
            inbox.PlaceDone: self._on_placed,
            inbox.RowsFetched: self._on_rows,
            inbox.TaskDone: self._on_task_done,
            inbox.StepDone: lambda m: self._apply_step(m.outcome),
            inbox.LeasesRenewed: self._on_leases,
            inbox.Tick: lambda m: self._housekeeping(),
            ReplicaRestarted: lambda m: self._on_replica_restarted(m.address),
            ReplicaRecovered: lambda m: self._release_moved(m.address),
        }
        handlers[type(m)](m)

    def _spawn(self, work: Awaitable[inbox.Message | None]) -> asyncio.Task[None]:
        """A task that waits on something and posts what it found (never changes state itself)."""

        async def run() -> None:
            try:
                message = await work
            except asyncio.CancelledError:
                return
            if message is not None:
                self.post(message)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.housekeeping_s)
            self.post(inbox.Tick())

    # ------------------------------------------------------------------ sessions

    def _on_create_session(self, m: inbox.CreateSession) -> None:
        def create() -> str:
            live = [x for x in self.sessions.values() if x.persistent]
            if self.cfg.max_sessions and len(live) >= self.cfg.max_sessions:
                raise ResourceExhausted(
                    f"the coordinator holds {len(live)} live sessions, its limit (--max-sessions); close some or wait for idle ones to expire",
                    reason="SESSION_LIMIT",
                )
            quota = self.cfg.quotas.get(m.owner, Quota())
            mine = sum(1 for x in live if x.owner == m.owner)
            if quota.max_sessions and mine >= quota.max_sessions:
                raise QuotaExceeded(f"quota max_sessions of key {m.owner!r}: {mine} live sessions")
            s = Session.new(m.owner, persistent=True, now=self.clock())
            self.sessions[s.id] = s
            self._save(s)
            return s.id

        _reply(m.reply, create)

    def _session_of(self, session_id: str, owner: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None or not s.persistent or s.owner != owner:
            raise UnknownSession(f"unknown session {short(session_id)} (closed, expired, or never created)")
        return s

    def _on_lookup(self, m: inbox.LookupSession) -> None:
        _reply(m.reply, lambda: self._session_of(m.session_id, m.owner).id)

    def _on_close_session(self, m: inbox.CloseSession) -> None:
        s = self.sessions.get(m.session_id)
        if s is None or not s.persistent or (m.owner is not None and s.owner != m.owner):
            if m.reply is not None:
                _reply(m.reply, lambda: False)
            return
        del self.sessions[s.id]
        for r in list(self.requests.values()):
            if r.session is s:
                self._on_cancel(r, Cancelled("the session was closed"))
        self._release(s)
        if self.store is not None:
            self._spawn(self._nothing(self.store.delete(s.id)))
        if m.reply is not None:
            _reply(m.reply, lambda: True)

    # ------------------------------------------------------------------ request lifecycle

    def _on_add(self, m: inbox.AddRequest) -> None:
        spec = m.spec
        try:
            s = self._session_for_turn(spec)
        except VlmeshError as err:
            _refuse(m.stream, spec, err, self.clock())
            return
        now = self.clock()
        s.busy = True
        s.last_used = now
        turn = Turn(len(s.token_ids), len(s.visual_positions), len(s.visuals), len(s.messages), s.rope_delta, s.cached)
        r = RequestState(spec, m.stream, s, turn, carrier=() if spec.trace_context is None else tuple(inject(spec.trace_context).items()))
        self.requests[spec.id] = r
        r.task = self._spawn(self._prepare(r))

    def _session_for_turn(self, spec: RequestSpec) -> Session:
        if spec.session_id:
            s = self._session_of(spec.session_id, spec.owner)
            if s.busy:
                raise SessionBusy(f"session {short(s.id)} is already generating")
        if len(spec.inputs) > self.cfg.max_images:
            raise InvalidArgument(f"{len(spec.inputs)} images and videos in one request; the limit is {self.cfg.max_images}")
        quota = self.cfg.quotas.get(spec.owner, Quota())
        running = sum(1 for x in self.requests.values() if x.spec.owner == spec.owner)
        if quota.max_requests and running >= quota.max_requests:
            raise QuotaExceeded(f"quota max_requests of key {spec.owner!r}: {running} requests in flight")
        if spec.session_id:
            return s
        one_shot = Session.new(spec.owner, persistent=False, now=self.clock())
        self.sessions[one_shot.id] = one_shot
        return one_shot

    def _on_cancel_message(self, m: inbox.CancelRequest) -> None:
        r = self.requests.get(m.request_id)
        if r is not None:
            for x in [r, *self._group(r)]:
                self._on_cancel(x, m.why)

    def _group(self, r: RequestState) -> list[RequestState]:
        """The other live continuations of r's call (n > 1)."""
        group = r.group or r.id
        return [x for x in self.requests.values() if x is not r and (x.group or x.id) == group and x.spec.params.n > 1]

    def _on_cancel(self, r: RequestState, why: VlmeshError) -> None:
        if r.phase is Phase.ENDED:
            return
        if r.in_flight:
            r.abort = why  # ended when its step returns
            return
        self._end(r, error=why)

    def _check_deadlines(self) -> None:
        now = self.clock()
        for r in list(self.requests.values()):
            if r.spec.deadline is not None and now > r.spec.deadline and r.phase is not Phase.ENDED:
                self._on_cancel(r, DeadlineExceeded("the request's deadline passed"))

    async def _prepare(self, r: RequestState) -> inbox.PrepareDone:
        try:
            return inbox.PrepareDone(r.id, await self.preparer.prepare(r.spec, r.session))
        except VlmeshError as err:
            return inbox.PrepareDone(r.id, err)
        except Exception as err:  # noqa: BLE001 - a bad prompt fails its request alone
            log.exception("preparing request %s failed", r.id)
            return inbox.PrepareDone(r.id, Internal(f"preparing the prompt failed: {type(err).__name__}: {err}"))

    def _on_prepared(self, m: inbox.PrepareDone) -> None:
        r = self.requests.get(m.request_id)
        if r is None:
            return
        r.task = None
        if isinstance(m.result, VlmeshError):
            self._end(r, error=m.result)
            return
        try:
            self._begin_turn(r, m.result)
        except VlmeshError as err:
            self._end(r, error=err)
            return
        r.phase = Phase.READY
        self.scheduler.add(r)

    def _begin_turn(self, r: RequestState, p: Prepared) -> None:
        """Apply the prepared turn to the session (undone by _end if the turn fails)."""
        s = r.session
        base = len(s.token_ids)
        visuals = s.visuals + list(p.new_visuals)
        s.visual_positions += [base + i for i, t in enumerate(p.new_ids) if t in self.preparer.prompts.placeholder_ids]
        if len(s.visual_positions) != sum(v.rows for v in visuals):
            raise InvalidArgument("the prompt's visual placeholders do not match its images and videos")
        s.token_ids = s.token_ids + list(p.new_ids)
        s.visuals = visuals
        s.rope_delta = p.rope_delta
        history = len(s.token_ids)
        r.positions = p.positions
        r.rows = VisualRows(p.first_visual, sum(v.rows for v in s.visuals[: p.first_visual]), list(p.embeddings))
        r.max_tokens = min(r.spec.params.max_tokens or self.cfg.default_max_tokens, self.max_positions - history)
        r.sampling.CopyFrom(r.spec.params.sampling)
        if r.sampling.temperature > 0 and not r.sampling.HasField("seed"):
            # Sampling is a pure function of (seed, position): a seed of our own makes a turn
            # that fails over reproduce exactly what it would have sampled.
            r.sampling.seed = secrets.randbits(63)
        r.seen = set(s.token_ids)
        r.detok = IncrementalDetokenizer(self.tokenizer, list(r.spec.params.stop), self._token_text)
        if not s.persistent:
            self._adopt_prefix(r)
        self._check_fits(history)
        self._check_kv_quota(r)
        r.cached_tokens = s.cached
        r.prompt_tokens = history - s.cached

    def _range_kv(self) -> list[tuple[str, int, int]]:
        """(layers, K+V bytes one position takes there, the smallest replica budget) per range."""
        out = []
        for g in self.mesh.ranges:
            infos = [x.info for x in g.replicas if x.info is not None]
            if infos:
                per = self.geometry.bytes_per_token(g.end - g.start, infos[0].dtype)
                out.append((g.label, per, min(i.kv_budget_bytes for i in infos)))
        return out

    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one position, at the stages' dtypes."""
        return sum(bpt for _, bpt, _ in self._range_kv())

    def _check_fits(self, positions: int) -> None:
        """A session that could never fit a stage's whole KV budget is refused before any step."""
        for label, bpt, budget in self._range_kv():
            if positions * bpt > budget:
                raise KVBudgetFull(
                    f"the conversation needs {positions} positions; layers {label} hold at most {budget // bpt} (KV budget {budget >> 20} MiB)"
                )

    def _check_kv_quota(self, r: RequestState) -> None:
        """Before any memory is spent on it: the turn's KV (prompt and max_tokens) fits the key's
        quota, once the key's own parked prefixes have made room."""
        owner = r.spec.owner
        quota = self.cfg.quotas.get(owner, Quota())
        s = r.session
        if not quota.max_kv_mb:
            return
        bpt = self.kv_bytes_per_token()
        need = (len(s.token_ids) - s.cached + r.max_tokens) * bpt

        def held() -> int:
            mine = [x for x in [*self.sessions.values(), *self.prefix.sessions()] if x.owner == owner and x is not s]
            return (sum(x.cached for x in mine) + s.cached) * bpt

        while held() + need > quota.max_kv_mb << 20:
            old = self.prefix.evict_of(owner)
            if old is None:
                raise QuotaExceeded(
                    f"quota max_kv_mb of key {owner!r}: the key's sessions hold {held() >> 20} MiB and this turn needs up to {need >> 20} MiB more"
                )
            self._release(old)

    def _adopt_prefix(self, r: RequestState) -> None:
        """Prefix caching: a one-shot request whose history starts with what a parked session's
        stages hold takes that session's KV over and feeds only the rest."""
        s = r.session
        hit = self.prefix.take(s.token_ids, s.visuals, s.visual_positions, r.spec.owner)
        if hit is None:
            return
        parked, length = hit
        # Keep our session's id-less identity but move the KV's: the stages know the parked id.
        self.sessions.pop(s.id, None)
        s.id = parked.id
        self.sessions[s.id] = s
        s.replicas = dict(parked.replicas)
        s.cached = length
        s.rewind = True
        self.kv_log.truncate(s.id, length)
        log.debug("request %s reuses %d cached positions of %s", r.id, length, short(s.id))

    # ------------------------------------------------------------------ placement

    def _load(self, rep: StageReplica) -> int:
        return sum(1 for s in self.sessions.values() if rep.address in s.replicas.values())

    def _place_waiting(self) -> None:
        """Requests about to step whose session lacks an up replica on some range: pin it (no
        I/O needed for a fresh session), or place it in a task of its own, so a restore never
        stalls the sessions batched beside it."""
        for r in self.scheduler.queue:
            if not isinstance(r, RequestState) or not r.feedable or not (todo := self.placer.unplaced(r.session.replicas)):
                continue
            s = r.session
            fresh = self.placer.pick_fresh(todo) if s.cached == 0 and not r.avoid else None
            if fresh is not None:
                s.replicas.update(fresh)
                continue
            r.task = self._spawn(self._place(r.id, s.id, dict(s.replicas), s.cached, r.avoid))

    async def _place(self, request_id: str, session_id: str, pins: dict[int, str], cached: int, avoid: frozenset[str]) -> inbox.PlaceDone:
        try:
            return inbox.PlaceDone(request_id, await self.placer.place(session_id, pins, cached, avoid))
        except VlmeshError as err:
            return inbox.PlaceDone(request_id, err)

    def _on_placed(self, m: inbox.PlaceDone) -> None:
        r = self.requests.get(m.request_id)
        p = m.result
        if r is None:
            if isinstance(p, Placement):  # ended meanwhile: what was restored for it goes
                self._release_on(p.session_id, [a for i, a in p.pins.items() if p.moved_from.get(i) != a])
            return
        r.task = None
        if isinstance(p, VlmeshError):
            self._end(r, error=p)
            return
        r.avoid = frozenset()
        if p.replay:
            self._replay(r)
            return
        r.session.replicas.update(p.pins)
        for addr in p.moved_from.values():
            self._moved.setdefault(addr, set()).add(p.session_id)

    def _replay(self, r: RequestState) -> None:
        """The session's KV is lost on some range and the log cannot restore it: start its KV
        afresh everywhere and feed its whole history again (the sample at the end is the one
        the lost step would have made)."""
        s = r.session
        log.warning("session %s: KV lost and not in the KV log; replaying %d tokens", short(s.id), len(s.token_ids))
        self.kv_log.drop(s.id)
        s.forget_kv()
        try:
            for i in range(len(self.mesh.ranges)):
                s.replicas[i] = self.mesh.pick(i, load=self._load).address
        except VlmeshError as err:  # a range with no replica up at all
            self._end(r, error=err)
            return
        if r.rows is None or r.rows.first > 0:
            r.task = self._spawn(self._fetch_rows(r))

    async def _fetch_rows(self, r: RequestState) -> inbox.RowsFetched:
        """Embeddings of every visual of the session (for a replay from position 0)."""
        try:
            sources = [v.source for v in r.session.visuals]
            return inbox.RowsFetched(r.id, await self.preparer.encode(sources, r.spec.deadline, r.spec.trace_context))
        except VlmeshError as err:
            return inbox.RowsFetched(r.id, err)

    def _on_rows(self, m: inbox.RowsFetched) -> None:
        r = self.requests.get(m.request_id)
        if r is None:
            return
        r.task = None
        if isinstance(m.result, VlmeshError):
            self._end(r, error=m.result)
        else:
            r.rows = VisualRows(0, 0, m.result)

    def _on_replica_restarted(self, address: str) -> None:
        """A replica came back empty: sessions pinned there are placed again (restored) before
        their next step. A step in flight there fails on its own and is placed again too."""
        self._moved.pop(address, None)
        for s in [*self.sessions.values(), *self.prefix.sessions()]:
            for i, addr in list(s.replicas.items()):
                if addr == address:
                    del s.replicas[i]

    def _release_moved(self, address: str) -> None:
        """A replica that was down or stalled answers again, with the KV of sessions moved away
        from it: give that KV back now rather than when its lease runs out."""
        gone = self._moved.pop(address, set())
        still = {s.id for s in [*self.sessions.values(), *self.prefix.sessions()] if address in s.replicas.values()}
        for sid in gone - still:
            self._release_on(sid, [address])

    # ------------------------------------------------------------------ stepping

    def _plan(self, picked: list[tuple[Any, int]]) -> MicroBatch | None:
        """The immutable micro-batch the runner gets: ids, replicas, tokens, positions, visual rows."""
        steps: list[StepPlan] = []
        ids: list[str] = []
        for r, n in picked:
            assert isinstance(r, RequestState)
            try:
                steps.append(self._step_plan(r, min(n, r.remaining)))
            except VlmeshError as err:
                self._end(r, error=err)
                continue
            ids.append(r.id)
            r.in_flight = True
            if r.started_at is None:
                r.started_at = self.clock()
        if not steps:
            return None
        self._batch_count += 1
        self._batches[self._batch_count] = tuple(ids)
        return MicroBatch(self._batch_count, tuple(steps))

    def _step_plan(self, r: RequestState, n: int) -> StepPlan:
        s = r.session
        assert r.positions is not None and r.rows is not None
        start, end = s.cached, s.cached + n
        known = r.positions.shape[1]
        if n == 1 and start >= known:  # a decode step (the common case): its wire Tensor, no torch op
            positions = _decode_positions(start + s.rope_delta)
        elif end <= known:
            positions = tensors.to_proto(r.positions[:, start:end])
        else:  # generated tokens: text positions after the prompt, offset by the rope delta
            tail = torch.arange(max(start, known), end) + s.rope_delta
            both = torch.cat([r.positions[:, start:known], tail.expand(3, -1)], dim=1) if start < known else tail.expand(3, -1)
            positions = tensors.to_proto(both)
        visual: tensor_pb2.Tensor | None = None
        deepstack: tuple[tensor_pb2.Tensor, ...] = ()
        spans: tuple[tuple[int, int], ...] = ()
        if s.visual_positions and (hi := s.visual_rows_from(end)) > (lo := s.visual_rows_from(start)):
            spans = _spans([p - start for p in s.visual_positions[lo:hi]])
            visual, rows = r.rows.rows(lo, hi, self.preparer.deepstack_layers)
            deepstack = tuple(rows)
        sample = None
        every = max(1, self.cfg.trace_decode_every)
        traced = n > 1 or len(r.generated) <= 1 or len(r.generated) % every == 0
        forks: tuple[str, ...] = ()
        if end == len(s.token_ids):
            sample = stage_pb2.SampleRequest(params=r.sampling, top_logprobs=r.spec.params.logprobs)
            if r.spec.params.n > 1 and r.index == 0 and not r.generated:
                # n continuations: the prompt's last step forks its KV; fork i samples with seed + i.
                r.forks = r.forks or tuple(uuid.uuid4().hex for _ in range(r.spec.params.n - 1))
                forks = r.forks
                sample.fork_seeds.extend((r.sampling.seed + i) % 2**64 for i in range(1, len(forks) + 1))
            if r.sampling.repetition_penalty not in (0.0, 1.0):
                sample.penalty_token_ids.extend(sorted(r.seen))
            if r.sampling.HasField("constraint"):  # the sampler rebuilds the constraint's state from them
                sample.constraint_token_ids.extend(r.generated)
        return StepPlan(
            session_id=s.id,
            replicas=tuple([s.replicas[i] for i in range(len(self.mesh.ranges))]),
            start=start,
            token_ids=(s.token_ids[start],) if n == 1 else tuple(s.token_ids[start:end]),
            positions=positions,
            visual_spans=spans,
            visual=visual,
            deepstack=deepstack,
            sample=sample,
            rewind=s.rewind,
            return_kv_delta=self.kv_log.enabled,  # the log is what keeps them: off, the stages send none
            trace_context=r.spec.trace_context,
            traced=traced,
            carrier=r.carrier,
            deadline=r.spec.deadline,
            forks=forks,
        )

    async def _execute(self, batch: MicroBatch) -> inbox.StepDone:
        try:
            return inbox.StepDone(await self.runner.execute(batch))
        except Exception as err:  # noqa: BLE001 - a runner bug fails its batch alone
            log.exception("micro-batch %d failed", batch.id)
            failed = StepOutcome(error=Internal(f"internal error: {type(err).__name__}: {err}"))
            return inbox.StepDone(BatchOutcome(batch, tuple(failed for _ in batch.steps)))

    def _apply_step(self, outcome: BatchOutcome) -> None:
        ids = self._batches.pop(outcome.batch.id, ())
        if outcome.steps and all(o.error is None and o.lost is None for o in outcome.steps):
            self.scheduler.costs.observe(sum(p.prompt_tokens for p in outcome.batch.steps), outcome.wall_s)
        for rid, plan, o in zip(ids, outcome.batch.steps, outcome.steps):
            r = self.requests.get(rid)
            if r is None:
                continue
            r.in_flight = False
            try:
                self._update(r, len(plan.token_ids), o)
            except Exception as err:  # noqa: BLE001 - one request's bad update fails it alone
                log.exception("updating request %s failed", r.id)
                self._end(r, error=Internal(f"internal error: {type(err).__name__}: {err}"))

    def _update(self, r: RequestState, fed: int, o: StepOutcome) -> None:
        s = r.session
        if o.lost is not None and o.error is None:
            if r.abort is not None:
                self._end(r, error=r.abort)
            else:
                self._on_lost(r, o)
            return
        if o.error is not None:
            if o.error.reason == "KV_BUDGET_FULL" and r.abort is None and len(self.prefix):
                # Parked prefixes give their KV back, then the step runs again. Ranges that ran
                # it hold its positions already; the retry drops them first.
                s.rewind = True
                r.task = self._spawn(self._evict_then_resume(r))
                return
            self._end(r, error=o.error)
            return
        s.cached += fed
        s.rewind = False
        r.recoveries = 0
        self.kv_log.append(s.id, list(o.kv_deltas))
        if r.abort is not None:
            self._end(r, error=r.abort)
            return
        if o.token is None:
            if s.cached == len(s.token_ids):  # a final chunk must have sampled
                self._end(r, error=Internal("the last stage returned no token"))
            return
        if r.forks and o.fork_tokens:
            for i, (sid, token) in enumerate(zip(r.forks, o.fork_tokens), start=1):
                self._fork(r, i, sid, token)
            r.forks = ()
        self._emit(r, o.token)

    def _fork(self, r: RequestState, index: int, session_id: str, token: stage_pb2.SampledToken) -> None:
        """Continuation `index` of r's call: a session the stages just forked from r's prefill (its
        KV is r's prompt, on r's replicas), which goes on from its own first token."""
        s = r.session
        child = Session(session_id, s.owner, persistent=False, last_used=self.clock())
        child.token_ids, child.visual_positions, child.visuals = list(s.token_ids), list(s.visual_positions), list(s.visuals)
        child.rope_delta, child.cached, child.replicas, child.busy = s.rope_delta, s.cached, dict(s.replicas), True
        self.sessions[child.id] = child
        self.kv_log.fork(s.id, child.id)
        spec = dataclasses.replace(r.spec, id=f"{r.id}.{index}")
        c = RequestState(spec, r.stream, child, Turn(0, 0, 0, 0, 0, 0), carrier=r.carrier, index=index, group=r.id)
        c.positions, c.rows, c.max_tokens = r.positions, r.rows, r.max_tokens
        c.sampling.CopyFrom(r.sampling)
        c.sampling.seed = (r.sampling.seed + index) % 2**64
        c.seen = set(r.seen)
        c.detok = IncrementalDetokenizer(self.tokenizer, list(spec.params.stop), self._token_text)
        c.prompt_tokens, c.cached_tokens, c.started_at = r.prompt_tokens, r.cached_tokens, r.started_at
        c.phase = Phase.READY
        self.requests[spec.id] = c
        r.stream.open += 1
        self.scheduler.add(c)
        self._emit(c, token)

    def _on_lost(self, r: RequestState, o: StepOutcome) -> None:
        """A hop of the step was lost: place the range again (restore or replay) and step again.
        Ranges before it ran the step already: the retry drops those positions first."""
        assert o.lost is not None
        r.recoveries += 1
        if r.recoveries > MAX_RECOVERIES:
            self._end(r, error=StageDown(f"the step failed on {MAX_RECOVERIES + 1} replicas in a row: {o.lost.why}"))
            return
        s = r.session
        s.rewind = True
        if s.replicas.get(o.lost.range_index) == o.lost.address:
            del s.replicas[o.lost.range_index]
        if o.lost.replica_down:  # a stalled replica may come back with the KV: released there then
            self._moved.setdefault(o.lost.address, set()).add(s.id)
        r.avoid = r.avoid | {o.lost.address}

    def _emit(self, r: RequestState, token: stage_pb2.SampledToken) -> None:
        """A sampled token: append it, stream it, and end the turn if it ends here."""
        s = r.session
        now = self.clock()
        for obs in self.observers:
            obs.on_token(TokenEmitted(r.id, r.spec.arrival, now, r.last_token_at))
        if r.first_token_at is None:
            r.first_token_at = now
        r.last_token_at = now
        tid = token.token_id
        s.token_ids.append(tid)
        r.generated.append(tid)
        r.seen.add(tid)
        resp = coordinator_pb2.GenerateResponse(token_ids=[tid], index=r.index)
        if len(r.generated) == 1:
            resp.session_id = s.id if s.persistent else ""
        if r.spec.params.logprobs > 0:
            resp.logprobs.add(token=tensor_pb2.TokenLogprob(token_id=tid, logprob=token.logprob), top=list(token.top_logprobs))
        finish, resp.text = self._text_of(r, tid)
        r.text.append(resp.text)
        r.stream.items.put_nowait(resp)
        if finish is not None:
            self._end(r, finish=finish)

    def _text_of(self, r: RequestState, tid: int) -> tuple[coordinator_pb2.FinishReason.ValueType | None, str]:
        """(how the turn ends here, or None; the text this token releases)."""
        assert r.detok is not None
        finish: coordinator_pb2.FinishReason.ValueType | None = None
        text = ""
        if tid in self.eos_token_ids:
            finish = FINISH_STOP
            if r.spec.params.include_stop_token_text:
                text = self.tokenizer.decode([tid], skip_special_tokens=False)
        else:
            text = r.detok.push(tid)
            if r.detok.stopped:
                finish = FINISH_STOP_STRING
        if finish is None and len(r.generated) >= r.max_tokens:
            finish = FINISH_LENGTH
        if finish in (FINISH_STOP, FINISH_LENGTH):
            # Whatever the detokenizer still holds back (an unfinished character, a possible
            # stop string) is final now; it comes before an end-of-turn token's own text.
            held = r.detok.flush()
            text = held + text if finish == FINISH_STOP else text + held
        return finish, text

    # ------------------------------------------------------------------ ending a turn

    def _end(self, r: RequestState, finish: coordinator_pb2.FinishReason.ValueType | None = None, error: VlmeshError | None = None) -> None:
        """The one place a turn ends, however it ends."""
        if r.phase is Phase.ENDED:
            return
        r.phase = Phase.ENDED
        if r.task is not None:
            r.task.cancel()
            r.task = None
        self.scheduler.remove(r)
        self.requests.pop(r.id, None)
        s = r.session
        ok = error is None
        if not ok:
            self._undo(s, r.turn)
        elif s.persistent:
            s.messages = s.messages + list(r.spec.messages) + [{"role": "assistant", "content": "".join(r.text)}]
        s.busy = False
        s.last_used = self.clock()
        if not s.persistent:
            self._retire_one_shot(s, parked=ok)
        summary = RequestSummary(
            r.id,
            s.id if s.persistent else "",
            r.spec.arrival,
            r.started_at,
            r.first_token_at,
            self.clock(),
            r.prompt_tokens,
            r.cached_tokens,
            len(r.generated),
            finish,
            error,
        )
        for obs in self.observers:
            obs.on_end(summary)
        if error is not None:
            _close(r.stream, summary, error)
            for sibling in self._group(r):  # the call ends with the error: its other continuations too
                self._on_cancel(sibling, Cancelled("another continuation of the request failed"))
            return
        final = coordinator_pb2.GenerateResponse(
            index=r.index,
            finish_reason=finish or coordinator_pb2.FINISH_REASON_UNSPECIFIED,
            usage=coordinator_pb2.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.generated), cached_tokens=r.cached_tokens),
        )
        if s.persistent and self.store is not None:
            self._spawn(self._save_then(s, r.stream, summary, final))
        else:
            _close(r.stream, summary, final)

    def _undo(self, s: Session, t: Turn) -> None:
        del s.token_ids[t.tokens :]
        del s.visual_positions[t.visual_positions :]
        del s.visuals[t.visuals :]
        del s.messages[t.messages :]
        s.rope_delta = t.rope_delta
        if s.cached > t.cached:
            s.cached = t.cached
            s.rewind = True  # the stages hold positions of the failed turn: drop them first
            self.kv_log.truncate(s.id, t.cached)

    def _retire_one_shot(self, s: Session, parked: bool) -> None:
        self.sessions.pop(s.id, None)
        if parked and s.cached > 0 and self.prefix.capacity > 0:
            for old in self.prefix.park(s):
                self._release(old)
        else:
            self._release(s)

    async def _evict_then_resume(self, r: RequestState, count: int = 4) -> inbox.TaskDone:
        """Give back the KV of the least recently used parked prefixes, then let `r` step again."""
        evicted = [e for e in (self.prefix.evict() for _ in range(count)) if e is not None]
        for old in evicted:
            self.kv_log.drop(old.id)
        await asyncio.gather(*(self.mesh.replicas[a].release(old.id) for old in evicted for a in old.replicas.values() if a in self.mesh.replicas))
        return inbox.TaskDone(r.id)

    def _on_task_done(self, m: inbox.TaskDone) -> None:
        r = self.requests.get(m.request_id)
        if r is not None:
            r.task = None

    def _release(self, s: Session) -> None:
        self.kv_log.drop(s.id)
        addrs = list(s.replicas.values())
        s.replicas = {}
        self._release_on(s.id, addrs)

    def _release_on(self, session_id: str, addresses: list[str]) -> None:
        for a in addresses:
            rep = self.mesh.replicas.get(a)
            if rep is not None:
                self._spawn(self._nothing(rep.release(session_id)))

    @staticmethod
    async def _nothing(work: Awaitable[Any]) -> None:
        await work

    async def _save_then(self, s: Session, stream: Stream, summary: RequestSummary, final: coordinator_pb2.GenerateResponse) -> None:
        try:
            await self._save_now(s)
        finally:
            _close(stream, summary, final)

    def _save(self, s: Session) -> None:
        if self.store is not None:
            self._spawn(self._save_now(s))

    async def _save_now(self, s: Session) -> None:
        assert self.store is not None
        try:
            await self.store.save(s)
        except Exception:  # noqa: BLE001 - the answer stands; the next save may work
            log.exception("saving session %s failed", short(s.id))

    # ------------------------------------------------------------------ housekeeping

    def _housekeeping(self) -> None:
        """Deadlines, idle sessions, leases, moved KV to give back: every tick."""
        self._check_deadlines()
        now = self.clock()
        for s in [s for s in self.sessions.values() if s.persistent and not s.busy and now - s.last_used > self.cfg.session_ttl]:
            log.info("session %s expired after %.0fs idle", short(s.id), self.cfg.session_ttl)
            self._on_close_session(inbox.CloseSession(s.id, None, None))
        for addr in [a for a in self._moved if (rep := self.mesh.replicas.get(a)) is not None and rep.up]:
            self._release_moved(addr)
        lease = min((r.info.lease_seconds for r in self.mesh.replicas.values() if r.info and r.info.lease_seconds), default=60.0)
        if now - self._last_renew > lease / 3:
            self._last_renew = now
            for addr, ids in self._held().items():
                rep = self.mesh.replicas.get(addr)
                if rep is not None and rep.up:
                    self._spawn(self._renew(rep, ids))

    def _held(self) -> dict[str, list[str]]:
        held: dict[str, list[str]] = {}
        for s in [*self.sessions.values(), *self.prefix.sessions()]:
            for addr in s.replicas.values():
                held.setdefault(addr, []).append(s.id)
        return held

    async def _renew(self, rep: StageReplica, ids: list[str]) -> inbox.LeasesRenewed | None:
        try:
            return inbox.LeasesRenewed(rep.address, frozenset(await rep.renew(ids)))
        except Exception as err:  # noqa: BLE001 - the next round tries again
            log.info("renewing leases on %s failed: %s", rep.address, err)
            return None

    def _on_leases(self, m: inbox.LeasesRenewed) -> None:
        flying = {r.session.id for r in self.requests.values() if r.in_flight}
        for s in [*self.sessions.values(), *self.prefix.sessions()]:
            if s.id in m.unknown and s.id not in flying:
                for i, a in list(s.replicas.items()):
                    if a == m.address:
                        del s.replicas[i]

    # ------------------------------------------------------------------ status

    def _count(self) -> inbox.Counts:
        waiting = sum(1 for r in self.requests.values() if r.phase is Phase.PREPARING or (r.phase is Phase.READY and r.started_at is None))
        return inbox.Counts(sum(1 for s in self.sessions.values() if s.persistent) + len(self.requests), len(self.requests) - waiting, waiting)

    def _pinned(self) -> dict[str, int]:
        return {addr: len(ids) for addr, ids in self._held().items()}


_heap_frozen = False


def _freeze_heap() -> None:
    """Once per process, when the first engine starts (as vLLM's engine core does): what the process
    holds by then (torch, transformers, the tokenizer, the templates: millions of objects that never
    become garbage) leaves the garbage collector's reach, so a full collection scans only what
    serving allocates instead of pausing every stream for ~100 ms (measured: bench_engine.py)."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _reply(reply: asyncio.Future[Any], compute: Callable[[], Any]) -> None:
    if reply.done():  # the asker went away
        return
    try:
        reply.set_result(compute())
    except VlmeshError as err:
        reply.set_exception(err)


def _close(stream: Stream, summary: RequestSummary, last: coordinator_pb2.GenerateResponse | VlmeshError) -> None:
    """A continuation ended: its last response, and the stream's end once every continuation
    has (an error ends it at once; what comes after is dropped)."""
    if stream.open <= 0:
        return
    stream.items.put_nowait(last)
    stream.open = 0 if isinstance(last, VlmeshError) else stream.open - 1
    if stream.open == 0:
        stream.items.put_nowait(None)
        if not stream.summary.done():
            stream.summary.set_result(summary)


def _refuse(stream: Stream, spec: RequestSpec, err: VlmeshError, now: float) -> None:
    """A request refused before it had any state."""
    _close(stream, RequestSummary(spec.id, spec.session_id, spec.arrival, None, None, now, 0, 0, 0, None, err), err)


_POSITION3 = struct.Struct("<3q")  # one position's three M-RoPE components (t, h, w), int64 little-endian


def _decode_positions(position: int) -> tensor_pb2.Tensor:
    """A decode step's [3, 1] positions as the wire Tensor (what tensors.to_proto makes of them)."""
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=(3, 1), data=_POSITION3.pack(position, position, position))


def _spans(offsets: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted offsets as runs: [3, 4, 5, 9] -> ((3, 3), (9, 1))."""
    out: list[tuple[int, int]] = []
    for o in offsets:
        if out and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((o, 1))
    return tuple(out)
