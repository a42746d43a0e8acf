"""The stage service: one handler per Forward stream over one backend (the layer range).

The event loop only moves messages; decoding, the forward pass, sampling and encoding run on
the stage's single runner thread, so health checks and GetInfo answer while a step computes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import grpc.aio
import torch
from opentelemetry import trace

from services.common import tensors
from services.common.checkpoint import open_checkpoint
from services.common.config import ServiceConfig, field
from services.common.devices import resolve_device
from services.common.errors import InvalidArgument, VlmeshError, short
from services.common.metrics import StageMetrics
from services.common.serve import prepare_process, serve_main
from services.common.server import RunningServer, start_server
from services.common.tracing import extract, tracer
from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc
from vlmesh.v1 import tensor_pb2

from .backend import SampleSpec, StageBackend, Step, StepResult
from .sampler import Constraints, Sample, SamplingParams, eos_token_ids

log = logging.getLogger(__name__)
_tracer = tracer("stage")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(kw_only=True)
class StageConfig(ServiceConfig):
    model: str = field(help="checkpoint directory (HF layout)")
    layers: str = field(help="layer range START:END this stage owns (END exclusive)")
    port: int = field(50061, "port to bind (0 = any free port)")
    dtype: str = field("auto", "activation and KV dtype: auto (the checkpoint's; bfloat16 on a GPU), float32, bfloat16, float16")
    device: str = field("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N")
    quantize: str = field("auto", "decoder-layer linears: auto (as the checkpoint), int8 (W8A8, quantizing a float one), none (dequantize)")
    kv_budget_mb: int = field(2048, "KV cache budget in MiB; a step beyond it is refused (RESOURCE_EXHAUSTED)")
    max_batch: int = field(64, "most session steps in one request")
    lease_seconds: float = field(60.0, "drop a session's KV this long after its last step or lease renewal")
    numerics: str = field(
        "exact",
        "attention: exact (transformers' call per session; greedy output equals generate()) or fast (one padded call per layer per micro-batch: not bitwise equal, agreement measured in the README)",
    )
    prepack: bool = field(
        True,
        "pack the float linear weights for oneDNN once at load, where a load-time check finds it bitwise equal to F.linear on this CPU (bfloat16 on CPUs with bf16 kernels); false: plain nn.Linear",
    )

    def layer_range(self) -> tuple[int, int]:
        try:
            a, b = self.layers.split(":")
            return int(a), int(b)
        except ValueError:
            raise ValueError(f"--layers must be START:END, got {self.layers!r}") from None


def _sample_spec(m: stage_pb2.SampleRequest, session_id: str, constraints: Constraints | None) -> SampleSpec:
    p = m.params
    allowed = None
    if p.HasField("constraint"):
        if constraints is None:
            raise InvalidArgument("this stage does not sample, so it takes no constraint")
        allowed = constraints.mask(session_id, p.constraint, m.constraint_token_ids)
    params = SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p if p.top_p > 0 else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty > 0 else 1.0,
        seed=p.seed,
        allowed=allowed,
    )
    ids = torch.tensor(list(m.penalty_token_ids), dtype=torch.int64) if m.penalty_token_ids else None
    return SampleSpec(params, m.top_logprobs, ids, tuple(m.fork_seeds))


def decode_step(m: stage_pb2.StepInput, constraints: Constraints | None = None) -> Step:
    """A StepInput as tensors (views of the message's bytes); InvalidArgument names what is wrong.
    `constraints`: the last stage's, which turns a step's constraint into its token mask."""
    if not m.session_id:
        raise InvalidArgument("step without session_id")
    positions = tensors.from_proto(m.position_ids, "position_ids", dtypes=(torch.int64,), shape=(3, None))
    t = positions.shape[1]
    step = Step(m.session_id, m.start_position, positions, return_kv_delta=m.return_kv_delta, rewind=m.rewind)
    kind = m.WhichOneof("input")
    if kind == "tokens":
        step.token_ids = torch.tensor(list(m.tokens.ids), dtype=torch.int64)
    elif kind == "hidden_states":
        step.hidden = tensors.from_proto(m.hidden_states, "hidden_states", dtypes=_FLOATS, shape=(t, None))
    else:
        raise InvalidArgument("a step needs tokens (first stage) or hidden_states (other stages)")
    if m.visual_spans:
        for sp in m.visual_spans:
            if sp.start < 0 or sp.length <= 0 or sp.start + sp.length > t:
                raise InvalidArgument(f"visual span [{sp.start}, {sp.start + sp.length}) outside the step's {t} positions")
        step.visual_index = torch.cat([torch.arange(sp.start, sp.start + sp.length) for sp in m.visual_spans])
        if step.visual_index.unique().numel() != step.visual_index.numel():
            raise InvalidArgument("visual spans overlap")
    if tensors.is_set(m.visual_embeds):
        step.visual = tensors.from_proto(m.visual_embeds, "visual_embeds", dtypes=_FLOATS, shape=(None, None))
    for d in m.deepstack:
        if d.layer in step.deepstack:
            raise InvalidArgument(f"two deepstack features for layer {d.layer}")
        step.deepstack[d.layer] = tensors.from_proto(d.embeds, f"deepstack[{d.layer}]", dtypes=_FLOATS, shape=(None, None))
    if m.HasField("sample"):
        step.sample = _sample_spec(m.sample, m.session_id, constraints)
    step.forks = _forks(m, step.sample)
    return step


def _forks(m: stage_pb2.StepInput, sample: SampleSpec | None) -> tuple[str, ...]:
    """The sessions a step forks into; a last stage's sample must bring a seed for each."""
    forks = tuple(m.fork_session_ids)
    if m.session_id in forks or len(set(forks)) != len(forks):
        raise InvalidArgument("fork_session_ids must be distinct and not the step's own session")
    seeds = sample.fork_seeds if sample is not None else ()
    if (sample is not None or not forks) and len(seeds) != len(forks):
        raise InvalidArgument(f"{len(forks)} forks but {len(seeds)} fork seeds")
    return forks


def _sampled(out: stage_pb2.SampledToken, t: Sample) -> None:
    out.token_id = t.token_id
    out.logprob = t.logprob
    out.top_logprobs.extend(tensor_pb2.TokenLogprob(token_id=i, logprob=lp) for i, lp in t.top)


def encode_result(r: StepResult, start: int) -> stage_pb2.StepOutput:
    out = stage_pb2.StepOutput(session_id=r.session_id, cache_length=r.cache_length)
    if r.error is not None:
        out.status.CopyFrom(r.error.to_status())
        return out
    if r.hidden is not None:
        out.hidden_states.CopyFrom(tensors.to_proto(r.hidden))
    if r.token is not None:
        _sampled(out.token, r.token)
    for t in r.fork_tokens:
        _sampled(out.fork_tokens.add(), t)
    for layer, (k, v) in sorted(r.kv_delta.items()):
        out.kv_deltas.append(tensor_pb2.KVDelta(layer=layer, start_position=start, key=tensors.to_proto(k), value=tensors.to_proto(v)))
    return out


class StageServicer(stage_pb2_grpc.StageServiceServicer):
    def __init__(self, backend: StageBackend, model_type: str, constraints: Constraints | None = None):
        self.backend = backend
        # Structured output on the last stage; touched only on the runner thread.
        self.constraints = constraints
        self.model_type = model_type
        self.instance_id = uuid.uuid4().hex
        self.layers = f"{backend.model.start}:{backend.model.end}"
        # The model runner: one thread, so steps, restores and their KV writes never interleave.
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner")

    def forward(self, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
        """Runs on the runner thread: decode, run, encode."""
        began = time.perf_counter()
        steps: list[Step | VlmeshError] = []
        for m in request.steps:
            try:
                steps.append(decode_step(m, self.constraints))
            except VlmeshError as err:
                steps.append(err)
        spans = [
            _tracer.start_span(
                "stage.forward",
                context=extract(dict(m.trace_context)),
                kind=trace.SpanKind.SERVER,
                attributes={
                    "session.id": m.session_id,
                    "vlmesh.layers": self.layers,
                    "vlmesh.start_position": m.start_position,
                    "vlmesh.batch_size": len(request.steps),
                },
            )
            for m in request.steps
        ]
        try:
            results = self.backend.run(steps)
        except VlmeshError as err:  # the request as a whole (too many steps)
            results = [StepResult(m.session_id, error=err) for m in request.steps]
        for span, r in zip(spans, results):
            if r.error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(r.error)))
                span.set_attribute("vlmesh.error_reason", r.error.reason)
            span.end()
        outputs = []
        for m, r in zip(request.steps, results):
            if r.error is not None and not r.session_id:
                r.session_id = m.session_id
            outputs.append(encode_result(r, m.start_position))
        return stage_pb2.ForwardResponse(outputs=outputs, compute_us=int((time.perf_counter() - began) * 1e6))

    async def Forward(
        self, request_iterator: AsyncIterator[stage_pb2.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.ForwardResponse]:
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            # The model runs on its own thread (about 0.2 ms of hand-off per step, measured): the
            # event loop stays free to answer health probes while a long prefill computes.
            yield await loop.run_in_executor(self.runner, self.forward, request)

    async def GetInfo(self, request: stage_pb2.GetInfoRequest, context: grpc.aio.ServicerContext) -> stage_pb2.GetInfoResponse:
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
            instance_id=self.instance_id,
            lease_seconds=b.kv.lease_seconds,
            quantization=getattr(b.model, "quantization", "none"),
            prepacked_linears=b.model.packing.packed,
            device=str(b.device),
        )

    async def RestoreSession(
        self, request_iterator: AsyncIterator[stage_pb2.RestoreSessionRequest], context: grpc.aio.ServicerContext
    ) -> stage_pb2.RestoreSessionResponse:
        header: stage_pb2.RestoreHeader | None = None
        parts: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        async for m in request_iterator:
            kind = m.WhichOneof("part")
            if kind == "header":
                if header is not None:
                    raise InvalidArgument("a restore has one header")
                header = m.header
            elif kind == "entry":
                if header is None:
                    raise InvalidArgument("a restore starts with its header")
                e = m.entry
                k = tensors.from_proto(e.key, f"layer {e.layer} key", dtypes=_FLOATS, shape=(None, None, None))
                v = tensors.from_proto(e.value, f"layer {e.layer} value", dtypes=_FLOATS, shape=tuple(k.shape))
                parts.setdefault(e.layer, []).append((e.start_position, k, v))
            else:
                raise InvalidArgument("an empty restore message")
        if header is None or not header.session_id:
            raise InvalidArgument("a restore needs a header with a session_id")
        if header.length <= 0:
            raise InvalidArgument("a restore needs length > 0")
        entries = {}
        for layer, chunks in parts.items():
            chunks.sort(key=lambda c: c[0])
            at = 0
            for start, k, _ in chunks:
                if start != at:
                    raise InvalidArgument(f"layer {layer}: restore entries leave a gap or overlap at position {at}")
                at += k.shape[1]
            if at != header.length:
                raise InvalidArgument(f"layer {layer}: restore entries cover {at} of {header.length} positions")
            entries[layer] = (torch.cat([c[1] for c in chunks], dim=1), torch.cat([c[2] for c in chunks], dim=1))
        loop = asyncio.get_running_loop()
        length = await loop.run_in_executor(self.runner, self.backend.restore, header.session_id, header.length, entries)
        log.info("restored session %s: %d positions", short(header.session_id), length)
        return stage_pb2.RestoreSessionResponse(cache_length=length)

    async def ReleaseSession(self, request: stage_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext) -> stage_pb2.ReleaseSessionResponse:
        if not request.session_id:
            raise InvalidArgument("release needs a session_id")
        released = self.backend.kv.release(request.session_id)
        return stage_pb2.ReleaseSessionResponse(freed_bytes=released.freed_bytes, existed=released.existed)

    async def RenewLeases(self, request: stage_pb2.RenewLeasesRequest, context: grpc.aio.ServicerContext) -> stage_pb2.RenewLeasesResponse:
        return stage_pb2.RenewLeasesResponse(unknown_session_ids=self.backend.kv.renew(list(request.session_ids)))

    async def expire_loop(self) -> None:
        every = max(0.2, min(5.0, self.backend.kv.lease_seconds / 4))
        while True:
            await asyncio.sleep(every)
            for sid in self.backend.kv.expire():
                log.info("session %s: lease ran out, KV dropped", short(sid))

    async def close(self) -> None:
        self.runner.shutdown(wait=False, cancel_futures=True)


async def start(cfg: StageConfig) -> RunningServer:
    prepare_process(f"stage-{cfg.layers.replace(':', '-')}", cfg)
    ckpt = open_checkpoint(cfg.model)
    start_layer, end_layer = cfg.layer_range()
    device = resolve_device(cfg.device)
    dtype = ckpt.dtype(cfg.dtype, device)
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(
        None,
        lambda: StageBackend(
            ckpt,
            start_layer,
            end_layer,
            dtype,
            cfg.kv_budget_mb << 20,
            device=device,
            lease_seconds=cfg.lease_seconds,
            max_batch=cfg.max_batch,
            quantize=cfg.quantize,
            numerics=cfg.numerics,
            prepack=cfg.prepack,
        ),
    )
    constraints = Constraints(cfg.model, ckpt.text_config.vocab_size, eos_token_ids(cfg.model)) if backend.is_last else None
    servicer = StageServicer(backend, ckpt.config.model_type, constraints)
    expiry = asyncio.create_task(servicer.expire_loop())
    metrics = StageMetrics.create()
    metrics.track_kv(servicer.layers, used=lambda: backend.kv.used, budget=backend.kv.budget, sessions=lambda: len(backend.kv))

    async def on_stop() -> None:
        expiry.cancel()
        await servicer.close()

    return await start_server(
        [(stage_pb2_grpc.add_StageServiceServicer_to_server, servicer, "vlmesh.internal.v1.StageService")],
        cfg,
        cfg.port,
        internal=True,
        on_stop=on_stop,
        metrics=metrics.registry,
        errors=metrics.request_errors,
    )


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve stage", "Serve a range of decoder layers.", StageConfig, start, argv)
