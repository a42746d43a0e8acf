"""Video inputs into what the checkpoint's video processor takes: frames plus their metadata.

Files are decoded by transformers' own PyAV reader (`read_video_pyav`, the "pyav" backend of
`load_video`) with the video processor's own `sample_frames`, so the frames are the ones a
transformers user gets from `load_video(path, backend="pyav")` and `processor(videos=...,
do_sample_frames=True)`. Before any frame is decoded the container header is checked against
the limits, so an oversized video costs nothing. transformers' default decoders here
(torchcodec, torchvision's removed video API) are not installed; PyAV is the one that works."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoLimits:
    max_frame_pixels: int  # refuse frames larger than this (width x height of the source)
    max_seconds: float  # refuse longer videos
    max_frames: int  # most frames in a video given as frames
    min_file_frames: int = 2  # transformers cannot sample a file shorter than one temporal patch


def probe(data: bytes, index: int, limits: VideoLimits) -> tuple[int, int, int]:
    """(frames, width, height) from the header; InvalidArgument unless it describes a video that
    PyAV's reader can sample and that fits the limits. Reads the header only."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise InvalidArgument(f"video {index}: the file holds no video stream")
            stream = container.streams.video[0]
            frames, rate = int(stream.frames), stream.average_rate
            width, height = stream.width, stream.height
            container_name = container.format.name
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for bad files
        raise InvalidArgument(f"video {index}: not a readable video ({type(exc).__name__}: {exc})") from None
    if frames <= 0 or not rate:
        # transformers' reader samples from the header's frame count; WebM and Matroska have none.
        raise InvalidArgument(
            f"video {index}: the {container_name} container does not record its frame count or rate; send MP4 or MOV (or the frames)"
        )
    if frames < limits.min_file_frames:
        # Qwen2-VL's sample_frames divides by zero there, Qwen3-VL's resize refuses: say so plainly.
        raise InvalidArgument(f"video {index}: {frames} frame(s); a video file needs at least {limits.min_file_frames}")
    if width * height > limits.max_frame_pixels:
        raise InvalidArgument(f"video {index}: frames of {width}x{height} = {width * height} pixels exceed the limit of {limits.max_frame_pixels}")
    seconds = frames / float(rate)
    if seconds > limits.max_seconds:
        raise InvalidArgument(f"video {index}: {seconds:.1f} s long, more than the limit of {limits.max_seconds:g} s")
    return frames, width, height


def read_file(data: bytes, index: int, sample_frames: Callable, limits: VideoLimits):
    """(frames [N, H, W, 3] uint8, VideoMetadata) of an encoded video file, sampled by
    `sample_frames(metadata)` (the video processor's, partially applied)."""
    from transformers.video_utils import read_video_pyav

    probe(data, index, limits)
    try:
        frames, metadata = read_video_pyav(io.BytesIO(data), sample_indices_fn=sample_frames)  # type: ignore[arg-type]  # PyAV reads file objects
    except Exception as exc:  # noqa: BLE001 - a damaged stream fails while decoding, in many ways
        raise InvalidArgument(f"video {index}: cannot decode or sample it ({type(exc).__name__}: {exc})") from None
    if len(frames) == 0 or len(frames) != len(metadata.frames_indices):
        raise InvalidArgument(f"video {index}: decoded {len(frames)} of {len(metadata.frames_indices)} sampled frames")
    return frames, metadata


def from_frames(frames: list, fps: float, index: int, limits: VideoLimits):
    """(frames [N, H, W, 3] uint8, VideoMetadata) of a video given as decoded RGB frames (PIL),
    all used: the metadata transformers builds for frames without any (`make_batched_metadata`),
    with the caller's fps when known."""
    from transformers.video_utils import VideoMetadata

    if not frames:
        raise InvalidArgument(f"video {index}: no frames")
    if len(frames) > limits.max_frames:
        raise InvalidArgument(f"video {index}: {len(frames)} frames, more than the limit of {limits.max_frames}")
    if len({f.size for f in frames}) != 1:
        raise InvalidArgument(f"video {index}: frames differ in size ({sorted({f.size for f in frames})})")
    if fps < 0 or not np.isfinite(fps):
        raise InvalidArgument(f"video {index}: fps must be >= 0, got {fps}")
    array = np.stack([np.asarray(f) for f in frames])
    metadata = VideoMetadata(
        total_num_frames=len(frames),
        fps=fps or None,  # None: the processor assumes 24, as for frames passed without metadata
        frames_indices=list(range(len(frames))),
        height=array.shape[1],
        width=array.shape[2],
    )
    return array, metadata
