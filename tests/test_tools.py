"""Tool calling on real meshes.

Through the OpenAI gateway (`vlmesh up`, the real `openai` SDK) with the shipped shapes model,
which knows nothing of tools: `required` and a named function always give calls whose arguments
validate (the grammar's doing), greedy and seeded; streamed tool-call deltas join to the
non-streamed call; a `role: "tool"` follow-up is accepted; refusals are 400s.

With the Python client on a checkpoint made to call a tool by itself (its head maps the end of
the prompt to <tool_call>, then to the call's body, then to </tool_call> and the end of the turn):
`auto` parses the call, `none` leaves it as text, a call of a function the request does not have
stays text, and a session's follow-up with the tool's result reuses the cached turn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from meshutil import start_mesh, vlmesh_up

from services.shapes import SHIPPED_MODEL
from vlmesh import Client

MODEL_ID = "shapes-qwen2-vl"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}
COUNT = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "colours": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
    },
    "required": ["shape", "colours"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "count_shapes": COUNT}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n.replace('_', ' ')}", "parameters": s}} for n, s in SCHEMAS.items()]
QUESTION = [{"role": "user", "content": "What is the weather in Rome?"}]


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with vlmesh_up(SHIPPED_MODEL, tmp_path_factory.mktemp("tools-logs"), "--openai-port", "0") as addresses:
        yield openai.OpenAI(base_url=addresses["openai"] + "/v1", api_key="sk-unused", max_retries=0, timeout=120)


def valid_calls(message, names=tuple(SCHEMAS)) -> list[tuple[str, dict]]:
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.parametrize("sampling_kw", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.9, "seed": 6}])
def test_required_gives_calls_that_validate(sdk, sampling_kw):
    got = sdk.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=200, **sampling_kw)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    valid_calls(choice.message)
    assert choice.message.content is None


def test_the_model_alone_calls_no_tool(sdk):
    """What the test above asserts is the grammar's doing: with auto, the shapes model writes prose."""
    got = sdk.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=TOOLS, max_tokens=40, temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length") and not got.choices[0].message.tool_calls
    assert got.choices[0].message.content


def test_a_named_function_is_the_one_called_once_without_parallel_calls(sdk):
    choice = {"type": "function", "function": {"name": "count_shapes"}}
    got = sdk.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_tokens=200, temperature=0
    )
    assert [name for name, _ in valid_calls(got.choices[0].message)] == ["count_shapes"]


def test_streamed_tool_call_deltas_join_to_the_call(sdk):
    kw = dict(model=MODEL_ID, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0, seed=9)
    whole = sdk.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish, text = None, ""
    for chunk in sdk.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for d in delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            c["id"] = d.id or c["id"]
            c["name"] = (d.function.name if d.function else None) or c["name"]
            c["arguments"] += (d.function.arguments if d.function else None) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and text == ""
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (w.function.name, json.loads(w.function.arguments)) for w in whole
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_a_tool_result_follow_up_is_answered(sdk):
    first = sdk.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0)
    message = first.choices[0].message
    follow = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in message.tool_calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"sky": "clear", "celsius": 21})} for c in message.tool_calls),
    ]
    got = sdk.chat.completions.create(model=MODEL_ID, messages=follow, tools=TOOLS, max_tokens=20, temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert got.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize(
    "kw, param",
    [
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": "x"}}}],
                "tool_choice": "required",
            },
            None,
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name"),
    ],
)
def test_refusals_are_400s_naming_the_problem(sdk, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=20, **kw)
    if param is not None:
        assert info.value.body["param"] == param
    # The mesh serves on.
    served = sdk.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2, temperature=0)
    assert served.choices[0].finish_reason in ("stop", "length") and served.usage.completion_tokens <= 2


# ------------------------------------------------------------------ a model that calls a tool itself

BODY = '\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "metric": true}}\n'


def calling_checkpoint(out: Path) -> str:
    """A tiny Qwen3-VL checkpoint (its tokenizer has <tool_call> and </tool_call>) that answers
    every prompt with BODY's call: each decoder layer adds nothing (o_proj and down_proj are
    zero), so the last hidden state is the last token's embedding, and the head maps "\\n" (the
    end of the generation prompt) to <tool_call>, <tool_call> to a token holding BODY, that to
    </tool_call> and that to the end of the turn."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from services.tiny import make_tiny

    path = make_tiny(out, family="qwen3-vl", tie_word_embeddings=False, key_layout="hub", seed=3)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_tokens([AddedToken(BODY, special=False, normalized=False)])
    tok.save_pretrained(str(path))
    ids = [tok.convert_tokens_to_ids(t) for t in ("\u010a", "<tool_call>", BODY, "</tool_call>", "<|im_end|>")]  # "\u010a": "\n" byte-level
    state = load_file(path / "model.safetensors")
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    embed, head = state[embed_key], state["lm_head.weight"]
    assert max(ids) < head.shape[0]
    for k in state:
        if k.endswith(("o_proj.weight", "down_proj.weight")) and "visual" not in k:
            state[k].zero_()
    basis = torch.linalg.qr(torch.randn(embed.shape[1], 3, generator=torch.Generator().manual_seed(0)))[0].T  # [3, H] orthonormal
    scale = embed.norm(dim=1).mean()
    newline = embed[ids[0]] / embed[ids[0]].norm()
    head[ids[1]] = 40 * scale * newline
    for i, src in enumerate(ids[1:4]):
        embed[src] = scale * basis[i]
        head[ids[i + 2]] = 40 * scale * basis[i]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    m = start_mesh(calling_checkpoint(tmp_path_factory.mktemp("caller")), [(0, 2), (2, 4)])
    client = Client(m.address)
    yield client
    client.close()
    m.stop()


def test_auto_parses_the_models_own_call(caller):
    got = caller.chat(QUESTION, tools=TOOLS, max_tokens=10)
    assert got.finish_reason == "tool_calls", got.text
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == [("get_weather", {"city": "Paris", "days": 2, "metric": True})]
    assert got.text == ""


def test_none_and_an_unknown_function_leave_the_block_as_text(caller):
    for kw in ({"tools": TOOLS, "tool_choice": "none"}, {"tools": TOOLS[1:]}, {}):
        got = caller.chat(QUESTION, max_tokens=10, **kw)
        assert (got.finish_reason, got.tool_calls, got.text) == ("stop", [], "<tool_call>" + BODY + "</tool_call>"), kw


def test_a_session_follow_up_with_the_result_reuses_the_turn(caller):
    with caller.session() as s:
        first = s.chat(QUESTION, tools=TOOLS, max_tokens=10)
        assert first.finish_reason == "tool_calls"
        result = {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"sky": "clear"}'}
        second = s.chat([result], tools=TOOLS, max_tokens=10)
    # Every token of the first turn is reused but its last (the end of turn, fed with this turn).
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens < 60  # the tool result's turn only, not the tool list again
    assert second.finish_reason == "tool_calls"
