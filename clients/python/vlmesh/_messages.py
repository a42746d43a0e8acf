"""Conversion of chat messages in the Qwen / transformers / OpenAI formats to wire messages.

Accepted message shapes (a list of them, or a plain string meaning one user text message)::

    {"role": "user", "content": "Hi"}
    {"role": "user", "content": [
        {"type": "image", "image": X},                  # Qwen / transformers
        {"type": "image", "url": X} or {"type": "image", "path": X},   # transformers
        {"type": "image_url", "image_url": {"url": X}},                 # OpenAI
        {"type": "image_url", "image_url": X},
        {"type": "video", "video": V},                  # Qwen / transformers (also "url" / "path")
        {"type": "video", "video": [X, X, ...], "fps": 2.0},             # a video as its frames
        {"type": "video_url", "video_url": {"url": V}},                 # OpenAI-style (vLLM)
        {"type": "text", "text": "What is this?"},
    ]}

Roles: system, user, assistant, tool. An assistant message may carry OpenAI-style ``tool_calls``
(``[{"id": ..., "function": {"name": ..., "arguments": "{...}"}}]``, content None) and a tool
message the ``tool_call_id`` it answers. An image X is a filesystem path (str or os.PathLike), a
``file://`` URL, an ``http(s)://`` URL, a ``data:`` URL, raw bytes of an encoded image, or a
``PIL.Image.Image``. A video V is a path, a ``file://``, ``http(s)://`` or ``data:`` URL or raw
bytes of a video file (the vision service reads MP4, MOV, M4V and AVI), or a list of frames, each an image
X, with the ``fps`` they were taken at (optional). Everything is turned into encoded bytes here,
on the client: the coordinator never fetches anything. http(s) URLs may name public hosts only,
unless the caller allows more (`_urls`).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as _metadata
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import tensor_pb2

from ._tools import tool_calls_of
from ._urls import AllowPrivate, download

__all__ = [
    "Prompt",
    "ImageSource",
    "VideoSource",
    "MessagesLike",
    "MAX_IMAGE_BYTES",
    "MAX_VIDEO_BYTES",
    "HTTP_TIMEOUT_S",
    "load_image",
    "load_video",
    "to_proto_messages",
]

#: Anything `load_image` accepts.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image
#: Anything `load_video` accepts: a video file (path, URL, bytes); a list of frames is a part of its own.
VideoSource = str | os.PathLike[str] | bytes | bytearray | memoryview


@dataclass(frozen=True)
class Prompt:
    """A raw prompt: text the model continues as it is, with no chat template (OpenAI's
    completions API). Its control tokens ("<|im_start|>", ...) are control tokens. One-shot."""

    text: str


#: What `Client.chat` and friends accept as `messages`.
MessagesLike = str | Mapping[str, Any] | pb.Message | Sequence[Mapping[str, Any] | pb.Message] | Prompt

#: Largest image accepted from an http(s) URL.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
#: Largest video accepted from an http(s) URL.
MAX_VIDEO_BYTES = 512 * 1024 * 1024
#: Time limit of one download (connect, redirects and body), in seconds.
HTTP_TIMEOUT_S = 30.0

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _user_agent() -> str:
    try:
        version = _metadata.version("vlmesh-client")
    except _metadata.PackageNotFoundError:
        version = "dev"
    return f"vlmesh-client/{version}"


def _describe(source: object) -> str:
    """A short, log-safe description of an image or video source for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    # data: URLs can be megabytes long; nobody wants them in a traceback.
    return text if len(text) <= 120 else text[:100] + "...(" + str(len(text)) + " chars)"


def _check_image(data: bytes, source: object) -> bytes:
    """Fail early, with the source in the message, on bytes that are not a known image format.

    Only the header is parsed (Image.open is lazy), so this costs next to nothing; the server
    would reject the same bytes, but with less context and after the upload.
    """
    if not data:
        raise ValueError(f"image {_describe(source)} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img_format = img.format
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"image {_describe(source)} is not a recognised image file (PNG, JPEG, WebP, GIF, ...)") from e
    if not img_format:
        raise ValueError(f"image {_describe(source)} is not a recognised image file")
    return data


def _encode_pil(img: Image.Image) -> bytes:
    """PNG-encode a PIL image, losslessly where PNG can hold the mode."""
    buf = io.BytesIO()
    try:
        # compress_level=1: the bytes only cross the network once; speed beats size here.
        img.save(buf, format="PNG", compress_level=1)
    except (OSError, ValueError, KeyError):
        # Modes PNG cannot store (CMYK, YCbCr, LAB, HSV, F, ...): the model sees RGB anyway.
        has_alpha = "A" in img.getbands() or "transparency" in img.info
        buf = io.BytesIO()
        img.convert("RGBA" if has_alpha else "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode_data_url(url: str, kind: str = "image") -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"malformed data URL {_describe(url)}: no ',' separator")
    params = header[len("data:") :].split(";")
    mediatype = params[0].strip().lower()
    if mediatype and not mediatype.startswith(kind) and mediatype != "application/octet-stream":
        raise ValueError(f"data URL {_describe(url)} has media type {mediatype!r}, not {'an' if kind == 'image' else 'a'} {kind}")
    if "base64" in (p.strip().lower() for p in params[1:]):
        try:
            # Tolerate line breaks and missing padding, both common in hand-built data URLs.
            compact = "".join(urllib.parse.unquote(payload).split())
            return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"data URL {_describe(url)} has invalid base64: {e}") from e
    return urllib.parse.unquote_to_bytes(payload)


def _file_url_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URL {url!r} names host {parsed.netloc!r}; only local files are supported")
    return urllib.request.url2pathname(parsed.path)


def _read_file(path: str | os.PathLike[str], source: object, kind: str = "image") -> bytes:
    path = os.path.expanduser(os.fspath(path))
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ValueError(f"{kind} file not found: {_describe(source)}") from e
    except IsADirectoryError as e:
        raise ValueError(f"{kind} path is a directory: {_describe(source)}") from e
    except OSError as e:
        raise ValueError(f"cannot read {kind} file {_describe(source)}: {e}") from e


def _download(url: str, timeout: float, max_bytes: int, kind: str, allow_private: AllowPrivate) -> bytes:
    headers = {"User-Agent": _user_agent(), "Accept": f"{kind}/*,*/*;q=0.5"}
    try:
        return download(url, timeout=timeout, max_bytes=max_bytes, allow_private=allow_private, headers=headers)
    except TimeoutError as e:  # socket.timeout is TimeoutError since 3.10
        raise ValueError(f"could not download {kind} {_describe(url)}: timed out after {timeout} s") from e
    except (ValueError, OSError, http.client.HTTPException) as e:  # refused, HTTP status, reset, ...
        raise ValueError(f"could not download {kind} {_describe(url)}: {e}") from e


def _fetch(source: str, kind: str, max_bytes: int, timeout: float | None, allow_private: AllowPrivate) -> bytes:
    """The bytes a path or a file/http(s)/data URL names (an image or a video file)."""
    text = source.strip()
    if text[:5].lower() == "data:":
        return _decode_data_url(text, kind)
    match = _URL_SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # "C://..." is a Windows drive, not a scheme
        return _read_file(text, source, kind)
    scheme = match.group(1).lower()
    if scheme == "file":
        return _read_file(_file_url_path(text), source, kind)
    if scheme in ("http", "https"):
        return _download(text, HTTP_TIMEOUT_S if timeout is None else timeout, max_bytes, kind, allow_private)
    raise ValueError(f"unsupported {kind} URL scheme {scheme!r} in {_describe(source)}; use file, http, https or data")


def load_image(source: ImageSource, *, timeout: float | None = None, allow_private_urls: AllowPrivate = False) -> bytes:
    """Encoded image bytes (PNG, JPEG, ...) for any supported image source.

    Args:
        source: a path (str or os.PathLike), a ``file://``, ``http(s)://`` or ``data:`` URL,
            raw encoded bytes, or a ``PIL.Image.Image`` (encoded as PNG, losslessly).
        timeout: time limit of an http(s) download in seconds, redirects and body included
            (default `HTTP_TIMEOUT_S`).
        allow_private_urls: let http(s) URLs reach loopback, private, link-local and other
            non-public addresses: True for all, or networks (``["10.0.0.0/8"]``) for those.
            By default such URLs are refused before any connection is made.

    Raises:
        ValueError: the source is of an unsupported kind, cannot be read or downloaded (a
            refused address included), is larger than `MAX_IMAGE_BYTES` (downloads), or is not
            an image file.
    """
    if isinstance(source, Image.Image):
        return _encode_pil(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _check_image(bytes(source), source)
    if isinstance(source, os.PathLike):
        return _check_image(_read_file(source, source), source)
    if not isinstance(source, str):
        raise ValueError(
            f"unsupported image source of type {type(source).__name__}; expected a path, a file/http(s)/data URL, bytes, or a PIL.Image.Image"
        )
    return _check_image(_fetch(source, "image", MAX_IMAGE_BYTES, timeout, allow_private_urls), source)


def load_video(source: VideoSource, *, timeout: float | None = None, allow_private_urls: AllowPrivate = False) -> bytes:
    """Bytes of a video file for any supported video source (the vision service decodes them).

    Args:
        source: a path (str or os.PathLike), a ``file://``, ``http(s)://`` or ``data:`` URL, or
            raw bytes of a video file. The vision service reads containers that record their
            frame count: MP4, MOV, M4V, AVI (not WebM or MKV: send those as frames).
        timeout: time limit of an http(s) download in seconds (default `HTTP_TIMEOUT_S`).
        allow_private_urls: as for `load_image`.

    Raises:
        ValueError: the source is of an unsupported kind, cannot be read or downloaded (a
            refused address included), is empty, or is larger than `MAX_VIDEO_BYTES` (downloads).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, os.PathLike):
        data = _read_file(source, source, "video")
    elif isinstance(source, str):
        data = _fetch(source, "video", MAX_VIDEO_BYTES, timeout, allow_private_urls)
    else:
        raise ValueError(
            f"unsupported video source of type {type(source).__name__}; expected a path, a file/http(s)/data URL, bytes, or a list of frames"
        )
    if not data:
        raise ValueError(f"video {_describe(source)} is empty")
    return data


def _url_ref(item: Mapping[str, Any], index: str, kind: str) -> Any:
    """The URL of an OpenAI-style part ({"type": "image_url", "image_url": {"url": ...}} or the
    URL as a string), or None when the part is not of that style."""
    key = f"{kind}_url"
    if not (item.get("type") == key or (item.get("type") is None and key in item)):
        return None
    ref = item.get(key)
    if isinstance(ref, Mapping):
        ref = ref.get("url")
    if ref is None:
        raise ValueError(f"{index}: '{key}' part needs {key}.url (or {key} as a string)")
    return ref


def _source(item: Mapping[str, Any], index: str, kind: str) -> Any:
    """The value of a {"type": kind, kind | "url" | "path": ...} part."""
    source = next((item[k] for k in (kind, "url", "path") if item.get(k) is not None), None)
    if source is None:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"{index}: '{kind}' part needs {article} '{kind}' (or 'url' / 'path') value")
    return source


def _video_part(item: Mapping[str, Any], index: str, allow: AllowPrivate) -> pb.Content:
    ref = _url_ref(item, index, "video")
    if ref is not None:
        return pb.Content(video=load_video(ref, allow_private_urls=allow))
    source = _source(item, index, "video")
    if isinstance(source, (list, tuple)):
        fps = item.get("fps", 0.0)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps >= 0:
            raise ValueError(f"{index}: 'fps' must be a number >= 0, got {fps!r}")
        if not source:
            raise ValueError(f"{index}: a video given as frames needs at least one frame")
        frames = [load_image(f, allow_private_urls=allow) for f in source]
        return pb.Content(video_frames=tensor_pb2.VideoFrames(frames=frames, fps=float(fps)))
    return pb.Content(video=load_video(source, allow_private_urls=allow))


def _image_part(item: Mapping[str, Any], index: str, allow: AllowPrivate) -> pb.Content:
    ref = _url_ref(item, index, "image")
    source = ref if ref is not None else _source(item, index, "image")
    return pb.Content(image=load_image(source, allow_private_urls=allow))


def _content_part(item: Any, index: str, allow: AllowPrivate) -> pb.Content:
    if isinstance(item, str):
        return pb.Content(text=item)
    if isinstance(item, pb.Content):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"{index}: content parts must be dicts or strings, got {type(item).__name__}")
    kind = item.get("type")
    if kind is None:
        # qwen-vl-utils style parts may leave out "type": infer it from the key present.
        kind = next((k for k in ("text", "image", "image_url", "video", "video_url") if k in item), None)
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{index}: 'text' part needs a string 'text', got {type(text).__name__}")
        return pb.Content(text=text)
    if kind in ("image", "image_url"):
        return _image_part(item, index, allow)
    if kind in ("video", "video_url"):
        return _video_part(item, index, allow)
    raise ValueError(f"{index}: unsupported content type {kind!r}; supported: 'text', 'image', 'image_url', 'video', 'video_url'")


def _message(msg: Any, index: str, allow: AllowPrivate) -> pb.Message:
    if isinstance(msg, pb.Message):
        return msg
    if not isinstance(msg, Mapping):
        raise ValueError(f"{index}: a message must be a dict with 'role' and 'content', got {type(msg).__name__}")
    role = msg.get("role")
    if role not in _ROLES:
        raise ValueError(f"{index}: unsupported role {role!r}; supported: 'system', 'user', 'assistant', 'tool'")
    calls = tool_calls_of(msg, index) if role == "assistant" else []
    content = msg.get("content")
    if isinstance(content, str):
        parts = [pb.Content(text=content)] if content or not calls else []
    elif content is None and calls:
        parts = []
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = [_content_part(item, f"{index}.content[{j}]", allow) for j, item in enumerate(content)]
    else:
        raise ValueError(f"{index}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    tool_call_id = msg.get("tool_call_id") or ""
    if not isinstance(tool_call_id, str):
        raise ValueError(f"{index}: 'tool_call_id' must be a string")
    return pb.Message(role=_ROLES[role], content=parts, tool_calls=calls, tool_call_id=tool_call_id if role == "tool" else "")


def to_proto_messages(messages: MessagesLike, *, allow_private_urls: AllowPrivate = False) -> list[pb.Message]:
    """Wire messages for a conversation (or a session turn).

    `messages` is a list of message dicts (or `vlmesh.v1` Message protos), a single message
    dict, or a plain string meaning one user text message. Images and videos are loaded here;
    `allow_private_urls` as for `load_image`.

    Raises:
        ValueError: unknown role or content type, malformed message, or an unloadable image or video.
    """
    if isinstance(messages, str):
        return [pb.Message(role=pb.ROLE_USER, content=[pb.Content(text=messages)])]
    if isinstance(messages, (Mapping, pb.Message)):
        return [_message(messages, "messages[0]", allow_private_urls)]
    if not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages or a string, got {type(messages).__name__}")
    out = [_message(m, f"messages[{i}]", allow_private_urls) for i, m in enumerate(messages)]
    if not out:
        raise ValueError("messages is empty")
    return out
