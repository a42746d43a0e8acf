"""Fuzz every RPC of every service with random and mutated requests (hypothesis): each answer is
OK or a documented status, never INTERNAL or UNKNOWN (per step too, on a stage), and every process
is alive and serving at the end."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import png
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshutil import internal_channel, to_proto
from procmesh import ProcMesh

from services.common import tensors
from vlmesh.internal.v1 import stage_pb2, vision_pb2
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import tensor_pb2

pytestmark = pytest.mark.slow

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
PNG = png(48, 40, 5)


@pytest.fixture(scope="module")
def mesh(tiny_models):
    m = ProcMesh(str(tiny_models["a"]), [(0, 2), (2, 4)], coord_args=["--default-max-tokens", "4"]).start()
    m.model_dir = tiny_models["a"]
    yield m
    for name, child in m.children.items():
        assert child.proc.poll() is None, f"{name} died during the fuzzing"
    m.stop()


def call(channel: grpc.Channel, method: str, request: bytes, stream_in: bool = False, stream_out: bool = False) -> grpc.StatusCode:
    """Send raw request bytes (a message or a mutated one) and return the status it ended with."""
    ident = lambda b: b  # noqa: E731
    try:
        if stream_in:
            mc = channel.stream_stream(method, request_serializer=ident, response_deserializer=ident)
            list(mc(iter([request]), timeout=30))
        elif stream_out:
            list(channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)(request, timeout=30))
        else:
            channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)(request, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """The valid serialization with bytes flipped, cut or appended."""

    @st.composite
    def build(draw):
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from(["flip", "cut", "append", "insert"]))
            if op == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= draw(st.integers(1, 255))
            elif op == "cut" and data:
                data = data[: draw(st.integers(0, len(data) - 1))]
            elif op == "append":
                data += draw(st.binary(max_size=16))
            elif op == "insert":
                i = draw(st.integers(0, len(data)))
                data[i:i] = draw(st.binary(max_size=8))
        return bytes(data)

    return build()


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
ids = st.one_of(st.text(max_size=24), st.text(min_size=2000, max_size=3000), st.just(""))


@st.composite
def generate_requests(draw) -> cpb.GenerateRequest:
    parts = draw(
        st.lists(
            st.one_of(
                st.builds(lambda t: cpb.Content(text=t), st.text(max_size=40)),
                st.builds(lambda b: cpb.Content(image=b), st.one_of(st.binary(max_size=64), st.just(PNG))),
                st.builds(lambda b: cpb.Content(video=b), st.binary(max_size=64)),
                st.builds(
                    lambda fs: cpb.Content(video_frames=tensor_pb2.VideoFrames(frames=fs)),
                    st.lists(st.one_of(st.binary(max_size=16), st.just(PNG)), max_size=3),
                ),
            ),
            max_size=3,
        )
    )
    messages = [cpb.Message(role=draw(st.integers(-1, 5)), content=parts) for _ in range(draw(st.integers(0, 2)))]
    req = cpb.GenerateRequest(
        messages=messages,
        max_tokens=draw(st.integers(-3, 6)),
        stop=draw(st.lists(st.text(max_size=4), max_size=2)),
        logprobs=draw(st.integers(-2, 30)),
        session_id=draw(st.one_of(st.just(""), ids)),
    )
    req.sampling.temperature = draw(floats)
    req.sampling.top_p = draw(floats)
    req.sampling.top_k = draw(st.integers(-5, 100))
    req.sampling.repetition_penalty = draw(floats)
    if draw(st.booleans()):
        req.sampling.seed = draw(st.integers(0, 2**64 - 1))
    return req


def valid_generate() -> bytes:
    return cpb.GenerateRequest(
        messages=to_proto([{"role": "user", "content": [{"type": "image", "image": PNG}, {"type": "text", "text": "hi"}]}]), max_tokens=2
    ).SerializeToString()


def test_fuzz_coordinator(mesh):
    with grpc.insecure_channel(mesh.address) as ch:

        @EXAMPLES
        @given(req=generate_requests())
        def generate(req):
            assert call(ch, "/vlmesh.v1.CoordinatorService/Generate", req.SerializeToString(), stream_out=True) in DOCUMENTED

        @EXAMPLES
        @given(raw=mutated(valid_generate()))
        def generate_mutated(raw):
            assert call(ch, "/vlmesh.v1.CoordinatorService/Generate", raw, stream_out=True) in DOCUMENTED

        @EXAMPLES
        @given(sid=ids, which=st.sampled_from(["CloseSession", "CreateSession", "GetModelInfo", "GetMeshStatus"]), junk=st.binary(max_size=12))
        def sessions(sid, which, junk):
            m = {
                "CloseSession": cpb.CloseSessionRequest(session_id=sid),
                "CreateSession": cpb.CreateSessionRequest(),
                "GetModelInfo": cpb.GetModelInfoRequest(),
                "GetMeshStatus": cpb.GetMeshStatusRequest(),
            }[which]
            for raw in (m.SerializeToString(), m.SerializeToString() + junk):
                assert call(ch, f"/vlmesh.v1.CoordinatorService/{which}", raw, stream_out=False) in DOCUMENTED

        generate()
        generate_mutated()
        sessions()


@st.composite
def tensor_protos(draw, dims: int) -> tensor_pb2.Tensor:
    shape = draw(st.lists(st.integers(-1, 6), min_size=dims - 1, max_size=dims + 1))
    dtype = draw(st.integers(0, 9))
    n = 1
    for d in shape:
        n *= max(d, 0)
    size = draw(st.one_of(st.just(n * 4), st.integers(0, 64)))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(min_size=min(size, 512), max_size=min(size, 512))))


@st.composite
def steps(draw) -> stage_pb2.StepInput:
    t = draw(st.integers(0, 4))
    s = stage_pb2.StepInput(session_id=draw(ids), start_position=draw(st.integers(-2, 40)), rewind=draw(st.booleans()))
    if draw(st.booleans()):
        s.position_ids.CopyFrom(tensors.to_proto(torch.arange(t).expand(3, t).contiguous()))
    else:
        s.position_ids.CopyFrom(draw(tensor_protos(2)))
    kind = draw(st.sampled_from(["tokens", "hidden", "none"]))
    if kind == "tokens":
        s.tokens.ids.extend(draw(st.lists(st.integers(-(2**40), 2**40), max_size=t + 1)))
    elif kind == "hidden":
        if draw(st.booleans()):
            s.hidden_states.CopyFrom(tensors.to_proto(torch.tensor(draw(st.lists(floats, min_size=t * 64, max_size=t * 64))).reshape(t, 64)))
        else:
            s.hidden_states.CopyFrom(draw(tensor_protos(2)))
    for _ in range(draw(st.integers(0, 2))):
        s.visual_spans.add(start=draw(st.integers(-2, 5)), length=draw(st.integers(-2, 5)))
    if draw(st.booleans()):
        s.visual_embeds.CopyFrom(draw(tensor_protos(2)))
    if draw(st.booleans()):
        s.deepstack.add(layer=draw(st.integers(-1, 5)), embeds=draw(tensor_protos(2)))
    if draw(st.booleans()):
        s.sample.params.temperature = draw(floats)
        s.sample.params.top_p = draw(floats)
        s.sample.params.top_k = draw(st.integers(-3, 5000))
        s.sample.params.repetition_penalty = draw(floats)
        s.sample.top_logprobs = draw(st.integers(-3, 5000))
        s.sample.penalty_token_ids.extend(draw(st.lists(st.integers(-(2**40), 2**40), max_size=4)))
    return s


def test_fuzz_stages_and_vision(mesh):
    from vlmesh.internal.v1 import stage_pb2_grpc

    stages = [c.address for n, c in mesh.children.items() if n.startswith("stage")]
    vision = mesh.children["vision0"].address

    def forward_statuses(ch, req: stage_pb2.ForwardRequest) -> list[int]:
        try:
            out = list(stage_pb2_grpc.StageServiceStub(ch).Forward(iter([req]), timeout=30))
        except grpc.RpcError as err:
            assert err.code() in DOCUMENTED, err.details()
            return []
        return [o.status.code for r in out for o in r.outputs]

    internal = [grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0]]
    for address in stages:
        with internal_channel(address) as ch:

            @EXAMPLES
            @given(batch=st.lists(steps(), max_size=3))
            def forward(batch):
                codes = forward_statuses(ch, stage_pb2.ForwardRequest(steps=batch))
                assert not set(codes) & set(internal), codes

            @EXAMPLES
            @given(
                raw=mutated(
                    stage_pb2.ForwardRequest(
                        steps=[
                            stage_pb2.StepInput(
                                session_id="s",
                                tokens=stage_pb2.TokenIds(ids=[1, 2]),
                                position_ids=tensors.to_proto(torch.zeros(3, 2, dtype=torch.long)),
                            )
                        ]
                    ).SerializeToString()
                )
            )
            def forward_mutated(raw):
                assert call(ch, "/vlmesh.internal.v1.StageService/Forward", raw, stream_in=True) in DOCUMENTED

            @EXAMPLES
            @given(
                sid=ids,
                length=st.integers(-3, 8),
                entry=st.builds(
                    lambda k, v, layer, start: tensor_pb2.KVDelta(layer=layer, start_position=start, key=k, value=v),
                    tensor_protos(3),
                    tensor_protos(3),
                    st.integers(-1, 5),
                    st.integers(-2, 8),
                ),
            )
            def restore_and_friends(sid, length, entry):
                msgs = [
                    stage_pb2.RestoreSessionRequest(header=stage_pb2.RestoreHeader(session_id=sid, length=length)),
                    stage_pb2.RestoreSessionRequest(entry=entry),
                ]
                stub = stage_pb2_grpc.StageServiceStub(ch)
                for fn in (
                    lambda: stub.RestoreSession(iter(msgs), timeout=30),
                    lambda: stub.RestoreSession(iter(msgs[::-1]), timeout=30),
                    lambda: stub.ReleaseSession(stage_pb2.ReleaseSessionRequest(session_id=sid), timeout=30),
                    lambda: stub.RenewLeases(stage_pb2.RenewLeasesRequest(session_ids=[sid]), timeout=30),
                    lambda: stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=30),
                ):
                    try:
                        fn()
                    except grpc.RpcError as err:
                        assert err.code() in DOCUMENTED, err.details()

            forward()
            forward_mutated()
            restore_and_friends()

    with internal_channel(vision) as ch:

        @EXAMPLES
        @given(
            inputs=st.lists(
                st.one_of(
                    st.builds(lambda b: vision_pb2.VisualInput(image_bytes=b), st.one_of(st.binary(max_size=64), st.just(PNG))),
                    st.builds(lambda b: vision_pb2.VisualInput(video_bytes=b), st.binary(max_size=64)),
                    st.builds(
                        lambda fs, fps: vision_pb2.VisualInput(video_frames=tensor_pb2.VideoFrames(frames=fs, fps=fps)),
                        st.lists(st.one_of(st.binary(max_size=8), st.just(PNG)), max_size=3),
                        st.floats(),
                    ),
                    st.just(vision_pb2.VisualInput()),
                ),
                max_size=3,
            )
        )
        def encode(inputs):
            raw = vision_pb2.EncodeRequest(inputs=inputs).SerializeToString()
            assert call(ch, "/vlmesh.internal.v1.VisionService/Encode", raw) in DOCUMENTED

        @EXAMPLES
        @given(raw=mutated(vision_pb2.EncodeRequest(inputs=[vision_pb2.VisualInput(image_bytes=PNG)]).SerializeToString()))
        def encode_mutated(raw):
            assert call(ch, "/vlmesh.internal.v1.VisionService/Encode", raw) in DOCUMENTED
            assert call(ch, "/vlmesh.internal.v1.VisionService/GetStats", raw[:3]) in DOCUMENTED

        encode()
        encode_mutated()


def test_every_process_still_serves(mesh):
    for name, child in mesh.children.items():
        assert child.proc.poll() is None, f"{name} died"
        ch = grpc.insecure_channel(child.address) if name == "coordinator" else internal_channel(child.address)
        with ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(mesh.address) as ch:
        from vlmesh.v1 import coordinator_pb2_grpc

        out = list(
            coordinator_pb2_grpc.CoordinatorServiceStub(ch).Generate(
                cpb.GenerateRequest(
                    messages=to_proto([{"role": "user", "content": [{"type": "image", "image": PNG}, {"type": "text", "text": "hi"}]}]), max_tokens=3
                ),
                timeout=60,
            )
        )
        assert sum(len(r.token_ids) for r in out) == 3
