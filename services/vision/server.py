"""The vision service: Encode images into merged visual embeddings, cached by content hash."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from services.common import tensors
from services.common.checkpoint import open_checkpoint
from services.common.config import add_config_arguments, config_from_args, field
from services.common.errors import InvalidInput
from services.common.server import RunningServer, setup_logging, start_server
from services.common.tracing import extract, setup_tracing, tracer
from vlmesh.v1 import vision_pb2, vision_pb2_grpc

from .encoder import VisionEncoder

log = logging.getLogger(__name__)
_tracer = tracer("vision")


@dataclass
class VisionConfig:
    model: str = field(help="checkpoint directory (HF layout)")
    host: str = field("0.0.0.0", "address to bind")
    port: int = field(50071, "port to bind (0 = any free port)")
    dtype: str = field("auto", "parameter dtype: auto (the checkpoint's), float32, bfloat16, float16")
    cache_mb: int = field(1024, "embedding cache budget in MiB")
    max_image_pixels: int = field(64_000_000, "refuse images with more pixels than this (before decoding)")
    max_images: int = field(16, "most images in one request")
    trace_exporter: str = field("none", "none | console | otlp")
    otlp_endpoint: str = field("", "OTLP gRPC endpoint, e.g. http://jaeger:4317")
    threads: int = field(0, "torch intra-op threads (0 = torch's default)")
    log_level: str = field("INFO", "logging level")


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
    setup_tracing("vision", cfg.trace_exporter, cfg.otlp_endpoint)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = open_checkpoint(cfg.model)
    encoder = VisionEncoder(ckpt, ckpt.dtype(cfg.dtype), cfg.cache_mb << 20, cfg.max_image_pixels, cfg.max_images)
    servicer = VisionServicer(encoder, ckpt.config.model_type)
    return start_server(
        [(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer, "vlmesh.v1.VisionService")], cfg.host, cfg.port
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmesh serve vision", description="Serve the vision encoder.")
    add_config_arguments(parser, VisionConfig)
    cfg = config_from_args(VisionConfig, parser.parse_args(argv))
    setup_logging(cfg.log_level)
    start(cfg).wait_for_signal()
    return 0
