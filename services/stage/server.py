"""The stage service: one handler per Forward stream over one backend (the layer range)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from opentelemetry import trace

from services.common import tensors
from services.common.checkpoint import open_checkpoint
from services.common.config import ServiceConfig, field
from services.common.errors import InvalidInput
from services.common.server import RunningServer, prepare_process, serve_main, start_server
from services.common.tracing import extract, tracer
from vlmesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

from .backend import Step, StageBackend, StepResult
from .sampler import SamplingParams

log = logging.getLogger(__name__)
_tracer = tracer("stage")


@dataclass(kw_only=True)
class StageConfig(ServiceConfig):
    model: str = field(help="checkpoint directory (HF layout)")
    layers: str = field(help="layer range START:END this stage owns (END exclusive)")
    port: int = field(50061, "port to bind (0 = any free port)")
    dtype: str = field("auto", "parameter dtype: auto (the checkpoint's), float32, bfloat16, float16")
    quantize: str = field("auto", "decoder-layer linears: auto (as the checkpoint), int8 (W8A8, quantizing a float one), none (dequantize)")
    kv_budget_mb: int = field(2048, "KV cache budget in MiB; steps beyond it get RESOURCE_EXHAUSTED")
    max_batch: int = field(32, "most session steps in one request")
    session_ttl: float = field(3600.0, "drop a session's KV after this many idle seconds")

    def layer_range(self) -> tuple[int, int]:
        try:
            a, b = self.layers.split(":")
            return int(a), int(b)
        except ValueError:
            raise ValueError(f"--layers must be START:END, got {self.layers!r}") from None


def _sampling(p: tensor_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p if p.top_p > 0 else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty > 0 else 1.0,
        seed=p.seed if p.HasField("seed") else None,
    )


def decode_step(m: stage_pb2.StepInput) -> Step:
    name = f"step of session {m.session_id!r}"
    if not m.session_id:
        raise InvalidInput("step without session_id")
    positions = tensors.from_proto(m.position_ids, f"{name}: position_ids", dtypes=(torch.int64,), shape=(3, None))
    hidden = None
    if tensors.is_set(m.hidden_states):
        hidden = tensors.from_proto(
            m.hidden_states, f"{name}: hidden_states", dtypes=(torch.float32, torch.bfloat16, torch.float16), shape=(None, None)
        )
    visual = None
    if tensors.is_set(m.visual_embeds):
        visual = tensors.from_proto(
            m.visual_embeds, f"{name}: visual_embeds", dtypes=(torch.float32, torch.bfloat16, torch.float16), shape=(None, None)
        )
    deepstack = {}
    for d in m.deepstack:
        if d.layer in deepstack:
            raise InvalidInput(f"{name}: two deepstack features for layer {d.layer}")
        deepstack[d.layer] = tensors.from_proto(
            d.embeds, f"{name}: deepstack[{d.layer}]", dtypes=(torch.float32, torch.bfloat16, torch.float16), shape=(None, None)
        )
    return Step(
        session_id=m.session_id,
        start_position=m.start_position,
        token_ids=torch.tensor(list(m.token_ids), dtype=torch.int64),
        hidden=hidden,
        position_ids=positions,
        visual=visual,
        deepstack=deepstack,
        return_kv_delta=m.return_kv_delta,
        sampling=_sampling(m.sampling),
        top_logprobs=m.top_logprobs,
        turn_start=m.turn_start,
    )


def encode_result(r: StepResult, start_position: int) -> stage_pb2.StepOutput:
    out = stage_pb2.StepOutput(session_id=r.session_id, cache_length=r.cache_length)
    if r.hidden is not None:
        out.hidden_states.CopyFrom(tensors.to_proto(r.hidden))
    if r.sample is not None:
        out.token_id = r.sample.token_id
        out.logprob = r.sample.logprob
        out.top_logprobs.extend(tensor_pb2.TokenLogprob(token_id=i, logprob=lp) for i, lp in r.sample.top)
    for layer, (k, v) in sorted(r.kv_delta.items()):
        out.kv_deltas.append(
            tensor_pb2.KVDelta(layer=layer, start_position=start_position, key=tensors.to_proto(k), value=tensors.to_proto(v))
        )
    return out


class StageServicer(stage_pb2_grpc.StageServiceServicer):
    def __init__(self, backend: StageBackend, model_type: str):
        self.backend = backend
        self.model_type = model_type

    def Forward(self, request_iterator, context):
        for request in request_iterator:
            steps = [decode_step(m) for m in request.steps]
            spans = [
                _tracer.start_span(
                    "stage.forward",
                    context=extract(dict(m.trace_context)),
                    attributes={
                        "vlmesh.service": "stage",
                        "vlmesh.session_id": m.session_id,
                        "vlmesh.layers": f"{self.backend.model.start}:{self.backend.model.end}",
                        "vlmesh.tokens": s.num_tokens,
                        "vlmesh.batch_size": len(steps),
                    },
                )
                for m, s in zip(request.steps, steps)
            ]
            began = time.perf_counter()
            try:
                results = self.backend.run(steps)
            except Exception as exc:
                for span in spans:
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                raise
            finally:
                for span in spans:
                    span.end()
            outputs = [encode_result(r, s.start_position) for r, s in zip(results, steps)]
            yield stage_pb2.ForwardResponse(outputs=outputs, compute_us=int((time.perf_counter() - began) * 1e6))

    def GetInfo(self, request, context):
        b = self.backend
        return stage_pb2.GetInfoResponse(
            model_type=self.model_type,
            layer_start=b.model.start,
            layer_end=b.model.end,
            num_layers=b.model.num_layers,
            is_first=b.is_first,
            is_last=b.is_last,
            hidden_size=b.hidden_size,
            dtype=str(b.dtype).removeprefix("torch."),
            kv_budget_bytes=b.kv.budget,
            kv_used_bytes=b.kv.used,
            num_sessions=len(b.kv),
            weight_bytes=b.model.weight_bytes(),
            deepstack_layers=list(b.model.deepstack_layers),
        )

    def ReleaseSession(self, request, context):
        return stage_pb2.ReleaseSessionResponse(freed_bytes=self.backend.release(request.session_id))


def _expiry_loop(backend: StageBackend, ttl: float, stop: threading.Event) -> None:
    while not stop.wait(min(ttl, 60.0)):
        for sid in backend.expire(ttl):
            log.info("session %s expired after %.0fs idle", sid, ttl)


def start(cfg: StageConfig) -> RunningServer:
    prepare_process("stage", cfg)
    ckpt = open_checkpoint(cfg.model)
    start_layer, end_layer = cfg.layer_range()
    backend = StageBackend(ckpt, start_layer, end_layer, ckpt.dtype(cfg.dtype), cfg.kv_budget_mb << 20, cfg.max_batch, cfg.quantize)
    stop = threading.Event()
    threading.Thread(target=_expiry_loop, args=(backend, cfg.session_ttl, stop), daemon=True).start()
    servicer = StageServicer(backend, ckpt.config.model_type)
    return start_server(
        [(stage_pb2_grpc.add_StageServiceServicer_to_server, servicer, "vlmesh.v1.StageService")],
        cfg.host,
        cfg.port,
        on_stop=stop.set,
    )


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve stage", "Serve a range of decoder layers.", StageConfig, start, argv)
