"""Tools and structured output in OpenAI's shapes, turned into the wire's fields.

    tools=[{"type": "function", "function": {"name": "get_weather", "description": "...",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    tool_choice="auto" | "none" | "required" | {"type": "function", "function": {"name": "get_weather"}}
    response_format={"type": "json_object"} | {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}

A function may also be given bare (`{"name": ..., "parameters": ...}`), and a choice of a
function as its name's string in `{"function": "get_weather"}`-free form: `tool_choice="get_weather"`
is not accepted (it would be ambiguous with the modes)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import tensor_pb2

__all__ = ["ToolsLike", "ToolChoiceLike", "ResponseFormatLike", "to_proto_tools", "to_proto_tool_choice", "response_format_constraint"]

#: What `tools=` accepts: OpenAI's function tools (or bare function dicts, or `vlmesh.v1.Tool`s).
ToolsLike = Sequence[Mapping[str, Any] | pb.Tool]
#: What `tool_choice=` accepts.
ToolChoiceLike = str | Mapping[str, Any]
#: What `response_format=` accepts.
ResponseFormatLike = Mapping[str, Any]

_MODES = {"auto": pb.TOOL_CHOICE_MODE_AUTO, "none": pb.TOOL_CHOICE_MODE_NONE, "required": pb.TOOL_CHOICE_MODE_REQUIRED}


def _tool(item: Any, index: str) -> pb.Tool:
    if isinstance(item, pb.Tool):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"{index}: a tool must be a dict, got {type(item).__name__}")
    if "type" in item and item["type"] != "function":
        raise ValueError(f"{index}: only tools of type 'function' are supported, got {item['type']!r}")
    fn = item.get("function", item)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{index}: a function needs a 'name'")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{index}: 'parameters' must be a JSON schema (a dict)")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"{index}: 'description' must be a string")
    return pb.Tool(name=fn["name"], description=description, parameters_json="" if params is None else json.dumps(params))


def to_proto_tools(tools: ToolsLike | None) -> list[pb.Tool]:
    """Wire tools for OpenAI-style function tools.

    Raises:
        ValueError: a tool that is not a function with a name, or parameters that are not a dict.
    """
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of tools")
    return [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]


def to_proto_tool_choice(choice: ToolChoiceLike | None) -> pb.ToolChoice | None:
    """The wire's ToolChoice for OpenAI's tool_choice ("auto", "none", "required" or a named function).

    Raises:
        ValueError: anything else.
    """
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _MODES:
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {choice!r}")
        return pb.ToolChoice(mode=_MODES[choice])
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str) or not name:
            raise ValueError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
        return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function_name=name)
    raise ValueError(f"tool_choice must be a string or a dict, got {type(choice).__name__}")


def response_format_constraint(fmt: ResponseFormatLike | None) -> tensor_pb2.Constraint | None:
    """The constraint for OpenAI's response_format: text (none), json_object, or json_schema.

    Raises:
        ValueError: another type, or a json_schema without a schema dict.
    """
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise ValueError("response_format must be a dict such as {'type': 'json_object'}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return tensor_pb2.Constraint(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return tensor_pb2.Constraint(json_schema=json.dumps(schema))
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def tool_calls_of(message: Mapping[str, Any], index: str) -> list[pb.ToolCall]:
    """An assistant message's tool_calls (OpenAI's shape: id, function.name, function.arguments)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ValueError(f"{index}: 'tool_calls' must be a list")
    out = []
    for j, c in enumerate(calls):
        if isinstance(c, pb.ToolCall):
            out.append(c)
            continue
        if hasattr(c, "arguments") and hasattr(c, "name"):  # a vlmesh.ToolCall from a previous result
            out.append(pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments))
            continue
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{index}.tool_calls[{j}]: needs function.name and function.arguments")
        args = fn.get("arguments", "{}")
        out.append(pb.ToolCall(id=str(c.get("id") or ""), name=fn["name"], arguments_json=args if isinstance(args, str) else json.dumps(args)))
    return out
