"""Incremental detokenisation with stop strings: text deltas never split a UTF-8 character and
never show a stop string (or the part of one that may still be completing)."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    """What the detokenizer needs of a transformers tokenizer."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool = ...) -> str: ...


SINGLE_CACHE_MAX = 1 << 16  # token texts an engine's shared cache keeps (a vocabulary is about 150k)


class IncrementalDetokenizer:
    """The windowed scheme vLLM uses: decode a short window of recent tokens and emit what it
    adds over the window without the newest token, holding back replacement characters that mean
    a multi-byte character is still incomplete.

    One tokenizer call per token, not two: the window without the newest token is decoded once
    per window (not again while a character is incomplete), and after each step it is the last
    token alone, whose text comes from `single` (token id -> decode([id]), a pure function of the
    id, shared by every request of an engine)."""

    def __init__(self, tokenizer: Decoder, stop: list[str] | None = None, single: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix: str | None = ""  # the text of ids[prefix_offset:read_offset]; None: not decoded yet
        self._single = {} if single is None else single
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of self.text already returned
        self.stop = [s for s in (stop or []) if s]
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if len(ids) == 1:
            text = self._single.get(ids[0])
            if text is None:
                text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if len(self._single) < SINGLE_CACHE_MAX:
                    self._single[ids[0]] = text
            return text
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _prefix_text(self) -> str:
        if self._prefix is None:
            self._prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._prefix

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be shown now."""
        self.ids.append(token_id)
        prefix = self._prefix_text()
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix = None
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever is left (an incomplete character decodes as U+FFFD, as HF does)."""
        if self.read_offset < len(self.ids):
            prefix = self._prefix_text()
            full = self._decode(self.ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
            self._prefix = None
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            # A stop string may straddle the emitted boundary; search from just before it.
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                self.text = self.text[:at]
                out = self.text[self.emitted :]
                self.emitted = len(self.text)
                return out
        end = len(self.text)
        if not final:
            # Hold back a tail that could be the start of a stop string.
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
