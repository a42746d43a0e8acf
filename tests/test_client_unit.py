"""Unit tests of the Python client (clients/python/vlmesh): message conversion, and the sync /
async clients and the chat CLI against a fake CoordinatorService on a real local gRPC server.
The real coordinator is tested elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.server
import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import vlmesh
from PIL import Image
from vlmesh import _messages, chat_cli
from vlmesh._messages import load_image, to_proto_messages
from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import coordinator_pb2_grpc as pb_grpc
from vlmesh.v1 import tensor_pb2

pytestmark = pytest.mark.timeout(60)


def png_bytes(size: tuple[int, int] = (5, 4), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size)
    # Distinct pixels, so a lossy or transposed round trip shows.
    img.putdata(
        [
            tuple((x * 40 + y * 7 + c * 50) % 256 for c in range(len(mode)))
            for y in range(size[1])
            for x in range(size[0])
        ]
    )
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

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        type(self).user_agents.append(self.headers.get("User-Agent", ""))
        if self.path == "/cat.png":
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


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


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
    assert load_image(f"{http_base}/cat.png") == PNG
    assert _ImageHandler.user_agents and _ImageHandler.user_agents[-1].startswith("vlmesh-client/")


def test_image_http_failures(http_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="HTTP 404"):
        load_image(f"{http_base}/missing.png")
    with pytest.raises(ValueError, match="not a recognised image"):
        load_image(f"{http_base}/page.html")
    with pytest.raises(ValueError, match="timed out"):
        load_image(f"{http_base}/slow", timeout=0.2)
    monkeypatch.setattr(_messages, "MAX_IMAGE_BYTES", len(PNG) + 100)
    assert load_image(f"{http_base}/cat.png") == PNG
    with pytest.raises(ValueError, match="limit"):
        load_image(f"{http_base}/big")
    with pytest.raises(ValueError, match="limit"):
        load_image(f"{http_base}/big-no-length")


def test_image_http_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="could not download"):
        load_image(f"http://127.0.0.1:{port}/x.png")


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
        msgs = to_proto_messages([{"role": "user", "content": [part, "and text"]}])
        with Image.open(io.BytesIO(only_image(msgs))) as img:
            assert img.convert("RGB").tobytes() == Image.open(path).convert("RGB").tobytes(), part
        assert msgs[0].content[1].text == "and text"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "tool", "content": "x"}], "unsupported role 'tool'"),
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


class FakeCoordinator(pb_grpc.CoordinatorServiceServicer):
    """Replies REPLY to everything; a few magic prompts trigger errors and slow paths."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.sessions: dict[str, int] = {}  # id -> cached tokens
        self.closed: list[str] = []
        self.cancelled = threading.Event()
        self.forget_new_sessions = False  # simulate a coordinator restart right after CreateSession
        self._next = 0
        self._lock = threading.Lock()

    def Generate(self, request, context):  # noqa: N802 (gRPC API)
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
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
        n = 2 if prompt == "exhaust" else len(REPLY)
        for i, delta in enumerate(REPLY[:n]):
            details = []
            if request.logprobs:
                details = [
                    pb.TokenDetail(
                        token=tensor_pb2.TokenLogprob(token_id=100 + i, logprob=-0.5 * i),
                        top=[
                            tensor_pb2.TokenLogprob(token_id=200 + k, logprob=-1.0 - k)
                            for k in range(request.logprobs)
                        ],
                    )
                ]
            yield pb.GenerateResponse(
                text=delta, token_ids=[100 + i], logprobs=details, session_id=sid, trace_id="feed"
            )
        if prompt == "exhaust":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full")
        if prompt == "no-finish":
            return
        cached = self.sessions.get(sid, 0)
        prompt_tokens = 10 * len(request.messages)
        if sid:
            self.sessions[sid] = cached + prompt_tokens + len(REPLY)
        yield pb.GenerateResponse(
            finish_reason=pb.FINISH_REASON_LENGTH
            if request.max_tokens == len(REPLY)
            else pb.FINISH_REASON_STOP,
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

    def GetKVLog(self, request, context):  # noqa: N802
        if request.session_id not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id}")
        for layer in range(2):
            key = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[1, 1, 2], data=b"\0" * 4)
            yield pb.GetKVLogResponse(delta=tensor_pb2.KVDelta(layer=layer, start_position=0, key=key, value=key))

    def GetModelInfo(self, request, context):  # noqa: N802
        return pb.GetModelInfoResponse(
            model_type="qwen2_vl", num_layers=28, stage_layers=["0:14", "14:28"], max_sequence_length=32768
        )


@pytest.fixture
def coordinator() -> Iterator[tuple[FakeCoordinator, str]]:
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CoordinatorServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


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
    assert (
        s.temperature == pytest.approx(0.7)
        and s.top_p == pytest.approx(0.9)
        and s.repetition_penalty == pytest.approx(1.05)
    )
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
        with pytest.raises(vlmesh.NotFound):
            client.kv_log("nope")
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
            client.chat([{"role": "tool", "content": "x"}])
        with pytest.raises(ValueError, match="unsupported content type"):
            client.stream([{"role": "user", "content": [{"type": "audio"}]}])  # raises before iteration
        with pytest.raises(ValueError, match="top_p"):
            client.chat("hi", top_p=1.5)
        with pytest.raises(ValueError, match="stop strings"):
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


def test_model_info_and_kv_log(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = coordinator
    with vlmesh.Client(address) as client:
        info = client.model_info()
        assert info == vlmesh.ModelInfo("qwen2_vl", 28, ["0:14", "14:28"], 32768)
        with client.session() as session:
            log = client.kv_log(session.id)
    assert [d.layer for d in log] == [0, 1]
    assert isinstance(log[0], tensor_pb2.KVDelta) and list(log[0].key.shape) == [1, 1, 2]


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
                assert len(await client.kv_log(session.id)) == 2
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


def test_cli_one_shot(
    coordinator: tuple[FakeCoordinator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
