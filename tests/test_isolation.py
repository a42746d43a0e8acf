"""A session's trouble is its own: a generated image placeholder is an ordinary token, one
session over the KV budget is refused alone, a cancelled request gives its KV back at once, and
health answers while the mesh is loaded and a stage is stalled."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshutil import images_of, reference, stage_info, start_mesh, to_proto, wait_until

from services.common.errors import reason_of
from vlmesh.v1 import coordinator_pb2 as cpb

STORY = [{"role": "user", "content": "Tell me a story about a red circle."}]


def favouring_placeholders(out) -> tuple[str, int]:
    """A tiny untied checkpoint whose head favours <|image_pad|> after ordinary text: greedy
    decoding of STORY emits it now and then between ordinary tokens."""
    from safetensors.torch import load_file, save_file

    from services.tiny import make_tiny

    path = make_tiny(out, tie_word_embeddings=False, key_layout="hub", seed=7)
    image_token = json.loads((path / "config.json").read_text())["image_token_id"]
    ref = reference(str(path))
    with torch.inference_mode():
        h = ref.model(input_ids=torch.tensor([ref.prompt_ids(STORY)]), output_hidden_states=True).hidden_states[-1][0]
    direction = h.mean(0) / h.mean(0).norm()
    state = load_file(path / "model.safetensors")
    head = state["lm_head.weight"]
    head[image_token] = head.norm(dim=1).mean() * direction
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    reference.cache_clear()
    return str(path), image_token


@pytest.fixture(scope="module")
def placeholder_mesh(tmp_path_factory):
    path, image_token = favouring_placeholders(tmp_path_factory.mktemp("favour"))
    m = start_mesh(path, [(0, 2), (2, 4)])
    m.model_dir, m.image_token = path, image_token
    yield m
    m.stop()


def run_all(mesh, jobs: list[tuple[list[dict], dict]]) -> list:
    """Generate every (messages, options) at once; the results (token ids or the RpcError)."""
    out: list = [None] * len(jobs)

    def go(i: int) -> None:
        try:
            out[i] = mesh.generate(jobs[i][0], **jobs[i][1])[0]
        except grpc.RpcError as err:
            out[i] = err

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_a_generated_placeholder_is_an_ordinary_token(placeholder_mesh, images):
    mesh = placeholder_mesh
    ref = reference(mesh.model_dir)
    others = [
        [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "Count to ten."}],
    ]
    expected = [ref.generate_ids(ref.prompt_ids(p), images_of(p), 24)[0] for p in [STORY, *others]]
    assert mesh.image_token in expected[0], "the checkpoint no longer makes generate() emit a placeholder"
    got = run_all(mesh, [(STORY, {"max_tokens": 24}), *[(p, {"max_tokens": 24}) for p in others]])
    assert got == expected
    # Sampled, beside greedy sessions in the same batches: no error, reproducible, others untouched.
    sampled = cpb.GenerateRequest().sampling
    sampled.temperature, sampled.seed = 0.8, 11
    jobs = [(STORY, {"max_tokens": 32, "sampling": sampled}), *[(p, {"max_tokens": 24}) for p in others]]
    first, second = run_all(mesh, jobs), run_all(mesh, jobs)
    assert first == second and first[1:] == expected[1:]
    assert mesh.image_token in first[0]


def test_one_session_over_the_kv_budget_fails_alone(tiny_models, images):
    """8 sessions in the same batches; one needs more KV than the stages have. The other 7
    finish token-exact; that one gets RESOURCE_EXHAUSTED / KV_BUDGET_FULL."""
    model = tiny_models["a"]
    ref = reference(model)
    # 1 MiB per stage: ~2k positions of this model (each stage allocates blocks of 256).
    mesh = start_mesh(model, [(0, 2), (2, 4)], stage_kw={"kv_budget_mb": 1}, coord_kw={"prefix_cache_sessions": 0})
    try:
        normal = [[{"role": "user", "content": f"Tell me about shape number {i}."}] for i in range(6)]
        normal.append([{"role": "user", "content": [{"type": "image", "image": images["tall"]}, {"type": "text", "text": "What?"}]}])
        huge = [{"role": "user", "content": "shapes " * 3000}]  # more positions than a stage holds
        expected = [ref.generate_ids(ref.prompt_ids(p), images_of(p), 16)[0] for p in normal]
        got = run_all(mesh, [*[(p, {"max_tokens": 16}) for p in normal], (huge, {"max_tokens": 4})])
        assert got[:7] == expected
        err = got[7]
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = dict(err.trailing_metadata() or ())
        from google.rpc import status_pb2

        assert reason_of(status_pb2.Status.FromString(details["grpc-status-details-bin"])) == "KV_BUDGET_FULL"
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def slow_prefill_mesh(tiny_models):
    # Chunks of 8 tokens: a long prompt takes many steps, so it can be cancelled mid-prefill.
    m = start_mesh(tiny_models["a"], [(0, 2), (2, 4)], coord_kw={"chunk_tokens": 8, "prefix_cache_sessions": 0})
    yield m
    m.stop()


def kv_used(mesh) -> list[int]:
    return [stage_info(s.address).kv_used_bytes for s in mesh.stages]


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_cancel_gives_the_kv_back_within_2s(slow_prefill_mesh, when):
    mesh = slow_prefill_mesh
    before = kv_used(mesh)
    prompt = [{"role": "user", "content": "shapes and colours " * 120}]
    call = mesh.stub.Generate(cpb.GenerateRequest(messages=to_proto(prompt), max_tokens=500))
    if when == "prefill":
        wait_until(lambda: all(a > b for a, b in zip(kv_used(mesh), before)), 60, "the prompt to start", interval=0.005)
    else:
        next(iter(call))  # the first token: decoding
    call.cancel()
    wait_until(lambda: kv_used(mesh) == before, 2.0, lambda: f"the KV to be given back after the cancel: {kv_used(mesh)} vs {before}", interval=0.02)


@pytest.mark.slow
def test_health_answers_under_64_generations_and_a_stalled_stage(tiny_models):
    """64 long generations at once, then one stage SIGSTOPped: Health/Check and GetModelInfo of the
    coordinator still answer within a second."""
    from procmesh import ProcMesh

    mesh = ProcMesh(str(tiny_models["a"]), [(0, 2), (2, 4)]).start()
    ch, stub = mesh.stub()
    calls = []
    try:
        for i in range(64):
            req = cpb.GenerateRequest(messages=to_proto([{"role": "user", "content": f"story {i}"}]), max_tokens=2000)
            calls.append(stub.Generate(req, timeout=120))
        for c in calls[:4]:
            next(iter(c))  # generating
        mesh.pause("stage1.0")
        health = health_pb2_grpc.HealthStub(ch)
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            stub.GetModelInfo(cpb.GetModelInfoRequest(), timeout=5)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.1)
        assert worst < 1.0, f"health + model info took {worst:.2f} s under load"
    finally:
        for c in calls:
            c.cancel()
        mesh.resume("stage1.0")
        ch.close()
        mesh.stop()
