"""Chat template and tokenisation with the checkpoint's own processor.

A session's token history is the truth: a follow-up turn tokenises only the text the chat
template adds for the new messages (the template rendered over the whole conversation, minus
its rendering of the conversation so far), so the stages' KV is reused as it is."""

from __future__ import annotations

from services.common.errors import InvalidInput

from .visual import Visual, images, videos

_SENTINEL = "\ue000"  # a private-use character no template emits, marks where content goes


def to_template_messages(messages: list[dict]) -> list[dict]:
    """The template only needs to see that an image or a video is there, not its bytes."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": c["type"]} if c["type"] in ("image", "video") else {"type": "text", "text": c["text"]} for c in content]
        out.append({"role": m["role"], "content": content})
    return out


class PromptBuilder:
    def __init__(self, processor, eos_token_ids: list[int]):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_token_ids = eos_token_ids
        if processor.chat_template is None:
            raise ValueError("the checkpoint has no chat template")
        # The tokens whose positions take visual rows. Which positions do is decided here, from
        # the prompt as built; a generated token with one of these ids is an ordinary token.
        self.placeholder_ids = {
            self.tokenizer.convert_tokens_to_ids(t) for t in (processor.image_token, getattr(processor, "video_token", None)) if t
        }
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

    def tokenize(self, text: str, visuals: list[Visual], first_turn: bool) -> list[int]:
        """Expand each image and video placeholder with the processor's own replacement (images:
        t*h*w/merge² tokens; Qwen3-VL videos: per frame a timestamp and its tokens), then tokenise."""
        import torch

        p = self.processor
        imgs, vids = images(visuals), videos(visuals)
        for what, token, items in (("image", p.image_token, imgs), ("video", p.video_token, vids)):
            if text.count(token) != len(items):
                raise InvalidInput(f"{text.count(token)} {what} placeholders in the prompt but {len(items)} {what}s")
        if visuals:
            image_inputs = {"image_grid_thw": torch.tensor([v.grid_thw for v in imgs])}
            video_inputs = {"video_grid_thw": torch.tensor([v.grid_thw for v in vids]), "video_metadata": [v.metadata() for v in vids]}
            image_repl = [p.replace_image_token(image_inputs, i) for i in range(len(imgs))]
            video_repl = [p.replace_video_token(video_inputs, i) for i in range(len(vids))]
            text = p.get_text_with_replacements([text], image_repl, video_repl)[0][0]
        # The first turn is tokenised exactly as the processor would; a continuation must not get
        # a second set of special tokens (Qwen adds none, other templates might).
        return self.tokenizer(text, add_special_tokens=first_turn)["input_ids"]
