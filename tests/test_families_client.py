"""The client library's video parts: {"type": "video", "video": path | URL | bytes | [frames]}
and OpenAI-style video_url, turned into wire Content on the client (no torch, no decoding)."""

from __future__ import annotations

import base64

import pytest
from conftest import png

from vlmesh._messages import load_video, to_proto_messages

VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 32  # the client does not decode videos


def part(p: dict) -> object:
    (msg,) = to_proto_messages([{"role": "user", "content": [p, "and text"]}])
    assert msg.content[1].text == "and text"
    return msg.content[0]


def test_video_file_parts(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(VIDEO)
    data_url = "data:video/mp4;base64," + base64.b64encode(VIDEO).decode()
    for p in (
        {"type": "video", "video": str(path)},
        {"type": "video", "video": path},
        {"type": "video", "path": str(path)},
        {"type": "video", "url": path.as_uri()},
        {"video": VIDEO},  # qwen-vl-utils leaves "type" out
        {"type": "video_url", "video_url": {"url": data_url}},
        {"type": "video_url", "video_url": str(path)},
    ):
        c = part(p)
        assert c.WhichOneof("kind") == "video" and c.video == VIDEO, p
    assert load_video(bytearray(VIDEO)) == VIDEO


def test_video_as_frames(tmp_path):
    frames = [png(32, 24, 1), png(32, 24, 2)]
    (tmp_path / "f0.png").write_bytes(frames[0])
    c = part({"type": "video", "video": [str(tmp_path / "f0.png"), frames[1]], "fps": 2})
    assert c.WhichOneof("kind") == "video_frames"
    assert list(c.video_frames.frames) == frames and c.video_frames.fps == 2.0
    c = part({"type": "video", "video": frames})
    assert c.video_frames.fps == 0.0  # unknown: the processor assumes 24


@pytest.mark.parametrize(
    "p, match",
    [
        ({"type": "video", "video": "/no/such/clip.mp4"}, "video file not found"),
        ({"type": "video", "video": b""}, "is empty"),
        ({"type": "video"}, "needs a 'video'"),
        ({"type": "video", "video": []}, "at least one frame"),
        ({"type": "video", "video": [png(8, 8, 0)], "fps": -1}, "'fps' must be"),
        ({"type": "video", "video": [b"not an image"]}, "not a recognised image"),
        ({"type": "video", "video": "ftp://host/clip.mp4"}, "unsupported video URL scheme 'ftp'"),
        ({"type": "video", "video": 3}, "unsupported video source of type int"),
        ({"type": "video_url", "video_url": {}}, "video_url.url"),
        ({"type": "video_url", "video_url": "data:image/png;base64,AAAA"}, "not a video"),
    ],
)
def test_bad_video_parts(p, match):
    with pytest.raises(ValueError, match=match):
        to_proto_messages([{"role": "user", "content": [p]}])
