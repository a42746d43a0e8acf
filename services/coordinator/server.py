"""The coordinator service: the mesh's public entry point."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import grpc
import torch
from opentelemetry import trace

from services.common import tensors
from services.common.checkpoint import Checkpoint, open_checkpoint
from services.common.config import ServiceConfig, field
from services.common.errors import Cancelled, InvalidInput, VlmeshError, from_rpc_error
from services.common.server import RunningServer, channel, prepare_process, serve_main, start_server
from services.common.tracing import extract, metadata, trace_id_hex, tracer
from vlmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, tensor_pb2, vision_pb2, vision_pb2_grpc

from .detokenizer import IncrementalDetokenizer
from .engine import CANCELLED, Engine, Request
from .prompt import PromptBuilder
from .rope import RopeIndex
from .runner import Runner
from .session import Session, SessionStore
from .stage_client import Mesh
from .visual import Visual

log = logging.getLogger(__name__)
_tracer = tracer("coordinator")
_ROLES = {
    coordinator_pb2.ROLE_SYSTEM: "system",
    coordinator_pb2.ROLE_USER: "user",
    coordinator_pb2.ROLE_ASSISTANT: "assistant",
}


@dataclass(kw_only=True)
class CoordinatorConfig(ServiceConfig):
    model: str = field(help="checkpoint directory (config, tokenizer and processor files are read; no weights)")
    stages: str = field(help="stage addresses host:port, comma-separated, any order")
    vision: str = field(help="vision service address host:port")
    port: int = field(50051, "port to bind (0 = any free port)")
    default_max_tokens: int = field(256, "max_tokens when a request sets none")
    max_batch: int = field(32, "most sessions decoded in one step")
    kv_log: bool = field(True, "collect each step's KV deltas into the session's KV log")
    session_ttl: float = field(1800.0, "close sessions idle for this many seconds")


def parse_messages(messages) -> tuple[list[dict], list[vision_pb2.VisualInput]]:
    """Template messages (images and videos as bare {"type": ...} parts) and the vision inputs,
    in prompt order."""
    if not messages:
        raise InvalidInput("a request needs at least one message")
    out, inputs = [], []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise InvalidInput(f"message {i}: role must be system, user or assistant")
        if not m.content:
            raise InvalidInput(f"message {i}: no content")
        content = []
        for c in m.content:
            kind = c.WhichOneof("kind")
            if kind == "text":
                content.append({"type": "text", "text": c.text})
            elif kind == "image":
                if not c.image:
                    raise InvalidInput(f"message {i}: empty image")
                content.append({"type": "image"})
                inputs.append(vision_pb2.VisualInput(image_bytes=c.image))
            elif kind == "video":
                if not c.video:
                    raise InvalidInput(f"message {i}: empty video")
                content.append({"type": "video"})
                inputs.append(vision_pb2.VisualInput(video_bytes=c.video))
            elif kind == "video_frames":
                if not c.video_frames.frames:
                    raise InvalidInput(f"message {i}: video without frames")
                content.append({"type": "video"})
                inputs.append(vision_pb2.VisualInput(video_frames=c.video_frames))
            else:
                raise InvalidInput(f"message {i}: content item with no text, image or video")
        out.append({"role": role, "content": content})
    return out, inputs


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, cfg: CoordinatorConfig, ckpt: Checkpoint, mesh: Mesh):
        from transformers import AutoProcessor, GenerationConfig

        self.cfg = cfg
        self.ckpt = ckpt
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        try:
            gen = GenerationConfig.from_pretrained(cfg.model)
            eos = gen.eos_token_id
        except OSError:
            eos = self.ckpt.text_config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.prompts = PromptBuilder(self.processor, sorted(self.eos_token_ids))
        self.rope = RopeIndex(self.ckpt, self.processor)
        self.max_positions = self.ckpt.text_config.max_position_embeddings
        self.mesh = mesh
        self.vision = vision_pb2_grpc.VisionServiceStub(channel(cfg.vision))
        self.sessions = SessionStore()
        self.engine = Engine(Runner(mesh, cfg.kv_log), cfg.max_batch)
        self._stop = threading.Event()
        threading.Thread(target=self._expire_loop, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.engine.stop()
        self.mesh.close()

    def _expire_loop(self) -> None:
        ttl = self.cfg.session_ttl
        while not self._stop.wait(min(ttl, 30.0)):
            for s in self.sessions.idle(ttl):
                log.info("session %s expired after %.0fs idle", s.id, ttl)
                self.mesh.release(s.id)

    def _encode(self, inputs: list[vision_pb2.VisualInput]) -> tuple[list[Visual], torch.Tensor | None, list[torch.Tensor] | None]:
        """The visuals, their embeddings [N, H] in prompt order, and (Qwen3-VL) one [N, H]
        DeepStack feature per DeepStack layer."""
        if not inputs:
            return [], None, None
        with _tracer.start_as_current_span("vision", attributes={"vlmesh.images": len(inputs)}) as span:
            try:
                resp = self.vision.Encode(vision_pb2.EncodeRequest(inputs=inputs), metadata=metadata(), timeout=600)
            except grpc.RpcError as err:
                raise from_rpc_error(err, "vision") from None
            span.set_attribute("vlmesh.cache_hits", sum(e.cache_hit for e in resp.embeddings))
        if len(resp.embeddings) != len(inputs):
            raise VlmeshError(f"vision answered {len(resp.embeddings)} of {len(inputs)} inputs")
        visuals = [Visual.from_encoding(i, e) for i, e in zip(inputs, resp.embeddings)]
        embeds = torch.cat([tensors.from_proto(e.embeddings, "visual embeddings") for e in resp.embeddings])
        layers = {len(e.deepstack) for e in resp.embeddings}
        if len(layers) != 1:
            raise VlmeshError(f"vision returned DeepStack features for {sorted(layers)} layers across inputs")
        deepstack = [
            torch.cat([tensors.from_proto(e.deepstack[k], "deepstack features") for e in resp.embeddings])
            for k in range(layers.pop())
        ]
        return visuals, embeds, deepstack or None

    def Generate(self, request, context):
        with _tracer.start_as_current_span(
            "generate", context=extract(context.invocation_metadata()), attributes={"vlmesh.service": "coordinator"}
        ) as span:
            trace_id = trace_id_hex(span)
            if request.session_id:
                session = self.sessions.acquire(request.session_id)
            else:
                session = self.sessions.create(persistent=False)
                session.busy = True
            span.set_attribute("vlmesh.session_id", session.id)
            saved = (list(session.token_ids), session.cached, session.rope_delta)
            ok = False
            inflight: list[Request] = []
            try:
                yield from self._generate(request, context, session, trace_id, inflight)
                ok = True
            finally:
                for req in inflight:  # let the engine finish with it before touching the session
                    req.cancel()
                    req.released.wait(timeout=60)
                if not ok:  # failed or cancelled: the turn did not happen
                    ran = session.cached != saved[1]
                    session.token_ids, session.cached, session.rope_delta = saved
                    if ran:  # the stages hold KV of the lost turn: rebuild from history next time
                        session.cached = 0
                        session.kv_log = type(session.kv_log)()
                if session.persistent:
                    self.sessions.release(session)
                else:
                    self.sessions.pop(session.id)
                    self.mesh.release(session.id)

    def _generate(self, request, context, session: Session, trace_id: str, inflight: list[Request]):
        messages, inputs = parse_messages(request.messages)
        last = session.token_ids[-1] if session.token_ids else None
        text = self.prompts.closing(last) + self.prompts.new_text(session.messages, messages)
        rebuild = session.cached == 0 and bool(session.token_ids)
        old = [v.source for v in session.visuals] if rebuild else []
        encoded, embeds, deepstack = self._encode(old + inputs)
        new_visuals = encoded[len(old) :]
        new_ids = self.prompts.tokenize(text, new_visuals, first_turn=not session.token_ids)
        history = session.token_ids + new_ids
        if len(history) >= self.max_positions:
            raise InvalidInput(f"prompt of {len(history)} tokens leaves no room within the model's limit of {self.max_positions}")
        positions, delta = self.rope.positions(history, session.visuals + new_visuals)
        max_tokens = request.max_tokens or self.cfg.default_max_tokens
        if max_tokens < 0:
            raise InvalidInput("max_tokens must be >= 0")
        max_tokens = min(max_tokens, self.max_positions - len(history))
        sampling = tensor_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        cached = session.cached
        session.token_ids = history
        session.rope_delta = delta
        req = Request(
            session=session,
            prompt_ids=history[cached:],
            positions=positions[:, cached:],
            visual=embeds,
            deepstack=deepstack,
            sampling=sampling,
            max_tokens=max_tokens,
            logprobs=request.logprobs,
            detok=IncrementalDetokenizer(self.processor.tokenizer, list(request.stop)),
            eos_token_ids=self.eos_token_ids,
            trace_context=trace.set_span_in_context(trace.get_current_span()),
            cached_tokens=cached,
        )
        context.add_callback(req.cancel)
        inflight.append(req)
        self.engine.submit(req)
        first = True
        text_out = []
        for item in iter(req.out.get, None):
            if isinstance(item, VlmeshError):
                raise item
            if item is CANCELLED:
                raise Cancelled("the request was cancelled")
            if first:
                item.session_id = session.id if session.persistent else ""
                item.trace_id = trace_id
                first = False
            text_out.append(item.text)
            yield item
        session.messages += messages + [{"role": "assistant", "content": "".join(text_out)}]
        session.visuals += new_visuals

    def CreateSession(self, request, context):
        return coordinator_pb2.CreateSessionResponse(session_id=self.sessions.create().id)

    def CloseSession(self, request, context):
        s = self.sessions.pop(request.session_id)
        if s is not None:
            self.mesh.release(s.id)
        return coordinator_pb2.CloseSessionResponse(existed=s is not None)

    def GetKVLog(self, request, context):
        s = self.sessions.get(request.session_id)
        for layer, (k, v) in s.kv_log.merged().items():
            yield tensor_pb2.KVDelta(layer=layer, start_position=0, key=tensors.to_proto(k), value=tensors.to_proto(v))

    def GetModelInfo(self, request, context):
        return coordinator_pb2.GetModelInfoResponse(
            model_type=self.ckpt.config.model_type,
            num_layers=self.ckpt.text_config.num_hidden_layers,
            stage_layers=[f"{s.info.layer_start}:{s.info.layer_end}" for s in self.mesh.stages],
            max_sequence_length=self.max_positions,
        )


def start(cfg: CoordinatorConfig) -> RunningServer:
    prepare_process("coordinator", cfg)
    ckpt = open_checkpoint(cfg.model)
    mesh = Mesh.connect([a.strip() for a in cfg.stages.split(",") if a.strip()], ckpt.text_config.num_hidden_layers)
    servicer = CoordinatorServicer(cfg, ckpt, mesh)
    return start_server(
        [(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, servicer, "vlmesh.v1.CoordinatorService")],
        cfg.host,
        cfg.port,
        on_stop=servicer.close,
    )


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve coordinator", "Serve the mesh's public API.", CoordinatorConfig, start, argv)
