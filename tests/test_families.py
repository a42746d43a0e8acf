"""Every family served by the mesh: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (DeepStack) and Qwen3-VL-MoE.
Greedy output equals transformers' generate() token for token on text, images, videos (a file, or
frames) and an image with a video, at 1, 2 and 3 stages, and over multi-turn sessions with video.
Both multi-stage splits put DeepStack's layers 0 and 1 on different stages (the 3-stage one on a
middle stage, which then gets token ids only for that). Bad videos are INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import mp4, png
from meshutil import forward_once, image_prompts, images_of, kv_log, reference, start_mesh, videos_of

from services.common import tensors
from services.common.tensors import from_proto
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import coordinator_pb2 as cpb

MAX_NEW = 8
FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe"]
SPLITS = {  # 4 decoder layers; Qwen3 families add DeepStack features after layers 0 and 1
    "1 stage": [(0, 4)],
    "2 stages": [(0, 1), (1, 4)],
    "3 stages": [(0, 1), (1, 2), (2, 4)],
}
CASES = [(f, s) for f in FAMILIES for s in SPLITS]
# Vision limits the bad-video tests run into (the good inputs stay well inside them).
LIMITS = {"max_video_seconds": 20.0, "max_image_pixels": 160 * 160}


def pytest_generate_tests(metafunc):
    """Every test runs on every (family, split) unless it names its own with @cases(...): one
    mesh per case is started once for the module and shared by all tests that run on it."""
    if "mesh" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("cases")
        chosen = marker.args[0] if marker else CASES
        metafunc.parametrize("mesh", chosen, ids=[f"{f}-{s.replace(' ', '')}" for f, s in chosen], indirect=True, scope="module")


def cases(chosen: list[tuple[str, str]]):
    return pytest.mark.cases(chosen)


@pytest.fixture(scope="module")
def mesh(request, family_model):
    family, split = request.param
    model = family_model(family)
    m = start_mesh(model, SPLITS[split], vision_kw=LIMITS)
    m.model_dir, m.family, m.split = model, family, split
    yield m
    m.stop()


def frames(n: int, seed: int) -> list[bytes]:
    return [png(64, 48, seed + i) for i in range(n)]


def prompts(images, videos) -> dict[str, list[dict]]:
    return {
        **image_prompts(images),
        "one video": [{"role": "user", "content": [{"type": "video", "video": videos["short"]}, {"type": "text", "text": "What happens?"}]}],
        "image and video": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images["square"]},
                    {"type": "text", "text": "then"},
                    {"type": "video", "video": videos["other"]},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        "video frames": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": frames(4, 10), "fps": 3.0},
                    {"type": "text", "text": "Describe the video."},
                ],
            }
        ],
    }


_EXPECTED: dict[tuple[str, str], list[int]] = {}


def expected(mesh, prompt: str, messages: list[dict]) -> list[int]:
    """generate()'s tokens, computed once per family and prompt (the same for every split)."""
    key = (str(mesh.model_dir), prompt)
    if key not in _EXPECTED:
        ref = reference(mesh.model_dir)
        _EXPECTED[key], _ = ref.generate_ids(ref.prompt_ids(messages), images_of(messages), MAX_NEW, videos=videos_of(messages))
    return _EXPECTED[key]


@pytest.mark.parametrize("prompt", ["text", "one image", "two images", "one video", "image and video", "video frames"])
def test_single_turn_matches_generate(mesh, images, videos, prompt):
    messages = prompts(images, videos)[prompt]
    want = expected(mesh, prompt, messages)
    got, _, last = mesh.generate(messages, max_tokens=MAX_NEW)
    assert got == want
    assert last.usage.completion_tokens == len(want)


def test_session_with_video_matches_generate_on_whole_conversation(mesh, images, videos):
    """Each turn continues on the stages' KV with the session's rope delta; it must equal
    generate() over the whole conversation (a video turn, a text turn, an image + video turn)."""
    ref = reference(mesh.model_dir)
    turns = [
        [{"role": "user", "content": [{"type": "video", "video": videos["short"]}, {"type": "text", "text": "What happens?"}]}],
        [{"role": "user", "content": "And what colour is it?"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images["tall"]},
                    {"type": "video", "video": videos["other"]},
                    {"type": "text", "text": "Now these?"},
                ],
            }
        ],
    ]
    session_id = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    history: list[dict] = []
    ids: list[int] = []
    for i, new in enumerate(turns):
        cached = max(len(ids) - 1, 0)  # the last generated token has not been fed yet
        ids = ref.prompt_ids(new) if i == 0 else ids + ref.continuation_ids(history, new, ids[-1])
        history += new
        want, _ = ref.generate_ids(ids, images_of(history), MAX_NEW, videos=videos_of(history))
        got, text, last = mesh.generate(new, session_id=session_id, max_tokens=MAX_NEW)
        assert got == want, f"turn {i + 1}"
        assert (last.usage.cached_tokens, last.usage.prompt_tokens) == (cached, len(ids) - cached)
        ids = ids + want
        history.append({"role": "assistant", "content": text})
    mesh.stub.CloseSession(cpb.CloseSessionRequest(session_id=session_id))


def ask_video(video) -> list[dict]:
    part = {"type": "video", "video": video}
    return [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]


BAD_VIDEOS = {
    "garbage": (b"\x00\x00\x00\x18ftypmp42 but nothing else", "not a readable video"),
    "webm": (lambda: mp4(4, 32, 32, 4, 2, container="webm", codec="libvpx"), "does not record its frame count"),
    "too long": (lambda: mp4(50, 16, 16, 2, 3), "more than the limit of 20 s"),
    "one frame": (lambda: mp4(1, 64, 48, 4, 5), "needs at least 2"),
    "frames too large": (lambda: mp4(2, 192, 160, 4, 4), "exceed the limit"),
    "frames of two sizes": ([png(64, 48, 1), png(48, 64, 2)], "differ in size"),
    "a frame not an image": ([png(64, 48, 1), b"no picture"], "not a readable image"),
}


@cases([(f, "1 stage") for f in FAMILIES])  # the vision service is the same at every split
@pytest.mark.parametrize("bad", list(BAD_VIDEOS))
def test_bad_video_is_invalid_argument(mesh, images, videos, bad):
    video, words = BAD_VIDEOS[bad]
    video = video() if callable(video) else video
    with pytest.raises(grpc.RpcError) as err:
        mesh.generate(ask_video(video), max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    ids, _, _ = mesh.generate(ask_video(videos["short"]), max_tokens=2)  # still serves
    assert len(ids) == 2


@cases([("qwen3-vl", "3 stages"), ("qwen3-vl-moe", "3 stages")])  # a middle stage owns DeepStack layer 1
def test_deepstack_goes_only_where_it_belongs(mesh):
    """A stage refuses a visual step without its layers' DeepStack features, and features for a
    layer it does not own: a wrong coordinator fails loudly instead of drifting."""
    cfg = reference(mesh.model_dir).model.config
    step = dict(
        session_id="direct",
        visual_spans=[stage_pb2.Span(start=1, length=2)],
        position_ids=tensors.to_proto(torch.zeros(3, 4, dtype=torch.long)),
        hidden_states=tensors.to_proto(torch.zeros(4, cfg.text_config.hidden_size)),
    )
    out = forward_once(mesh.stages[1].address, stage_pb2.StepInput(**step))  # the middle stage owns layer 1
    assert out.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no deepstack features for layers [1]" in out.status.message
    feature = stage_pb2.DeepstackFeature(layer=0, embeds=tensors.to_proto(torch.zeros(2, cfg.text_config.hidden_size)))
    out = forward_once(mesh.stages[2].address, stage_pb2.StepInput(**step, deepstack=[feature]))  # the last stage (2:4) owns none
    assert out.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "layers [0]" in out.status.message


@cases([("qwen3-vl-moe", "3 stages")])
def test_stage_reads_only_its_own_experts(mesh):
    """Qwen3-VL-MoE: a stage loads the (hub-transposed) experts of its own layers and no others."""
    from services.common.checkpoint import open_checkpoint
    from services.stage.model import StageModel

    ckpt = open_checkpoint(mesh.model_dir)
    stage = StageModel(ckpt, 1, 2, torch.float32)
    experts = {n for n in stage.state_dict() if ".experts." in n}
    assert experts == {"layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"}  # global layer 1
    ref = reference(mesh.model_dir).model.model.language_model.layers[1].mlp.experts
    torch.testing.assert_close(stage.layers[0].mlp.experts.gate_up_proj, ref.gate_up_proj.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(stage.layers[0].mlp.experts.down_proj, ref.down_proj.cpu(), rtol=0, atol=0)
    whole = sum(p.numel() * p.element_size() for p in reference(mesh.model_dir).model.model.language_model.parameters())
    assert stage.weight_bytes() < whole / 3


@cases([("qwen3-vl", "1 stage")])
def test_client_library_sends_video_paths_and_frames(mesh, images, videos, tmp_path):
    """The client's {"type": "video", "video": path | [frames]} parts, end to end."""
    from vlmesh import Client

    path = tmp_path / "clip.mp4"
    path.write_bytes(videos["short"])
    frame_paths = []
    for i, data in enumerate(prompts(images, videos)["video frames"][0]["content"][0]["video"]):
        frame_paths.append(tmp_path / f"frame{i}.png")
        frame_paths[-1].write_bytes(data)
    with Client(mesh.address) as client:
        got = client.chat(
            [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "What happens?"}]}],
            max_tokens=MAX_NEW,
        )
        assert got.token_ids == expected(mesh, "one video", prompts(images, videos)["one video"])
        got = client.chat(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": [str(p) for p in frame_paths], "fps": 3.0},
                        {"type": "text", "text": "Describe the video."},
                    ],
                }
            ],
            max_tokens=MAX_NEW,
        )
        assert got.token_ids == expected(mesh, "video frames", prompts(images, videos)["video frames"])


@cases([(f, "3 stages") for f in FAMILIES])  # once per family, on the most split mesh
def test_kv_log_equals_generate_past_key_values(mesh, images, videos):
    """The KV deltas of an image + video prefill (DeepStack included) are generate()'s cache."""
    ref = reference(mesh.model_dir)
    messages = prompts(images, videos)["image and video"]
    _, out = ref.generate_ids(ref.prompt_ids(messages), images_of(messages), MAX_NEW, videos=videos_of(messages))
    sid = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    mesh.generate(messages, session_id=sid, max_tokens=MAX_NEW)
    log = kv_log(mesh.channel, sid)
    cache = out.past_key_values
    assert sorted(log) == list(range(len(cache.layers)))
    for layer, d in log.items():
        torch.testing.assert_close(from_proto(d.key, "k"), cache.layers[layer].keys[0].cpu(), atol=1e-5, rtol=0)
        torch.testing.assert_close(from_proto(d.value, "v"), cache.layers[layer].values[0].cpu(), atol=1e-5, rtol=0)
    mesh.stub.CloseSession(cpb.CloseSessionRequest(session_id=sid))
