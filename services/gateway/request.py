"""A chat completions request body, checked and turned into the client library's arguments.

Everything OpenAI's API defines is either honoured, accepted because it changes nothing here
(`user`, `metadata`, `store`, ...), or refused with a 400 that names it (penalties, audio, the
deprecated `functions`, ...). `n` > 1 continuations share the prompt's prefill. Tools (`tools`,
`tool_choice`, `parallel_tool_calls`, `role: "tool"` messages and assistant `tool_calls`) go to
the mesh, which renders them and parses the model's calls. Names OpenAI does not define are
refused as OpenAI refuses them, except vLLM's `top_k`, `repetition_penalty` and `structured_outputs`.

Structured output (`response_format` json_object / json_schema, or vLLM's `structured_outputs`
json / regex / choice / grammar) becomes the mesh's Constraint: the sampling stage masks tokens, so
the reply is valid by construction; a schema the engine cannot compile comes back as a 400.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmesh import GenerateOptions, Prompt
from vlmesh.client import MAX_CHOICES
from vlmesh.v1 import tensor_pb2

from .errors import invalid

#: Most alternatives `top_logprobs` may ask for (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Deepest nesting of arrays and objects a request body may have. A chat request needs 6 levels;
#: Python's parser gives up near 1,000 with a RecursionError, and code walking a parsed value
#: would too.
MAX_JSON_DEPTH = 64

# A JSON string once its escaped backslashes and quotes are gone; an unterminated one runs to
# the end, so the pattern always matches at a quote and a scan never retries inside a string.
_JSON_STRING = re.compile(rb'"[^"]*"?')
# Brackets as one kind of pair, "(" and ")" (nesting counts both kinds alike), every other byte
# deleted: for bytes.translate.
_AS_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Accepted and without effect on the reply.
_IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Parameters that would change the reply in ways this server cannot honour, with the values
# that mean "not used" (those are accepted).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}
_HANDLED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "n",
    "top_k",
    "repetition_penalty",
    "response_format",
    "structured_outputs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
_URL_SCHEMES = ("data:", "http://", "https://")


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: what to ask the mesh and how to answer."""

    model: str
    #: The conversation in the client library's format (OpenAI-style parts, roles mapped), or
    #: the raw prompt of a completions request.
    messages: list[dict[str, Any]] | Prompt
    options: GenerateOptions
    stream: bool
    #: Streams end with a usage chunk (stream_options.include_usage).
    include_usage: bool
    #: Alternatives per token when logprobs were asked for (0..20); None = no logprobs.
    top_logprobs: int | None
    user: str | None


def _nesting_ok(raw: bytes) -> bool:
    """Whether `raw` nests arrays and objects at most MAX_JSON_DEPTH deep (or is not JSON), in
    bytes operations only: no Python loop over the body's bytes, and no recursion."""
    # Escaped backslashes first, then escaped quotes: what is left of a string holds no quote.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _JSON_STRING.sub(b"", unescaped).translate(_AS_PARENS, _NOT_BRACKETS)
    if brackets.count(b"(") <= MAX_JSON_DEPTH:
        return True  # every real request
    # Each pass removes the innermost pairs (replace does not rescan the pairs it uncovers): the
    # passes that empty it are its depth.
    for _ in range(MAX_JSON_DEPTH):
        inner = brackets.replace(b"()", b"")
        if not inner:
            return True
        if inner == brackets:
            return True  # brackets that do not pair up: not JSON, which the parser reports
        brackets = inner
    return False


def json_body(raw: bytes) -> Any:
    """The parsed body.

    Raises:
        ApiError: 400 if it is not JSON, or nests deeper than MAX_JSON_DEPTH (checked before
            parsing: the parser's own limit is a RecursionError).
    """
    if not _nesting_ok(raw):
        raise invalid(f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels, the limit")
    try:
        return json.loads(raw)
    except RecursionError:  # brackets that do not pair up, nested past the parser's limit
        raise invalid(f"the request body is not valid JSON, and nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from e


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise invalid(f"'{name}' must be an integer {bound}, got {value!r}", name)
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _url(part: Mapping[str, Any], key: str, param: str) -> str:
    ref = part.get(key)
    url = ref.get("url") if isinstance(ref, Mapping) else ref
    if not isinstance(url, str) or not url:
        raise invalid(f"'{key}' parts need {key}.url", f"{param}.{key}.url")
    # Only URLs: the client library would also read paths and file:// URLs, which must not
    # reach this server's own disk.
    if not url[:8].lower().startswith(_URL_SCHEMES):
        raise invalid(f"{key}.url must be a data: URL or an http(s) URL", f"{param}.{key}.url")
    if isinstance(ref, Mapping):
        extra = set(ref) - {"url", "detail"}  # detail: a hint; the model's processor sizes images
        if extra:
            raise invalid(f"unknown field '{min(extra)}' in {key}", f"{param}.{key}")
    return url


def _part(part: Any, param: str) -> dict[str, Any]:
    if not isinstance(part, Mapping):
        raise invalid("content parts must be objects", param)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid("'text' parts need a string 'text'", f"{param}.text")
        return {"type": "text", "text": text}
    if kind in ("image_url", "video_url"):
        return {"type": kind, kind: {"url": _url(part, kind, param)}}
    raise invalid(
        f"content part type {kind!r} is not supported; supported: 'text', 'image_url' (and 'video_url')",
        f"{param}.type",
    )


def _tool_calls(message: Mapping[str, Any], param: str) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise invalid("'tool_calls' must be a list", f"{param}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        where = f"{param}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise invalid("a tool call needs function.name and function.arguments (a JSON string)", where)
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise invalid("function.arguments must be a JSON object as a string", f"{where}.function.arguments")
        out.append({"id": str(call.get("id") or ""), "type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _message(message: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise invalid("messages must be objects with 'role' and 'content'", param)
    role = message.get("role")
    if role == "function":
        raise invalid("role 'function' (deprecated) is not supported; use tools and role 'tool'", f"{param}.role")
    if role not in _ROLES:
        raise invalid(f"unknown role {role!r}; supported: system, developer, user, assistant, tool", f"{param}.role")
    if message.get("function_call"):
        raise invalid("function_call (deprecated) is not supported; use tool_calls", f"{param}.function_call")
    extra = set(message) - _MESSAGE_KEYS - {"function_call"}
    if extra:
        raise invalid(f"unknown field '{min(extra)}' in a message", param)
    out: dict[str, Any] = {"role": _ROLES[role]}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = _tool_calls(message, param)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise invalid("a tool message needs 'tool_call_id'", f"{param}.tool_call_id")
        out["tool_call_id"] = call_id
    content = message.get("content")
    if isinstance(content, str):
        out["content"] = content
    elif isinstance(content, list) and content:
        out["content"] = [_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]
    elif content is None and "tool_calls" in out:
        out["content"] = None
    else:
        raise invalid("'content' must be a string or a non-empty list of parts", f"{param}.content")
    return out


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list", "tools")
    for j, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise invalid("only tools of type 'function' are supported", f"tools[{j}].type")
        fn = _keys(tool.get("function"), f"tools[{j}].function", {"name", "description", "parameters", "strict"})
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise invalid("a function name must be 1 to 64 letters, digits, '_' or '-'", f"tools[{j}].function.name")
        if not isinstance(fn.get("parameters", {}), Mapping):
            raise invalid("'parameters' must be a JSON schema (an object)", f"tools[{j}].function.parameters")
    return tools


def _tool_choice(body: Mapping[str, Any], tools: list[dict[str, Any]] | None) -> Any:
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        if choice == "required" and tools is None:
            raise invalid("tool_choice 'required' needs tools", "tool_choice")
        return choice if tools is not None else None
    fn = choice.get("function") if isinstance(choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
        raise invalid("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise invalid(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
    return choice


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("'stop' must be a non-empty string or a list of them", "stop")
    return stops


def _keys(value: Any, param: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise invalid(f"'{param}' must be an object", param)
    extra = set(value) - allowed
    if extra:
        raise invalid(f"unknown field '{min(extra)}' in '{param}'", f"{param}.{min(extra)}")
    return value


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema as the mesh takes it (JSON text); whether it compiles the mesh says."""
    if isinstance(schema, str):  # vLLM also takes the schema as a JSON string
        try:
            schema = json.loads(schema)
        except ValueError:
            raise invalid(f"'{param}' is not valid JSON", param) from None
    if not isinstance(schema, Mapping | bool):
        raise invalid(f"'{param}' must be a JSON schema (an object)", param)
    return json.dumps(schema)


def _response_format(value: Any) -> tensor_pb2.Constraint | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema."""
    fmt = _keys(value, "response_format", {"type", "json_schema"})
    kind = fmt.get("type")
    if kind == "text" and "json_schema" not in fmt:
        return None
    if kind == "json_object" and "json_schema" not in fmt:
        return tensor_pb2.Constraint(json_object=True)
    if kind != "json_schema":
        raise invalid(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}", "response_format.type")
    spec = _keys(fmt.get("json_schema"), "response_format.json_schema", {"name", "description", "schema", "strict"})
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise invalid("'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'", "response_format.json_schema.name")
    if spec.get("strict") not in (None, True, False):
        raise invalid("'response_format.json_schema.strict' must be true or false", "response_format.json_schema.strict")
    # The mask enforces the schema whatever `strict` says; no schema means any JSON value.
    return tensor_pb2.Constraint(json_schema=_schema_text(spec.get("schema", {}), "response_format.json_schema.schema"))


def _structured_outputs(value: Any) -> tensor_pb2.Constraint:
    """vLLM's structured_outputs extension: exactly one of json, json_object, regex, choice, grammar."""
    spec = _keys(value, "structured_outputs", {"json", "json_object", "regex", "choice", "grammar"})
    given = [k for k in spec if spec[k] is not None]
    if len(given) != 1:
        raise invalid("'structured_outputs' takes exactly one of json, json_object, regex, choice, grammar", "structured_outputs")
    kind = given[0]
    param = f"structured_outputs.{kind}"
    item = spec[kind]
    if kind == "json":
        return tensor_pb2.Constraint(json_schema=_schema_text(item, param))
    if kind == "json_object":
        if item is not True:
            raise invalid(f"'{param}' must be true", param)
        return tensor_pb2.Constraint(json_object=True)
    if kind == "choice":
        if not isinstance(item, list) or not item or not all(isinstance(o, str) and o for o in item):
            raise invalid(f"'{param}' must be a non-empty list of non-empty strings", param)
        return tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=item))
    if not isinstance(item, str) or not item:
        raise invalid(f"'{param}' must be a non-empty string", param)
    return tensor_pb2.Constraint(regex=item) if kind == "regex" else tensor_pb2.Constraint(grammar=item)


def _constraint(body: Mapping[str, Any]) -> tensor_pb2.Constraint | None:
    fmt = None if body.get("response_format") is None else _response_format(body["response_format"])
    if body.get("structured_outputs") is None:
        return fmt
    if fmt is not None:
        raise invalid("give either 'response_format' or 'structured_outputs', not both", "structured_outputs")
    return _structured_outputs(body["structured_outputs"])


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name in body:
        if name in _HANDLED or name in _IGNORED:
            continue
        if name in _OFF_VALUES:
            if body[name] not in _OFF_VALUES[name]:
                raise invalid(f"'{name}' is not supported by this server", name, "unsupported_parameter")
            continue
        raise invalid(f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")


def _output_options(body: Mapping[str, Any], options: GenerateOptions) -> None:
    """The constraint (response_format, structured_outputs) or the tools, into `options`."""
    constraint = _constraint(body)
    if constraint is not None:
        options["constraint"] = constraint
    tools = _tools(body)
    if tools is None:
        _tool_choice(body, None)
        return
    if constraint is not None:
        raise invalid("give either tools or a response format, not both", "tools")
    options["tools"] = tools
    options["tool_choice"] = _tool_choice(body, tools)
    if body.get("parallel_tool_calls") is not None:
        options["parallel_tool_calls"] = _boolean(body, "parallel_tool_calls")


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = _boolean(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is None:
        return stream, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(stream_options, Mapping) or set(stream_options) - {"include_usage"}:
        raise invalid("'stream_options' takes only 'include_usage'", "stream_options")
    return stream, _boolean(stream_options, "include_usage")


def _sampling(body: Mapping[str, Any], default_max_tokens: int | None = None) -> GenerateOptions:
    """Token selection and when to stop (logprobs aside: the two APIs spell them differently)."""
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        # OpenAI: only the most likely token survives, i.e. greedy. (0 means "off" on the wire.)
        temperature, top_p = 0.0, 1.0
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    top_k = _integer(body, "top_k", -1)  # vLLM's extension; -1 (and 0) = off
    repetition_penalty = _number(body, "repetition_penalty", 0.0, 100.0)
    n = _integer(body, "n", 1, MAX_CHOICES)
    return {
        "n": 1 if n is None else n,
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        # OpenAI's default temperature is 1 (sampling); send 0 for greedy.
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": max(top_k or 0, 0),
        "repetition_penalty": 1.0 if repetition_penalty is None else repetition_penalty,
        # OpenAI's seeds are signed 64-bit; the mesh's are unsigned: same bits, same seed.
        "seed": None if seed is None else seed % 2**64,
        "stop": _stop(body),
    }


def _model_and_user(body: Any) -> tuple[str, str | None]:
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required", "model")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("'user' must be a string", "user")
    return model, user


def parse_chat_request(body: Any) -> ChatRequest:
    """The checked request.

    Raises:
        ApiError: 400 naming the first problem (its `param` says where).
    """
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object")
    _check_unsupported(body)
    model, user = _model_and_user(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    stream, include_usage = _stream_flags(body)
    logprobs = _boolean(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    options = _sampling(body)
    # The mesh returns a token's logprob only with at least one alternative.
    options["logprobs"] = max(top_logprobs or 0, 1) if logprobs else 0
    _output_options(body, options)
    return ChatRequest(
        model=model,
        messages=[_message(m, i) for i, m in enumerate(messages)],
        options=options,
        stream=stream,
        include_usage=include_usage,
        top_logprobs=(top_logprobs or 0) if logprobs else None,
        user=user,
    )


# The legacy completions API: what it takes beyond the sampling parameters, and the values of
# its parameters this server cannot honour that mean "not used".
_COMPLETION_KEYS = {"model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed"}
_COMPLETION_KEYS |= {"logprobs", "n", "top_k", "repetition_penalty", "response_format", "structured_outputs", "user"}
_COMPLETION_OFF: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
#: OpenAI's default max_tokens for completions.
COMPLETION_MAX_TOKENS = 16


def parse_completion_request(body: Any) -> ChatRequest:
    """A /v1/completions body: a raw prompt (one string; no chat template), as ChatRequest with
    `messages` a `vlmesh.Prompt`.

    Raises:
        ApiError: 400 naming the first problem.
    """
    model, user = _model_and_user(body)
    for name in body:
        if name in _COMPLETION_OFF:
            if body[name] not in _COMPLETION_OFF[name]:
                raise invalid(f"'{name}' is not supported by this server", name, "unsupported_parameter")
        elif name not in _COMPLETION_KEYS:
            raise invalid(f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise invalid("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    stream, include_usage = _stream_flags(body)
    top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    options = _sampling(body, COMPLETION_MAX_TOKENS)
    options["logprobs"] = max(top, 1) if top is not None else 0
    constraint = _constraint(body)
    if constraint is not None:
        options["constraint"] = constraint
    return ChatRequest(
        model=model,
        messages=Prompt(prompt),
        options=options,
        stream=stream,
        include_usage=include_usage,
        top_logprobs=top,
        user=user,
    )
