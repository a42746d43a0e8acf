"""The engine: the one owner of sessions and requests (vLLM v1's loop: schedule, execute, update).

gRPC handlers never touch a session. They post messages (add a request, abort it, close a
session) and read each request's output queue. Everything that changes a session or a request
runs on the engine's event loop, in the engine's own coroutines: the loop that schedules
micro-batches, the tasks that prepare a prompt (template, vision, M-RoPE), the tasks that run a
micro-batch through the stages and apply its outcome, and the tasks that repair a session's
placement when a replica is lost. Every way a turn can end (finish, error, client gone,
deadline, cancel in any phase) goes through `_end`, which releases it at once."""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common.errors import Cancelled, Conflict, DeadlineExceeded, InvalidInput, KVBudgetFull, StageDown, UnknownSession, VlmeshError, short
from services.common.tracing import metadata, tracer
from vlmesh.internal.v1 import stage_pb2, vision_pb2
from vlmesh.v1 import coordinator_pb2, tensor_pb2

from .auth import Quota
from .detokenizer import IncrementalDetokenizer
from .kv_log import KVLog
from .prefix import PrefixCache
from .prompt import PromptBuilder
from .rope import RopeIndex
from .runner import Runner, StepOutcome, StepPlan
from .scheduler import Scheduler, SchedulerConfig
from .session import Session
from .stage_client import Mesh, StageReplica
from .store import SessionStore
from .vision_client import VisionPool
from .visual import Visual, VisualRows

log = logging.getLogger(__name__)
_tracer = tracer("coordinator")

FINISH_STOP = coordinator_pb2.FINISH_REASON_STOP
FINISH_LENGTH = coordinator_pb2.FINISH_REASON_LENGTH
FINISH_STOP_STRING = coordinator_pb2.FINISH_REASON_STOP_STRING


@dataclass(frozen=True)
class EngineConfig:
    default_max_tokens: int = 256
    max_images: int = 16  # per request
    vision_timeout: float = 300.0
    session_ttl: float = 1800.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_cache_sessions: int = 64  # finished one-shot sessions kept with their KV (0 = off)
    quotas: dict[str, Quota] = field(default_factory=dict)  # API key name -> its quotas


@dataclass(frozen=True)
class GenerateParams:
    """What a Generate call asks for, validated by the handler."""

    sampling: tensor_pb2.SamplingParams
    max_tokens: int  # 0 = the default
    stop: tuple[str, ...]
    logprobs: int
    include_stop_token_text: bool


class Observer(Protocol):
    """Told about every request's tokens and end, on the engine's loop (metrics)."""

    def on_token(self, r: Request, now: float) -> None: ...

    def on_end(self, r: Request, finish: int | None, error: VlmeshError | None) -> None: ...


@dataclass(frozen=True)
class _Add:
    request: Request


@dataclass(frozen=True)
class _Cancel:
    request_id: str
    why: VlmeshError


@dataclass(frozen=True)
class _Close:
    session_id: str


class Phase(enum.Enum):
    PREPARING = "preparing"  # template, vision, M-RoPE (a task)
    READY = "ready"  # in the scheduler's queue
    ENDED = "ended"


@dataclass
class Turn:
    """What a turn changes in its session: enough to undo it if it fails."""

    tokens: int
    visual_positions: int
    visuals: int
    messages: int
    rope_delta: int
    cached: int


@dataclass(eq=False)
class Request:
    """One Generate call. Created by `Engine.add`; every field below `out` is the engine's."""

    id: str
    session_id: str  # "" = one-shot
    owner: str
    messages: list[dict]  # template messages of this turn
    inputs: list[vision_pb2.VisualInput]  # its images and videos, in prompt order
    params: GenerateParams
    deadline: float | None  # time.monotonic() by which the client wants the answer
    trace_context: otel_context.Context | None
    arrival: float = field(default_factory=time.monotonic)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # GenerateResponse | VlmeshError | None (end)

    phase: Phase = Phase.PREPARING
    session: Session | None = None
    turn: Turn | None = None
    task: asyncio.Task | None = None  # preparing, fetching visual rows or repairing placement
    in_flight: bool = False
    abort: VlmeshError | None = None  # why the engine must end it when its step returns
    rows: VisualRows | None = None  # the visual embeddings this request may still feed
    positions: torch.Tensor | None = None  # [3, L] M-RoPE positions of the history at prepare time
    sampling: tensor_pb2.SamplingParams = field(default_factory=tensor_pb2.SamplingParams)
    max_tokens: int = 0
    detok: IncrementalDetokenizer | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # the reply as streamed
    seen: set[int] = field(default_factory=set)  # distinct tokens so far (repetition penalty)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None  # (metrics: inter-token latency)
    finish: coordinator_pb2.FinishReason.ValueType | None = None  # how it ended, when it ended well
    started_at: float | None = None  # first step scheduled
    span: trace.Span | None = None

    @property
    def feedable(self) -> bool:
        return self.phase is Phase.READY and not self.in_flight and self.task is None and self.abort is None

    @property
    def remaining(self) -> int:
        s = self.session
        return len(s.token_ids) - s.cached if s is not None else 0


class Engine:
    def __init__(
        self,
        cfg: EngineConfig,
        mesh: Mesh,
        vision: VisionPool,
        prompts: PromptBuilder,
        rope: RopeIndex,
        tokenizer,
        eos_token_ids: set[int],
        max_positions: int,
        kv_log: KVLog,
        store: SessionStore | None,
        runner: Runner,
        deepstack_layers: int,
        kv_heads: int = 0,
        head_dim: int = 0,
    ):
        self.cfg = cfg
        self.mesh = mesh
        self.vision = vision
        self.prompts = prompts
        self.rope = rope
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_positions = max_positions
        self.kv_log = kv_log
        self.store = store
        self.runner = runner
        self.deepstack_layers = deepstack_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.scheduler = Scheduler(cfg.scheduler)
        self.sessions: dict[str, Session] = {}
        self.requests: dict[str, Request] = {}
        self.prefix = PrefixCache(cfg.prefix_cache_sessions)
        self._inbox: deque[_Add | _Cancel | _Close] = deque()
        self._wake = asyncio.Event()
        self._batches: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.observers: list[Observer] = []  # metrics
        runner.recover = self.recover
        mesh.on_restart = self.on_replica_restart
        if store is not None:
            for s in store.load():
                self.sessions[s.id] = s

    # ------------------------------------------------------------------ messages from handlers

    def add(self, req: Request) -> None:
        self._post(_Add(req))

    def cancel(self, request_id: str, why: VlmeshError) -> None:
        self._post(_Cancel(request_id, why))

    def create_session(self, owner: str) -> Session:
        """A new persistent session (no other state is touched: safe to do inline)."""
        quota = self.cfg.quotas.get(owner, Quota())
        live = sum(1 for x in self.sessions.values() if x.persistent and x.owner == owner)
        if quota.max_sessions and live >= quota.max_sessions:
            raise KVBudgetFull(f"quota max_sessions of key {owner!r}: {live} live sessions", reason="QUOTA_EXCEEDED")
        s = Session.new(owner, persistent=True)
        self.sessions[s.id] = s
        self._spawn(self._save(s))
        return s

    def close_session(self, session_id: str, owner: str) -> bool:
        s = self.sessions.get(session_id)
        if s is None or not s.persistent or s.owner != owner:
            return False
        self._post(_Close(session_id))
        return True

    def session_for(self, session_id: str, owner: str) -> Session:
        """A session of this owner; NOT_FOUND for any other (no existence leak)."""
        s = self.sessions.get(session_id)
        if s is None or not s.persistent or s.owner != owner:
            raise UnknownSession(f"unknown session {short(session_id)} (closed, expired, or never created)")
        return s

    def _post(self, message: _Add | _Cancel | _Close) -> None:
        self._inbox.append(message)
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._spawn(self._housekeeping())

    async def stop(self) -> None:
        for t in [*self._tasks, *self._batches, *([self._loop_task] if self._loop_task else [])]:
            t.cancel()
        for r in list(self.requests.values()):
            self._end(r, error=StageDown("the coordinator is shutting down"))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self._inbox:
                    m = self._inbox.popleft()
                    if isinstance(m, _Add):
                        self._on_add(m.request)
                    elif isinstance(m, _Cancel):
                        r = self.requests.get(m.request_id)
                        if r is not None:
                            self._on_cancel(r, m.why)
                    else:
                        self._on_close(m.session_id)
                self._check_deadlines()
                while batch := self.scheduler.next_batch(len(self._batches)):
                    self._launch(batch)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - the loop must survive anything one round does
                log.exception("engine round failed")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ request lifecycle

    def _on_add(self, r: Request) -> None:
        self.requests[r.id] = r
        try:
            if r.session_id:
                s = self.session_for(r.session_id, r.owner)
                if s.busy:
                    raise Conflict(f"session {short(s.id)} is already generating")
            else:
                s = Session.new(r.owner, persistent=False)
                self.sessions[s.id] = s
            if len(r.inputs) > self.cfg.max_images:
                raise InvalidInput(f"{len(r.inputs)} images and videos in one request; the limit is {self.cfg.max_images}")
            quota = self.cfg.quotas.get(r.owner, Quota())
            running = sum(1 for x in self.requests.values() if x.owner == r.owner and x.session is not None)
            if quota.max_requests and running >= quota.max_requests:
                raise KVBudgetFull(f"quota max_requests of key {r.owner!r}: {running} requests in flight", reason="QUOTA_EXCEEDED")
        except VlmeshError as err:
            self._end(r, error=err)
            return
        s.busy = True
        s.last_used = time.monotonic()
        r.session = s
        r.turn = Turn(len(s.token_ids), len(s.visual_positions), len(s.visuals), len(s.messages), s.rope_delta, s.cached)
        r.task = self._spawn(self._prepare(r))

    def _on_cancel(self, r: Request, why: VlmeshError) -> None:
        if r.phase is Phase.ENDED:
            return
        if r.in_flight:
            r.abort = why  # ended when its step returns
            return
        self._end(r, error=why)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for r in list(self.requests.values()):
            if r.deadline is not None and now > r.deadline and r.phase is not Phase.ENDED:
                self._on_cancel(r, DeadlineExceeded("the request's deadline passed"))

    async def _prepare(self, r: Request) -> None:
        """Template, vision and M-RoPE for the turn; then the request joins the scheduler."""
        s = r.session
        assert s is not None and r.turn is not None
        try:
            history_msgs = s.messages
            last = s.token_ids[-1] if s.token_ids else None
            prompt = self.prompts.new_text(history_msgs, r.messages)
            prompt.text = self.prompts.closing(last) + prompt.text
            # Embeddings are needed for every visual with rows still to feed: the new ones, and
            # old ones when the session's KV must be rebuilt.
            first_row = s.visual_rows_from(s.cached)
            k0 = s.visual_index_of_row(first_row)
            old = s.visuals[k0:]
            embeddings = await self._encode([v.source for v in old] + list(r.inputs), r.deadline, r.trace_context)
            new_visuals = [Visual.from_encoding(src, e) for src, e in zip(r.inputs, embeddings[len(old) :])]
            new_ids = await asyncio.to_thread(self.prompts.tokenize, prompt, new_visuals, not s.token_ids)
            history = s.token_ids + new_ids
            if len(history) >= self.max_positions:
                raise InvalidInput(f"prompt of {len(history)} tokens leaves no room within the model's limit of {self.max_positions}")
            visuals = s.visuals + new_visuals
            positions, delta = await asyncio.to_thread(self.rope.positions, history, visuals)
        except asyncio.CancelledError:
            return
        except VlmeshError as err:
            r.task = None
            self._end(r, error=err)
            return
        except Exception as err:  # noqa: BLE001 - a bad prompt fails its request alone
            log.exception("preparing request %s failed", r.id)
            r.task = None
            self._end(r, error=VlmeshError(f"preparing the prompt failed: {type(err).__name__}: {err}"))
            return
        r.task = None
        if r.phase is Phase.ENDED:
            return
        # Apply the turn to the session (undone by _end if the turn fails).
        base = len(s.token_ids)
        s.visual_positions += [base + i for i, t in enumerate(new_ids) if t in self.prompts.placeholder_ids]
        if len(s.visual_positions) != sum(v.rows for v in visuals):
            self._end(r, error=InvalidInput("the prompt's visual placeholders do not match its images and videos"))
            return
        s.token_ids = history
        s.visuals = visuals
        s.rope_delta = delta
        r.positions = positions
        r.rows = VisualRows(k0, sum(v.rows for v in s.visuals[:k0]), list(embeddings))
        r.max_tokens = min(r.params.max_tokens or self.cfg.default_max_tokens, self.max_positions - len(history))
        r.sampling.CopyFrom(r.params.sampling)
        if r.sampling.temperature > 0 and not r.sampling.HasField("seed"):
            # Sampling is a pure function of (seed, position): a seed of our own makes a turn
            # that fails over reproduce exactly what it would have sampled.
            r.sampling.seed = secrets.randbits(63)
        r.seen = set(history)
        r.detok = IncrementalDetokenizer(self.tokenizer, list(r.params.stop))
        if not s.persistent:
            self._adopt_prefix(r)
        try:
            self._check_fits(len(history))
            self._check_kv_quota(r)
        except VlmeshError as err:
            self._end(r, error=err)
            return
        r.cached_tokens = s.cached
        r.prompt_tokens = len(history) - s.cached
        r.phase = Phase.READY
        self.scheduler.add(r)
        self._wake.set()

    def _range_kv(self) -> list[tuple[str, int, int]]:
        """(layers, K+V bytes one position takes there, the smallest replica budget) per range."""
        out = []
        for g in self.mesh.ranges:
            infos = [x.info for x in g.replicas if x.info is not None]
            if infos:
                itemsize = 2 if infos[0].dtype in ("bfloat16", "float16") else 4
                out.append((g.label, 2 * (g.end - g.start) * self.kv_heads * self.head_dim * itemsize, min(i.kv_budget_bytes for i in infos)))
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

    def _check_kv_quota(self, r: Request) -> None:
        """Before any memory is spent on it: the turn's KV (prompt and max_tokens) fits the key's
        quota, once the key's own parked prefixes have made room."""
        quota = self.cfg.quotas.get(r.owner, Quota())
        s = r.session
        if not quota.max_kv_mb or s is None:
            return
        bpt = self.kv_bytes_per_token()
        need = (len(s.token_ids) - s.cached + r.max_tokens) * bpt

        def held() -> int:
            mine = [x for x in [*self.sessions.values(), *self.prefix.sessions()] if x.owner == r.owner and x is not s]
            return (sum(x.cached for x in mine) + s.cached) * bpt

        while held() + need > quota.max_kv_mb << 20:
            old = self.prefix.evict_of(r.owner)
            if old is None:
                raise KVBudgetFull(
                    f"quota max_kv_mb of key {r.owner!r}: the key's sessions hold {held() >> 20} MiB and this turn needs up to {need >> 20} MiB more",
                    reason="QUOTA_EXCEEDED",
                )
            self._release(old)

    async def _encode(
        self, inputs: list[vision_pb2.VisualInput], deadline: float | None, ctx: otel_context.Context | None
    ) -> list[vision_pb2.VisualEmbedding]:
        if not inputs:
            return []
        # Rebuilding a long session may need more visuals than one request may carry.
        size = self.cfg.max_images
        parts = [inputs[i : i + size] for i in range(0, len(inputs), size)]
        with _tracer.start_as_current_span(
            "vision",
            context=ctx,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "vlmesh.internal.v1.VisionService", "rpc.method": "Encode", "vlmesh.inputs": len(inputs)},
        ) as span:
            resps = await asyncio.gather(*(self.vision.encode(p, deadline, self.cfg.vision_timeout, metadata()) for p in parts))
            out = [e for resp in resps for e in resp.embeddings]
            span.set_attribute("vlmesh.cache_hits", sum(e.cache_hit for e in out))
        if len(out) != len(inputs):
            raise StageDown(f"vision answered {len(out)} of {len(inputs)} inputs")
        layers = {len(e.deepstack) for e in out}
        if len(layers) != 1 or layers.pop() != self.deepstack_layers:
            raise StageDown("vision returned DeepStack features that do not match the model")
        return out

    def _adopt_prefix(self, r: Request) -> None:
        """Prefix caching: a one-shot request whose history starts with what a parked session's
        stages hold takes that session's KV over and feeds only the rest."""
        s = r.session
        assert s is not None
        hit = self.prefix.take(s.token_ids, s.visuals, s.visual_positions, r.owner)
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

    # ------------------------------------------------------------------ stepping

    def _launch(self, batch: list[tuple[Request, int]]) -> None:
        for r, _ in batch:
            r.in_flight = True
            if r.started_at is None:
                r.started_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._step(batch))
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        self._wake.set()

    async def _step(self, batch: list[tuple[Request, int]]) -> None:
        plans: list[StepPlan] = []
        runnable: list[tuple[Request, int]] = []
        for r, n in batch:
            s = r.session
            assert s is not None
            cached = s.cached
            try:
                await self._place(r)
            except VlmeshError as err:
                r.in_flight = False
                self._end(r, error=err)
                continue
            if r.phase is Phase.ENDED or r.abort is not None or r.task is not None or s.cached != cached:
                # Ended, cancelled, or its KV is being rebuilt: not this round.
                r.in_flight = False
                if r.abort is not None:
                    self._end(r, error=r.abort)
                continue
            plans.append(self._plan(r, min(n, r.remaining)))
            runnable.append((r, min(n, r.remaining)))
        began = time.monotonic()
        outcomes = await self.runner.execute(plans) if plans else []
        if plans and all(o.error is None and not o.replay for o in outcomes):
            self.scheduler.costs.observe(sum(len(p.token_ids) for p in plans if p.sample is None or len(p.token_ids) > 1), time.monotonic() - began)
        for (r, n), outcome in zip(runnable, outcomes):
            r.in_flight = False
            try:
                self._update(r, n, outcome)
            except Exception as err:  # noqa: BLE001 - one request's bad update fails it alone
                log.exception("updating request %s failed", r.id)
                self._end(r, error=VlmeshError(f"internal error: {type(err).__name__}: {err}"))

    async def _place(self, r: Request) -> None:
        """Pin the session to an up replica of every range, restoring its KV where a pinned
        replica was lost; replay (feed the history again) where the log cannot restore it."""
        s = r.session
        assert s is not None
        for i, rng in enumerate(self.mesh.ranges):
            addr = s.replicas.get(i)
            rep = self.mesh.replicas.get(addr) if addr else None
            if rep is not None and rep.up:
                continue
            if not rng.up() or (rep is not None and not rep.up):
                await self.mesh.refresh(i)  # down a moment ago may be up again now
                addr = s.replicas.get(i)  # (a restart seen by the probe drops the pin)
                rep = self.mesh.replicas.get(addr) if addr else None
                if rep is not None and rep.up:
                    continue
            if s.cached == 0:
                s.replicas[i] = self.mesh.pick(i, load=self._load).address
                continue
            if await self._restore(s, i, exclude={addr} if addr else set()) is None:
                self._replay(r)
                return

    def _load(self, rep: StageReplica) -> int:
        return sum(1 for s in self.sessions.values() if rep.address in s.replicas.values())

    async def _restore(self, s: Session, index: int, exclude: set[str]) -> StageReplica | None:
        """Put the session's KV for range `index` on an up replica from the KV log."""
        rng = self.mesh.ranges[index]
        entries = self.kv_log.entries(s.id, range(rng.start, rng.end), s.cached)
        if entries is None:
            return None
        candidates = [x for x in rng.up() if x.address not in exclude] or rng.up()
        for rep in sorted(candidates, key=self._load):
            try:
                with _tracer.start_as_current_span(
                    "restore", attributes={"session.id": s.id, "vlmesh.layers": rng.label, "server.address": rep.address, "vlmesh.positions": s.cached}
                ):
                    await rep.restore(s.id, s.cached, entries, timeout=self.runner.hop_timeout + 1e-3 * s.cached)
            except VlmeshError as err:
                log.warning("restoring %s on %s failed: %s", short(s.id), rep.address, err)
                continue
            s.replicas[index] = rep.address
            log.info("session %s: layers %s restored on %s (%d positions, no recompute)", short(s.id), rng.label, rep.address, s.cached)
            return rep
        return None

    async def recover(self, plan: StepPlan, index: int, dead: StageReplica | None) -> StageReplica | None:
        """The runner lost a hop of this session's step on range `index`."""
        s = plan.session
        if not self.mesh.ranges[index].up():
            await self.mesh.refresh(index)
        if plan.start == 0:  # nothing to restore: any up replica starts it afresh
            rng = self.mesh.ranges[index]
            up = [x for x in rng.up() if dead is None or x.address != dead.address] or rng.up()
            if not up:
                return None
            s.replicas[index] = min(up, key=self._load).address
            return self.mesh.replicas[s.replicas[index]]
        return await self._restore(s, index, exclude={dead.address} if dead is not None else set())

    def _replay(self, r: Request) -> None:
        """The session's KV is lost on some range and the log cannot restore it: start its KV
        afresh everywhere and feed its whole history again (the sample at the end is the one
        the lost step would have made)."""
        s = r.session
        assert s is not None
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

    async def _fetch_rows(self, r: Request) -> None:
        """Embeddings of every visual of the session (for a replay from position 0)."""
        s = r.session
        assert s is not None
        try:
            embeddings = await self._encode([v.source for v in s.visuals], r.deadline, r.trace_context)
        except asyncio.CancelledError:
            return
        except VlmeshError as err:
            r.task = None
            self._end(r, error=err)
            return
        r.rows = VisualRows(0, 0, embeddings)
        r.task = None
        self._wake.set()

    def _plan(self, r: Request, n: int) -> StepPlan:
        s = r.session
        assert s is not None and r.positions is not None and r.rows is not None
        start = s.cached
        end = start + n
        ids = s.token_ids[start:end]
        known = r.positions.shape[1]
        if end <= known:
            positions = r.positions[:, start:end]
        else:  # generated tokens: text positions after the prompt, offset by the rope delta
            tail = torch.arange(max(start, known), end) + s.rope_delta
            positions = torch.cat([r.positions[:, start:known], tail.expand(3, -1)], dim=1) if start < known else tail.expand(3, -1).clone()
        plan = StepPlan(s, start, ids, positions, rewind=s.rewind, trace_context=r.trace_context, deadline=r.deadline)
        lo, hi = s.visual_rows_from(start), s.visual_rows_from(end)
        if hi > lo:
            offsets = [p - start for p in s.visual_positions[lo:hi]]
            plan.visual_spans = _spans(offsets)
            plan.visual, plan.deepstack = r.rows.rows(lo, hi, self.deepstack_layers)
        if end == len(s.token_ids):
            plan.sample = stage_pb2.SampleRequest(params=r.sampling, top_logprobs=r.params.logprobs)
            if r.sampling.repetition_penalty not in (0.0, 1.0):
                plan.sample.penalty_token_ids.extend(sorted(r.seen))
        return plan

    def _update(self, r: Request, fed: int, outcome: StepOutcome) -> None:
        s = r.session
        assert s is not None
        if outcome.replay and outcome.error is None and r.abort is None:
            self._replay(r)
            return
        if outcome.error is not None:
            if outcome.error.reason == "KV_BUDGET_FULL" and r.abort is None and len(self.prefix):
                # Parked prefixes give their KV back, then the step runs again. Ranges that ran
                # it hold its positions already; the retry drops them first.
                s.rewind = True
                r.task = self._spawn(self._evict_then_resume(r))
                return
            self._end(r, error=outcome.error)
            return
        s.cached += fed
        s.rewind = False
        self.kv_log.append(s.id, outcome.kv_deltas)
        if r.abort is not None:
            self._end(r, error=r.abort)
            return
        token = outcome.token
        if token is None:
            if s.cached == len(s.token_ids):  # a final chunk must have sampled
                self._end(r, error=VlmeshError("the last stage returned no token"))
            return
        now = time.monotonic()
        if r.first_token_at is None:
            r.first_token_at = now
        for obs in self.observers:
            obs.on_token(r, now)
        tid = token.token_id
        s.token_ids.append(tid)
        r.generated.append(tid)
        r.seen.add(tid)
        resp = coordinator_pb2.GenerateResponse(token_ids=[tid])
        if len(r.generated) == 1:
            resp.session_id = s.id if s.persistent else ""
        if r.params.logprobs > 0:
            resp.logprobs.add(token=tensor_pb2.TokenLogprob(token_id=tid, logprob=token.logprob), top=list(token.top_logprobs))
        assert r.detok is not None
        finish = None
        if tid in self.eos_token_ids:
            finish = FINISH_STOP
            if r.params.include_stop_token_text:
                resp.text = self.tokenizer.decode([tid], skip_special_tokens=False)
        else:
            resp.text = r.detok.push(tid)
            if r.detok.stopped:
                finish = FINISH_STOP_STRING
        if finish is None and len(r.generated) >= r.max_tokens:
            finish = FINISH_LENGTH
        if finish in (FINISH_STOP, FINISH_LENGTH):
            # Whatever the detokenizer still holds back (an unfinished character, a possible
            # stop string) is final now; it comes before an end-of-turn token's own text.
            held = r.detok.flush()
            resp.text = held + resp.text if finish == FINISH_STOP else resp.text + held
        r.text.append(resp.text)
        r.out.put_nowait(resp)
        if finish is not None:
            self._end(r, finish=finish)

    # ------------------------------------------------------------------ ending a turn

    def _end(self, r: Request, finish: coordinator_pb2.FinishReason.ValueType | None = None, error: VlmeshError | None = None) -> None:
        """The one place a turn ends, however it ends."""
        if r.phase is Phase.ENDED:
            return
        r.phase = Phase.ENDED
        r.finish = finish
        if r.task is not None:
            r.task.cancel()
            r.task = None
        self.scheduler.remove(r)
        self.requests.pop(r.id, None)
        s = r.session
        ok = error is None
        for obs in self.observers:
            obs.on_end(r, finish, error)
        if s is not None:
            if not ok and r.turn is not None:
                self._undo(s, r.turn)
            if ok and s.persistent:
                s.messages = s.messages + r.messages + [{"role": "assistant", "content": "".join(r.text)}]
            s.busy = False
            s.last_used = time.monotonic()
            if not s.persistent:
                self._retire_one_shot(s, parked=ok)
        if ok:
            final = coordinator_pb2.GenerateResponse(
                finish_reason=finish or coordinator_pb2.FINISH_REASON_UNSPECIFIED,
                usage=coordinator_pb2.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.generated), cached_tokens=r.cached_tokens),
            )
            if s is not None and s.persistent:
                self._spawn(self._save_then(s, r, final))
                return
            r.out.put_nowait(final)
        else:
            assert error is not None
            r.out.put_nowait(error)
        r.out.put_nowait(None)

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

    async def _evict_then_resume(self, r: Request, count: int = 4) -> None:
        """Give back the KV of the least recently used parked prefixes, then let `r` step again."""
        evicted = [e for e in (self.prefix.evict() for _ in range(count)) if e is not None]
        for old in evicted:
            self.kv_log.drop(old.id)
        await asyncio.gather(*(self.mesh.replicas[a].release(old.id) for old in evicted for a in old.replicas.values() if a in self.mesh.replicas))
        r.task = None
        self._wake.set()

    def _release(self, s: Session) -> None:
        self.kv_log.drop(s.id)
        reps = [self.mesh.replicas[a] for a in s.replicas.values() if a in self.mesh.replicas]
        s.replicas = {}
        for rep in reps:
            self._spawn(rep.release(s.id))

    async def _save_then(self, s: Session, r: Request, final: coordinator_pb2.GenerateResponse) -> None:
        try:
            await self._save(s)
        finally:
            r.out.put_nowait(final)
            r.out.put_nowait(None)

    async def _save(self, s: Session) -> None:
        if self.store is not None:
            try:
                await self.store.save(s)
            except Exception:  # noqa: BLE001 - the answer stands; the next save may work
                log.exception("saving session %s failed", short(s.id))

    def _on_close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        for r in list(self.requests.values()):
            if r.session is s:
                self._on_cancel(r, Cancelled("the session was closed"))
        self._release(s)
        if self.store is not None:
            self._spawn(self.store.delete(session_id))

    # ------------------------------------------------------------------ housekeeping

    def on_replica_restart(self, rep: StageReplica) -> None:
        """A replica came back empty: sessions pinned there must be restored before their next
        step (their pin is dropped; _place restores them)."""
        for s in self.sessions.values():
            for i, addr in list(s.replicas.items()):
                if addr == rep.address and not any(r.session is s and r.in_flight for r in self.requests.values()):
                    del s.replicas[i]

    async def _housekeeping(self) -> None:
        """Leases, idle sessions, prefix-cache bounds, deadlines: every few seconds."""
        every = 1.0
        last_renew = 0.0
        while True:
            await asyncio.sleep(every)
            try:
                self._check_deadlines()
                now = time.monotonic()
                for s in [s for s in self.sessions.values() if s.persistent and not s.busy and now - s.last_used > self.cfg.session_ttl]:
                    log.info("session %s expired after %.0fs idle", short(s.id), self.cfg.session_ttl)
                    self._on_close(s.id)
                lease = min((r.info.lease_seconds for r in self.mesh.replicas.values() if r.info and r.info.lease_seconds), default=60.0)
                if now - last_renew > lease / 3:
                    last_renew = now
                    await self._renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("housekeeping failed")

    async def _renew_leases(self) -> None:
        held: dict[str, list[Session]] = {}
        for s in [*self.sessions.values(), *self.prefix.sessions()]:
            for addr in s.replicas.values():
                held.setdefault(addr, []).append(s)
        for addr, sessions in held.items():
            rep = self.mesh.replicas.get(addr)
            if rep is None or not rep.up:
                continue
            try:
                unknown = set(await rep.renew([s.id for s in sessions]))
            except Exception as err:  # noqa: BLE001 - the next round tries again
                log.info("renewing leases on %s failed: %s", addr, err)
                continue
            for s in sessions:
                if s.id in unknown and not any(r.session is s and r.in_flight for r in self.requests.values()):
                    for i, a in list(s.replicas.items()):
                        if a == addr:
                            del s.replicas[i]

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, int]:
        waiting = sum(1 for r in self.requests.values() if r.phase is Phase.PREPARING or (r.phase is Phase.READY and r.started_at is None))
        return {
            "sessions": sum(1 for s in self.sessions.values() if s.persistent) + len(self.requests),
            "running": len(self.requests) - waiting,
            "waiting": waiting,
        }


def _spans(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as runs: [3, 4, 5, 9] -> [(3, 3), (9, 1)]."""
    out: list[tuple[int, int]] = []
    for o in offsets:
        if out and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((o, 1))
    return out

