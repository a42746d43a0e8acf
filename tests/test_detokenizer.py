"""Incremental detokenisation: never a broken UTF-8 character, stop strings never shown."""

from __future__ import annotations

import pytest

from services.coordinator.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["a"])


def stream(tokenizer, ids, stop=None):
    d = IncrementalDetokenizer(tokenizer, stop)
    parts = [d.push(i) for i in ids]
    parts.append(d.flush())
    return parts, d


def test_multibyte_characters_arrive_whole(tokenizer):
    text = "héllo 中文 🙂 naïve — done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level pieces split characters
    parts, _ = stream(tokenizer, ids)
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    text = "a red circle. STOP and a blue square"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    parts, d = stream(tokenizer, ids, stop=["STOP"])
    assert "".join(parts) == "a red circle. "
    assert d.stopped
    assert not any("S" in p for p in parts)  # not even the start of the stop string leaked


def test_held_back_prefix_released_when_it_is_not_a_stop(tokenizer):
    text = "one STOne two"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    parts, d = stream(tokenizer, ids, stop=["STOP"])
    assert "".join(parts) == text and not d.stopped


def test_special_tokens_are_not_shown(tokenizer):
    ids = tokenizer("hi", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    parts, _ = stream(tokenizer, ids)
    assert "".join(parts) == "hi"
