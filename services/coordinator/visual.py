"""What the coordinator keeps of each image and video of a conversation: the grid and the video
sampling the vision service reported (all that placeholder expansion and M-RoPE need), its
content hash (prefix caching, the durable store), and the input itself, to re-encode when a
session's KV must be rebuilt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.errors import InvalidArgument
from vlmesh.internal.v1 import vision_pb2
from vlmesh.v1 import tensor_pb2

VisualKind = Literal["image", "video"]


@dataclass(frozen=True)
class Visual:
    kind: VisualKind
    source: vision_pb2.VisualInput  # what was sent to the vision service
    grid_thw: tuple[int, int, int]
    content_hash: str
    rows: int  # merged embedding rows = placeholder tokens: t*h*w / merge^2
    fps: float | None = None  # videos: frame rate of the source (None: unknown)
    total_num_frames: int = 0
    frames_indices: tuple[int, ...] = ()
    second_per_grid: float | None = None  # Qwen2.5-VL's second_per_grid_ts entry

    @classmethod
    def from_encoding(cls, source: vision_pb2.VisualInput, e: vision_pb2.VisualEmbedding) -> Visual:
        if source.WhichOneof("source") == "image_bytes":
            return cls("image", source, (e.grid_thw[0], e.grid_thw[1], e.grid_thw[2]), e.content_hash, e.embeddings.shape[0])
        v = e.video
        return cls(
            "video",
            source,
            (e.grid_thw[0], e.grid_thw[1], e.grid_thw[2]),
            e.content_hash,
            e.embeddings.shape[0],
            fps=v.fps or None,
            total_num_frames=v.total_num_frames,
            frames_indices=tuple(v.frames_indices),
            second_per_grid=v.second_per_grid if v.HasField("second_per_grid") else None,
        )

    def metadata(self):
        """The transformers VideoMetadata the processor had (Qwen3-VL's timestamps come from it)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.total_num_frames, fps=self.fps, frames_indices=list(self.frames_indices))


def images(visuals: list[Visual]) -> list[Visual]:
    return [v for v in visuals if v.kind == "image"]


def videos(visuals: list[Visual]) -> list[Visual]:
    return [v for v in visuals if v.kind == "video"]


@dataclass
class VisualRows:
    """The merged embeddings (and DeepStack features) of consecutive visuals of a session, as
    the vision service sent them: row r of visual `first + j` is row r of embeddings[j]. Rows
    are forwarded to the stages as byte slices of those messages, never decoded here."""

    first: int  # index in the session's visuals of embeddings[0]
    row_base: int  # the session-wide row number of embeddings[0]'s first row
    embeddings: list[vision_pb2.VisualEmbedding]

    @property
    def end_row(self) -> int:
        return self.row_base + sum(e.embeddings.shape[0] for e in self.embeddings)

    def rows(self, a: int, b: int, deepstack_layers: int) -> tuple[tensor_pb2.Tensor, list[tensor_pb2.Tensor]]:
        """Session-wide rows [a, b) as one Tensor (and one per DeepStack layer)."""
        if a < self.row_base or b > self.end_row:
            raise InvalidArgument(f"visual rows [{a}, {b}) are not held (have [{self.row_base}, {self.end_row}))")
        main = [_slice(e.embeddings, *span) for e, span in self._parts(a, b)]
        stack = [[_slice(e.deepstack[k], *span) for e, span in self._parts(a, b)] for k in range(deepstack_layers)]
        return _cat(main), [_cat(s) for s in stack]

    def _parts(self, a: int, b: int):
        at = self.row_base
        for e in self.embeddings:
            n = e.embeddings.shape[0]
            lo, hi = max(a, at), min(b, at + n)
            if lo < hi:
                yield e, (lo - at, hi - at)
            at += n


def _slice(t: tensor_pb2.Tensor, lo: int, hi: int) -> tuple[tensor_pb2.DType.ValueType, list[int], bytes]:
    row = len(t.data) // t.shape[0]
    return t.dtype, [hi - lo, *t.shape[1:]], t.data[lo * row : hi * row]


def _cat(parts: list[tuple[tensor_pb2.DType.ValueType, list[int], bytes]]) -> tensor_pb2.Tensor:
    dtype, shape, _ = parts[0]
    rows = sum(p[1][0] for p in parts)
    return tensor_pb2.Tensor(dtype=dtype, shape=[rows, *shape[1:]], data=b"".join(p[2] for p in parts))
