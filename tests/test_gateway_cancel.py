"""A caller that goes away cancels its generation: through `vlmesh up --openai-port` (real
processes) on a tiny random-weight model, whose greedy answers run on for hundreds of tokens (the
shapes model of test_gateway.py ends its answers within a few tokens)."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from meshutil import vlmesh_up

from vlmesh import Client

PROMPT = "Tell me about shapes and colours."
MAX_TOKENS = 800


CERTS: dict[str, str] = {}  # stage address -> the certificates `vlmesh up` made for its mesh


def stage_kv_used_bytes(address: str) -> int:
    """KV bytes a stage holds, from its GetInfo: the one place this test speaks the stage protocol."""
    from meshutil import stage_info

    return stage_info(address, CERTS[address]).kv_used_bytes


@pytest.fixture(scope="module")
def mesh(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    model = tiny_models["a"]
    # Finished requests give their KV back at once (no prefix caching), so "freed" means "back to
    # what the stages held before the request".
    env = {"VLMESH_PREFIX_CACHE_SESSIONS": "0"}
    with vlmesh_up(model, tmp_path_factory.mktemp("gateway-cancel-logs"), "--openai-port", "0", env=env) as addresses:
        CERTS.update({a: addresses["certs"] for a in addresses["stages"]})
        yield {**addresses, "model": model.name}


@pytest.fixture(scope="module")
def generation_s(mesh: dict[str, Any]) -> float:
    """How long the whole answer takes when nobody leaves (checked to run to MAX_TOKENS)."""
    with Client(mesh["coordinator"], timeout=300) as client:
        start = time.monotonic()
        result = client.chat(PROMPT, max_tokens=MAX_TOKENS)
        took = time.monotonic() - start
    assert result.finish_reason == "length"
    return took


def wait_freed(stages: list[str], before: list[int], bound_s: float) -> float:
    """Seconds until every stage's KV use is back to `before`; fails past `bound_s`."""
    start = time.monotonic()
    while (now := [stage_kv_used_bytes(s) for s in stages]) != before:
        assert time.monotonic() - start < bound_s, f"stage KV still held {bound_s:.2f} s after the disconnect: {now} (before {before})"
        time.sleep(0.02)
    return time.monotonic() - start


def wait_held(stages: list[str], before: list[int]) -> None:
    deadline = time.monotonic() + 60
    while not all(n > b for n, b in zip([stage_kv_used_bytes(s) for s in stages], before, strict=True)):
        assert time.monotonic() < deadline, "the generation never took KV on the stages"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_stage_kv(mesh: dict[str, Any], generation_s: float) -> None:
    stages = mesh["stages"]
    before = [stage_kv_used_bytes(s) for s in stages]
    sdk = openai.OpenAI(base_url=mesh["openai"] + "/v1", api_key="sk-unused", max_retries=0, timeout=120)
    stream = sdk.chat.completions.create(
        model=mesh["model"],
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 4:
            break
    wait_held(stages, before)
    stream.close()  # the HTTP connection goes away mid-stream
    # Freed within 2 s, and well before the answer would have ended by itself.
    wait_freed(stages, before, min(2.0, generation_s / 2))


def test_disconnect_while_waiting_for_a_whole_answer_frees_stage_kv(mesh: dict[str, Any], generation_s: float) -> None:
    stages = mesh["stages"]
    before = [stage_kv_used_bytes(s) for s in stages]
    url = urllib.parse.urlsplit(mesh["openai"])
    body = json.dumps(
        {
            "model": mesh["model"],
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + body)
        wait_held(stages, before)
    wait_freed(stages, before, min(2.0, generation_s / 2))
