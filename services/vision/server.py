"""The vision service: Encode images and videos into merged visual embeddings (plus Qwen3-VL's
DeepStack features), cached by content hash."""

from __future__ import annotations

import logging
from dataclasses import dataclass


from services.common import tensors
from services.common.checkpoint import open_checkpoint
from services.common.config import ServiceConfig, field
from services.common.errors import InvalidInput
from services.common.server import RunningServer, prepare_process, serve_main, start_server
from services.common.tracing import extract, tracer
from vlmesh.v1 import vision_pb2, vision_pb2_grpc

from .encoder import Encoded, VideoSettings, VisionEncoder, VisualItem

log = logging.getLogger(__name__)
_tracer = tracer("vision")


@dataclass(kw_only=True)
class VisionConfig(ServiceConfig):
    model: str = field(help="checkpoint directory (HF layout)")
    port: int = field(50071, "port to bind (0 = any free port)")
    dtype: str = field("auto", "parameter dtype: auto (the checkpoint's), float32, bfloat16, float16")
    cache_mb: int = field(1024, "embedding cache budget in MiB")
    max_image_pixels: int = field(64_000_000, "refuse images and video frames with more pixels than this (before decoding)")
    max_images: int = field(16, "most images and videos in one request")
    video_fps: float = field(0.0, "frames sampled per second of video (0 = the checkpoint's video processor fps, else 2)")
    video_max_frames: int = field(0, "most frames sampled from (or sent as) one video (0 = the checkpoint's max_frames)")
    max_video_seconds: float = field(600.0, "refuse longer videos (read from the header, before decoding)")


def decode_input(i: int, item: vision_pb2.VisualInput) -> VisualItem:
    kind = item.WhichOneof("source")
    if kind == "image_bytes" and item.image_bytes:
        return VisualItem("image", item.image_bytes)
    if kind == "video_bytes" and item.video_bytes:
        return VisualItem("video", item.video_bytes)
    if kind == "video_frames" and item.video_frames.frames:
        if not all(item.video_frames.frames):
            raise InvalidInput(f"input {i}: an empty video frame")
        return VisualItem("frames", tuple(item.video_frames.frames), item.video_frames.fps)
    raise InvalidInput(f"input {i}: no image or video bytes")


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


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, encoder: VisionEncoder, model_type: str):
        self.encoder = encoder
        self.model_type = model_type

    def Encode(self, request, context):
        with _tracer.start_as_current_span(
            "vision.encode",
            context=extract(context.invocation_metadata()),
            attributes={"vlmesh.service": "vision", "vlmesh.images": len(request.inputs)},
        ) as span:
            items = [decode_input(i, item) for i, item in enumerate(request.inputs)]
            span.set_attribute("vlmesh.videos", sum(it.kind != "image" for it in items))
            out = self.encoder.encode(items)
            span.set_attribute("vlmesh.cache_hits", sum(e.cache_hit for e in out))
            span.set_attribute("vlmesh.cache_misses", sum(not e.cache_hit for e in out))
            return vision_pb2.EncodeResponse(embeddings=[encode_result(e) for e in out])

    def GetStats(self, request, context):
        c = self.encoder.cache
        return vision_pb2.GetStatsResponse(
            cache_hits=c.hits, cache_misses=c.misses, cache_entries=len(c), cache_bytes=c.bytes, model_type=self.model_type
        )


def start(cfg: VisionConfig) -> RunningServer:
    prepare_process("vision", cfg)
    ckpt = open_checkpoint(cfg.model)
    videos = VideoSettings(cfg.video_fps, cfg.video_max_frames, cfg.max_video_seconds)
    encoder = VisionEncoder(ckpt, ckpt.dtype(cfg.dtype), cfg.cache_mb << 20, cfg.max_image_pixels, cfg.max_images, videos)
    servicer = VisionServicer(encoder, ckpt.config.model_type)
    return start_server(
        [(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer, "vlmesh.v1.VisionService")], cfg.host, cfg.port
    )


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve vision", "Serve the vision encoder.", VisionConfig, start, argv)
