"""The OpenAI-compatible gateway end to end: `vlmesh up --openai-port` on the shipped shapes model
(real processes), driven by the real `openai` SDK and plain HTTP, checked against the gRPC client
on the same mesh. (Cancellation on disconnect needs a model that talks long: test_gateway_cancel.py.)"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from meshutil import vlmesh_up

from services.cli import DEMO_IMAGE
from services.shapes import SHIPPED_MODEL
from vlmesh import Client

MODEL_ID = SHIPPED_MODEL.name  # the gateway serves the checkpoint directory's name
IMAGE_URL = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with vlmesh_up(SHIPPED_MODEL, tmp_path_factory.mktemp("gateway-logs"), "--openai-port", "0") as addresses:
        yield addresses


@pytest.fixture(scope="module")
def sdk(mesh: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh["openai"] + "/v1", api_key="sk-unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def grpc_client(mesh: dict[str, Any]) -> Iterator[Client]:
    with Client(mesh["coordinator"], timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED_MODEL)


def picture_question(text: str = QUESTION) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": text}],
        }
    ]


def post(url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(mesh: dict[str, Any], sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list().data] == [MODEL_ID]
    assert sdk.models.retrieve(MODEL_ID).id == MODEL_ID
    with urllib.request.urlopen(mesh["openai"] + "/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}


def test_chat_equals_grpc_client_token_for_token(sdk: openai.OpenAI, grpc_client: Client, tokenizer: Any) -> None:
    ref = grpc_client.chat(picture_question(), max_tokens=32, logprobs=3)
    got = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=picture_question(),
        max_tokens=32,
        temperature=0,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    (choice,) = got.choices
    assert choice.message.content == ref.text and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and ref.finish_reason == "stop"
    assert got.model == MODEL_ID and got.object == "chat.completion"
    assert ref.logprobs is not None and choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    # One entry per generated token (the end-of-turn token included), in order, with its text and bytes.
    assert [e.token for e in content] == [tokenizer.decode([i]) for i in ref.token_ids]
    assert [bytes(e.bytes or []) for e in content] == [tokenizer.decode([i]).encode() for i in ref.token_ids]
    assert [e.logprob for e in content] == pytest.approx([r.logprob for r in ref.logprobs], abs=1e-6)
    for entry, r in zip(content, ref.logprobs, strict=True):
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t.token_id]) for t in r.top]
    assert got.usage is not None
    assert got.usage.completion_tokens == len(ref.token_ids) == ref.usage.completion_tokens
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens + ref.usage.cached_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.usage.prompt_tokens_details is not None and got.usage.prompt_tokens_details.cached_tokens is not None
    # Without logprobs asked for there are none.
    plain = sdk.chat.completions.create(model=MODEL_ID, messages=picture_question(), max_tokens=32, temperature=0)  # type: ignore[arg-type]
    assert plain.choices[0].message.content == ref.text and plain.choices[0].logprobs is None


def test_stream_equals_grpc_client(sdk: openai.OpenAI, grpc_client: Client, tokenizer: Any) -> None:
    ref = grpc_client.chat(picture_question(), max_tokens=32, logprobs=1)
    stream = sdk.chat.completions.create(  # type: ignore[call-overload]
        model=MODEL_ID,
        messages=picture_question(),
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    tokens = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert tokens == [tokenizer.decode([i]) for i in ref.token_ids]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None and all(c.usage is None for c in body)
    assert last.usage.completion_tokens == ref.usage.completion_tokens

    # A stop string and a length limit, as OpenAI names them.
    ref_stop = grpc_client.chat(picture_question(), max_tokens=32, stop=" circle")
    stream = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=picture_question(),
        max_tokens=32,
        temperature=0,
        stream=True,
        stop=[" circle"],  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref_stop.text
    assert ref_stop.finish_reason == "stop_string" and chunks[-1].choices[0].finish_reason == "stop"
    short = sdk.chat.completions.create(model=MODEL_ID, messages=picture_question(), max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert short.choices[0].finish_reason == "length" and short.usage is not None and short.usage.completion_tokens == 3


def error_of(status_and_body: tuple[int, Any]) -> tuple[int, dict[str, Any]]:
    status, body = status_and_body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return status, body["error"]


def test_bad_requests_get_openai_errors(mesh: dict[str, Any], sdk: openai.OpenAI) -> None:
    url = mesh["openai"] + "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any] | bytes, dict[str, str], int, str | None, str]] = [
        ({"model": "gpt-4o", "messages": hi}, {}, 404, "model", "does not exist"),
        ({"model": MODEL_ID, "messages": hi, "n": 17}, {}, 400, "n", "from 1 to 16"),
        (
            {"model": MODEL_ID, "messages": hi, "tools": [{"type": "custom", "custom": {"name": "f"}}]},
            {},
            400,
            "tools[0].type",
            "function",
        ),
        (
            {
                "model": MODEL_ID,
                "messages": hi,
                "response_format": {"type": "yaml"},
            },
            {},
            400,
            "response_format.type",
            "json_schema",
        ),
        ({"model": MODEL_ID, "messages": hi, "frobnicate": 1}, {}, 400, "frobnicate", "Unrecognized"),
        ({"model": MODEL_ID, "messages": hi, "temperature": 3}, {}, 400, "temperature", "temperature"),
        ({"model": MODEL_ID, "messages": hi, "top_logprobs": 2}, {}, 400, "top_logprobs", "logprobs"),
        ({"model": MODEL_ID, "messages": [{"role": "tool", "content": "x"}]}, {}, 400, "messages[0].tool_call_id", "tool_call_id"),
        ({"model": MODEL_ID, "messages": []}, {}, 400, "messages", "non-empty"),
        (b"{not json", {}, 400, None, "JSON"),
        (
            {
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
            },
            {},
            400,
            "messages[0].content[0].image_url.url",
            "data: URL or an http(s) URL",
        ),
        # Refused before any connection: the gateway fetches URLs under the client library's rules.
        (
            {
                "model": MODEL_ID,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}],
                    }
                ],
            },
            {},
            400,
            None,
            "link-local address",
        ),
        (
            {
                "model": MODEL_ID,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                    }
                ],
            },
            {},
            400,
            None,
            "not a recognised image",
        ),
        # Refused by the coordinator (INVALID_ARGUMENT): longer than the model's 4096 positions.
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "red " * 5000}]}, {}, 400, None, "limit"),
        ({"model": MODEL_ID, "messages": hi}, {"Authorization": "Basic abc"}, 401, None, "Bearer"),
    ]
    for body, headers, status, param, words in cases:
        got_status, err = error_of(post(url, body, headers))
        assert (got_status, err["param"]) == (status, param), (
            body if isinstance(body, bytes) else str(body)[:200],
            err,
        )
        assert words in err["message"], err
    status, err = error_of(post(mesh["openai"] + "/v1/no-such-thing", {}))
    assert status == 404 and err["type"] == "invalid_request_error"

    # The SDK raises its own classes for them.
    with pytest.raises(openai.NotFoundError) as nf:
        sdk.chat.completions.create(model="gpt-4o", messages=hi)  # type: ignore[arg-type]
    assert nf.value.status_code == 404 and nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=MODEL_ID, messages=hi, n=17)  # type: ignore[arg-type]
    assert bad.value.param == "n"
    basic = sdk.with_options(default_headers={"Authorization": "Basic abc"})
    with pytest.raises(openai.AuthenticationError):
        basic.chat.completions.create(model=MODEL_ID, messages=hi)  # type: ignore[arg-type]
    # Still serving.
    ok = sdk.chat.completions.create(model=MODEL_ID, messages=picture_question(), max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert ok.choices[0].message.content


def test_stateless_conversation_reuses_the_previous_turns_kv(sdk: openai.OpenAI, grpc_client: Client) -> None:
    """A 4-turn stateless conversation through the gateway: from turn 2 on,
    usage.prompt_tokens_details.cached_tokens covers the whole previous conversation, and each
    answer equals the mesh's answer on the full history.

    "The whole previous conversation" in tokens: the previous turn's prompt and every token the
    mesh generated for it but the last (which was sampled, never fed, so no KV holds it), as far
    as it is a prefix of this turn's prompt (the shapes model's answers re-tokenise to themselves,
    checked below, so all of it is)."""
    from meshutil import reference

    ref = reference(SHIPPED_MODEL)
    image = DEMO_IMAGE.read_bytes()
    questions = [QUESTION, "How many shapes are there?", "What colour is the star?", "Where is the circle?"]
    history: list[dict[str, Any]] = []  # OpenAI format, as the client resends it
    as_reference: list[dict[str, Any]] = []  # the same conversation for the processor
    fed_before: list[int] | None = None
    for turn, question in enumerate(questions, start=1):
        if turn == 1:
            history += picture_question(question)
            as_reference.append({"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]})
        else:
            history.append({"role": "user", "content": question})
            as_reference.append({"role": "user", "content": question})
        got = sdk.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=24, temperature=0)  # type: ignore[arg-type]
        mesh_answer = grpc_client.chat(history, max_tokens=24)
        answer = got.choices[0].message.content
        assert answer == mesh_answer.text, f"turn {turn}"
        prompt = ref.prompt_ids(as_reference)
        assert got.usage is not None and got.usage.prompt_tokens == len(prompt), f"turn {turn}"
        if fed_before is not None:
            pairs = enumerate(zip(fed_before, prompt, strict=False))
            common = next((i for i, (a, b) in pairs if a != b), min(len(fed_before), len(prompt)))
            assert common == len(fed_before), f"turn {turn}: the previous conversation is not a token prefix of this prompt"
            details = got.usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else None
            assert cached is not None and cached >= len(fed_before), (
                f"turn {turn}: {cached} cached tokens; the previous conversation is {len(fed_before)} tokens"
            )
        fed_before = prompt + mesh_answer.token_ids[:-1]
        history.append({"role": "assistant", "content": answer})
        as_reference.append({"role": "assistant", "content": answer})


# ------------------------------------------------------------------ /v1/completions (a raw prompt)


def _rendered(question: str) -> str:
    """The chat template's text for one user question, as a raw prompt writes it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(SHIPPED_MODEL))
    return processor.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def test_completions_take_a_raw_prompt_untemplated(sdk: openai.OpenAI) -> None:
    """A raw prompt that writes the template itself gets what the chat endpoint gives for the
    message: its control tokens are control tokens, and nothing is templated around it."""
    question = "What colour is the circle?"
    chat = sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24)
    done = sdk.completions.create(model=MODEL_ID, prompt=_rendered(question), temperature=0, max_tokens=24)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.choices[0].text == chat.choices[0].message.content
    assert done.choices[0].finish_reason == chat.choices[0].finish_reason
    assert done.usage.completion_tokens == chat.usage.completion_tokens
    streamed, finish, usage = "", None, None
    for chunk in sdk.completions.create(
        model=MODEL_ID, prompt=_rendered(question), temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            streamed += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert (streamed, finish) == (done.choices[0].text, done.choices[0].finish_reason)
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens


def test_completions_default_to_16_tokens_and_give_legacy_logprobs(sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(model=MODEL_ID, prompt="The picture shows", temperature=0, logprobs=2)
    assert done.usage.completion_tokens <= 16
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == done.usage.completion_tokens
    # The end-of-turn token is among them (its logprob is reported), not in the text.
    assert "".join(lp.tokens).startswith(done.choices[0].text) and lp.text_offset[0] == 0
    assert all(len(t) <= 2 for t in lp.top_logprobs)


@pytest.mark.parametrize(
    "extra, param",
    [({"echo": True}, "echo"), ({"prompt": ["a", "b"]}, "prompt"), ({"messages": []}, "messages"), ({"n": 17}, "n"), ({"best_of": 3}, "best_of")],
)
def test_completions_refusals(mesh: dict[str, Any], extra: dict[str, Any], param: str) -> None:
    status, body = post(mesh["openai"] + "/v1/completions", {"model": MODEL_ID, "prompt": "hi", **extra})
    assert (status, body["error"]["param"]) == (400, param), body
