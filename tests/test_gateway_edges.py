"""The gateway's edges, as a real process in front of the fake coordinator of test_gateway_unit.py
(a real gRPC server on 127.0.0.1): bodies nested too deep, bodies larger than the coordinator takes
(413, which the real openai SDK does not retry), and the gateway's own span of each request."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import png
from grpc_health.v1 import health
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_sink import OtlpSink
from test_gateway_unit import MODEL, FakeCoordinator, _serve_fake, _start_gateway, _stop, call, chat

from services.gateway.request import MAX_JSON_DEPTH

pytestmark = pytest.mark.timeout(180)

Gateway = tuple[FakeCoordinator, health.HealthServicer, str]


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """A gateway with its default limits."""
    server, fake, health_servicer, address = _serve_fake()
    proc, url = _start_gateway(address)
    yield fake, health_servicer, url
    _stop(proc)
    server.stop(None)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# --- nesting -----------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_naming_the_limit(gateway: Gateway) -> None:
    _, _, url = gateway
    # 1,000 nested lists: Python's parser raises RecursionError there (it was a 500).
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "metadata": {"a": ' % MODEL.encode()
    body += b"[" * 1000 + b"]" * 1000 + b"}}"
    status, _, answer = call(url + "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert f"deeper than {MAX_JSON_DEPTH} levels" in answer["error"]["message"]
    # Brackets that never close are refused alike (the parser alone would recurse on them too).
    status, _, answer = call(url + "/v1/chat/completions", b"[" * 5000)
    assert status == 400 and str(MAX_JSON_DEPTH) in answer["error"]["message"], answer
    # Inside a string, brackets are text, not nesting: answered.
    status, _, answer = call(url + "/v1/chat/completions", chat("[" * 5000 + '\\"{'))
    assert status == 200, answer


def test_nesting_up_to_the_limit_is_accepted(gateway: Gateway) -> None:
    _, _, url = gateway
    # The body object and metadata's object are two levels of the limit.
    inside = chat("hi", metadata={"a": nested(MAX_JSON_DEPTH - 2)})
    status, _, answer = call(url + "/v1/chat/completions", inside)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "Hello", answer
    over = chat("hi", metadata={"a": nested(MAX_JSON_DEPTH - 1)})
    status, _, answer = call(url + "/v1/chat/completions", over)
    assert status == 400 and f"deeper than {MAX_JSON_DEPTH}" in answer["error"]["message"], answer


# --- size --------------------------------------------------------------------------------------


def counting_sdk(url: str) -> tuple[openai.OpenAI, list[str]]:
    """The openai SDK with its default retries, and the list of requests it sent."""
    sent: list[str] = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: sent.append(str(request.url))]})
    return openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=2, http_client=http, timeout=120), sent


def coordinator_max_message_mb() -> int:
    from services.coordinator.server import CoordinatorConfig

    return next(f.default for f in dataclasses.fields(CoordinatorConfig) if f.name == "max_message_mb")  # type: ignore[return-value]


def test_body_larger_than_the_coordinator_takes_is_413_and_not_retried(gateway: Gateway) -> None:
    """A body over what the coordinator accepts by default is refused by the gateway (its default
    limit is no larger), before it is read: 413, which the SDK does not send again."""
    fake, _, url = gateway
    sdk, sent = counting_sdk(url)
    calls = len(fake.metadata)
    text = "a" * ((coordinator_max_message_mb() + 8) << 20)
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    assert info.value.status_code == 413, info.value
    assert isinstance(info.value.body, dict) and info.value.body.get("code") == "request_too_large"
    assert len(sent) == 1
    assert len(fake.metadata) == calls  # never reached the coordinator


def test_message_the_coordinator_refuses_for_size_is_413_and_not_retried() -> None:
    """A gateway allowed more than its coordinator: gRPC's own RESOURCE_EXHAUSTED "Received message
    larger than max" is a message-size refusal (413), not a quota (429, which the SDK retries)."""
    server, fake, _, address = _serve_fake(max_message_bytes=1 << 20)
    proc, url = _start_gateway(address, "--max-request-mb", "8", "--served-model-name", MODEL)
    try:
        sdk, sent = counting_sdk(url)
        with pytest.raises(openai.APIStatusError) as info:
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a" * (2 << 20)}])
        assert info.value.status_code == 413, info.value
        assert isinstance(info.value.body, dict) and info.value.body.get("code") == "message_too_large"
        assert "larger than max" in info.value.message
        assert len(sent) == 1
        assert fake.metadata == []  # gRPC refused it before any handler (the model id needs no call)
        # A quota is still a 429.
        status, _, answer = call(url + "/v1/chat/completions", chat("quota"))
        assert (status, answer["error"]["code"]) == (429, "quota_exceeded")
    finally:
        _stop(proc)
        server.stop(None)


# --- tracing -----------------------------------------------------------------------------------

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def test_gateway_spans_continue_the_callers_trace() -> None:
    sink = OtlpSink().start()
    server, fake, _, address = _serve_fake()
    proc, url = _start_gateway(address, "--trace-exporter", "otlp", "--otlp-endpoint", sink.endpoint)
    try:
        # Refused by the gateway itself (no coordinator call to name a trace): the response names
        # the caller's trace, which the gateway's span continued.
        status, headers, _ = call(url + "/v1/chat/completions", {"model": MODEL, "messages": []}, {"traceparent": PARENT})
        assert status == 400 and headers.get("vlmesh-trace-id") == TRACE_ID
        # Without a traceparent, a trace of its own.
        status, headers, _ = call(url + "/v1/chat/completions", {"model": MODEL, "messages": []})
        fresh = headers.get("vlmesh-trace-id", "")
        assert status == 400 and re.fullmatch("[0-9a-f]{32}", fresh) and fresh != TRACE_ID
        status, _, _ = call(url + "/v1/chat/completions", chat("hi"), {"traceparent": PARENT})
        assert status == 200
        # The coordinator's call carries the gateway span's context: same trace, another parent.
        version, trace_id, parent, flags = fake.metadata[-1]["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01") and parent != PARENT.split("-")[2]
        assert "vlmesh-gateway" in sink.wait_for("service.name", {"vlmesh-gateway"})
        with sink.lock:
            names = [s.name for s in sink.spans if s.resource.get("service.name") == "vlmesh-gateway"]
        assert names.count("POST /v1/chat/completions") >= 3, names
        # Health probes (a supervisor's, every second) are not traced.
        call(url + "/health")
        with sink.lock:
            assert not any("health" in s.name for s in sink.spans), [s.name for s in sink.spans]
    finally:
        _stop(proc)
        server.stop(None)
        sink.stop()


def test_one_trace_from_the_gateway_to_every_stage(tiny_models: dict[str, Path]) -> None:
    """A request through the gateway with a traceparent: the gateway's span, the coordinator's,
    vision's and both stages' spans, all in the caller's trace, the gateway's span the child of
    the caller's and the parent of the coordinator's (an in-process mesh and gateway, one
    exporter for all of them)."""
    import base64
    import urllib.request

    import uvicorn
    from meshutil import start_mesh

    from services.common.tracing import setup_tracing
    from services.gateway.server import GatewayConfig, create_app
    from services.launcher import free_port

    spans = InMemorySpanExporter()
    setup_tracing("tests", extra=spans)
    model = tiny_models["a"]
    mesh = start_mesh(model, [(0, 2), (2, 4)])
    port = free_port()
    app = create_app(GatewayConfig(coordinator=mesh.address, host="127.0.0.1", port=port, model=str(model)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        image = "data:image/png;base64," + base64.b64encode(png(64, 64, 3)).decode()
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]
        body = {"model": model.name, "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "traceparent": PARENT},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200 and response.headers["vlmesh-trace-id"] == TRACE_ID
            json.loads(response.read())
    finally:
        server.should_exit = True
        thread.join(30)
        mesh.stop()
    mine = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID]
    scopes = {s.instrumentation_scope.name for s in mine if s.instrumentation_scope is not None}
    assert {"fastapi", "vlmesh.coordinator", "vlmesh.vision", "vlmesh.stage"} <= scopes, scopes
    (gateway_span,) = [s for s in mine if s.name == "POST /v1/chat/completions"]
    assert gateway_span.parent is not None and gateway_span.parent.span_id == int(PARENT.split("-")[2], 16)
    (generate,) = [s for s in mine if s.name == "generate"]
    assert generate.parent is not None and generate.parent.span_id == gateway_span.context.span_id
    assert {s.attributes["vlmesh.layers"] for s in mine if s.name == "stage.forward" and s.attributes} == {"0:2", "2:4"}


# --- the depth check on its own ------------------------------------------------------------------


def _depth(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max((_depth(c) for c in children), default=0)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 3 * MAX_JSON_DEPTH])
@pytest.mark.parametrize(
    "text",
    ["plain", "[[[{{{", "]]]}}}", "a \\ backslash", "ends in a backslash \\", 'a "quote" [', '\\"[', '\\\\"]'],
)
def test_depth_is_counted_outside_strings_only(depth: int, text: str) -> None:
    """Strings full of brackets, escaped quotes and backslashes, between arrays and objects
    nested `depth` deep: refused exactly when the parsed value nests deeper than the limit."""
    from services.gateway.errors import ApiError
    from services.gateway.request import json_body

    value: Any = [text, {"k": text}]
    for level in range(depth - 2):
        value = {text: value, "n": [text]} if level % 2 else [text, value]
    raw = json.dumps(value).encode()
    if depth <= MAX_JSON_DEPTH:
        assert _depth(json_body(raw)) == depth
    else:
        with pytest.raises(ApiError) as info:
            json_body(raw)
        assert info.value.status == 400 and f"deeper than {MAX_JSON_DEPTH}" in info.value.message
