"""Unit tests of the Python client (clients/python/vlmesh): message conversion, and the sync /
async clients and the chat CLI against a fake CoordinatorService on a real local gRPC server.
The real coordinator is tested elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import http.server
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

import vlmesh
from vlmesh import _messages, chat_cli
from vlmesh._messages import load_image, to_proto_messages
from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import coordinator_pb2_grpc as pb_grpc
from vlmesh.v1 import tensor_pb2

pytestmark = pytest.mark.timeout(60)


def png_bytes(size: tuple[int, int] = (5, 4), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size)
    # Distinct pixels, so a lossy or transposed round trip shows.
    img.putdata([tuple((x * 40 + y * 7 + c * 50) % 256 for c in range(len(mode))) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


def only_image(messages: list[pb.Message]) -> bytes:
    images = [c.image for m in messages for c in m.content if c.WhichOneof("kind") == "image"]
    assert len(images) == 1
    return images[0]


# ---------------------------------------------------------------------------------------------
# An HTTP server for image URLs
# ---------------------------------------------------------------------------------------------


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    user_agents: list[str] = []
    #: (Host header, path) of every request, across both servers.
    seen: list[tuple[str, str]] = []

    def handle(self) -> None:
        # Clients that stop reading early (size and time limits) are part of the tests.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().handle()

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        type(self).user_agents.append(self.headers.get("User-Agent", ""))
        type(self).seen.append((self.headers.get("Host", ""), self.path))
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(self.path[len("/redirect?to=") :]))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/drip":  # a byte now and then: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for byte in PNG[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            self.close_connection = True
        elif self.path == "/cat.png":
            self._send(200, PNG, "image/png")
        elif self.path == "/big":  # over the (patched) cap, honest Content-Length
            self._send(200, PNG + b"\0" * 4096, "image/png")
        elif self.path == "/big-no-length":  # over the cap, no Content-Length: read until close
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG + b"\0" * 4096)
            self.close_connection = True
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, PNG, "image/png")
        elif self.path == "/page.html":
            self._send(200, b"<html>not an image</html>", "text/html")
        else:
            self._send(404, b"nope", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve_http(host: str) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer((host, 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{host}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    yield from _serve_http("127.0.0.1")


@pytest.fixture(scope="module")
def http_other() -> Iterator[str]:
    """A second server on another loopback address (all of 127.0.0.0/8 is local on Linux)."""
    yield from _serve_http("127.0.0.2")


# ---------------------------------------------------------------------------------------------
# Message conversion
# ---------------------------------------------------------------------------------------------


def test_plain_string_is_one_user_message() -> None:
    (msg,) = to_proto_messages("hello")
    assert msg.role == pb.ROLE_USER
    assert [c.text for c in msg.content] == ["hello"]


def test_roles_and_string_content() -> None:
    msgs = to_proto_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    )
    assert [m.role for m in msgs] == [pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert [m.content[0].text for m in msgs] == ["be brief", "hi", "hello"]


def test_qwen_format_keeps_part_order(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    (msg,) = to_proto_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image", "image": str(path)},
                    {"type": "text", "text": "b"},
                ],
            }
        ]
    )
    assert [c.WhichOneof("kind") for c in msg.content] == ["text", "image", "text"]
    assert msg.content[1].image == PNG


def test_image_from_path_str_pathlike_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert load_image(str(path)) == PNG
    assert load_image(path) == PNG
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_image("~/a.png") == PNG


def test_image_from_file_url(tmp_path: Path) -> None:
    path = tmp_path / "with space.png"
    path.write_bytes(PNG)
    assert load_image(path.as_uri()) == PNG
    assert load_image("file://localhost" + path.as_uri()[len("file://") :]) == PNG
    with pytest.raises(ValueError, match="only local files"):
        load_image("file://otherhost/x.png")


def test_image_from_data_url() -> None:
    b64 = base64.b64encode(PNG).decode()
    assert load_image(f"data:image/png;base64,{b64}") == PNG
    assert load_image(f"data:image;base64,{b64}") == PNG  # qwen-vl-utils style
    assert load_image(f"data:image/png;base64,{b64.rstrip('=')}") == PNG  # padding left out
    with pytest.raises(ValueError, match="base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ValueError, match="not an image"):
        load_image(f"data:text/plain;base64,{b64}")


def test_image_from_bytes() -> None:
    assert load_image(PNG) == PNG
    assert load_image(bytearray(PNG)) == PNG
    assert load_image(memoryview(PNG)) == PNG
    with pytest.raises(ValueError, match="not a recognised image"):
        load_image(b"definitely not an image")
    with pytest.raises(ValueError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_image_from_pil_is_lossless_png(mode: str) -> None:
    src = Image.open(io.BytesIO(png_bytes(mode="RGB"))).convert(mode)
    data = load_image(src)
    with Image.open(io.BytesIO(data)) as back:
        assert back.format == "PNG"
        assert back.mode == mode
        assert (back.size, back.tobytes()) == (src.size, src.tobytes())


def test_image_from_pil_mode_png_cannot_hold() -> None:
    src = Image.new("CMYK", (3, 2), (0, 255, 0, 0))
    with Image.open(io.BytesIO(load_image(src))) as back:
        assert back.format == "PNG" and back.mode == "RGB"
        assert back.getpixel((0, 0)) == src.convert("RGB").getpixel((0, 0))


def test_image_from_http_url(http_base: str) -> None:
    _ImageHandler.user_agents.clear()
    assert load_image(f"{http_base}/cat.png", allow_private_urls=True) == PNG
    assert _ImageHandler.user_agents and _ImageHandler.user_agents[-1].startswith("vlmesh-client/")


def test_image_http_failures(http_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def load(path: str, timeout: float | None = None) -> bytes:
        return load_image(f"{http_base}{path}", timeout=timeout, allow_private_urls=True)

    with pytest.raises(ValueError, match="HTTP 404"):
        load("/missing.png")
    with pytest.raises(ValueError, match="not a recognised image"):
        load("/page.html")
    with pytest.raises(ValueError, match="timed out"):
        load("/slow", timeout=0.2)
    monkeypatch.setattr(_messages, "MAX_IMAGE_BYTES", len(PNG) + 100)
    assert load("/cat.png") == PNG
    with pytest.raises(ValueError, match="limit"):
        load("/big")
    with pytest.raises(ValueError, match="limit"):
        load("/big-no-length")


def test_image_http_time_limit_covers_the_whole_body(http_base: str) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match="timed out"):
        load_image(f"{http_base}/drip", timeout=0.5, allow_private_urls=True)
    assert time.monotonic() - start < 2.0  # the body alone would take 4 s


def test_image_http_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="could not download"):
        load_image(f"http://127.0.0.1:{port}/x.png", allow_private_urls=True)


# Addresses that are refused before any connection is made (so none is ever contacted).
@pytest.mark.parametrize(
    "host, kind",
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),  # IPv4-mapped IPv6 reaches the IPv4 address
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("[fe80::1]", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("[fd00::1]", "private"),
        ("[64:ff9b::a01:203]", "private"),  # NAT64 of 10.1.2.3
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-global"),  # carrier NAT
    ],
)
def test_url_to_non_public_address_refused_by_default(host: str, kind: str) -> None:
    before = len(_ImageHandler.seen)
    with pytest.raises(ValueError, match=f"a {kind} address"):
        load_image(f"http://{host}:9/x.png")
    assert len(_ImageHandler.seen) == before


def test_private_urls_allowed_by_option(http_base: str) -> None:
    url = f"{http_base}/cat.png"
    with pytest.raises(ValueError, match="loopback address"):
        load_image(url)
    assert load_image(url, allow_private_urls=True) == PNG
    assert load_image(url, allow_private_urls=["127.0.0.1/32"]) == PNG
    assert load_image(url, allow_private_urls="10.0.0.0/8, 127.0.0.0/8") == PNG
    with pytest.raises(ValueError, match="loopback address"):
        load_image(url, allow_private_urls=["127.0.0.2"])
    with pytest.raises(ValueError, match="allow_private_urls"):
        load_image(url, allow_private_urls=["not-a-network"])
    msgs = to_proto_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], allow_private_urls=True)
    assert only_image(msgs) == PNG
    with pytest.raises(ValueError, match="loopback"):
        to_proto_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def test_redirects_are_checked_hop_by_hop(http_base: str, http_other: str) -> None:
    allow_first = ["127.0.0.1/32"]  # the first server may be reached, the second may not

    def via(target: str) -> str:
        return f"{http_base}/redirect?to={urllib.parse.quote(target, safe='')}"

    assert load_image(via(f"{http_base}/cat.png"), allow_private_urls=allow_first) == PNG
    assert load_image(via("/cat.png"), allow_private_urls=allow_first) == PNG  # relative Location
    before = len(_ImageHandler.seen)
    with pytest.raises(ValueError, match="127.0.0.2 is a loopback address"):
        load_image(via(f"{http_other}/cat.png"), allow_private_urls=allow_first)
    with pytest.raises(ValueError, match="169.254.169.254 is a link-local address"):
        load_image(via("http://169.254.169.254/latest/meta-data/"), allow_private_urls=allow_first)
    with pytest.raises(ValueError, match="scheme 'file'"):
        load_image(via("file:///etc/passwd"), allow_private_urls=True)
    hosts = [host for host, _ in _ImageHandler.seen[before:]]
    assert hosts and all(h == http_base.removeprefix("http://") for h in hosts), hosts  # none to the second
    with pytest.raises(ValueError, match="more than 5 redirects"):
        load_image(f"{http_base}/loop", allow_private_urls=True)
    # Both servers allowed: the redirect is followed.
    assert load_image(via(f"{http_other}/cat.png"), allow_private_urls=True) == PNG


def test_connection_goes_to_the_address_that_was_checked(http_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a name that answers an allowed address first and a refused one after must
    be looked up once, connected to at the checked address, and asked for by its name."""
    port = int(http_base.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    lookups: list[str] = []

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list:
        if host != "rebind.test":
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(host)
        return real(next(answers), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    before = len(_ImageHandler.seen)
    assert load_image(f"http://rebind.test:{port}/cat.png", allow_private_urls=["127.0.0.1"]) == PNG
    assert lookups == ["rebind.test"]
    assert _ImageHandler.seen[before:] == [(f"rebind.test:{port}", "/cat.png")]


def test_openai_and_transformers_image_parts(http_base: str, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    for part in (
        {"type": "image_url", "image_url": {"url": f"{http_base}/cat.png"}},
        {"type": "image_url", "image_url": data_url},
        {"type": "image", "url": f"{http_base}/cat.png"},
        {"type": "image", "path": str(path)},
        {"image": str(path)},  # qwen-vl-utils leaves "type" out
        {"type": "image", "image": Image.open(path)},
    ):
        msgs = to_proto_messages([{"role": "user", "content": [part, "and text"]}], allow_private_urls=True)
        with Image.open(io.BytesIO(only_image(msgs))) as img:
            assert img.convert("RGB").tobytes() == Image.open(path).convert("RGB").tobytes(), part
        assert msgs[0].content[1].text == "and text"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "function", "content": "x"}], "unsupported role 'function'"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "function.name"),
        ([{"content": "x"}], "unsupported role None"),
        (
            [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
            "unsupported content type 'audio'",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "'text' part needs a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], "needs an 'image'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url.url"),
        ([{"role": "user", "content": None}], "'content' must be"),
        ([{"role": "user", "content": [3]}], "content parts must be"),
        (["hi"], "a message must be a dict"),
        ([], "empty"),
        (
            [{"role": "user", "content": [{"type": "image", "image": 3.5}]}],
            "unsupported image source of type float",
        ),
        (
            [{"role": "user", "content": [{"type": "image", "image": "ftp://h/x.png"}]}],
            "unsupported image URL scheme 'ftp'",
        ),
        (
            [{"role": "user", "content": [{"type": "image", "image": "/no/such/file.png"}]}],
            "image file not found",
        ),
    ],
)
def test_bad_messages_raise_value_error(messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_proto_messages(messages)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# A fake coordinator on a real gRPC server
# ---------------------------------------------------------------------------------------------

REPLY = ["Hel", "", "lo", " wor", "ld"]


def _last_text(request: pb.GenerateRequest) -> str:
    texts = [c.text for m in request.messages for c in m.content if c.WhichOneof("kind") == "text"]
    return texts[-1] if texts else ""


TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def abort_rich(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str) -> None:
    """Abort as the coordinator does: a google.rpc.Status with an ErrorInfo in the details trailer,
    and the trace id in its own trailer."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="vlmesh.dev", metadata={"quota": "requests"}))
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    trailers = (*status.trailing_metadata, ("vlmesh-trace-id", TRACE_ID))
    context.abort_with_status(_Status(status.code, status.details, trailers))


class FakeCoordinator(pb_grpc.CoordinatorServiceServicer):
    """Replies REPLY to everything; a few magic prompts trigger errors and slow paths."""

    def __init__(self) -> None:
        self.api_key: str | None = None  # when set, every call must carry it
        self.model_info_error = False
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.sessions: dict[str, int] = {}  # id -> cached tokens
        self.closed: list[str] = []
        self.cancelled = threading.Event()
        self.forget_new_sessions = False  # simulate a coordinator restart right after CreateSession
        self._next = 0
        self._lock = threading.Lock()

    def _authorize(self, context: grpc.ServicerContext) -> None:
        got = dict(context.invocation_metadata()).get("authorization")
        if self.api_key is not None and got != f"Bearer {self.api_key}":
            abort_rich(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key", "UNAUTHENTICATED")

    def Generate(self, request, context):  # noqa: N802 (gRPC API)
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        self._authorize(context)
        sid = request.session_id
        if sid and sid not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {sid}")
        prompt = _last_text(request)
        if prompt == "sleep":
            time.sleep(1.0)
        if prompt == "slow":
            context.add_callback(self.cancelled.set)
            for _ in range(500):
                yield pb.GenerateResponse(text="tick ")
                time.sleep(0.01)
            return
        if prompt == "quota":
            abort_rich(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota of concurrent requests", "QUOTA_EXCEEDED")
        n = 2 if prompt in ("exhaust", "quota-mid") else len(REPLY)
        for i, delta in enumerate(REPLY[:n]):
            details = []
            if request.logprobs:
                details = [
                    pb.TokenDetail(
                        token=tensor_pb2.TokenLogprob(token_id=100 + i, logprob=-0.5 * i),
                        top=[tensor_pb2.TokenLogprob(token_id=200 + k, logprob=-1.0 - k) for k in range(request.logprobs)],
                    )
                ]
            yield pb.GenerateResponse(text=delta, token_ids=[100 + i], logprobs=details, session_id=sid, trace_id="feed")
        if prompt == "exhaust":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full")
        if prompt == "quota-mid":
            abort_rich(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "KV budget full", "KV_BUDGET_FULL")
        if prompt == "no-finish":
            return
        cached = self.sessions.get(sid, 0)
        prompt_tokens = 10 * len(request.messages)
        if sid:
            self.sessions[sid] = cached + prompt_tokens + len(REPLY)
        yield pb.GenerateResponse(
            finish_reason=pb.FINISH_REASON_LENGTH if request.max_tokens == len(REPLY) else pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(REPLY), cached_tokens=cached),
            session_id=sid,
            trace_id="feed",
        )

    def CreateSession(self, request, context):  # noqa: N802
        with self._lock:
            self._next += 1
            sid = f"s{self._next}"
        if not self.forget_new_sessions:
            self.sessions[sid] = 0
        self.forget_new_sessions = False
        return pb.CreateSessionResponse(session_id=sid)

    def CloseSession(self, request, context):  # noqa: N802
        self.closed.append(request.session_id)
        return pb.CloseSessionResponse(existed=self.sessions.pop(request.session_id, None) is not None)

    def GetModelInfo(self, request, context):  # noqa: N802
        self._authorize(context)
        if self.model_info_error:
            abort_rich(context, grpc.StatusCode.UNAVAILABLE, "stage 1 is down", "STAGE_UNAVAILABLE")
        return pb.GetModelInfoResponse(
            model_type="qwen2_vl",
            num_layers=28,
            stage_layers=[pb.LayerRange(start=0, end=14), pb.LayerRange(start=14, end=28)],
            max_sequence_length=32768,
        )


def _fake_server(fake: FakeCoordinator) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CoordinatorServiceServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


@pytest.fixture
def coordinator_health() -> Iterator[tuple[FakeCoordinator, str, health.HealthServicer]]:
    fake = FakeCoordinator()
    server, health_servicer = _fake_server(fake)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}", health_servicer
    server.stop(None)


@pytest.fixture
def coordinator(coordinator_health: tuple[FakeCoordinator, str, health.HealthServicer]) -> tuple[FakeCoordinator, str]:
    return coordinator_health[0], coordinator_health[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_joins_deltas(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address, metadata={"x-user": "ann"}) as client:
        result = client.chat(
            [
                {"role": "system", "content": "sys"},
                {
                    "role": "user",
                    "content": [{"type": "image", "image": PNG}, {"type": "text", "text": "hi"}],
                },
            ],
            max_tokens=64,
            temperature=0.7,
            top_k=20,
            top_p=0.9,
            repetition_penalty=1.05,
            seed=7,
            stop=["\n\n"],
        )
    assert result.text == "Hello world"
    assert result.token_ids == [100, 101, 102, 103, 104]
    assert result.finish_reason == "stop"
    assert result.usage == vlmesh.Usage(prompt_tokens=20, completion_tokens=5, cached_tokens=0)
    assert result.logprobs is None
    assert (result.session_id, result.trace_id) == ("", "feed")

    (req,) = fake.requests
    assert req.session_id == "" and req.max_tokens == 64 and list(req.stop) == ["\n\n"] and req.logprobs == 0
    assert [m.role for m in req.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]
    assert req.messages[1].content[0].image == PNG
    s = req.sampling
    assert (s.top_k, s.seed) == (20, 7) and s.HasField("seed")
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9) and s.repetition_penalty == pytest.approx(1.05)
    assert fake.metadata[0]["x-user"] == "ann"


def test_chat_defaults_are_greedy_and_unseeded(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address) as client:
        client.chat("hi")
    (req,) = fake.requests
    assert req.max_tokens == 0 and req.sampling.temperature == 0 and not req.sampling.HasField("seed")


def test_chat_length_and_logprobs(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address) as client:
        result = client.chat("hi", max_tokens=len(REPLY), logprobs=2)
    assert result.finish_reason == "length"
    assert result.logprobs is not None and len(result.logprobs) == len(REPLY)
    first = result.logprobs[1]
    assert (first.token_id, first.logprob) == (101, -0.5)
    assert [(t.token_id, t.logprob) for t in first.top] == [(200, -1.0), (201, -2.0)]


def test_chat_without_finish_reason_is_an_error(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address) as client, pytest.raises(vlmesh.VlmeshError, match="finish reason"):
        client.chat("no-finish")


def test_stream_and_stream_events(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address) as client:
        assert list(client.stream("hi")) == ["Hel", "lo", " wor", "ld"]
        events = list(client.stream_events("hi"))
    assert len(events) == len(REPLY) + 1
    assert all(e.finish_reason is None and e.usage is None for e in events[:-1])
    assert events[-1].finish_reason == "stop" and events[-1].usage is not None
    assert events[-1].usage.completion_tokens == len(REPLY)


def test_stream_break_cancels_generation(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address) as client:
        for delta in client.stream("slow"):
            assert delta == "tick "
            break
        assert fake.cancelled.wait(5)


def test_session_create_continue_close(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address) as client:
        with client.session() as session:
            first = session.chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": PNG}, {"type": "text", "text": "what?"}],
                    }
                ]
            )
            second = session.chat("and?")
            deltas = list(session.stream("more"))
            assert session.id == "s1"
        assert session.closed
        assert fake.closed == ["s1"]
        with pytest.raises(RuntimeError, match="closed"):
            session.chat("again")
    assert [r.session_id for r in fake.requests] == ["s1", "s1", "s1"]
    # Only the new messages of each turn travel.
    assert [len(r.messages) for r in fake.requests] == [1, 1, 1]
    assert _last_text(fake.requests[1]) == "and?" and fake.requests[1].messages[0].role == pb.ROLE_USER
    assert (first.session_id, second.session_id) == ("s1", "s1")
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens == 15
    assert deltas == ["Hel", "lo", " wor", "ld"]


def test_session_closed_even_when_the_body_fails(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address) as client:
        with pytest.raises(KeyError), client.session() as session:
            raise KeyError("boom")
        assert fake.closed == [session.id]
        # Attaching to an existing session does not create one.
        sid = client.create_session()
        with client.session(sid) as attached:
            attached.chat("hi")
        assert fake.closed == [session.id, sid] and fake.requests[-1].session_id == sid


def test_not_found_becomes_client_error(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address) as client:
        with pytest.raises(vlmesh.NotFound) as info:
            client.chat("hi", session_id="nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert "unknown session nope" in info.value.details
        assert isinstance(info.value.__cause__, grpc.RpcError)
        assert isinstance(info.value, vlmesh.VlmeshError)
        assert client.close_session("nope") is False


def test_error_mid_stream_after_deltas(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    got: list[str] = []
    with vlmesh.Client(address) as client, pytest.raises(vlmesh.ResourceExhausted, match="KV cache full"):
        for delta in client.stream("exhaust"):
            got.append(delta)
    assert got == ["Hel"]


def test_value_error_before_any_rpc(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address) as client:
        with pytest.raises(ValueError, match="unsupported role"):
            client.chat([{"role": "robot", "content": "x"}])
        with pytest.raises(ValueError, match="unsupported content type"):
            client.stream([{"role": "user", "content": [{"type": "audio"}]}])  # raises before iteration
        with pytest.raises(ValueError, match="top_p"):
            client.chat("hi", top_p=1.5)
        with pytest.raises(ValueError, match="stop must be a non-empty string"):
            client.chat("hi", stop=[""])
        with pytest.raises(TypeError):
            client.stream("hi", temprature=1.0)  # type: ignore[call-arg]
    assert fake.requests == []


def test_deadline_and_unavailable(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address, timeout=0.2) as client, pytest.raises(vlmesh.DeadlineExceeded):
        client.chat("sleep")
    with vlmesh.Client(f"127.0.0.1:{_free_port()}", timeout=5) as client, pytest.raises(vlmesh.Unavailable):
        client.model_info()


def test_model_info(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address) as client:
        info = client.model_info()
        assert info == vlmesh.ModelInfo("qwen2_vl", 28, [(0, 14), (14, 28)], 32768)


def test_async_client(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator

    async def main() -> None:
        async with vlmesh.AsyncClient(address) as client:
            result = await client.chat("hi", seed=3)
            assert (result.text, result.finish_reason) == ("Hello world", "stop")
            assert [d async for d in client.stream("hi")] == ["Hel", "lo", " wor", "ld"]
            events = [e async for e in client.stream_events("hi")]
            assert events[-1].usage is not None

            async with client.session() as session:
                assert session.id == "s1"
                await session.chat("one")
                assert [d async for d in session.stream("two")] == ["Hel", "lo", " wor", "ld"]
            assert session.closed and fake.closed == ["s1"]

            other = await client.session()
            assert other.id == "s2"
            await other.close()

            with pytest.raises(vlmesh.NotFound) as info:
                await client.chat("hi", session_id="nope")
            assert isinstance(info.value.__cause__, grpc.RpcError)
            with pytest.raises(vlmesh.ResourceExhausted):
                async for _ in client.stream("exhaust"):
                    pass
            with pytest.raises(ValueError, match="unsupported role"):
                await client.chat([{"role": "robot", "content": "x"}])
            assert (await client.model_info()).num_layers == 28

    asyncio.run(main())
    assert [r.session_id for r in fake.requests if r.session_id] == ["s1", "s1", "nope"]
    assert fake.closed == ["s1", "s2"]


def test_async_stream_break_cancels(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator

    async def main() -> None:
        async with vlmesh.AsyncClient(address) as client:
            stream = client.stream("slow")
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())
    assert fake.cancelled.wait(5)


def test_import_pulls_in_no_torch_or_transformers() -> None:
    code = (
        "import sys, vlmesh, vlmesh.client, vlmesh.chat_cli\n"
        "vlmesh.Client, vlmesh.AsyncClient, vlmesh.NotFound\n"
        "heavy = ('torch', 'transformers', 'services', 'numpy')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# chat CLI
# ---------------------------------------------------------------------------------------------


def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_one_shot(coordinator: tuple[FakeCoordinator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = coordinator
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    args = _cli_args(
        "--address",
        address,
        "--image",
        str(image),
        "--system",
        "sys",
        "--max-tokens",
        "9",
        "--temperature",
        "0.5",
        "--seed",
        "1",
        "--stop",
        "X",
        "--stop",
        "Y",
        "describe",
    )
    assert chat_cli.run(args) == 0
    assert capsys.readouterr().out == "Hello world\n"
    (req,) = fake.requests
    assert [m.role for m in req.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]
    assert [c.WhichOneof("kind") for c in req.messages[1].content] == ["image", "text"]
    assert req.max_tokens == 9 and req.sampling.seed == 1 and list(req.stop) == ["X", "Y"]


def test_cli_one_shot_errors(
    coordinator: tuple[FakeCoordinator, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, address = coordinator
    monkeypatch.setenv("VLMESH_ADDRESS", address)  # --address falls back to it
    assert chat_cli.run(_cli_args("exhaust")) == 1
    out, err = capsys.readouterr()
    assert out == "Hel\n" and err == "error: RESOURCE_EXHAUSTED: KV cache full\n"
    assert chat_cli.run(_cli_args("--image", "/no/such.png", "hi")) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: image file not found")


def test_cli_interactive(
    coordinator: tuple[FakeCoordinator, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, address = coordinator
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    lines = ["hello", "", f"/image {image}", "what is it?", "/image /no/such.png", "/bogus", "exhaust"]
    lines += ["/reset", "again", "/quit", "never sent"]
    stdin = "".join(line + "\n" for line in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert chat_cli.run(_cli_args("--address", address, "--system", "sys")) == 0
    out, err = capsys.readouterr()
    assert out == "Hello world\nHello world\nHel\nHello world\n"
    assert "you> " not in out  # stdin is not a tty
    assert "image file not found" in err and "unknown command '/bogus'" in err
    assert "error: RESOURCE_EXHAUSTED: KV cache full" in err

    texts = [_last_text(r) for r in fake.requests]
    assert texts == ["hello", "what is it?", "exhaust", "again"]
    assert [r.session_id for r in fake.requests] == ["s1", "s1", "s1", "s2"]
    # System prompt on the first turn of each session only; the image on the next message only.
    assert [[m.role for m in r.messages] for r in fake.requests] == [
        [pb.ROLE_SYSTEM, pb.ROLE_USER],
        [pb.ROLE_USER],
        [pb.ROLE_USER],
        [pb.ROLE_SYSTEM, pb.ROLE_USER],
    ]
    assert [c.WhichOneof("kind") for c in fake.requests[1].messages[0].content] == ["image", "text"]
    assert [c.WhichOneof("kind") for c in fake.requests[2].messages[0].content] == ["text"]
    assert fake.closed == ["s1", "s2"]


def test_cli_interactive_recovers_from_lost_session(
    coordinator: tuple[FakeCoordinator, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, address = coordinator
    fake.forget_new_sessions = True
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    assert chat_cli.run(_cli_args("--address", address)) == 0
    out, err = capsys.readouterr()
    assert "error: NOT_FOUND: unknown session s1" in err and out == "Hello world\n"
    assert [r.session_id for r in fake.requests] == ["s1", "s2"]


# ---------------------------------------------------------------------------------------------
# Error details, API keys, TLS, health
# ---------------------------------------------------------------------------------------------


def test_error_reason_and_trace_id(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    with vlmesh.Client(address) as client:
        with pytest.raises(vlmesh.ResourceExhausted) as info:
            client.chat("quota")
        assert (info.value.reason, info.value.trace_id) == ("QUOTA_EXCEEDED", TRACE_ID)
        assert info.value.details == "quota of concurrent requests"
        got: list[str] = []
        with pytest.raises(vlmesh.ResourceExhausted) as info:
            got.extend(client.stream("quota-mid"))  # after streamed deltas
        assert got == ["Hel"] and (info.value.reason, info.value.trace_id) == ("KV_BUDGET_FULL", TRACE_ID)
        fake.model_info_error = True
        with pytest.raises(vlmesh.Unavailable) as info:
            client.model_info()  # unary
        assert (info.value.reason, info.value.trace_id) == ("STAGE_UNAVAILABLE", TRACE_ID)
        # A status without details has neither.
        with pytest.raises(vlmesh.ResourceExhausted) as info:
            client.chat("exhaust")
        assert (info.value.reason, info.value.trace_id) == (None, None)

    async def main() -> None:
        async with vlmesh.AsyncClient(address) as aclient:
            with pytest.raises(vlmesh.ResourceExhausted) as ainfo:
                await aclient.chat("quota")
            assert (ainfo.value.reason, ainfo.value.trace_id) == ("QUOTA_EXCEEDED", TRACE_ID)
            with pytest.raises(vlmesh.ResourceExhausted) as ainfo:
                async for _ in aclient.stream("quota-mid"):
                    pass
            assert (ainfo.value.reason, ainfo.value.trace_id) == ("KV_BUDGET_FULL", TRACE_ID)
            with pytest.raises(vlmesh.Unavailable) as ainfo:
                await aclient.model_info()
            assert (ainfo.value.reason, ainfo.value.trace_id) == ("STAGE_UNAVAILABLE", TRACE_ID)
            with pytest.raises(vlmesh.NotFound) as ainfo:
                await aclient.chat("hi", session_id="nope")
            assert (ainfo.value.reason, ainfo.value.trace_id) == (None, None)

    asyncio.run(main())


def test_api_key(coordinator: tuple[FakeCoordinator, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, address = coordinator
    fake.api_key = "k1"
    monkeypatch.delenv("VLMESH_API_KEY", raising=False)
    with vlmesh.Client(address) as client, pytest.raises(vlmesh.Unauthenticated) as info:
        client.chat("hi")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.reason == "UNAUTHENTICATED"
    assert "authorization" not in fake.metadata[-1]

    with vlmesh.Client(address, api_key="k1", metadata={"x-user": "ann"}) as client:
        assert client.chat("hi").text == "Hello world"
        assert fake.metadata[-1]["authorization"] == "Bearer k1" and fake.metadata[-1]["x-user"] == "ann"
        assert client.model_info().num_layers == 28  # unary calls carry it too
        other = client.with_options(api_key="k2")  # same channel, another caller's key
        with pytest.raises(vlmesh.Unauthenticated):
            other.chat("hi")
        assert fake.metadata[-1]["authorization"] == "Bearer k2" and fake.metadata[-1]["x-user"] == "ann"
        with pytest.raises(vlmesh.Unauthenticated):
            client.with_options(api_key="").chat("hi")  # "" = no key
        assert "authorization" not in fake.metadata[-1]
        other.close()  # a copy does not close the shared channel
        assert client.chat("hi").text == "Hello world"

    monkeypatch.setenv("VLMESH_API_KEY", "k1")
    with vlmesh.Client(address) as client:
        assert client.chat("hi").text == "Hello world"
        with pytest.raises(vlmesh.Unauthenticated):
            vlmesh.Client(address, api_key="").chat("hi")
    # Explicit authorization metadata wins over the environment.
    with vlmesh.Client(address, metadata={"authorization": "Bearer k1"}) as client:
        client.chat("hi")
    with pytest.raises(ValueError, match="printable ASCII"):
        vlmesh.Client(address, api_key="a b")
    with pytest.raises(ValueError, match="not both"):
        vlmesh.Client(address, api_key="k1", metadata={"authorization": "Bearer k1"})

    async def main() -> None:
        async with vlmesh.AsyncClient(address, api_key="k1") as aclient:
            assert (await aclient.chat("hi")).text == "Hello world"
            with pytest.raises(vlmesh.Unauthenticated) as ainfo:
                await aclient.with_options(api_key="k2", timeout=5).chat("hi")
            assert ainfo.value.reason == "UNAUTHENTICATED"
            assert (await aclient.model_info()).num_layers == 28

    asyncio.run(main())


def _self_signed() -> tuple[bytes, bytes]:
    """(certificate, key) PEM for localhost / 127.0.0.1, valid for a day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLMESH_API_KEY", raising=False)
    cert, key = _self_signed()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert)
    fake = FakeCoordinator()
    fake.api_key = "k1"
    server, _ = _fake_server(fake)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    address = f"localhost:{port}"
    try:
        for roots in (cert, str(ca_file), ca_file):
            with vlmesh.Client(address, api_key="k1", root_certificates=roots, timeout=10) as client:
                assert client.chat("hi").text == "Hello world"
        assert fake.metadata[-1]["authorization"] == "Bearer k1"
        # The system's roots do not know this CA; a plaintext client cannot talk TLS.
        with vlmesh.Client(address, api_key="k1", tls=True, timeout=10) as client, pytest.raises(vlmesh.Unavailable):
            client.chat("hi")
        with vlmesh.Client(address, api_key="k1", timeout=10) as client, pytest.raises(vlmesh.Unavailable):
            client.chat("hi")
        with pytest.raises(ValueError, match="not both"):
            vlmesh.Client(address, tls=True, credentials=grpc.ssl_channel_credentials())
        with pytest.raises(ValueError, match="cannot read root certificates"):
            vlmesh.Client(address, root_certificates=tmp_path / "missing.pem")

        async def main() -> str:
            async with vlmesh.AsyncClient(address, api_key="k1", root_certificates=cert, timeout=10) as aclient:
                return (await aclient.chat("hi")).text

        assert asyncio.run(main()) == "Hello world"

        args = _cli_args("--address", address, "--ca-cert", str(ca_file), "--api-key", "k1", "hi")
        assert chat_cli.run(args) == 0
        assert capsys.readouterr().out == "Hello world\n"
        monkeypatch.setenv("VLMESH_API_KEY", "k1")  # --api-key defaults to it
        assert chat_cli.run(_cli_args("--address", address, "--ca-cert", str(ca_file), "hi")) == 0
        assert capsys.readouterr().out == "Hello world\n"
        assert chat_cli.run(_cli_args("--address", address, "--ca-cert", str(ca_file), "--api-key", "bad", "hi")) == 1
        assert capsys.readouterr().err == "error: UNAUTHENTICATED: missing or unknown API key\n"
        assert chat_cli.run(_cli_args("--address", address, "--tls", "hi")) == 1
        assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
    finally:
        server.stop(None)


def test_health(coordinator_health: tuple[FakeCoordinator, str, health.HealthServicer]) -> None:
    _, address, health_servicer = coordinator_health
    with vlmesh.Client(address, timeout=5) as client:
        assert client.health() == "SERVING"
        health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(vlmesh.NotFound):
            client.health("no.such.Service")

    async def main() -> str:
        async with vlmesh.AsyncClient(address, timeout=5) as aclient:
            return await aclient.health()

    assert asyncio.run(main()) == "NOT_SERVING"
    with vlmesh.Client(f"127.0.0.1:{_free_port()}", timeout=5) as client, pytest.raises(vlmesh.Unavailable):
        client.health()


def test_cli_private_urls(coordinator: tuple[FakeCoordinator, str], http_base: str, capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = coordinator
    url = f"{http_base}/cat.png"
    assert chat_cli.run(_cli_args("--address", address, "--image", url, "hi")) == 1
    assert "loopback address" in capsys.readouterr().err and fake.requests == []
    assert chat_cli.run(_cli_args("--address", address, "--image", url, "--allow-private-urls", "hi")) == 0
    assert only_image(list(fake.requests[0].messages)) == PNG
