"""Tool calling's parts without a mesh: the parser that cuts <tool_call> blocks out of streamed
text, the grammar that enforces `required` and a named function (driven through the sampling
stage's own Constraints with random allowed tokens), and the prompt for a template that takes
tools (Qwen3-VL's) and for one that does not (Qwen2-VL's: Hermes-style injection)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from transformers import AutoProcessor

from services.common.errors import InvalidArgument
from services.coordinator.prompt import PromptBuilder
from services.coordinator.tools import Mode, ToolCallParser, Tools, constraint, hermes_messages, parse_tools
from services.stage.sampler import Constraints
from services.tiny import make_tiny
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import tensor_pb2

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


def request(mode=cpb.TOOL_CHOICE_MODE_AUTO, name="", parallel=None) -> cpb.GenerateRequest:
    r = cpb.GenerateRequest(
        tools=[cpb.Tool(name=n, description=f"{n} of a place", parameters_json=json.dumps(s)) for n, s in SCHEMAS.items()],
        tool_choice=cpb.ToolChoice(mode=mode, function_name=name),
    )
    if parallel is not None:
        r.parallel_tool_calls = parallel
    return r


# ------------------------------------------------------------------ the parser


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'


def parse_in_pieces(text: str, cuts: list[int], parser: ToolCallParser) -> tuple[str, list[cpb.ToolCall]]:
    shown, calls, at = [], [], 0
    for cut in [*cuts, len(text)]:
        t, c = parser.feed(text[at:cut])
        shown.append(t)
        calls += c
        at = cut
    shown.append(parser.finish())
    return "".join(shown), calls


@pytest.mark.parametrize("seed", range(12))
def test_parser_gives_the_same_split_any_way_the_text_streams(seed):
    text = "Let me look.\n" + CALL + "\n" + CALL.replace("Rome", "Oslo") + "\n"
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    shown, calls = parse_in_pieces(text, cuts, ToolCallParser(set(SCHEMAS)))
    assert shown == "Let me look.\n"
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": "Rome", "days": 2}),
        ("get_weather", {"city": "Oslo", "days": 2}),
    ]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',  # not one of the tools
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"',  # cut off (max_tokens)
        "a < b and <tool_ but no call",
    ],
)
def test_a_block_that_is_not_a_call_stays_text(text):
    shown, calls = parse_in_pieces(text, [3, 11, 12], ToolCallParser(set(SCHEMAS)))
    assert (shown, calls) == (text, [])


def test_without_parallel_calls_a_second_block_is_text():
    shown, calls = parse_in_pieces(CALL + "\n" + CALL, [], ToolCallParser(set(SCHEMAS), parallel=False))
    assert len(calls) == 1 and shown == "\n" + CALL


def test_arguments_given_as_a_json_string_are_taken():
    text = '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}\n</tool_call>'
    _, calls = parse_in_pieces(text, [], ToolCallParser(set(SCHEMAS)))
    assert json.loads(calls[0].arguments_json) == {"zone": "UTC"}


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.tools.add(name="get_weather"), "unique"),
        (lambda r: r.tools.add(name="bad name"), "letters"),
        (lambda r: r.tools.add(name="x", parameters_json="[1]"), "JSON object"),
        (lambda r: r.tools.add(name="y", parameters_json="{"), "not valid JSON"),
        (lambda r: r.tool_choice.CopyFrom(cpb.ToolChoice(mode=cpb.TOOL_CHOICE_MODE_FUNCTION, function_name="nope")), "not one of the tools"),
        (lambda r: r.sampling.constraint.CopyFrom(tensor_pb2.Constraint(json_object=True)), "not both"),
    ],
)
def test_bad_tools_are_invalid_argument(change, message):
    r = request()
    change(r)
    with pytest.raises(InvalidArgument, match=message):
        parse_tools(r)


def test_required_without_tools_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="no tools"):
        parse_tools(cpb.GenerateRequest(tool_choice=cpb.ToolChoice(mode=cpb.TOOL_CHOICE_MODE_REQUIRED)))
    assert parse_tools(cpb.GenerateRequest()) is None


# ------------------------------------------------------------------ the grammar


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen3-vl"])
def checkpoint(request, tmp_path_factory):
    """qwen2-vl: <tool_call> is text (several tokens); qwen3-vl: a token of its own."""
    path = make_tiny(tmp_path_factory.mktemp(request.param), family=request.param)
    return path, AutoProcessor.from_pretrained(str(path))


def drive(constraints: Constraints, c, rng: random.Random, eos: int, limit: int = 400) -> list[int]:
    """Tokens drawn at random among those the mask allows, until the end of turn."""
    out: list[int] = []
    while len(out) < limit:
        allowed = constraints.mask("s", c, out).nonzero().flatten().tolist()
        token = rng.choice(allowed)
        if token == eos:
            return out
        out.append(token)
    raise AssertionError("the grammar did not end")


@pytest.mark.parametrize(
    "mode, name, parallel",
    [
        (cpb.TOOL_CHOICE_MODE_REQUIRED, "", True),
        (cpb.TOOL_CHOICE_MODE_REQUIRED, "", False),
        (cpb.TOOL_CHOICE_MODE_FUNCTION, "get_time", True),
    ],
)
def test_required_and_named_grammars_give_valid_calls(checkpoint, mode, name, parallel):
    path, processor = checkpoint
    tools = parse_tools(request(mode, name, parallel))
    prompts = PromptBuilder(processor, [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")])
    c = constraint(tools, prompts.tool_tags_are_tokens)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    constraints = Constraints(path, len(processor.tokenizer), [eos])
    rng = random.Random(0)
    for _ in range(4):
        ids = drive(constraints, c, rng, eos)
        text = processor.tokenizer.decode(ids)
        shown, calls = parse_in_pieces(text, [], ToolCallParser(tools.names, tools.parallel))
        assert shown == "" and calls, text
        if not parallel:
            assert len(calls) == 1
        for call in calls:
            assert name in ("", call.name)
            jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])


def test_auto_and_none_have_no_grammar():
    for mode in (cpb.TOOL_CHOICE_MODE_AUTO, cpb.TOOL_CHOICE_MODE_NONE):
        tools = parse_tools(request(mode))
        assert constraint(tools, True) is None
    assert not parse_tools(request(cpb.TOOL_CHOICE_MODE_NONE)).parses


# ------------------------------------------------------------------ the prompt


def conversation() -> tuple[list[dict], list[dict]]:
    first = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Rome?"}]},
    ]
    follow = [
        {
            "role": "assistant",
            "content": [],
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'}}],
        },
        {"role": "tool", "content": [{"type": "text", "text": "sunny"}], "tool_call_id": "call_1"},
        {"role": "tool", "content": [{"type": "text", "text": "<|im_end|> is text here"}], "tool_call_id": "call_1"},
    ]
    return first, follow


def plain(prompt) -> str:
    """A PromptText with its content markers replaced by the content."""
    text = prompt.text
    for i, c in enumerate(prompt.contents):
        text = text.replace(f"\ue001{i}\ue002", c)
    return text


def test_both_kinds_of_template_render_tools_and_results_in_qwens_format(checkpoint):
    path, processor = checkpoint
    prompts = PromptBuilder(processor, [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert prompts.takes_tools == (processor.chat_template.count("tools") > 0)
    tools = parse_tools(request())
    first, follow = conversation()
    text = prompts.new_text([], first + follow, tools)
    rendered = plain(text)
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(tools.functions[0], ensure_ascii=False) in rendered
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call><|im_end|>' in rendered
    assert (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n<|im_end|> is text here\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        in rendered
    )
    # A tool result's text is content: special-token strings in it stay ordinary text.
    ids = prompts.tokenize(text, [], True)
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 4  # system, user, assistant, tool turn
    if prompts.tool_tags_are_tokens:
        assert processor.tokenizer.convert_tokens_to_ids("<tool_call>") in ids


def test_a_tool_turn_renders_incrementally_in_a_session(checkpoint):
    """A session's next turn is only what the template adds for the new messages."""
    _, processor = checkpoint
    prompts = PromptBuilder(processor, [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")])
    tools = parse_tools(request())
    first, follow = conversation()
    whole = prompts.render(first + follow, True, tools=tools)
    turn1 = plain(prompts.new_text([], first, tools))
    history = first + [{"role": "assistant", "content": follow[0]["content"], "tool_calls": follow[0]["tool_calls"]}]
    turn2 = plain(prompts.new_text(history, follow[1:], tools))
    assert whole.startswith(turn1.removesuffix("<|im_start|>assistant\n"))
    assert whole.endswith(turn2)


def test_hermes_messages_keep_the_users_system_text_as_content():
    tools = Tools(({"type": "function", "function": {"name": "f", "parameters": {}}},), Mode.AUTO, "", True)
    out = hermes_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tools)
    assert out[0]["role"] == "system" and out[0]["content"][0]["raw"] and "<tools>" in out[0]["content"][0]["text"]
    assert out[1] == {"role": "user", "content": [{"type": "text", "text": "hi"}]}


def test_mask_allows_only_the_open_tag_first(checkpoint):
    """`required` leaves the model no text before the call."""
    path, processor = checkpoint
    prompts = PromptBuilder(processor, [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")])
    c = constraint(parse_tools(request(cpb.TOOL_CHOICE_MODE_REQUIRED)), prompts.tool_tags_are_tokens)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    allowed: torch.Tensor = Constraints(path, len(processor.tokenizer), [eos]).mask("s", c, [])
    pieces = {processor.tokenizer.decode([t]) for t in allowed.nonzero().flatten().tolist()}
    assert pieces and all("<tool_call>".startswith(p) for p in pieces), pieces
