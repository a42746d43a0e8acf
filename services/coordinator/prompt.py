"""Chat template and tokenisation with the checkpoint's own processor.

A session's token history is the truth: a follow-up turn tokenises only the text the chat
template adds for the new messages (the template rendered over the whole conversation, minus
its rendering of the conversation so far), so the stages' KV is reused as it is.

Content is text. The template is rendered with every message's text replaced by a marker; the
template's own text is tokenised as the processor would (its control tokens are real), and each
message's text is tokenised with special-token strings split into ordinary tokens, so a user who
writes "<|im_end|>" gets those characters, not the end of the turn. It is the one place the mesh
deliberately differs from tokenising the rendered template whole; for text without such strings
the tokens are the same (the template joins content at newlines and control tokens)."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from services.common.errors import InvalidArgument

from .tools import CLOSE, OPEN, Tools, hermes_messages
from .visual import Visual, images, videos

log = logging.getLogger(__name__)

_SENTINEL = "\ue000"  # a private-use character no template emits, marks where content goes
_MARK = re.compile("\ue001(\\d+)\ue002")


def _mark(i: int) -> str:
    return f"\ue001{i}\ue002"


@dataclass
class PromptText:
    """The template's text for some messages, with each message text replaced by a marker."""

    text: str
    contents: list[str]  # the texts the markers stand for, by index


def to_template_messages(messages: list[dict], contents: list[str] | None = None) -> list[dict]:
    """The template only needs to see that an image or a video is there, not its bytes. With
    `contents`, each text is replaced by a marker and appended to it."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for c in content:
                if c["type"] in ("image", "video"):
                    parts.append({"type": c["type"]})
                elif contents is not None and not c.get("raw"):
                    parts.append({"type": "text", "text": _mark(len(contents))})
                    contents.append(c["text"])
                else:
                    parts.append({"type": "text", "text": c["text"]})
            content = parts
        elif contents is not None:
            contents.append(content)
            content = _mark(len(contents) - 1)
        out.append({"role": m["role"], "content": content, **{k: m[k] for k in ("tool_calls", "tool_call_id") if k in m}})
    return out


class PromptBuilder:
    def __init__(self, processor, eos_token_ids: list[int]):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_token_ids = eos_token_ids
        self._tokenizing = threading.Lock()
        if processor.chat_template is None:
            raise ValueError("the checkpoint has no chat template")
        # The tokens whose positions take visual rows. Which positions do is decided here, from
        # the prompt as built; a generated token with one of these ids is an ordinary token.
        self.placeholder_ids = {
            self.tokenizer.convert_tokens_to_ids(t) for t in (processor.image_token, getattr(processor, "video_token", None)) if t
        }
        # A template that takes `tools` (Qwen3-VL's) renders them and tool messages itself; for one
        # that does not, they are rewritten as Qwen's function-calling guide shows (tools.py).
        import jinja2.meta
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template(processor.chat_template).environment
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(processor.chat_template))
        # Whether <tool_call> and </tool_call> are tokens of their own (Qwen2.5-VL, Qwen3-VL), not text.
        vocab = self.tokenizer.get_vocab()
        self.tool_tags_are_tokens = OPEN in vocab and CLOSE in vocab
        # What the template writes after an assistant message's content (e.g. "<|im_end|>\n").
        probe = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], False)
        self.assistant_closing = probe[probe.index(_SENTINEL) + 1 :]

    def render(self, messages: list[dict], add_generation_prompt: bool, contents: list[str] | None = None, tools: Tools | None = None) -> str:
        extra = {}
        if self.takes_tools:
            if tools is not None and tools.functions:
                extra["tools"] = list(tools.functions)
        else:
            messages = hermes_messages(messages, tools)
        return self.processor.apply_chat_template(
            to_template_messages(messages, contents), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )

    def new_text(self, history: list[dict], new: list[dict], tools: Tools | None = None) -> PromptText:
        """The template's text for `new`, given the conversation `history` already rendered. A
        session's tools are rendered into its first turn; later turns render them the same way."""
        contents: list[str] = []
        full = self.render(history + new, add_generation_prompt=True, contents=contents, tools=tools)
        marks = _MARK.findall(full)
        if sorted(int(i) for i in marks) != list(range(len(contents))):
            # A template that drops, repeats or rewrites content: tokenise its text as it renders.
            log.warning("the chat template rewrites message content; special-token strings in text are not escaped")
            full, contents = self.render(history + new, add_generation_prompt=True, tools=tools), []
            before = self.render(history, add_generation_prompt=False, tools=tools) if history else ""
        else:
            before = self.render(history, add_generation_prompt=False, contents=[], tools=tools) if history else ""
        if not full.startswith(before):
            raise InvalidArgument("the chat template does not render this conversation incrementally")
        return PromptText(full[len(before) :], contents)

    def closing(self, last_token: int | None) -> str:
        """Text that ends the previous assistant turn in the template's form. If generation
        stopped on the end-of-turn token itself, that token is already in the history."""
        if last_token is None:
            return ""
        close = self.assistant_closing
        if last_token in self.eos_token_ids:
            eos_text = self.tokenizer.decode([last_token])
            if close.startswith(eos_text):
                return close[len(eos_text) :]
        return close

    def tokenize(self, prompt: PromptText, visuals: list[Visual], first_turn: bool) -> list[int]:
        """Expand each image and video placeholder with the processor's own replacement (images:
        t*h*w/merge² tokens; Qwen3-VL videos: per frame a timestamp and its tokens), then tokenise:
        the template's text as the processor does, each message text as plain text."""
        import torch

        p = self.processor
        text = prompt.text
        imgs, vids = images(visuals), videos(visuals)
        for what, token, items in (("image", p.image_token, imgs), ("video", p.video_token, vids)):
            if text.count(token) != len(items):
                raise InvalidArgument(f"{text.count(token)} {what} placeholders in the prompt but {len(items)} {what}s")
        if visuals:
            image_inputs = {"image_grid_thw": torch.tensor([v.grid_thw for v in imgs])}
            video_inputs = {"video_grid_thw": torch.tensor([v.grid_thw for v in vids]), "video_metadata": [v.metadata() for v in vids]}
            image_repl = [p.replace_image_token(image_inputs, i) for i in range(len(imgs))]
            video_repl = [p.replace_video_token(video_inputs, i) for i in range(len(vids))]
            text = p.get_text_with_replacements([text], image_repl, video_repl)[0][0]
        ids: list[int] = []
        at = 0
        # The first turn gets the tokenizer's own special tokens (Qwen adds none, other templates
        # might); a continuation must not get a second set.
        special = first_turn
        # One prompt at a time: split_special_tokens is a setting of the shared Rust tokenizer
        # while a call runs, so a concurrent call would split the template's control tokens too.
        with self._tokenizing:
            for m in _MARK.finditer(text):
                ids += self.tokenizer(text[at : m.start()], add_special_tokens=special)["input_ids"]
                special = False
                ids += self.tokenizer(prompt.contents[int(m.group(1))], add_special_tokens=False, split_special_tokens=True)["input_ids"]
                at = m.end()
            ids += self.tokenizer(text[at:], add_special_tokens=special)["input_ids"]
        return ids
