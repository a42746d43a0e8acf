"""The coordinator service: the mesh's public entry point.

Handlers validate and translate; the engine owns every session and request. A Generate stream
is a coroutine waiting on its request's output queue: it holds no thread, so health checks,
GetModelInfo and new requests are answered however many generations are running."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace

from services.common import tensors
from services.common.checkpoint import Checkpoint, open_checkpoint
from services.common.config import ServiceConfig, field
from services.common.errors import Cancelled, InvalidArgument, ResourceExhausted, UnknownSession, VlmeshError
from services.common.interceptor import abort
from services.common.metrics import CoordinatorMetrics
from services.common.serve import prepare_process, serve_main
from services.common.server import RunningServer, start_server
from services.common.tls import MeshTLS
from services.common.tracing import extract, trace_id_hex, tracer
from vlmesh.internal.v1 import admin_pb2, admin_pb2_grpc, vision_pb2
from vlmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, tensor_pb2

from .auth import Keyring
from .engine import Engine, EngineConfig
from .kv_log import KVLog, pin_mmap_threshold
from .limits import RateLimiter, peer_host
from .prepare import Preparer
from .prompt import PromptBuilder
from .replicas import ProbePolicy
from .request import GenerateParams, Message, RequestSpec, RequestSummary
from .rope import RopeIndex
from .runner import Runner
from .scheduler import SchedulerConfig
from .stage_client import Mesh
from .store import SessionStore
from .telemetry import FINISH_NAMES, EngineMetrics
from .tools import ToolCallParser, Tools, parse_tools
from .tools import constraint as tool_constraint
from .vision_client import VisionPool

log = logging.getLogger(__name__)
_tracer = tracer("coordinator")
_ROLES = {
    coordinator_pb2.ROLE_SYSTEM: "system",
    coordinator_pb2.ROLE_USER: "user",
    coordinator_pb2.ROLE_ASSISTANT: "assistant",
    coordinator_pb2.ROLE_TOOL: "tool",
}
_INT32_MAX = 2**31 - 1
#: Most continuations one request may ask for (GenerateRequest.n).
MAX_CHOICES = 16


def _default_state_dir(port: int) -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "vlmesh" / f"coordinator-{port}")


@dataclass(kw_only=True)
class CoordinatorConfig(ServiceConfig):
    model: str = field(help="checkpoint directory (config, tokenizer and processor files are read; no weights)")
    stages: str = field(help="stage replicas: host:port or dns:///name:port entries, comma-separated, any order")
    vision: str = field(help="vision instances: host:port or dns:///name:port entries, comma-separated")
    port: int = field(50051, "port to bind (0 = any free port)")
    max_message_mb: int = field(32, "largest request accepted, in MiB (images and videos included)")
    default_max_tokens: int = field(256, "max_tokens when a request sets none")
    max_images: int = field(16, "most images and videos in one request")
    max_batch: int = field(64, "most sessions in one micro-batch")
    chunk_tokens: int = field(
        0,
        "most tokens in one micro-batch: a longer prompt is fed in chunks between decode steps (0 = as many as cost about one decode step, measured as it runs)",
    )
    pipeline: bool = field(True, "keep one micro-batch in flight per layer range, so every range computes at once")
    kv_log_mb: int = field(1024, "memory for the KV log that restores a lost replica without recompute (0 = off: replay instead)")
    prefix_cache_sessions: int = field(64, "finished one-shot requests whose KV is kept for prefix reuse (0 = off)")
    session_ttl: float = field(1800.0, "close sessions idle for this many seconds")
    max_sessions: int = field(4096, "most live sessions (CreateSession), all API keys together (0 = no cap)")
    session_rate: float = field(20.0, "sessions one client address may create per second, on average (0 = no limit)")
    session_burst: int = field(200, "sessions one client address may create at once, beyond --session-rate")
    state_dir: str = field(
        "", "directory of the durable session store (SQLite; default ~/.local/state/vlmesh/coordinator-PORT; 'none' = memory only)"
    )
    hop_timeout: float = field(30.0, "seconds a stage may take for one step before its replica counts as stalled")
    hop_timeout_per_token: float = field(0.05, "extra seconds of the hop timeout per token in the step")
    vision_timeout: float = field(300.0, "seconds the vision service may take for one request")
    trace_decode_every: int = field(
        16,
        "give a decode step a span of its own for a request's first token and every Nth (1 = every step; the others' stage spans join the request's)",
    )
    health_interval: float = field(1.0, "seconds between health probe rounds")
    probe_failures: int = field(
        3, "unanswered health probes in a row before a connected replica counts as down (a refused connection or broken stream counts at once)"
    )
    probe_timeout: float = field(1.0, "seconds a health probe waits for its answer (a stage with slow steps gets twice its slowest recent step)")
    startup_timeout: float = field(600.0, "seconds to wait for the stages and vision at start")
    api_keys_file: str = field("", "API keys (hashed) and their quotas, see `vlmesh keys new`; empty = no keys")
    public_tls_cert: str = field("", "PEM certificate of the public port (TLS); empty = plaintext")
    public_tls_key: str = field("", "PEM private key of --public-tls-cert")
    max_prompt_chars: int = field(0, "most characters of text in one request, checked before tokenising (0 = 8 x the model's context)")


def parse_messages(messages, max_chars: int = 1 << 30) -> tuple[list[Message], list[vision_pb2.VisualInput]]:
    """Template messages (images and videos as bare {"type": ...} parts) and the vision inputs,
    in prompt order. Text longer than max_chars in all is refused before anything tokenises it."""
    if not messages:
        raise InvalidArgument("a request needs at least one message")
    chars = sum(len(c.text) for m in messages for c in m.content if c.WhichOneof("kind") == "text")
    chars += sum(len(t.arguments_json) + len(t.name) for m in messages for t in m.tool_calls)
    if chars > max_chars:
        raise InvalidArgument(f"the request holds {chars} characters of text; the limit is {max_chars}")
    out: list[Message] = []
    inputs: list[vision_pb2.VisualInput] = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise InvalidArgument(f"message {i}: role must be system, user, assistant or tool")
        if m.tool_calls and role != "assistant":
            raise InvalidArgument(f"message {i}: only an assistant message has tool_calls")
        if not m.content and not m.tool_calls:
            raise InvalidArgument(f"message {i}: no content")
        msg: Message = {"role": role, "content": [_content(i, c, inputs) for c in m.content]}
        if m.tool_calls:
            msg["tool_calls"] = [_tool_call(i, j, t) for j, t in enumerate(m.tool_calls)]
        if role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out, inputs


def parse_prompt(request: coordinator_pb2.GenerateRequest, max_chars: int) -> tuple[list[Message], list[vision_pb2.VisualInput]]:
    """A raw prompt's checks: it comes alone (no messages, session or tools)."""
    if request.messages:
        raise InvalidArgument("a request takes messages or a prompt, not both")
    if request.session_id:
        raise InvalidArgument("a raw prompt is one-shot: it cannot continue a session")
    if request.tools:
        raise InvalidArgument("tools need messages (the chat template renders them), not a raw prompt")
    if len(request.prompt) > max_chars:
        raise InvalidArgument(f"the request holds {len(request.prompt)} characters of text; the limit is {max_chars}")
    return [], []


def _content(i: int, c: coordinator_pb2.Content, inputs: list[vision_pb2.VisualInput]) -> dict[str, Any]:
    """One content part as the template sees it; an image or video also goes into `inputs`."""
    kind = c.WhichOneof("kind")
    if kind == "text":
        return {"type": "text", "text": c.text}
    if kind == "image":
        if not c.image:
            raise InvalidArgument(f"message {i}: empty image")
        inputs.append(vision_pb2.VisualInput(image_bytes=c.image))
        return {"type": "image"}
    if kind == "video":
        if not c.video:
            raise InvalidArgument(f"message {i}: empty video")
        inputs.append(vision_pb2.VisualInput(video_bytes=c.video))
        return {"type": "video"}
    if kind == "video_frames":
        if not c.video_frames.frames:
            raise InvalidArgument(f"message {i}: video without frames")
        inputs.append(vision_pb2.VisualInput(video_frames=c.video_frames))
        return {"type": "video"}
    raise InvalidArgument(f"message {i}: content item with no text, image or video")


def _tool_call(i: int, j: int, t: coordinator_pb2.ToolCall) -> dict[str, Any]:
    """A previous turn's call in the template's form (arguments as the JSON text they were)."""
    import json

    try:
        args = json.loads(t.arguments_json or "{}")
    except (ValueError, RecursionError):
        args = None
    if not isinstance(args, dict):
        raise InvalidArgument(f"message {i}: tool_calls[{j}].arguments_json must be a JSON object")
    if not t.name:
        raise InvalidArgument(f"message {i}: tool_calls[{j}] has no name")
    return {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments_json or "{}"}}


def parse_params(request: coordinator_pb2.GenerateRequest) -> GenerateParams:
    import math

    p = request.sampling
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise InvalidArgument(f"temperature must be a finite number >= 0, got {p.temperature}")
    if not (0.0 <= p.top_p <= 1.0):
        raise InvalidArgument(f"top_p must be in [0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {p.top_k}")
    if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty >= 0):
        raise InvalidArgument(f"repetition_penalty must be a finite number >= 0, got {p.repetition_penalty}")
    if request.max_tokens < 0:
        raise InvalidArgument("max_tokens must be >= 0")
    if not 0 <= request.logprobs <= 20:
        raise InvalidArgument("logprobs must be in [0, 20]")
    if any(not s for s in request.stop):
        raise InvalidArgument("stop strings must not be empty")
    if not 0 <= request.n <= MAX_CHOICES:
        raise InvalidArgument(f"n must be from 1 to {MAX_CHOICES}, got {request.n}")
    if request.n > 1 and request.session_id:
        raise InvalidArgument("n > 1 is one-shot: it cannot continue a session")
    if p.HasField("constraint") and p.constraint.WhichOneof("kind") is None:
        # The rest of a constraint is checked where it compiles, on the sampling stage.
        raise InvalidArgument("a constraint needs one of json_schema, json_object, regex, choice or grammar")
    return GenerateParams(p, request.max_tokens, tuple(request.stop), request.logprobs, request.include_stop_token_text, max(request.n, 1))


def with_tool_constraint(params: GenerateParams, tools: Tools | None, tags_are_tokens: bool) -> GenerateParams:
    """`params` with the grammar that enforces tool_choice required or a named function."""
    grammar = None if tools is None else tool_constraint(tools, tags_are_tokens)
    if grammar is None:
        return params
    sampling = tensor_pb2.SamplingParams()
    sampling.CopyFrom(params.sampling)
    sampling.constraint.CopyFrom(grammar)
    return dataclasses.replace(params, sampling=sampling)


def _cut_tool_calls(parser: ToolCallParser, item: coordinator_pb2.GenerateResponse) -> None:
    """Move the <tool_call> blocks of a response's text into its tool_calls; the last response
    (it has the finish reason) gets what was held back, and ends as TOOL_CALLS after calls."""
    text, calls = parser.feed(item.text)
    if item.finish_reason != coordinator_pb2.FINISH_REASON_UNSPECIFIED:
        text += parser.finish()
        if parser.calls and item.finish_reason == coordinator_pb2.FINISH_REASON_STOP:
            item.finish_reason = coordinator_pb2.FINISH_REASON_TOOL_CALLS
    item.text = text
    item.tool_calls.extend(calls)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, cfg: CoordinatorConfig, ckpt: Checkpoint, engine: Engine, kv_log: KVLog, mesh: Mesh, vision: VisionPool, keys: Keyring):
        self.cfg = cfg
        self.keys = keys
        self.max_chars = cfg.max_prompt_chars or 8 * ckpt.text_config.max_position_embeddings
        self.ckpt = ckpt
        self.engine = engine
        self.kv_log = kv_log
        self.mesh = mesh
        self.vision = vision
        self.session_rate = RateLimiter(cfg.session_rate, cfg.session_burst)
        self.tool_tags_are_tokens = engine.preparer.prompts.tool_tags_are_tokens

    def owner(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's API key name; UNAUTHENTICATED without a known key (when keys are set)."""
        return self.keys.identify(context.invocation_metadata())

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        span = _tracer.start_span(
            "generate",
            context=extract(context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": "vlmesh.v1.CoordinatorService", "rpc.method": "Generate"},
        )
        trace_id = trace_id_hex(span)
        spec: RequestSpec | None = None
        stream = None
        ended = False
        first = True
        try:
            owner = self.owner(context)
            messages, inputs = parse_prompt(request, self.max_chars) if request.prompt else parse_messages(request.messages, self.max_chars)
            tools = parse_tools(request)
            params = with_tool_constraint(parse_params(request), tools, self.tool_tags_are_tokens)
            left = context.time_remaining()
            now = time.monotonic()
            spec = RequestSpec(
                id=uuid.uuid4().hex,
                session_id=request.session_id,
                owner=owner,
                messages=tuple(messages),
                inputs=tuple(inputs),
                params=params,
                deadline=None if left is None else now + left,
                trace_context=trace.set_span_in_context(span),
                arrival=now,
                tools=tools,
                prompt=request.prompt,
            )
            stream = self.engine.add(spec)
            parsers: dict[int, ToolCallParser] = {}
            while True:
                item = await stream.items.get()
                if item is None:
                    ended = True
                    break
                if not isinstance(item, coordinator_pb2.GenerateResponse):
                    ended = True
                    raise item
                if tools is not None and tools.parses:
                    parser = parsers.setdefault(item.index, ToolCallParser(tools.names, tools.parallel))
                    _cut_tool_calls(parser, item)
                if first:
                    item.trace_id = trace_id
                    first = False
                yield item
            _close_span(span, stream.summary.result(), None)
        except VlmeshError as err:
            err.trace_id = trace_id  # type: ignore[attr-defined]
            _close_span(span, stream.summary.result() if stream is not None and stream.summary.done() else None, err)
            await abort(context, err, trace_id)
        finally:
            if spec is not None and not ended:  # the client went away (or its deadline passed)
                self.engine.cancel(spec.id, Cancelled("the client cancelled the request"))
                _close_span(span, None, Cancelled("cancelled"))

    async def CreateSession(
        self, request: coordinator_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CreateSessionResponse:
        owner = self.owner(context)
        if not self.session_rate.allow(peer_host(context.peer() or "")):
            raise ResourceExhausted(
                f"this client creates sessions faster than --session-rate {self.cfg.session_rate:g}/s allows; retry later", reason="SESSION_RATE"
            )
        return coordinator_pb2.CreateSessionResponse(session_id=await self.engine.create_session(owner))

    async def CloseSession(
        self, request: coordinator_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CloseSessionResponse:
        return coordinator_pb2.CloseSessionResponse(existed=await self.engine.close_session(request.session_id, self.owner(context)))

    async def GetModelInfo(
        self, request: coordinator_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.GetModelInfoResponse:
        self.owner(context)  # any key will do, but a key it must be
        return coordinator_pb2.GetModelInfoResponse(
            model_type=self.ckpt.config.model_type,
            num_layers=self.ckpt.text_config.num_hidden_layers,
            stage_layers=[coordinator_pb2.LayerRange(start=g.start, end=g.end) for g in self.mesh.ranges],
            max_sequence_length=self.ckpt.text_config.max_position_embeddings,
        )

    async def GetMeshStatus(
        self, request: coordinator_pb2.GetMeshStatusRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.GetMeshStatusResponse:
        self.owner(context)
        await asyncio.gather(*(i.refresh_stats() for i in self.vision.instances.values()))
        resp = coordinator_pb2.GetMeshStatusResponse(model_type=self.ckpt.config.model_type)
        snap = await self.engine.snapshot()
        pinned = snap.pinned
        reps = sorted(self.mesh.replicas.values(), key=lambda r: (r.layers or (1 << 30, 0), r.address))
        for r in reps:
            info = r.info
            resp.stages.add(
                address=r.address,
                layers=coordinator_pb2.LayerRange(start=info.layer_start, end=info.layer_end) if info else None,
                state=coordinator_pb2.REPLICA_STATE_UP if r.up else coordinator_pb2.REPLICA_STATE_DOWN,
                kv_used_bytes=info.kv_used_bytes if info else 0,
                kv_budget_bytes=info.kv_budget_bytes if info else 0,
                num_sessions=info.num_sessions if info else 0,
                pinned_sessions=pinned.get(r.address, 0),
                dtype=info.dtype if info else "",
                quantization=info.quantization if info else "",
            )
        for inst in self.vision.instances.values():
            st = inst.stats
            resp.vision.add(
                address=inst.address,
                state=coordinator_pb2.REPLICA_STATE_UP if inst.health.up else coordinator_pb2.REPLICA_STATE_DOWN,
                cache_hits=st.cache_hits if st else 0,
                cache_misses=st.cache_misses if st else 0,
                cache_entries=st.cache_entries if st else 0,
                cache_bytes=st.cache_bytes if st else 0,
            )
        resp.num_sessions = snap.counts.sessions
        resp.requests_running = snap.counts.running
        resp.requests_waiting = snap.counts.waiting
        resp.kv_log_bytes = self.kv_log.bytes
        resp.kv_log_budget_bytes = self.kv_log.budget
        return resp


class CoordinatorAdminServicer(admin_pb2_grpc.CoordinatorAdminServiceServicer):
    """Internal hooks (the mesh's own tests and tools), behind the same API keys."""

    def __init__(self, engine: Engine, kv_log: KVLog, keys: Keyring):
        self.engine = engine
        self.kv_log = kv_log
        self.keys = keys

    async def GetKVLog(self, request: admin_pb2.GetKVLogRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[admin_pb2.GetKVLogResponse]:
        sid = await self.engine.session_id_for(request.session_id, self.keys.identify(context.invocation_metadata()))
        merged = self.kv_log.merged(sid)
        if merged is None:
            raise UnknownSession("the session has no KV log (the log is off, or was dropped to stay within its budget)", reason="NO_KV_LOG")
        for layer, (k, v) in merged.items():
            yield admin_pb2.GetKVLogResponse(
                delta=tensor_pb2.KVDelta(layer=layer, start_position=0, key=tensors.to_proto(k), value=tensors.to_proto(v))
            )


def _close_span(span: trace.Span, summary: RequestSummary | None, err: VlmeshError | None) -> None:
    if not span.is_recording():
        return
    trace_id = trace_id_hex(span)
    outcome = err.code.name if err is not None else FINISH_NAMES.get(summary.finish or 0, "stop") if summary is not None else "?"
    if summary is not None:
        log.info(
            "generate %s: %s, %d prompt + %d cached -> %d tokens, session %s, trace %s",
            summary.id[:12],
            outcome,
            summary.prompt_tokens,
            summary.cached_tokens,
            summary.generated_tokens,
            summary.session_id[:12] or "-",
            trace_id,
            extra={"trace_id": trace_id},
        )
        if summary.finish is not None:
            span.set_attribute("vlmesh.finish_reason", FINISH_NAMES.get(summary.finish, "stop"))
        if summary.session_id:
            span.set_attribute("session.id", summary.session_id)
        span.set_attribute("vlmesh.prompt_tokens", summary.prompt_tokens)
        span.set_attribute("vlmesh.cached_tokens", summary.cached_tokens)
        span.set_attribute("vlmesh.generated_tokens", summary.generated_tokens)
        if summary.first_token_at is not None:
            span.set_attribute("vlmesh.ttft_s", summary.first_token_at - summary.arrival)
        if summary.started_at is not None:
            span.set_attribute("vlmesh.queue_s", summary.started_at - summary.arrival)
    if err is not None:
        span.set_attribute("rpc.grpc.status_code", err.code.value[0])
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(err)))
    else:
        span.set_attribute("rpc.grpc.status_code", 0)
    span.end()


async def start(cfg: CoordinatorConfig) -> RunningServer:
    from transformers import AutoProcessor, GenerationConfig

    prepare_process("coordinator", cfg)
    ckpt = open_checkpoint(cfg.model)
    tls = MeshTLS.from_config(cfg)
    keys = Keyring.load(cfg.api_keys_file)
    public = _public_credentials(cfg)
    if not keys.enabled and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API keys (--api-keys-file) and bound to %s: anyone who reaches the port can use the mesh", cfg.host)
    processor = await asyncio.to_thread(AutoProcessor.from_pretrained, cfg.model)
    try:
        eos = GenerationConfig.from_pretrained(cfg.model).eos_token_id
    except OSError:
        eos = ckpt.text_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    kv_log = KVLog(cfg.kv_log_mb << 20)
    if kv_log.enabled:
        pin_mmap_threshold()
    state_dir = cfg.state_dir or _default_state_dir(cfg.port)
    store = None if state_dir == "none" else await asyncio.to_thread(SessionStore, state_dir)
    policy = ProbePolicy(interval=cfg.health_interval, failures=cfg.probe_failures, timeout=cfg.probe_timeout)
    mesh = Mesh(cfg.stages, tls, ckpt.text_config.num_hidden_layers, policy=policy)
    vision = VisionPool(cfg.vision, tls, policy=policy)
    await asyncio.gather(mesh.connect(cfg.startup_timeout), vision.connect(cfg.startup_timeout))
    metrics = CoordinatorMetrics.create()
    engine = _engine(cfg, ckpt, processor, eos_ids, mesh, vision, kv_log, store, keys, EngineMetrics(metrics))
    engine.start()
    servicer = CoordinatorServicer(cfg, ckpt, engine, kv_log, mesh, vision, keys)

    async def on_stop() -> None:
        await engine.stop()
        await asyncio.gather(mesh.close(), vision.close())
        if store is not None:
            store.close()

    return await start_server(
        [
            (coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, servicer, "vlmesh.v1.CoordinatorService"),
            (
                admin_pb2_grpc.add_CoordinatorAdminServiceServicer_to_server,
                CoordinatorAdminServicer(engine, kv_log, keys),
                "vlmesh.internal.v1.CoordinatorAdminService",
            ),
        ],
        cfg,
        cfg.port,
        internal=False,
        credentials=public,
        on_stop=on_stop,
        metrics=metrics.registry,
        errors=metrics.request_errors,
    )


def _engine(
    cfg: CoordinatorConfig,
    ckpt: Checkpoint,
    processor: Any,  # the checkpoint's transformers processor
    eos_ids: set[int],
    mesh: Mesh,
    vision: VisionPool,
    kv_log: KVLog,
    store: SessionStore | None,
    keys: Keyring,
    observer: EngineMetrics,
) -> Engine:
    tc = ckpt.text_config
    engine_cfg = EngineConfig(
        default_max_tokens=cfg.default_max_tokens,
        max_images=cfg.max_images,
        vision_timeout=cfg.vision_timeout,
        session_ttl=cfg.session_ttl,
        max_sessions=cfg.max_sessions,
        trace_decode_every=cfg.trace_decode_every,
        scheduler=SchedulerConfig(max_batch=cfg.max_batch, chunk_tokens=cfg.chunk_tokens, pipeline_depth=len(mesh.ranges) if cfg.pipeline else 1),
        prefix_cache_sessions=cfg.prefix_cache_sessions,
        quotas=keys.quotas,
    )
    runner = Runner(mesh, cfg.hop_timeout, cfg.hop_timeout_per_token, observers=(observer,))
    prompts = PromptBuilder(processor, sorted(eos_ids))
    deepstack = ckpt.family.deepstack_layers(ckpt.config)
    preparer = Preparer(prompts, RopeIndex(ckpt, processor), vision, tc.max_position_embeddings, cfg.max_images, cfg.vision_timeout, deepstack)
    engine = Engine(engine_cfg, mesh, preparer, processor.tokenizer, eos_ids, kv_log, store, runner, tc, observers=(observer,))
    observer.watch_counts(lambda: engine.counts.running, lambda: engine.counts.waiting)
    return engine


def _public_credentials(cfg: CoordinatorConfig) -> grpc.ServerCredentials | None:
    if bool(cfg.public_tls_cert) != bool(cfg.public_tls_key):
        raise ValueError("--public-tls-cert and --public-tls-key go together")
    if not cfg.public_tls_cert:
        return None
    try:
        cert, key = Path(cfg.public_tls_cert).read_bytes(), Path(cfg.public_tls_key).read_bytes()
    except OSError as err:
        raise ValueError(f"public TLS: {err.filename}: {err.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve coordinator", "Serve the mesh's public API.", CoordinatorConfig, start, argv)
