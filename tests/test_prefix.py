"""Automatic prefix caching, for every client: a one-shot request whose tokens start with the
tokens (and pictures) of KV the stages hold feeds only the rest, reports the reused tokens, and
answers exactly as generate() on the whole conversation. Parked prefixes give their KV back when
the stages run out of room."""

from __future__ import annotations

import pytest
from conftest import png
from meshutil import images_of, reference, stage_info, start_mesh

from vlmesh.v1 import coordinator_pb2 as cpb

MAX_NEW = 10


@pytest.fixture(scope="module")
def mesh(tiny_models):
    m = start_mesh(tiny_models["a"], [(0, 2), (2, 4)])
    m.model_dir = tiny_models["a"]
    yield m
    m.stop()


@pytest.fixture(scope="module")
def shapes_mesh():
    from services.shapes import SHIPPED_MODEL

    m = start_mesh(SHIPPED_MODEL, [(0, 2), (2, 4)])
    m.model_dir = SHIPPED_MODEL
    yield m
    m.stop()


def test_a_stateless_conversation_reuses_the_previous_turns_kv(shapes_mesh):
    """4 turns, each sending the whole conversation (as OpenAI's API does). The shipped shapes
    model, whose answers tokenise back to the tokens it generated, so "the previous conversation"
    is a token prefix of the next prompt (a random model's answers need not be: then the reuse
    stops where the re-tokenised answer differs, as in vLLM)."""
    from services.cli import DEMO_IMAGE

    mesh = shapes_mesh
    ref = reference(mesh.model_dir)
    image = DEMO_IMAGE.read_bytes()
    questions = ["What is in this picture?", "How many shapes are there?", "What colour is the star?", "Where is the circle?"]
    history: list[dict] = []
    fed_before: list[int] = []
    for turn, q in enumerate(questions, start=1):
        history.append(
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]}
            if turn == 1
            else {"role": "user", "content": q}
        )
        prompt = ref.prompt_ids(history)
        expected = ref.generate_ids(prompt, images_of(history), 24)[0]
        got, text, last = mesh.generate(history, max_tokens=24)  # one-shot: the whole conversation
        assert got == expected, f"turn {turn}"
        assert last.usage.prompt_tokens + last.usage.cached_tokens == len(prompt)
        if turn > 1:
            assert prompt[: len(fed_before)] == fed_before, "the answer did not tokenise back to itself"
            assert last.usage.cached_tokens >= len(fed_before), f"turn {turn}: {last.usage.cached_tokens} cached of {len(fed_before)}"
        fed_before = prompt + got[:-1]  # the last token was sampled, never fed
        history.append({"role": "assistant", "content": text})


def test_another_picture_is_not_a_prefix(mesh, images):
    """Same tokens, another picture (its placeholders are the same ids): nothing from the picture
    on is reused; the same picture again is."""
    ref = reference(mesh.model_dir)

    def ask(image: bytes) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "And this one?"}]}]

    mesh.generate(ask(images["square"]), max_tokens=MAX_NEW)
    other = ask(png(64, 64, 99))  # the same size: the same placeholder tokens
    prompt = ref.prompt_ids(other)
    got, _, last = mesh.generate(other, max_tokens=MAX_NEW)
    assert got == ref.generate_ids(prompt, images_of(other), MAX_NEW)[0]
    picture = prompt.index(ref.model.config.vision_start_token_id) + 1  # its first placeholder
    assert last.usage.cached_tokens <= picture
    mesh.generate(ask(images["square"]), max_tokens=MAX_NEW)  # reuses `other`'s text prefix only
    _, _, last = mesh.generate(ask(images["square"]), max_tokens=MAX_NEW)
    assert last.usage.cached_tokens > picture  # the same picture again: reused past it


def test_parked_prefixes_give_their_kv_back_when_the_stages_are_full(tiny_models):
    """1 MiB per stage holds 8 sessions' first block: 20 different one-shot requests all succeed
    (parked prefixes are evicted to make room), each equal to generate(), and parked KV never
    exceeds the budget."""
    ref = reference(tiny_models["a"])
    m = start_mesh(tiny_models["a"], [(0, 2), (2, 4)], stage_kw={"kv_budget_mb": 1})
    try:
        for i in range(20):
            p = [{"role": "user", "content": f"Request number {i}: tell me about shape {i * 7}."}]
            got, _, _ = m.generate(p, max_tokens=6)
            assert got == ref.generate_ids(ref.prompt_ids(p), [], 6)[0]
            assert all(stage_info(s.address).kv_used_bytes <= 1 << 20 for s in m.stages)
        status = m.stub.GetMeshStatus(cpb.GetMeshStatusRequest())
        assert max(r.num_sessions for r in status.stages) <= 8
    finally:
        m.stop()
