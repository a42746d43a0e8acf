"""Token strings and bytes for OpenAI's logprobs, from the checkpoint's tokenizer.json.

The coordinator returns token ids only; OpenAI's logprobs carry each token's text and its UTF-8
bytes. A byte-level BPE token (every Qwen tokenizer) is a string over GPT-2's byte alphabet, which
maps back to the exact bytes, also for tokens that hold part of a multi-byte character.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


class TokenPieces:
    """`piece(id)`: (display string, bytes) of one token."""

    def __init__(self, model_dir: str) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        self._tokenizer = Tokenizer.from_file(path)
        with open(path, encoding="utf-8") as f:
            decoder = json.load(f).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        # Added tokens (<|im_end|>, ...) are stored as their literal text, not in byte alphabet.
        self._added = {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        token = self._tokenizer.id_to_token(token_id)
        if token is None:  # past the vocabulary (padded embedding rows): never sampled
            return b""
        if self._byte_level and all(c in self._byte_of for c in token):
            return bytes(self._byte_of[c] for c in token)
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def piece(self, token_id: int) -> tuple[str, bytes]:
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8"), data
        except UnicodeDecodeError:
            # Part of a character: OpenAI shows such tokens as "bytes:\xNN..." with the real bytes.
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data
