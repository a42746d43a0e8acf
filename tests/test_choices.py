"""n > 1 continuations of one prompt (GenerateRequest.n): one prefill, the stages fork its KV, and
continuation i is sampled with seed + i, so each equals the single request with that seed token
for token (the forked KV is the prompt's, exactly). Greedy continuations are alike. Through the
gateway (`vlmesh up`, the real `openai` SDK): `n` choices, streamed as not."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest
from meshutil import start_mesh, to_proto, vlmesh_up

from services.cli import DEMO_IMAGE
from services.shapes import SHIPPED_MODEL
from services.stage.backend import StageBackend
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import tensor_pb2

PICTURE = [{"role": "user", "content": [{"type": "image", "image": DEMO_IMAGE.read_bytes()}, {"type": "text", "text": "What is in the picture?"}]}]
MODEL_ID = SHIPPED_MODEL.name


@pytest.fixture(scope="module")
def mesh():
    # No prefix cache: a single request after the n > 1 one prefills on its own, as it would alone.
    m = start_mesh(SHIPPED_MODEL, [(0, 2), (2, 4)], coord_kw={"prefix_cache_sessions": 0})
    yield m
    m.stop()


@pytest.fixture
def prefills(monkeypatch) -> list[int]:
    """The sizes of the multi-token steps (prompt chunks) the stages run, first stage only."""
    seen: list[int] = []
    lock = threading.Lock()
    run = StageBackend.run

    def counting(self, steps):
        if self.is_first:
            with lock:
                seen.extend(s.num_tokens for s in steps if not isinstance(s, Exception) and s.num_tokens > 1)
        return run(self, steps)

    monkeypatch.setattr(StageBackend, "run", counting)
    return seen


def choices(mesh, n: int, **sampling) -> dict[int, tuple[list[int], str, cpb.GenerateResponse]]:
    req = cpb.GenerateRequest(messages=to_proto(PICTURE), sampling=tensor_pb2.SamplingParams(**sampling), max_tokens=12, n=n)
    out: dict[int, tuple[list[int], str, cpb.GenerateResponse | None]] = {}
    for r in mesh.stub.Generate(req, timeout=120):
        ids, text, _ = out.get(r.index, ([], "", None))
        out[r.index] = (ids + list(r.token_ids), text + r.text, r)
    return out  # type: ignore[return-value]


def test_sampled_continuations_equal_single_requests_with_their_seeds_after_one_prefill(mesh, prefills):
    got = choices(mesh, 3, temperature=2.0, seed=40)
    assert sorted(got) == [0, 1, 2]
    forked = len(prefills)
    assert forked == 1, prefills  # one prefill for the three
    for i, (ids, text, last) in got.items():
        assert last.finish_reason in (cpb.FINISH_REASON_STOP, cpb.FINISH_REASON_LENGTH)
        alone, alone_text, _ = mesh.generate(PICTURE, sampling=tensor_pb2.SamplingParams(temperature=2.0, seed=40 + i), max_tokens=12)
        assert (ids, text) == (alone, alone_text), i
    assert len({tuple(ids) for ids, _, _ in got.values()}) > 1  # the seeds do differ
    assert len(prefills) == forked + 3  # each single request prefilled on its own


def test_greedy_continuations_are_alike_and_usage_counts_the_prompt_in_each(mesh):
    got = choices(mesh, 2)
    (a, ta, la), (b, tb, lb) = got[0], got[1]
    alone, text, last = mesh.generate(PICTURE, max_tokens=12)
    assert a == b == alone and ta == tb == text
    assert (la.usage.prompt_tokens, la.usage.cached_tokens) == (lb.usage.prompt_tokens, lb.usage.cached_tokens)
    assert la.usage.prompt_tokens + la.usage.cached_tokens == last.usage.prompt_tokens + last.usage.cached_tokens  # the whole prompt
    assert la.usage.completion_tokens == lb.usage.completion_tokens == len(alone)


@pytest.mark.parametrize("kw", [{"n": 17}, {"n": -1}, {"n": 2, "session_id": "x"}])
def test_bad_n_is_invalid_argument(mesh, kw):
    import grpc

    req = cpb.GenerateRequest(messages=to_proto(PICTURE), max_tokens=4, **kw)
    with pytest.raises(grpc.RpcError) as info:
        list(mesh.stub.Generate(req, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with vlmesh_up(SHIPPED_MODEL, tmp_path_factory.mktemp("choices-logs"), "--openai-port", "0") as addresses:
        yield openai.OpenAI(base_url=addresses["openai"] + "/v1", api_key="sk-unused", max_retries=0, timeout=120)


def test_gateway_n_choices_stream_as_they_come_whole(sdk):
    kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Tell me about shapes."}], n=3, temperature=1.0, seed=7, max_tokens=16)
    whole = sdk.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = {c.index: c.message.content for c in whole.choices}
    streamed: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    for chunk in sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert streamed == texts and set(finished) == {0, 1, 2}
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens
    done = sdk.completions.create(model=MODEL_ID, prompt="The picture shows", n=2, temperature=1.0, seed=3)
    assert [c.index for c in done.choices] == [0, 1]
