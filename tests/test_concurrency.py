"""Several sessions at once: their decode steps share forward passes and each still equals
generate(); cancelled requests and idle sessions give their KV back."""

from __future__ import annotations

import threading

import grpc
import pytest
from meshutil import images_of, reference, stage_holds, start_mesh, to_proto, wait_until
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.tracing import setup_tracing
from vlmesh.v1 import coordinator_pb2 as cpb

SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module")
def mesh(tiny_models):
    setup_tracing("tests", extra=SPANS)
    m = start_mesh(tiny_models["c"], [(0, 1), (1, 3)], coord_kw={"session_ttl": 1.0})
    m.model_dir = tiny_models["c"]
    yield m
    m.stop()


def test_concurrent_sessions_batch_their_decode_and_each_matches_generate(mesh, images):
    ref = reference(mesh.model_dir)
    prompts = [
        [{"role": "user", "content": "Tell me a story about a red circle."}],
        [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": images["tall"]}, {"type": "text", "text": "Describe it in detail."}]}],
        [{"role": "user", "content": "Count."}],
    ]
    expected = [ref.generate_ids(ref.prompt_ids(p), images_of(p), 24)[0] for p in prompts]
    SPANS.clear()
    got: list = [None] * len(prompts)

    def run(i):
        got[i] = mesh.generate(prompts[i], max_tokens=24)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    batched = [s for s in SPANS.get_finished_spans() if s.name == "stage.forward" and s.attributes["vlmesh.batch_size"] > 1]
    assert batched, "no decode step ran more than one session in a forward pass"


def test_cancelled_stream_leaves_the_session_usable(mesh, images):
    ref = reference(mesh.model_dir)
    sid = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    first = [{"role": "user", "content": [{"type": "image", "image": images["square"]}, {"type": "text", "text": "Hi"}]}]
    call = mesh.stub.Generate(cpb.GenerateRequest(messages=to_proto(first), session_id=sid, max_tokens=200))
    next(iter(call))
    call.cancel()

    # The cancelled turn never happened: the next request on the session is its first turn again
    # (once the engine has let go of the cancelled one, the session is no longer busy).
    def again():
        try:
            return mesh.generate(first, session_id=sid, max_tokens=6)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ABORTED:
                raise
            return None

    got, _, last = wait_until(again, 5, "the session to be free again")
    assert got == ref.generate_ids(ref.prompt_ids(first), images_of(first), 6)[0]
    assert last.usage.cached_tokens == 0


def test_idle_sessions_expire_everywhere(mesh):
    sid = mesh.stub.CreateSession(cpb.CreateSessionRequest()).session_id
    mesh.generate([{"role": "user", "content": "hello"}], session_id=sid, max_tokens=2)
    assert all(stage_holds(s.address, sid) for s in mesh.stages)
    wait_until(lambda: not any(stage_holds(s.address, sid) for s in mesh.stages), 10, "the stages to drop the idle session", interval=0.2)
    with pytest.raises(grpc.RpcError) as err:
        mesh.generate([{"role": "user", "content": "still there?"}], session_id=sid, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
