"""The vision service: Encode images into merged visual embeddings, cached by content hash."""

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

from .encoder import VisionEncoder

log = logging.getLogger(__name__)
_tracer = tracer("vision")


@dataclass(kw_only=True)
class VisionConfig(ServiceConfig):
    model: str = field(help="checkpoint directory (HF layout)")
    port: int = field(50071, "port to bind (0 = any free port)")
    dtype: str = field("auto", "parameter dtype: auto (the checkpoint's), float32, bfloat16, float16")
    cache_mb: int = field(1024, "embedding cache budget in MiB")
    max_image_pixels: int = field(64_000_000, "refuse images with more pixels than this (before decoding)")
    max_images: int = field(16, "most images in one request")


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
            images = []
            for i, item in enumerate(request.inputs):
                if item.WhichOneof("source") != "image_bytes" or not item.image_bytes:
                    raise InvalidInput(f"input {i}: no image bytes")
                images.append(item.image_bytes)
            out = self.encoder.encode(images)
            span.set_attribute("vlmesh.cache_hits", sum(e.cache_hit for e in out))
            span.set_attribute("vlmesh.cache_misses", sum(not e.cache_hit for e in out))
            return vision_pb2.EncodeResponse(
                embeddings=[
                    vision_pb2.VisualEmbedding(
                        embeddings=tensors.to_proto(e.embeddings),
                        grid_thw=list(e.grid_thw),
                        content_hash=e.content_hash,
                        cache_hit=e.cache_hit,
                    )
                    for e in out
                ]
            )

    def GetStats(self, request, context):
        c = self.encoder.cache
        return vision_pb2.GetStatsResponse(
            cache_hits=c.hits, cache_misses=c.misses, cache_entries=len(c), cache_bytes=c.bytes, model_type=self.model_type
        )


def start(cfg: VisionConfig) -> RunningServer:
    prepare_process("vision", cfg)
    ckpt = open_checkpoint(cfg.model)
    encoder = VisionEncoder(ckpt, ckpt.dtype(cfg.dtype), cfg.cache_mb << 20, cfg.max_image_pixels, cfg.max_images)
    servicer = VisionServicer(encoder, ckpt.config.model_type)
    return start_server(
        [(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer, "vlmesh.v1.VisionService")], cfg.host, cfg.port
    )


def main(argv: list[str] | None = None) -> int:
    return serve_main("vlmesh serve vision", "Serve the vision encoder.", VisionConfig, start, argv)
