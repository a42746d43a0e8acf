"""Greedy output of the mesh equals transformers' generate(), token for token, for several
tiny configs and every kind of layer split."""

from __future__ import annotations

import pytest
import torch
from meshutil import image_prompts, images_of, kv_log, reference, start_mesh

from services.common import tensors
from vlmesh.v1 import coordinator_pb2 as cpb

MAX_NEW = 10

SPLITS = {
    "a": {  # 4 layers
        "1 stage": [(0, 4)],
        "2 stages": [(0, 2), (2, 4)],
        "3 uneven": [(0, 1), (1, 3), (3, 4)],
        "layer per stage": [(0, 1), (1, 2), (2, 3), (3, 4)],
    },
    "b": {"2 uneven": [(0, 3), (3, 5)], "layer per stage": [(i, i + 1) for i in range(5)]},  # 5 layers, untied
    "c": {"1 stage": [(0, 3)], "3 stages": [(0, 1), (1, 2), (2, 3)]},  # 3 layers, 1 KV head
}
CASES = [(m, name) for m, splits in SPLITS.items() for name in splits]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{n}" for m, n in CASES])
def mesh(request, tiny_models):
    model, name = request.param
    m = start_mesh(tiny_models[model], SPLITS[model][name])
    m.model_dir = tiny_models[model]
    yield m
    m.stop()


@pytest.mark.parametrize("prompt", ["text", "one image", "two images"])
def test_single_turn_matches_generate(mesh, images, prompt):
    messages = image_prompts(images)[prompt]
    ref = reference(mesh.model_dir)
    expected, _ = ref.generate_ids(ref.prompt_ids(messages), images_of(messages), MAX_NEW)
    got, _, last = mesh.generate(messages, max_tokens=MAX_NEW)
    assert got == expected
    assert last.usage.completion_tokens == len(expected)


def test_three_turn_session_matches_generate_on_whole_conversation(mesh, images):
    ref = reference(mesh.model_dir)
    turns = [
        [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "And what colour is it?"}],
        [{"role": "user", "content": [{"type": "image", "image": images["tall"]}, {"type": "text", "text": "Now this one?"}]}],
    ]
    session_id = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    history: list[dict] = []
    ids: list[int] = []
    all_images = []
    for i, new in enumerate(turns):
        cached = max(len(ids) - 1, 0)  # the last generated token has not been fed yet
        ids = ref.prompt_ids(new) if i == 0 else ids + ref.continuation_ids(history, new, ids[-1])
        all_images += images_of(new)
        expected, _ = ref.generate_ids(ids, all_images, MAX_NEW)
        got, text, last = mesh.generate(new, session_id=session_id, max_tokens=MAX_NEW)
        assert got == expected, f"turn {i + 1}"
        assert (last.usage.cached_tokens, last.usage.prompt_tokens) == (cached, len(ids) - cached)
        ids = ids + expected
        history += new + [{"role": "assistant", "content": text}]


def test_kv_log_equals_generate_past_key_values(mesh, images):
    ref = reference(mesh.model_dir)
    messages = image_prompts(images)["one image"]
    _, out = ref.generate_ids(ref.prompt_ids(messages), images_of(messages), MAX_NEW)
    sid = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    mesh.generate(messages, session_id=sid, max_tokens=MAX_NEW)
    log = kv_log(mesh.channel, sid)
    cache = out.past_key_values
    assert sorted(log) == list(range(len(cache.layers)))
    for layer, d in log.items():
        k, v = tensors.from_proto(d.key, "k"), tensors.from_proto(d.value, "v")
        ref_k, ref_v = cache.layers[layer].keys[0].cpu(), cache.layers[layer].values[0].cpu()  # [H, L, D]
        assert k.shape == ref_k.shape
        torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=0)
