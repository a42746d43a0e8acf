"""The vision tower of the checkpoint, its processor's resize/normalise, and a content-hash cache."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from services.common.checkpoint import Checkpoint, build_on_meta, load_weights
from services.common.errors import InvalidInput, KVBudgetFull

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    embeddings: torch.Tensor  # [t*h*w / merge^2, hidden]
    grid_thw: tuple[int, int, int]
    content_hash: str
    cache_hit: bool


class EmbeddingCache:
    """LRU by bytes. Keyed by the sha256 of the image file, so the second turn of a chat about
    the same picture never runs the encoder."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict[str, tuple[torch.Tensor, tuple[int, int, int]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return item

    def put(self, key: str, emb: torch.Tensor, grid: tuple[int, int, int]) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.budget:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (emb, grid)
            self.bytes += size
            while self.bytes > self.budget:
                _, (old, _) = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)


class VisionEncoder:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, cache_bytes: int, max_image_pixels: int, max_images: int):
        from transformers import AutoProcessor

        self.ckpt = ckpt
        self.dtype = dtype
        # The checkpoint's own processor settings (min/max pixels) decide the grid and so the
        # number of placeholder tokens the coordinator inserts.
        self.image_processor = AutoProcessor.from_pretrained(ckpt.path).image_processor
        model = build_on_meta(ckpt.family.vision_model, ckpt.vision_config, dtype)
        state = ckpt.read(lambda part, name: name if part == "vision" else None, dtype, desc="vision weights")
        load_weights(model, state, "the vision tower")
        self.model = model.eval()
        self.cache = EmbeddingCache(cache_bytes)
        self.max_image_pixels = max_image_pixels
        self.max_images = max_images
        self._lock = threading.Lock()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _decode(self, data: bytes, index: int) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: refuse oversized images before decoding them
            if w * h > self.max_image_pixels:
                raise InvalidInput(f"image {index}: {w}x{h} = {w * h} pixels exceeds the limit of {self.max_image_pixels}")
            img.load()
            return img.convert("RGB")
        except InvalidInput:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise InvalidInput(f"image {index}: not a readable image ({type(exc).__name__}: {exc})") from None

    def encode(self, images: list[bytes]) -> list[Encoded]:
        if len(images) > self.max_images:
            raise KVBudgetFull(f"{len(images)} images in one request; the limit is {self.max_images}")
        if not images:
            return []
        hashes = [hashlib.sha256(b).hexdigest() for b in images]
        cached = {h: self.cache.get(h) for h in dict.fromkeys(hashes)}
        todo = [i for i, h in enumerate(hashes) if cached[h] is None and hashes.index(h) == i]
        if todo:
            pil = [self._decode(images[i], i) for i in todo]
            # One encoder pass over all new images of the request, as transformers does;
            # cu_seqlens from grid_thw keeps them from attending to each other.
            inputs = self.image_processor(images=pil, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.dtype)
            grids = inputs["image_grid_thw"]
            with self._lock, torch.inference_mode():
                merged = self.model(pixels, grid_thw=grids).pooler_output
            sizes = (grids.prod(-1) // self.ckpt.vision_config.spatial_merge_size**2).tolist()
            for i, emb, grid in zip(todo, torch.split(merged, sizes), grids.tolist()):
                cached[hashes[i]] = (emb.clone(), tuple(grid))
                self.cache.put(hashes[i], emb.clone(), tuple(grid))
        fresh = set(hashes[i] for i in todo)
        return [Encoded(cached[h][0], cached[h][1], h, h not in fresh) for h in hashes]

