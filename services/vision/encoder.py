"""The vision tower of the checkpoint, its processor's resize/normalise (and video sampling), and
a content-hash cache."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from services.common.checkpoint import Checkpoint, build_on_meta, load_weights
from services.common.errors import InvalidArgument

from . import video
from .video import VideoLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisualItem:
    """One input: an encoded image, an encoded video file, or a video as encoded frames."""

    kind: str  # "image" | "video" | "frames"
    data: bytes = b""  # the image or video file ("image", "video")
    frames: tuple[bytes, ...] = ()  # the frames' image files ("frames")
    fps: float = 0.0  # frames only: the rate they were taken at (0 = unknown)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        if self.kind == "image":
            h.update(self.data)  # the plain file hash, as before videos existed
            return h.hexdigest()
        h.update(self.kind.encode() + b"\0")
        if self.kind == "frames":
            h.update(repr(self.fps).encode() + b"\0")
            for frame in self.frames:
                h.update(len(frame).to_bytes(8, "little") + frame)
        else:
            h.update(self.data)
        return h.hexdigest()


@dataclass(frozen=True)
class VideoInfo:
    """How the processor sampled a video (what placeholder expansion and M-RoPE need)."""

    fps: float | None
    total_num_frames: int
    frames_indices: tuple[int, ...]
    second_per_grid: float | None  # Qwen2.5-VL's second_per_grid_ts entry


@dataclass
class Entry:
    embeddings: torch.Tensor  # [t*h*w / merge^2, hidden]
    grid_thw: tuple[int, int, int]
    deepstack: list[torch.Tensor] = field(default_factory=list)  # Qwen3-VL: [rows, hidden] per DeepStack layer
    video: VideoInfo | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.embeddings, *self.deepstack])


@dataclass
class Encoded:
    entry: Entry
    content_hash: str
    cache_hit: bool


class EmbeddingCache:
    """LRU by bytes. Keyed by the sha256 of the input, so the second turn of a chat about the
    same picture or video never runs the encoder."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return item

    def put(self, key: str, entry: Entry) -> None:
        size = entry.nbytes()
        if size > self.budget:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = entry
            self.bytes += size
            while self.bytes > self.budget:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class VideoSettings:
    fps: float = 0.0  # frames sampled per second; 0 = the checkpoint's video processor fps, else 2
    max_frames: int = 0  # 0 = the checkpoint's video processor max_frames
    max_seconds: float = 600.0


class VisionEncoder:
    def __init__(
        self,
        ckpt: Checkpoint,
        dtype: torch.dtype,
        cache_bytes: int,
        max_image_pixels: int,
        videos: VideoSettings = VideoSettings(),
        device: torch.device = torch.device("cpu"),
    ):
        from transformers import AutoProcessor

        self.ckpt = ckpt
        self.dtype = dtype
        self.device = device
        # The checkpoint's own processor settings (min/max pixels, patch size, video sampling)
        # decide the grid and so the number of placeholder tokens the coordinator inserts.
        self.processor = AutoProcessor.from_pretrained(ckpt.path)
        self.image_processor = self.processor.image_processor
        self.video_processor = self.processor.video_processor
        if videos.max_frames > 0:
            # sample_frames reads max_frames from the instance (Qwen3-VL ignores the argument).
            self.video_processor.max_frames = videos.max_frames
        self.video_fps = videos.fps or getattr(self.video_processor, "fps", None) or 2.0
        model = build_on_meta(ckpt.family.vision_model, ckpt.vision_config, dtype)
        state = ckpt.read(lambda part, name: name if part == "vision" else None, dtype, desc="vision weights")
        load_weights(model, state, "the vision tower")
        self.model = model.to(device).eval()
        self.merge = ckpt.vision_config.spatial_merge_size
        self.cache = EmbeddingCache(cache_bytes)
        # 0 = auto: bigger images than a few times what the processor resizes them to gain nothing.
        self.max_image_pixels = max_image_pixels or max(4 * self.processor_max_pixels(), 4_000_000)
        self.video_limits = VideoLimits(
            self.max_image_pixels, videos.max_seconds, self.video_processor.max_frames, self.video_processor.temporal_patch_size
        )
        self.passes = 0  # forward passes of the tower
        self.encoded = 0  # inputs encoded in them
        self._lock = threading.Lock()

    def processor_max_pixels(self) -> int:
        ip = self.image_processor
        return int(getattr(ip, "max_pixels", None) or (getattr(ip, "size", None) or {}).get("longest_edge") or 12845056)

    def pixels(self, item: VisualItem, index: int) -> int:
        """What decoding `item` will hold in memory, in pixels, read from its header only; raises
        InvalidArgument for an unreadable header or a frame over max_image_pixels."""
        if item.kind == "image":
            return self._header(item.data, f"image {index}")
        if item.kind == "frames":
            return sum(self._header(f, f"video {index} frame {j}") for j, f in enumerate(item.frames))
        frames, width, height = video.probe(item.data, index, self.video_limits)
        return min(frames, self.video_processor.max_frames or frames) * width * height

    def _header(self, data: bytes, what: str) -> int:
        try:
            w, h = Image.open(io.BytesIO(data)).size  # the header only
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise InvalidArgument(f"{what}: not a readable image ({type(exc).__name__}: {exc})") from None
        if w * h > self.max_image_pixels:
            raise InvalidArgument(f"{what}: {w}x{h} = {w * h} pixels exceeds the limit of {self.max_image_pixels}")
        return w * h

    def _decode(self, data: bytes, what: str) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: refuse oversized images before decoding them
            if w * h > self.max_image_pixels:
                raise InvalidArgument(f"{what}: {w}x{h} = {w * h} pixels exceeds the limit of {self.max_image_pixels}")
            img.load()
            return img.convert("RGB")
        except InvalidArgument:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise InvalidArgument(f"{what}: not a readable image ({type(exc).__name__}: {exc})") from None

    def encode(self, items: list[VisualItem]) -> list[Encoded]:
        """Encode what the cache lacks: the new images in one pass, the new videos in one."""
        if not items:
            return []
        hashes = [it.content_hash() for it in items]
        cached = {h: self.cache.get(h) for h in dict.fromkeys(hashes)}
        todo = [i for i, h in enumerate(hashes) if cached[h] is None and hashes.index(h) == i]
        # As transformers does: one encoder pass over the new images, one over the new videos;
        # cu_seqlens from grid_thw keeps them from attending to each other.
        images = [i for i in todo if items[i].kind == "image"]
        videos = [i for i in todo if items[i].kind != "image"]
        fresh: dict[int, Entry] = {}
        if images:
            fresh.update(zip(images, self._encode_images([items[i] for i in images], images)))
        if videos:
            fresh.update(zip(videos, self._encode_videos([items[i] for i in videos], videos)))
        for i, entry in fresh.items():
            cached[hashes[i]] = entry
            self.cache.put(hashes[i], entry)
        new = {hashes[i] for i in todo}
        return [Encoded(e, h, h not in new) for h in hashes if (e := cached[h]) is not None]

    def _encode_images(self, items: list[VisualItem], where: list[int]) -> list[Entry]:
        pil = [self._decode(it.data, f"image {i}") for it, i in zip(items, where)]
        inputs = self.image_processor(images=pil, return_tensors="pt")
        return self._run(inputs["pixel_values"], inputs["image_grid_thw"], [None] * len(items))

    def _encode_videos(self, items: list[VisualItem], where: list[int]) -> list[Entry]:
        sample = functools.partial(self.video_processor.sample_frames, fps=self.video_fps)
        clips, metas = [], []
        for it, i in zip(items, where):
            if it.kind == "video":
                frames, meta = video.read_file(it.data, i, sample, self.video_limits)
            else:
                pil = [self._decode(f, f"video {i} frame {j}") for j, f in enumerate(it.frames)]
                frames, meta = video.from_frames(pil, it.fps, i, self.video_limits)
            clips.append(frames)
            metas.append(meta)
        try:
            # The whole processor, not only its video processor: Qwen2.5-VL's adds second_per_grid_ts.
            inputs = self.processor(videos=clips, video_metadata=metas, do_sample_frames=False, return_metadata=True, return_tensors="pt")
        except (ValueError, ZeroDivisionError) as exc:  # e.g. too few frames for one temporal patch
            raise InvalidArgument(f"video {where[0] if len(where) == 1 else where}: cannot process it: {exc}") from None
        seconds = inputs.get("second_per_grid_ts")
        infos = [
            VideoInfo(
                fps=meta.fps,
                total_num_frames=int(meta.total_num_frames),
                frames_indices=tuple(int(x) for x in meta.frames_indices),
                second_per_grid=None if seconds is None else float(seconds[k]),
            )
            for k, meta in enumerate(inputs["video_metadata"])
        ]
        return self._run(inputs["pixel_values_videos"], inputs["video_grid_thw"], infos)

    def _run(self, pixels: torch.Tensor, grids: torch.Tensor, infos: Sequence[VideoInfo | None]) -> list[Entry]:
        with self._lock, torch.inference_mode():
            out = self.model(pixels.to(self.device, self.dtype), grid_thw=grids.to(self.device))
            self.passes += 1
            self.encoded += len(grids)
        sizes = (grids.prod(-1) // self.merge**2).tolist()
        merged = torch.split(out.pooler_output, sizes)
        # Qwen3-VL: one feature per DeepStack layer, split per input like the embeddings.
        deepstack = [torch.split(f, sizes) for f in (getattr(out, "deepstack_features", None) or [])]
        return [
            Entry(merged[k].cpu().clone(), tuple(grid), [layer[k].cpu().clone() for layer in deepstack], infos[k])
            for k, grid in enumerate(grids.tolist())
        ]
