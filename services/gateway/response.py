"""OpenAI's response objects: chat.completion, chat.completion.chunk, usage and logprobs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlmesh import ChatResult, TokenLogprobs, ToolCall, Usage

from .tokens import TokenPieces


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's name: an end-of-turn token and a stop string are both "stop"."""
    if reason is None:
        return None
    return reason if reason in ("length", "tool_calls") else "stop"


def tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """OpenAI's tool call object (with its index in the message: a streamed delta)."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
    return out


def total(results: Sequence[ChatResult]) -> Usage:
    """One call's usage: the shared prompt once, every continuation's completion."""
    first = results[0].usage
    return Usage(first.prompt_tokens, sum(r.usage.completion_tokens for r in results), first.cached_tokens)


def usage(u: Usage) -> dict[str, Any]:
    # The mesh counts only the tokens it had to feed as prompt_tokens and the reused ones as
    # cached_tokens; OpenAI's prompt_tokens is the whole prompt, cached part included.
    prompt = u.prompt_tokens + u.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.completion_tokens,
        "total_tokens": prompt + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def logprobs(entries: Sequence[TokenLogprobs], pieces: TokenPieces, top: int) -> list[dict[str, Any]]:
    """OpenAI's logprobs.content: per token its string, logprob, bytes and `top` alternatives."""
    out = []
    for entry in entries:
        text, data = pieces.piece(entry.token_id)
        alternatives = []
        for alt in entry.top[:top]:
            alt_text, alt_data = pieces.piece(alt.token_id)
            alternatives.append({"token": alt_text, "logprob": alt.logprob, "bytes": list(alt_data)})
        out.append({"token": text, "logprob": entry.logprob, "bytes": list(data), "top_logprobs": alternatives})
    return out


@dataclass(frozen=True)
class Reply:
    """What every object of one response shares."""

    id: str
    created: int
    model: str
    #: Alternatives per token, when logprobs were asked for; None = no logprobs.
    top_logprobs: int | None
    pieces: TokenPieces | None

    def _logprobs(self, entries: Sequence[TokenLogprobs] | None) -> dict[str, Any] | None:
        if self.top_logprobs is None or self.pieces is None or entries is None:
            return None
        return {"content": logprobs(entries, self.pieces, self.top_logprobs), "refusal": None}

    def _message(self, result: ChatResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
        if result.tool_calls:
            # OpenAI: null content when the reply is only calls.
            message["content"] = result.text if result.text.strip() else None
            message["tool_calls"] = [tool_call(c) for c in result.tool_calls]
        return message

    def completion(self, results: Sequence[ChatResult]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": self._message(result),
                    "logprobs": self._logprobs(result.logprobs),
                    "finish_reason": finish_reason(result.finish_reason),
                }
                for i, result in enumerate(results)
            ],
            "usage": usage(total(results)),
        }

    def chunk(
        self,
        delta: dict[str, Any],
        *,
        index: int = 0,
        entries: Sequence[TokenLogprobs] | None = None,
        finish: str | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": self._logprobs(entries),
                    "finish_reason": finish_reason(finish),
                }
            ],
        }
        if with_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
        return chunk

    def usage_chunk(self, u: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage(u),
        }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass(frozen=True)
class CompletionReply:
    """The legacy completions API's objects (text_completion), for a raw prompt."""

    id: str
    created: int
    model: str
    #: Alternatives per token (the request's `logprobs`); None = no logprobs.
    top_logprobs: int | None
    pieces: TokenPieces | None

    def logprobs(self, entries: Sequence[TokenLogprobs] | None, offset: int) -> dict[str, Any] | None:
        """The legacy shape: tokens, token_logprobs, top_logprobs and text_offset (from `offset`)."""
        if self.top_logprobs is None or self.pieces is None or entries is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            text, _ = self.pieces.piece(entry.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append({self.pieces.piece(a.token_id)[0]: a.logprob for a in entry.top[: self.top_logprobs]})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _object(self, *choices: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": list(choices),
        }

    def completion(self, results: Sequence[ChatResult]) -> dict[str, Any]:
        body = self._object(
            *(
                {"text": r.text, "index": i, "logprobs": self.logprobs(r.logprobs, 0), "finish_reason": finish_reason(r.finish_reason)}
                for i, r in enumerate(results)
            )
        )
        body["usage"] = usage(total(results))
        return body

    def chunk(
        self,
        text: str,
        *,
        index: int = 0,
        entries: Sequence[TokenLogprobs] | None = None,
        offset: int = 0,
        finish: str | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        body = self._object({"text": text, "index": index, "logprobs": self.logprobs(entries, offset), "finish_reason": finish_reason(finish)})
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, u: Usage) -> dict[str, Any]:
        body = self._object()
        body["usage"] = usage(u)
        return body
