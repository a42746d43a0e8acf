"""Shared fixtures: tiny checkpoints made on disk once per run, in-process meshes of real gRPC
servers on 127.0.0.1, and the transformers reference for parity."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny configs that differ where the mesh could go wrong: layer count (splits), heads vs KV heads
# (GQA, MHA), tied vs untied head, hub vs transformers key layout, sharded weights.
TINY = {
    "a": dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, tie_word_embeddings=True, key_layout="hub"),
    "b": dict(
        num_layers=5,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=4,
        tie_word_embeddings=False,
        key_layout="transformers",
        max_shard_size="300KB",
        seed=1,
    ),
    "c": dict(num_layers=3, hidden_size=48, num_heads=3, num_kv_heads=1, intermediate_size=96, tie_word_embeddings=True, seed=2),
}


# One tiny checkpoint per family for tests/test_families.py (Qwen2-VL's images are covered by "a"-"c"
# above; here its videos): 4 decoder layers so that 1, 2 and 3 stages split DeepStack's layers 0, 1
# every way; tied and untied heads; sharded; the hub layout (qwen3-vl-moe's transposed fused experts
# included) and transformers' own.
FAMILY_TINY = {
    "qwen2-vl": dict(family="qwen2-vl", tie_word_embeddings=True, key_layout="hub", seed=6),
    "qwen2.5-vl": dict(family="qwen2.5-vl", tie_word_embeddings=False, key_layout="hub", seed=3),
    "qwen3-vl": dict(family="qwen3-vl", tie_word_embeddings=True, key_layout="transformers", seed=4),
    "qwen3-vl-moe": dict(family="qwen3-vl-moe", tie_word_embeddings=False, key_layout="hub", max_shard_size="300KB", seed=5),
}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family name -> its tiny checkpoint, made on first use."""
    from services.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_tiny(tmp_path_factory.mktemp(name.replace(".", "")), **FAMILY_TINY[name])
        return made[name]

    return get


def mp4(frames: int, width: int, height: int, rate: int, seed: int, container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """A short noisy video file, encoded with PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


@pytest.fixture(scope="session")
def videos() -> dict[str, bytes]:
    return {"short": mp4(8, 64, 48, 4, 0), "other": mp4(9, 72, 40, 6, 1)}  # "other": sampled at 8/3 fps


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from services.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(root / name, **kw) for name, kw in TINY.items()}


def png(width: int, height: int, seed: int) -> bytes:
    """A noisy PNG: lossless, so the vision service and the reference see the same pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    return {"wide": png(100, 60, 0), "tall": png(50, 120, 1), "square": png(64, 64, 2)}
