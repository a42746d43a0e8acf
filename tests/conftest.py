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
