"""Incremental detokenisation with stop strings: text deltas never split a UTF-8 character and
never show a stop string (or the part of one that may still be completing)."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    """What the detokenizer needs of a transformers tokenizer."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """The windowed scheme vLLM uses: decode a short window of recent tokens and emit what it
    adds over the window without the newest token, holding back replacement characters that mean
    a multi-byte character is still incomplete."""

    def __init__(self, tokenizer: Decoder, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of self.text already returned
        self.stop = [s for s in (stop or []) if s]
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be shown now."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever is left (an incomplete character decodes as U+FFFD, as HF does)."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
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
