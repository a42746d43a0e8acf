"""The gateway as a real process in front of a fake CoordinatorService (a real gRPC server on
127.0.0.1) that fails on cue: API keys travel on, and every coordinator status becomes OpenAI's
error shape with its HTTP status. The real mesh is in test_gateway.py."""

from __future__ import annotations

import collections
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import openai
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.launcher import free_port
from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
MODEL = "qwen2_vl"  # no --model and no --served-model-name: the coordinator's model type


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def abort_rich(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str) -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="vlmesh.dev"))
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    context.abort_with_status(_Status(status.code, status.details, (*status.trailing_metadata, ("vlmesh-trace-id", TRACE_ID))))


class FakeCoordinator(pb_grpc.CoordinatorServiceServicer):
    """Answers "Hello" to everything, except prompts that name a failure."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()

    def _check_key(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        if md.get("authorization") == "Bearer bad":
            abort_rich(context, grpc.StatusCode.UNAUTHENTICATED, "unknown API key", "UNAUTHENTICATED")

    def Generate(self, request, context):  # noqa: N802 (gRPC API)
        self._check_key(context)
        prompt = request.messages[-1].content[-1].text
        if prompt == "quota":
            abort_rich(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota of concurrent requests reached", "QUOTA_EXCEEDED")
        if prompt == "down":
            abort_rich(context, grpc.StatusCode.UNAVAILABLE, "stage 127.0.0.1:1 is down", "STAGE_UNAVAILABLE")
        if prompt == "sleep":
            context.add_callback(self.cancelled.set)
            time.sleep(3)
        yield pb.GenerateResponse(text="Hel", token_ids=[1], trace_id=TRACE_ID)
        if prompt == "mid-error":
            abort_rich(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "KV budget full", "KV_BUDGET_FULL")
        yield pb.GenerateResponse(text="lo", token_ids=[2])
        yield pb.GenerateResponse(
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=10, completion_tokens=2, cached_tokens=5),
        )

    def GetModelInfo(self, request, context):  # noqa: N802
        self._check_key(context)
        return pb.GetModelInfoResponse(model_type=MODEL, num_layers=2, stage_layers=[pb.LayerRange(start=0, end=2)], max_sequence_length=4096)


def _serve_fake(max_message_bytes: int | None = None) -> tuple[grpc.Server, FakeCoordinator, health.HealthServicer, str]:
    """The fake on 127.0.0.1; `max_message_bytes`: the largest request it takes (gRPC's 4 MiB if None)."""
    fake = FakeCoordinator()
    options = [] if max_message_bytes is None else [("grpc.max_receive_message_length", max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    pb_grpc.add_CoordinatorServiceServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, fake, health_servicer, f"127.0.0.1:{port}"


def _start_gateway(coordinator: str, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "serve",
            "gateway",
            "--coordinator",
            coordinator,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            *flags,
        ],
        # The gateway's own environment holds a key: it must never stand in for a caller's.
        env={**os.environ, "VLMESH_API_KEY": "gateway-secret"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the gateway exited"
        try:
            # 200 or 503: it answers either way once it is up.
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return proc, url
        except urllib.error.HTTPError:
            return proc, url
        except OSError:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[FakeCoordinator, health.HealthServicer, str]]:
    server, fake, health_servicer, address = _serve_fake()
    proc, url = _start_gateway(address, "--request-timeout", "1", "--max-request-mb", "1")
    yield fake, health_servicer, url
    _stop(proc)
    server.stop(None)


def call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def test_keys_travel_on_and_the_gateway_has_none(gateway: tuple[FakeCoordinator, health.HealthServicer, str]) -> None:
    fake, _, url = gateway
    status, _, body = call(url + "/v1/chat/completions", chat("hi"), {"Authorization": "Bearer k1"})
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello"
    assert fake.metadata[-1]["authorization"] == "Bearer k1"
    status, _, _ = call(url + "/v1/chat/completions", chat("hi"))
    assert status == 200 and "authorization" not in fake.metadata[-1]  # not the gateway's VLMESH_API_KEY
    status, _, body = call(url + "/v1/models", headers={"Authorization": "Bearer k2"})
    assert status == 200 and [m["id"] for m in body["data"]] == [MODEL]
    assert fake.metadata[-1]["authorization"] == "Bearer k2"


def test_usage_counts_the_cached_tokens_in_the_prompt(
    gateway: tuple[FakeCoordinator, health.HealthServicer, str],
) -> None:
    _, _, url = gateway
    _, _, body = call(url + "/v1/chat/completions", chat("hi"))
    assert body["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 2,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "prompt, headers, status, kind, code",
    [
        ("hi", {"Authorization": "Bearer bad"}, 401, "authentication_error", "invalid_api_key"),
        ("quota", {}, 429, "rate_limit_error", "quota_exceeded"),
        ("down", {}, 503, "server_error", "stage_unavailable"),
        ("sleep", {}, 504, "timeout_error", "timeout"),  # --request-timeout 1
    ],
)
def test_coordinator_statuses_become_http_statuses(
    gateway: tuple[FakeCoordinator, health.HealthServicer, str],
    prompt: str,
    headers: dict[str, str],
    status: int,
    kind: str,
    code: str,
) -> None:
    _, _, url = gateway
    got, response_headers, body = call(url + "/v1/chat/completions", chat(prompt), headers)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["code"]) == (kind, code)
    if prompt != "sleep":
        assert response_headers.get("vlmesh-trace-id") == TRACE_ID
    # The same through the SDK's own exception classes.
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=headers.get("Authorization", "Bearer ok").split()[1], max_retries=0)
    expected = {
        401: openai.AuthenticationError,
        429: openai.RateLimitError,
        503: openai.InternalServerError,
        504: openai.InternalServerError,
    }
    with pytest.raises(expected[status]) as info:
        sdk.chat.completions.create(**chat(prompt))
    assert info.value.status_code == status


def test_gateway_refusals(gateway: tuple[FakeCoordinator, health.HealthServicer, str]) -> None:
    _, _, url = gateway
    status, _, body = call(url + "/v1/chat/completions", chat("hi", logprobs=True))
    assert status == 400 and "--model" in body["error"]["message"]  # no tokenizer to name the tokens
    # Over --max-request-mb 1: refused on the declared length, before the body is read.
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_error_after_the_stream_started_is_an_event(
    gateway: tuple[FakeCoordinator, health.HealthServicer, str],
) -> None:
    _, _, url = gateway
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(chat("mid-error", stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        events = [line[len(b"data: ") :] for line in resp.read().split(b"\n\n") if line]
    payloads = [json.loads(e) for e in events]
    assert payloads[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert payloads[-1]["error"]["code"] == "kv_budget_full" and b"[DONE]" not in events
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError, match="KV budget full"):
        for _ in sdk.chat.completions.create(**chat("mid-error"), stream=True):
            pass


def test_health_follows_the_coordinator(gateway: tuple[FakeCoordinator, health.HealthServicer, str]) -> None:
    _, health_servicer, url = gateway
    assert call(url + "/health")[:3:2] == (200, {"status": "ok"})
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        status, _, body = call(url + "/health")
        assert status == 503 and "NOT_SERVING" in body["error"]["message"]
    finally:
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)


def test_mesh_down_is_503() -> None:
    proc, url = _start_gateway(f"127.0.0.1:{free_port()}", "--served-model-name", "m")
    try:
        status, _, body = call(url + "/health")
        assert status == 503 and body["error"]["type"] == "server_error"
        status, _, body = call(url + "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and body["error"]["code"] == "unavailable"
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------------
# The request parser on its own
# ---------------------------------------------------------------------------------------------


def test_request_options_map_to_the_client_library() -> None:
    from services.gateway.request import parse_chat_request

    req = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    ],
                },
                {"role": "assistant", "content": "hello", "refusal": None},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,  # wins over max_tokens, as in OpenAI's API
            "seed": -1,
            "stop": "\n",
            "logprobs": True,
            "top_logprobs": 0,
            "top_k": -1,
            # Accepted, without effect:
            "user": "u1",
            "metadata": {"a": "b"},
            "store": False,
            "tool_choice": "none",
            "tools": [],
            "response_format": {"type": "text"},
            "n": 1,
            "frequency_penalty": 0,
        }
    )
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant"]
    assert req.messages[1]["content"][1] == {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert req.options == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 1.0,  # OpenAI's default: sampling
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "seed": 2**64 - 1,  # the same 64 bits
        "stop": ["\n"],
        "logprobs": 1,  # the mesh sends a token's logprob with at least one alternative
    }
    assert (req.top_logprobs, req.user, req.stream) == (0, "u1", False)
    greedy = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0})
    assert (greedy.options["temperature"], greedy.options["top_p"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object", "strict": True}}, "response_format.strict"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"user": 5}, "user"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_request_refusals(extra: dict[str, Any], param: str) -> None:
    from services.gateway.errors import ApiError
    from services.gateway.request import parse_chat_request

    with pytest.raises(ApiError) as info:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages[0].content[0].type"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "x": 1}}]},
            "messages[0].content[0].image_url",
        ),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "messages[0].tool_calls[0]"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "[1]"}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "function", "content": "x"}, "messages[0].role"),
        ({"role": "user", "content": []}, "messages[0].content"),
        ({"role": "user", "content": "x", "audio": {}}, "messages[0]"),
        ({"role": "robot", "content": "x"}, "messages[0].role"),
    ],
)
def test_message_refusals(message: dict[str, Any], param: str) -> None:
    from services.gateway.errors import ApiError
    from services.gateway.request import parse_chat_request

    with pytest.raises(ApiError) as info:
        parse_chat_request({"model": "m", "messages": [message]})
    assert (info.value.status, info.value.param) == (400, param)
