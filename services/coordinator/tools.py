"""Tool calling in Qwen's format: the tool list goes into the prompt, the model answers with
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, and those come back as
`ToolCall`s.

- The prompt: a chat template that takes `tools` (Qwen3-VL's) renders them itself; for one that
  does not (Qwen2-VL's, Qwen2.5-VL's), the messages are rewritten the way Qwen's function-calling
  guide does (Hermes style): a `# Tools` system block, assistant calls as `<tool_call>` text, tool
  results as `<tool_response>` user turns (`hermes_messages`).
- `required` and a named function are enforced on the sampling stage by a grammar (`constraint`):
  the call is well formed and its arguments are valid under the function's schema. `auto` leaves
  the model free; a block that does not parse as a call of a known function stays text.
- The output: `ToolCallParser` cuts the blocks out of the text stream as it arrives."""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from services.common.errors import InvalidArgument
from vlmesh.v1 import coordinator_pb2, tensor_pb2

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HERMES = Template((Path(__file__).resolve().parent / "templates" / "hermes_tools.txt").read_text().rstrip("\n"))
# How the grammar writes a call's JSON: as Qwen's template shows it, one line with ", " and ": ".
_CALL_MARK = "\ue010"  # where a call was cut out of the text (a private-use character)
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Mode(enum.Enum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"


_MODES = {
    coordinator_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: Mode.AUTO,
    coordinator_pb2.TOOL_CHOICE_MODE_AUTO: Mode.AUTO,
    coordinator_pb2.TOOL_CHOICE_MODE_NONE: Mode.NONE,
    coordinator_pb2.TOOL_CHOICE_MODE_REQUIRED: Mode.REQUIRED,
    coordinator_pb2.TOOL_CHOICE_MODE_FUNCTION: Mode.FUNCTION,
}


@dataclass(frozen=True)
class Tools:
    """A request's tools as validated: the template's form and how the model may use them."""

    functions: tuple[dict[str, Any], ...]  # {"type": "function", "function": {name, description, parameters}}
    mode: Mode
    function: str  # the one to call, with Mode.FUNCTION
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {f["function"]["name"] for f in self.functions}

    @property
    def parses(self) -> bool:
        """Whether the output's <tool_call> blocks are calls (not with tool_choice none)."""
        return bool(self.functions) and self.mode is not Mode.NONE


def parse_tools(request: coordinator_pb2.GenerateRequest) -> Tools | None:
    """The request's tools, validated; None when it has none."""
    choice = request.tool_choice
    mode = _MODES.get(choice.mode)
    if mode is None:
        raise InvalidArgument(f"tool_choice.mode {choice.mode} is not a mode")
    if not request.tools:
        if mode in (Mode.REQUIRED, Mode.FUNCTION):
            raise InvalidArgument("tool_choice requires a tool but the request has no tools")
        return None
    if request.sampling.HasField("constraint"):
        raise InvalidArgument("a request takes tools or a constraint, not both")
    functions: list[dict[str, Any]] = []
    for i, t in enumerate(request.tools):
        if not _NAME.match(t.name):
            raise InvalidArgument(f"tools[{i}].name must be 1 to 64 letters, digits, '_' or '-'")
        params: Any = {"type": "object"}
        if t.parameters_json:
            try:
                params = json.loads(t.parameters_json)
            except (ValueError, RecursionError) as err:
                raise InvalidArgument(f"tools[{i}].parameters_json is not valid JSON: {err}") from None
            if not isinstance(params, dict):
                raise InvalidArgument(f"tools[{i}].parameters_json must be a JSON object (a schema)")
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = params
        functions.append({"type": "function", "function": fn})
    names = [f["function"]["name"] for f in functions]
    if len(set(names)) != len(names):
        raise InvalidArgument("tool names must be unique")
    if mode is Mode.FUNCTION and choice.function_name not in names:
        raise InvalidArgument(f"tool_choice names {choice.function_name!r}, which is not one of the tools")
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return Tools(tuple(functions), mode, choice.function_name if mode is Mode.FUNCTION else "", parallel)


def constraint(tools: Tools, special_tags: bool) -> tensor_pb2.Constraint | None:
    """The grammar that enforces `required` or a named function (None for auto and none).
    `special_tags`: the tokenizer has <tool_call> and </tool_call> as tokens of their own, which
    llguidance matches as tokens (not text)."""
    if tools.mode not in (Mode.REQUIRED, Mode.FUNCTION):
        return None
    chosen = [f["function"] for f in tools.functions if tools.mode is Mode.REQUIRED or f["function"]["name"] == tools.function]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": _CALL_JSON}
    open_, close = (OPEN, CLOSE) if special_tags else (json.dumps(OPEN), json.dumps(CLOSE))
    start = 'call ("\\n" call)*' if tools.parallel else "call"
    grammar = f'%llguidance {{}}\nstart: {start}\ncall: {open_} "\\n" %json {json.dumps(schema)} "\\n" {close}\n'
    return tensor_pb2.Constraint(grammar=grammar)


# ------------------------------------------------------------------ the prompt


def _raw(text: str) -> dict[str, Any]:
    """A text part that is the template's own (tokenised with its control tokens), not content."""
    return {"type": "text", "text": text, "raw": True}


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    return f'{OPEN}\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {fn["arguments"]}}}\n{CLOSE}'


def hermes_messages(messages: list[dict[str, Any]], tools: Tools | None) -> list[dict[str, Any]]:
    """Messages for a template that takes no tools: the tool list as a system block, assistant
    calls as <tool_call> text and each run of tool results as one user turn of <tool_response>s."""
    out: list[dict[str, Any]] = []
    if tools is not None and tools.functions:
        block = _HERMES.substitute(tools="\n".join(json.dumps(f, ensure_ascii=False) for f in tools.functions))
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"]
            messages = messages[1:]
            parts = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
            out.append({"role": "system", "content": [*parts, _raw("\n\n" + block)]})
        else:
            out.append({"role": "system", "content": [_raw(block)]})
    for m in messages:
        if m["role"] == "tool":
            parts = [_raw("<tool_response>\n"), *m["content"], _raw("\n</tool_response>")]
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += [_raw("\n"), *parts]
            else:
                out.append({"role": "user", "content": parts, "tool_results": True})
        elif m.get("tool_calls"):
            parts = list(m["content"])
            for i, call in enumerate(m["tool_calls"]):
                parts.append(_raw(("\n" if parts or i else "") + _call_text(call)))
            out.append({"role": "assistant", "content": parts})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


# ------------------------------------------------------------------ the output


def _call_of(body: str, names: set[str]) -> coordinator_pb2.ToolCall | None:
    """A block's body as a call of one of `names`, or None if it is not one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return coordinator_pb2.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"], arguments_json=json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Cuts <tool_call> blocks out of streamed text. Text that may still turn into a block (a
    partial "<tool_call>", an open block) is held back until it is decided; a block that is not a
    call of a known function (or a second one when parallel calls are off) is given back as text."""

    def __init__(self, names: set[str], parallel: bool = True):
        self.names = names
        self.parallel = parallel
        self.buffer = ""
        self.in_block = False
        self.calls = 0
        self.pending_space = ""  # whitespace after a call: shown only if more text follows

    def feed(self, text: str) -> tuple[str, list[coordinator_pb2.ToolCall]]:
        self.buffer += text
        shown: list[str] = []
        calls: list[coordinator_pb2.ToolCall] = []
        while True:
            if not self.in_block:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    shown.append(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    break
                shown.append(self.buffer[:at])
                self.buffer = self.buffer[at:]
                self.in_block = True
            end = self.buffer.find(CLOSE)
            if end < 0:
                break
            block, self.buffer = self.buffer[: end + len(CLOSE)], self.buffer[end + len(CLOSE) :]
            self.in_block = False
            call = _call_of(block[len(OPEN) : -len(CLOSE)].strip(), self.names) if (self.parallel or not self.calls) else None
            if call is None:
                shown.append(block)
            else:
                shown.append(_CALL_MARK)  # where a call was: whitespace around it is dropped
                calls.append(call)
                self.calls += 1
        return self._visible("".join(shown)), calls

    def finish(self) -> str:
        """What is still held back, as text (an unfinished block stays text)."""
        rest, self.buffer, self.in_block = self.buffer, "", False
        return self._visible(rest)

    def _visible(self, text: str) -> str:
        """Text with calls' places (_CALL_MARK) removed, and whitespace that only separates calls dropped."""
        out = []
        for i, piece in enumerate(text.split(_CALL_MARK)):
            if i > 0:  # whitespace between two calls goes with them
                self.pending_space = ""
            if self.calls and not piece.strip():
                self.pending_space += piece
                continue
            out.append(self.pending_space + piece)
            self.pending_space = ""
        return "".join(out)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
