"""What the coordinator keeps of each image and video of a conversation: the grid and the video
sampling the vision service reported (all that placeholder expansion and M-RoPE need), and the
input itself, to re-encode when a session's KV must be rebuilt."""

from __future__ import annotations

from dataclasses import dataclass

from vlmesh.v1 import vision_pb2


@dataclass(frozen=True)
class Visual:
    kind: str  # "image" | "video"
    source: vision_pb2.VisualInput  # what was sent to the vision service
    grid_thw: tuple[int, int, int]
    fps: float | None = None  # videos: frame rate of the source (None: unknown)
    total_num_frames: int = 0
    frames_indices: tuple[int, ...] = ()
    second_per_grid: float | None = None  # Qwen2.5-VL's second_per_grid_ts entry

    @classmethod
    def from_encoding(cls, source: vision_pb2.VisualInput, e: vision_pb2.VisualEmbedding) -> Visual:
        if source.WhichOneof("source") == "image_bytes":
            return cls("image", source, tuple(e.grid_thw))
        v = e.video
        return cls(
            "video",
            source,
            tuple(e.grid_thw),
            fps=v.fps or None,
            total_num_frames=v.total_num_frames,
            frames_indices=tuple(v.frames_indices),
            second_per_grid=v.second_per_grid if v.HasField("second_per_grid") else None,
        )

    def metadata(self):
        """The transformers VideoMetadata the processor had (Qwen3-VL's timestamps come from it)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(
            total_num_frames=self.total_num_frames, fps=self.fps, frames_indices=list(self.frames_indices)
        )


def images(visuals: list[Visual]) -> list[Visual]:
    return [v for v in visuals if v.kind == "image"]


def videos(visuals: list[Visual]) -> list[Visual]:
    return [v for v in visuals if v.kind == "video"]
