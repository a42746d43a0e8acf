"""Chat template and tokenisation with the checkpoint's own processor.

A session's token history is the truth: a follow-up turn tokenises only the text the chat
template adds for the new messages (the template rendered over the whole conversation, minus
its rendering of the conversation so far), so the stages' KV is reused as it is."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.errors import InvalidInput

_SENTINEL = "\ue000"  # a private-use character no template emits, marks where content goes


@dataclass
class Turn:
    """The new part of a conversation: text segment and the images it references, in order."""

    token_ids: list[int]  # [T]
    images: list[bytes]
    num_image_tokens: list[int] = field(default_factory=list)


def to_template_messages(messages: list[dict]) -> list[dict]:
    """Our messages hold image bytes; the template only needs to see that an image is there."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if c["type"] == "image" else {"type": "text", "text": c["text"]} for c in content]
        out.append({"role": m["role"], "content": content})
    return out


class PromptBuilder:
    def __init__(self, processor, eos_token_ids: list[int]):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_token_ids = eos_token_ids
        if processor.chat_template is None:
            raise ValueError("the checkpoint has no chat template")
        # What the template writes after an assistant message's content (e.g. "<|im_end|>\n").
        probe = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], False)
        self.assistant_closing = probe[probe.index(_SENTINEL) + 1 :]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            to_template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def new_text(self, history: list[dict], new: list[dict]) -> str:
        """The template's text for `new`, given the conversation `history` already rendered."""
        full = self.render(history + new, add_generation_prompt=True)
        if not history:
            return full
        before = self.render(history, add_generation_prompt=False)
        if not full.startswith(before):
            raise InvalidInput("the chat template does not render this conversation incrementally")
        return full[len(before) :]

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

    def tokenize(self, text: str, grids: list[tuple[int, int, int]], first_turn: bool) -> list[int]:
        """Expand each image placeholder to t*h*w/merge² tokens with the processor's own
        replacement, then tokenise."""
        p = self.processor
        n_placeholders = text.count(p.image_token)
        if n_placeholders != len(grids):
            raise InvalidInput(f"{n_placeholders} image placeholders in the prompt but {len(grids)} images")
        if grids:
            import torch

            inputs = {"image_grid_thw": torch.tensor(grids)}
            replacements = [p.replace_image_token(inputs, i) for i in range(len(grids))]
            text = p.get_text_with_replacements([text], replacements)[0][0]
        # The first turn is tokenised exactly as the processor would; a continuation must not get
        # a second set of special tokens (Qwen adds none, other templates might).
        return self.tokenizer(text, add_special_tokens=first_turn)["input_ids"]
