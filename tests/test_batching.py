"""Serving many at once: requests of mixed lengths and kinds joining a running batch (continuous
batching), long prompts fed in chunks between decode steps (chunked prefill), several micro-batches
in flight (pipelining), concurrent images encoded in one tower pass; every request still equals its
own generate(), token for token, and the stages hold no more KV afterwards than before."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from conftest import png
from meshutil import images_of, reference, stage_info, start_mesh, videos_of, wait_until
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.tracing import setup_tracing

SPANS = InMemorySpanExporter()
MAX_NEW = 12


def requests(images, videos) -> list[list[dict]]:
    """Eight prompts of mixed lengths: text, images, a video file, frames."""
    return [
        [{"role": "user", "content": "Hi."}],
        [{"role": "user", "content": "Tell me a long story about shapes, colours and the pictures they make. " * 6}],
        [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": images["tall"]}, {"type": "text", "text": "Describe it."}]}],
        [{"role": "user", "content": [{"type": "video", "video": videos["short"]}, {"type": "text", "text": "What happens?"}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images["square"]},
                    {"type": "image", "image": images["wide"]},
                    {"type": "text", "text": "Compare."},
                ],
            }
        ],
        [{"role": "user", "content": "Count from one to twenty, slowly."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "image", "image": images["tall"]}]}],
    ]


@pytest.fixture(scope="module", params=[[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]], ids=["2 stages", "3 stages"])
def mesh(request, family_model):
    setup_tracing("tests", extra=SPANS)
    model = family_model("qwen2-vl")
    # Chunks of 16 tokens: every image prompt is fed in several chunks between the others' decodes.
    m = start_mesh(model, request.param, coord_kw={"chunk_tokens": 16, "prefix_cache_sessions": 0, "trace_decode_every": 1})
    m.model_dir = model
    yield m
    m.stop()


def test_staggered_mixed_requests_each_equal_their_own_generate(mesh, images, videos):
    ref = reference(mesh.model_dir)
    prompts = requests(images, videos)
    expected = [ref.generate_ids(ref.prompt_ids(p), images_of(p), MAX_NEW, videos=videos_of(p))[0] for p in prompts]
    before = [stage_info(s.address).kv_used_bytes for s in mesh.stages]
    got: list = [None] * len(prompts)
    started = threading.Event()

    def run(i: int) -> None:
        if i:  # arrive while the earlier ones are already running
            started.wait(30)
        got[i] = mesh.generate(prompts[i], max_tokens=MAX_NEW)[0]

    threads = []
    for i in range(len(prompts)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        if i == 0:
            started.set()
    for t in threads:
        t.join(180)
    assert got == expected
    # Every request's KV is given back (released as each one ends, a moment after its last answer).
    kv = lambda: [stage_info(s.address).kv_used_bytes for s in mesh.stages]  # noqa: E731
    wait_until(lambda: kv() == before, 5, lambda: f"every request's KV to be given back: {kv()}, {before} before")


def test_a_newcomer_joins_the_running_batch(mesh, images):
    """While one request decodes, a new image request joins: its prompt chunks run between the
    running request's decode steps (the trace's step spans say which micro-batch each ran in)."""
    SPANS.clear()
    long = [{"role": "user", "content": "Count from one to a hundred."}]
    newcomer = [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "And this?"}]}]
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("long", mesh.generate(long, max_tokens=120)))
    t.start()
    wait_until(
        lambda: any(s.name == "step" and s.attributes["vlmesh.tokens"] == 1 for s in SPANS.get_finished_spans()),
        30,
        "the long request to decode",
        interval=0.01,
    )
    _, _, last = mesh.generate(newcomer, max_tokens=4)
    t.join(120)
    long_trace = out["long"][2].trace_id
    steps = [s for s in SPANS.get_finished_spans() if s.name == "step"]
    mine = {s.attributes["vlmesh.batch"] for s in steps if format(s.context.trace_id, "032x") == last.trace_id and s.attributes["vlmesh.tokens"] > 1}
    decoding = {
        s.attributes["vlmesh.batch"] for s in steps if format(s.context.trace_id, "032x") == long_trace and s.attributes["vlmesh.tokens"] == 1
    }
    assert len(mine) > 1, "the image prompt was not fed in chunks"
    # The newcomer started before the running request finished, and its prompt did not stall it:
    # the running request decoded between the newcomer's first and last prompt chunks (in the same
    # micro-batch, or in the next one in flight beside it when the stages are pipelined).
    assert min(mine) < max(decoding)
    assert any(min(mine) <= d <= max(mine) for d in decoding), (sorted(mine), sorted(decoding))


def test_concurrent_images_share_one_tower_pass(tiny_models):
    """Requests that arrive while the encoder is busy are encoded together: one pass of the vision
    tower for all of them, and each embedding equals the one encoded alone."""
    from meshutil import mesh_tls_kw

    from services.common.checkpoint import open_checkpoint
    from services.vision.encoder import VisionEncoder, VisualItem
    from services.vision.server import VisionConfig, VisionServicer

    def make_encoder() -> VisionEncoder:
        ckpt = open_checkpoint(tiny_models["a"])
        return VisionEncoder(ckpt, torch.float32, 64 << 20, 0)

    def encode_alone(picture: bytes) -> torch.Tensor:
        return make_encoder().encode([VisualItem("image", picture)])[0].entry.embeddings

    encoder = make_encoder()
    pictures = [png(40 + 8 * i, 48, 30 + i) for i in range(4)]

    async def run():
        servicer = VisionServicer(encoder, "qwen2_vl", VisionConfig(model=str(tiny_models["a"]), **mesh_tls_kw("vision")))
        before = encoder.passes
        results = await asyncio.gather(*(servicer.batcher.encode([VisualItem("image", p)], 1) for p in pictures))
        await servicer.batcher.close()
        return encoder.passes - before, results

    passes, results = asyncio.run(run())
    assert passes == 1
    for pic, (got,) in zip(pictures, results):
        torch.testing.assert_close(got.entry.embeddings, encode_alone(pic), rtol=1e-5, atol=1e-5)
