"""Sampling, sessions, the vision cache, tracing, health/reflection and bad input, on one
in-process mesh (real gRPC on 127.0.0.1) of a tiny checkpoint split over two stages."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import png
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshutil import forward_once, images_of, internal_channel, reference, start_mesh, to_proto, vision_stats
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import tensors
from services.common.tracing import setup_tracing
from vlmesh.internal.v1 import stage_pb2
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import tensor_pb2

SPANS = InMemorySpanExporter()
MAX_PIXELS = 2_000_000


@pytest.fixture(scope="module")
def mesh(tiny_models):
    setup_tracing("tests", extra=SPANS)
    m = start_mesh(tiny_models["a"], [(0, 2), (2, 4)], vision_kw={"max_image_pixels": MAX_PIXELS})
    m.model_dir = tiny_models["a"]
    yield m
    m.stop()


def ask(image: bytes, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


# --- sampling -------------------------------------------------------------------------------


def test_same_seed_same_text_different_seed_differs(mesh):
    msgs = [{"role": "user", "content": "Say something."}]
    sampling = dict(temperature=1.5, top_k=50, top_p=0.95)
    a = mesh.generate(msgs, sampling=tensor_pb2.SamplingParams(seed=7, **sampling), max_tokens=16)[0]
    b = mesh.generate(msgs, sampling=tensor_pb2.SamplingParams(seed=7, **sampling), max_tokens=16)[0]
    c = mesh.generate(msgs, sampling=tensor_pb2.SamplingParams(seed=8, **sampling), max_tokens=16)[0]
    greedy = mesh.generate(msgs, max_tokens=16)[0]
    assert a == b
    assert a != c or a != greedy  # sampling at temperature 1.5 is not the greedy path


def test_top_k_1_is_greedy_whatever_the_temperature(mesh):
    msgs = [{"role": "user", "content": "Count the shapes."}]
    greedy = mesh.generate(msgs, max_tokens=12)[0]
    sampled = mesh.generate(msgs, sampling=tensor_pb2.SamplingParams(temperature=5.0, top_k=1, seed=1), max_tokens=12)[0]
    assert sampled == greedy


def test_repetition_penalty_matches_generate(mesh, images):
    ref = reference(mesh.model_dir)
    msgs = ask(images["square"])
    expected, _ = ref.generate_ids(ref.prompt_ids(msgs), images_of(msgs), 12, repetition_penalty=1.5)
    got = mesh.generate(msgs, sampling=tensor_pb2.SamplingParams(repetition_penalty=1.5), max_tokens=12)[0]
    assert got == expected


def test_logprobs_are_log_softmax_of_the_logits(mesh, images):
    ref = reference(mesh.model_dir)
    msgs = ask(images["wide"])
    ids = ref.prompt_ids(msgs)
    _, out = ref.generate_ids(ids, images_of(msgs), 3, output_logits=True)
    resp = list(mesh.stub.Generate(cpb.GenerateRequest(messages=to_proto(msgs), max_tokens=3, logprobs=5)))
    details = [d for r in resp for d in r.logprobs]
    assert len(details) == 3
    for step, d in enumerate(details):
        want = torch.log_softmax(out.logits[step][0].float(), -1)
        assert d.token.logprob == pytest.approx(float(want[d.token.token_id]), abs=1e-4)
        top = torch.topk(want, 5)
        assert [t.token_id for t in d.top] == top.indices.tolist()


def test_stop_string_and_max_tokens(mesh):
    msgs = [{"role": "user", "content": "Tell me about shapes and colours."}]
    ids, text, last = mesh.generate(msgs, max_tokens=20)
    assert last.finish_reason in (cpb.FINISH_REASON_LENGTH, cpb.FINISH_REASON_STOP)
    if last.finish_reason == cpb.FINISH_REASON_LENGTH:
        assert len(ids) == 20
    stop = text.strip()[3:6]
    if len(stop) == 3:
        _, cut, last2 = mesh.generate(msgs, max_tokens=20, stop=[stop])
        assert last2.finish_reason == cpb.FINISH_REASON_STOP_STRING
        assert stop not in cut and text.startswith(cut)


# --- sessions and the vision cache ------------------------------------------------------------


def test_vision_cache_hits_on_second_turn_about_the_same_image(mesh):
    image = png(80, 80, 42)
    sid = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    before = vision_stats(mesh.vision.address)
    mesh.generate(ask(image), session_id=sid, max_tokens=4)
    mid = vision_stats(mesh.vision.address)
    assert (mid.cache_misses - before.cache_misses, mid.cache_hits - before.cache_hits) == (1, 0)
    SPANS.clear()
    mesh.generate(ask(image, "Look again: what is it?"), session_id=sid, max_tokens=4)
    after = vision_stats(mesh.vision.address)
    assert (after.cache_misses - mid.cache_misses, after.cache_hits - mid.cache_hits) == (0, 1)
    encode = [s for s in SPANS.get_finished_spans() if s.name == "vision.encode"]
    assert encode and encode[-1].attributes["vlmesh.cache_hits"] == 1


def test_closed_or_unknown_session_is_not_found(mesh):
    sid = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    assert mesh.stub.CloseSession(cpb.CloseSessionRequest(session_id=sid)).existed
    for bad in (sid, "no-such-session"):
        with pytest.raises(grpc.RpcError) as err:
            mesh.generate([{"role": "user", "content": "hi"}], session_id=bad, max_tokens=2)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown session" in err.value.details()


# --- tracing, health, reflection --------------------------------------------------------------


def test_one_trace_holds_spans_of_all_three_services(mesh, images):
    SPANS.clear()
    _, _, last = mesh.generate(ask(images["tall"]), max_tokens=3)
    spans = SPANS.get_finished_spans()
    assert last.trace_id
    mine = [s for s in spans if format(s.context.trace_id, "032x") == last.trace_id]
    scopes = {s.instrumentation_scope.name for s in mine}
    assert {"vlmesh.coordinator", "vlmesh.vision", "vlmesh.stage"} <= scopes
    stage_spans = [s for s in mine if s.name == "stage.forward"]
    assert {s.attributes["vlmesh.layers"] for s in stage_spans} == {"0:2", "2:4"}
    assert len(stage_spans) == 2 * 3  # each of 3 steps crossed both stages
    root = [s for s in mine if s.parent is None]
    assert [s.name for s in root] == ["generate"]


def test_health_serving_and_reflection_lists_every_service(mesh):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    expect = {
        mesh.coordinator.address: "vlmesh.v1.CoordinatorService",
        mesh.vision.address: "vlmesh.internal.v1.VisionService",
        mesh.stages[0].address: "vlmesh.internal.v1.StageService",
        mesh.stages[1].address: "vlmesh.internal.v1.StageService",
    }
    for address, service in expect.items():
        ch = grpc.insecure_channel(address) if address == mesh.coordinator.address else internal_channel(address)
        with ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
            assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


# --- bad input: a clear status, and the mesh keeps serving ----------------------------------


def still_serves(mesh, images):
    ids, _, last = mesh.generate(ask(images["wide"]), max_tokens=3)
    assert len(ids) == 3 and last.finish_reason == cpb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    "image, code, words",
    [
        (b"\x89PNG\r\n\x1a\n this is not an image", grpc.StatusCode.INVALID_ARGUMENT, "not a readable image"),
        (png(2000, 1001, 3), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
    ],
    ids=["corrupt", "too many pixels"],
)
def test_bad_image(mesh, images, image, code, words):
    with pytest.raises(grpc.RpcError) as err:
        mesh.generate(ask(image), max_tokens=2)
    assert err.value.code() == code and words in err.value.details()
    still_serves(mesh, images)


def test_prompt_longer_than_the_model_limit(mesh, images):
    with pytest.raises(grpc.RpcError) as err:
        mesh.generate([{"role": "user", "content": "shapes " * 5000}], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.value.details()
    still_serves(mesh, images)


def test_bad_messages(mesh, images):
    with pytest.raises(grpc.RpcError) as err:
        list(mesh.stub.Generate(cpb.GenerateRequest(messages=[cpb.Message(content=[cpb.Content(text="x")])])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(mesh.stub.Generate(cpb.GenerateRequest()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    still_serves(mesh, images)


@pytest.mark.parametrize(
    "stage, build, words",
    [
        (0, lambda: dict(tokens=stage_pb2.TokenIds(ids=[1, 2]), position_ids=tensors.to_proto(torch.zeros(3, 2))), "dtype float32 not accepted"),
        (0, lambda: dict(tokens=stage_pb2.TokenIds(ids=[1, 2]), position_ids=tensors.to_proto(torch.zeros(2, 2, dtype=torch.long))), "shape [2, 2]"),
        (
            1,
            lambda: dict(position_ids=tensors.to_proto(torch.zeros(3, 2, dtype=torch.long)), hidden_states=tensors.to_proto(torch.zeros(2, 65))),
            "does not match [2, 64]",
        ),
        (
            1,
            lambda: dict(
                position_ids=tensors.to_proto(torch.zeros(3, 2, dtype=torch.long)),
                hidden_states=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 64], data=b"\0" * 12),
            ),
            "12 bytes for shape [2, 64]",
        ),
        (
            0,
            lambda: dict(tokens=stage_pb2.TokenIds(ids=[1, 99999]), position_ids=tensors.to_proto(torch.zeros(3, 2, dtype=torch.long))),
            "token id outside",
        ),
        (
            0,
            lambda: dict(tokens=stage_pb2.TokenIds(ids=[1, -3]), position_ids=tensors.to_proto(torch.zeros(3, 2, dtype=torch.long))),
            "token id outside",
        ),
        (
            1,
            lambda: dict(
                position_ids=tensors.to_proto(torch.zeros(3, 2, dtype=torch.long)),
                hidden_states=tensors.to_proto(torch.full((2, 64), float("nan"))),
            ),
            "NaN",
        ),
    ],
    ids=["wrong dtype", "wrong shape", "wrong hidden width", "truncated bytes", "token out of vocab", "negative token", "NaN hidden"],
)
def test_malformed_step_sent_straight_to_a_stage(mesh, images, stage, build, words):
    out = forward_once(mesh.stages[stage].address, stage_pb2.StepInput(session_id="direct", **build()))
    assert out.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert words in out.status.message
    still_serves(mesh, images)


def test_step_at_a_position_the_stage_does_not_hold(mesh, images):
    step = stage_pb2.StepInput(
        session_id="never-seen",
        start_position=5,
        tokens=stage_pb2.TokenIds(ids=[1]),
        position_ids=tensors.to_proto(torch.zeros(3, 1, dtype=torch.long)),
    )
    out = forward_once(mesh.stages[0].address, step)
    assert out.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    still_serves(mesh, images)


def test_kv_budget_full_is_resource_exhausted_and_spares_other_sessions(tiny_models, images):
    # A budget of one MiB holds ~2k tokens of this model per stage; a 3k-token prompt cannot fit.
    m = start_mesh(tiny_models["a"], [(0, 2), (2, 4)], stage_kw={"kv_budget_mb": 1})
    try:
        sid = m.stub.CreateSession(cpb.CreateSessionRequest()).session_id
        first, _, _ = m.generate(ask(images["wide"]), session_id=sid, max_tokens=4)
        with pytest.raises(grpc.RpcError) as err:
            m.generate([{"role": "user", "content": "shapes " * 3000}], max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV budget" in err.value.details()
        # The earlier session is intact: its next turn reuses its KV.
        _, _, last = m.generate([{"role": "user", "content": "more?"}], session_id=sid, max_tokens=2)
        assert last.usage.cached_tokens > 0
    finally:
        m.stop()
