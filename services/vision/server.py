"""The vision service: Encode images and videos into merged visual embeddings (plus Qwen3-VL's
DeepStack features), cached by content hash.

Every input is checked from its header (pixels, frames, duration) before anything is decoded,
so an oversized request is refused in milliseconds and costs no memory. Concurrent requests are
encoded together: a batcher takes what is waiting, up to a bound on decoded pixels, and runs
one tower pass over their new images and one over their new videos (the family's cu_seqlens
keeps inputs from attending to each other). Requests beyond the bound wait their turn."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from services.common import tensors
from services.common.checkpoint import open_checkpoint
from services.common.config import ServiceConfig
from services.common.config import field as flag
from services.common.devices import resolve_device
from services.common.errors import InvalidArgument, TooManyImages
from services.common.metrics import VisionMetrics
from services.common.serve import prepare_process, serve_main
from services.common.server import RunningServer, start_server
from services.common.tracing import extract, tracer
from vlmesh.internal.v1 import vision_pb2, vision_pb2_grpc

from .encoder import Encoded, VideoSettings, VisionEncoder, VisualItem

log = logging.getLogger(__name__)
_tracer = tracer("vision")


@dataclass(kw_only=True)
class VisionConfig(ServiceConfig):
    model: str = flag(help="checkpoint directory (HF layout)")
    port: int = flag(50071, "port to bind (0 = any free port)")
    dtype: str = flag("auto", "parameter dtype: auto (the checkpoint's; bfloat16 on a GPU), float32, bfloat16, float16")
    device: str = flag("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N")
    cache_mb: int = flag(1024, "embedding cache budget in MiB")
    max_image_pixels: int = flag(0, "refuse images and video frames with more pixels (header check; 0 = 4x the processor's max_pixels, at least 4M)")
    max_request_pixels: int = flag(0, "refuse a request whose inputs decode to more pixels in all (0 = 4x --max-image-pixels)")
    max_inflight_pixels: int = flag(0, "most decoded pixels being encoded at once; more requests wait (0 = --max-request-pixels)")
    max_images: int = flag(16, "most images and videos in one request")
    video_fps: float = flag(0.0, "frames sampled per second of video (0 = the checkpoint's video processor fps, else 2)")
    video_max_frames: int = flag(0, "most frames sampled from (or sent as) one video (0 = the checkpoint's max_frames)")
    max_video_seconds: float = flag(600.0, "refuse longer videos (read from the header, before decoding)")


def decode_input(i: int, item: vision_pb2.VisualInput) -> VisualItem:
    kind = item.WhichOneof("source")
    if kind == "image_bytes" and item.image_bytes:
        return VisualItem("image", item.image_bytes)
    if kind == "video_bytes" and item.video_bytes:
        return VisualItem("video", item.video_bytes)
    if kind == "video_frames" and item.video_frames.frames:
        if not all(item.video_frames.frames):
            raise InvalidArgument(f"input {i}: an empty video frame")
        return VisualItem("frames", frames=tuple(item.video_frames.frames), fps=item.video_frames.fps)
    raise InvalidArgument(f"input {i}: no image or video bytes")


def encode_result(e: Encoded) -> vision_pb2.VisualEmbedding:
    entry = e.entry
    out = vision_pb2.VisualEmbedding(
        embeddings=tensors.to_proto(entry.embeddings),
        grid_thw=list(entry.grid_thw),
        content_hash=e.content_hash,
        cache_hit=e.cache_hit,
        deepstack=[tensors.to_proto(t) for t in entry.deepstack],
    )
    v = entry.video
    if v is not None:
        out.video.fps = v.fps or 0.0
        out.video.total_num_frames = v.total_num_frames
        out.video.frames_indices.extend(v.frames_indices)
        if v.second_per_grid is not None:
            out.video.second_per_grid = v.second_per_grid
    return out


@dataclass
class _Job:
    items: list[VisualItem]
    pixels: int
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EncodeBatcher:
    """Merges concurrent requests into shared tower passes, within a pixel bound."""

    def __init__(self, encoder: VisionEncoder, max_inflight_pixels: int):
        self.encoder = encoder
        self.max_inflight_pixels = max_inflight_pixels
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def encode(self, items: list[VisualItem], pixels: int) -> list[Encoded]:
        job = _Job(items, pixels)
        await self._queue.put(job)
        return await job.done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            total = jobs[0].pixels
            while not self._queue.empty() and total + self._queue._queue[0].pixels <= self.max_inflight_pixels:  # type: ignore[attr-defined]
                job = self._queue.get_nowait()
                jobs.append(job)
                total += job.pixels
            jobs = [j for j in jobs if not j.done.cancelled()]
            if not jobs:
                continue
            try:
                merged = await loop.run_in_executor(self._runner, self.encoder.encode, [it for j in jobs for it in j.items])
            except Exception:  # noqa: BLE001 - one bad input must not fail the requests it was batched with
                if len(jobs) == 1:
                    merged = None
                else:
                    for j in jobs:
                        await self._alone(j)
                    continue
            if merged is None:
                await self._alone(jobs[0])
                continue
            at = 0
            for j in jobs:
                if not j.done.done():
                    j.done.set_result(merged[at : at + len(j.items)])
                at += len(j.items)

    async def _alone(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._runner, self.encoder.encode, job.items)
        except Exception as exc:  # noqa: BLE001 - reported to that request alone
            if not job.done.done():
                job.done.set_exception(exc)
            return
        if not job.done.done():
            job.done.set_result(result)

    async def close(self) -> None:
        self._task.cancel()
        self._runner.shutdown(wait=False, cancel_futures=True)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, encoder: VisionEncoder, model_type: str, cfg: VisionConfig):
        self.metrics = VisionMetrics.create()
        self.encoder = encoder
        self.model_type = model_type
        self.max_images = cfg.max_images
        self.max_request_pixels = cfg.max_request_pixels or 4 * encoder.max_image_pixels
        self.batcher = EncodeBatcher(encoder, cfg.max_inflight_pixels or self.max_request_pixels)

    async def Encode(self, request, context):
        with _tracer.start_as_current_span(
            "vision.encode",
            context=extract(context.invocation_metadata()),
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "vlmesh.internal.v1.VisionService",
                "rpc.method": "Encode",
                "vlmesh.inputs": len(request.inputs),
            },
        ) as span:
            if len(request.inputs) > self.max_images:
                raise TooManyImages(f"{len(request.inputs)} images and videos in one request; the limit is {self.max_images}")
            items = [decode_input(i, item) for i, item in enumerate(request.inputs)]
            pixels = sum(self.encoder.pixels(it, i) for i, it in enumerate(items))
            if pixels > self.max_request_pixels:
                raise InvalidArgument(f"the request's images and frames hold {pixels} pixels in all; the limit is {self.max_request_pixels}")
            span.set_attribute("vlmesh.videos", sum(it.kind != "image" for it in items))
            out = await self.batcher.encode(items, pixels)
            hits = sum(e.cache_hit for e in out)
            self.metrics.cache_hits.inc(hits)
            self.metrics.cache_misses.inc(len(out) - hits)
            span.set_attribute("vlmesh.cache_hits", hits)
            span.set_attribute("vlmesh.cache_misses", len(out) - hits)
            return vision_pb2.EncodeResponse(embeddings=[encode_result(e) for e in out])

    async def GetStats(self, request, context):
        c = self.encoder.cache
        return vision_pb2.GetStatsResponse(
            cache_hits=c.hits,
            cache_misses=c.misses,
            cache_entries=len(c),
            cache_bytes=c.bytes,
            model_type=self.model_type,
            encoder_passes=self.encoder.passes,
            encoded_inputs=self.encoder.encoded,
        )


async def start(cfg: VisionConfig) -> RunningServer:
    prepare_process("vision", cfg)
    ckpt = open_checkpoint(cfg.model)
    device = resolve_device(cfg.device)
    videos = VideoSettings(cfg.video_fps, cfg.video_max_frames, cfg.max_video_seconds)
    loop = asyncio.get_running_loop()
    encoder = await loop.run_in_executor(
        None, lambda: VisionEncoder(ckpt, ckpt.dtype(cfg.dtype, device), cfg.cache_mb << 20, cfg.max_image_pixels, videos, device)
    )
    servicer = VisionServicer(encoder, ckpt.config.model_type, cfg)
    try:
        return await start_server(
            [(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer, "vlmesh.internal.v1.VisionService")],
            cfg,
            cfg.port,
            internal=True,
            on_stop=servicer.batcher.close,
            metrics=servicer.metrics.registry,
            errors=servicer.metrics.request_errors,
        )
    except BaseException:
        await servicer.batcher.close()
        raise


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve vision", "Serve the vision encoder.", VisionConfig, start, argv)
