"""Linears packed for oneDNN at load (services/stage/packed.py) change no bit of what a stage computes.

The stage packs only where its load-time check finds packed and plain F.linear bitwise equal, so
these tests compare the two ways on what the check did not try: other row counts, whole stages
over mixed micro-batches (decodes, prompts, chunks after cached positions), greedy tokens against
transformers' generate(). On a CPU where oneDNN has no bf16 kernels the stage refuses to pack and
says why; the test then reports the refusal instead of comparing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_profile import Stages  # noqa: E402

from services.stage import packed  # noqa: E402

# Wide enough that F.linear reaches oneDNN (it takes tiny matmuls elsewhere), small enough for CI.
WIDE = dict(num_layers=3, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512, dtype="bfloat16", seed=7)


def _packs_here() -> packed.Packing:
    probe = nn.Sequential(nn.Linear(256, 512, dtype=torch.bfloat16))
    return packed.pack_linears(probe, torch.device("cpu"), torch.bfloat16)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    from services.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("wide") / "m", **WIDE)


@pytest.fixture(scope="module")
def packing_here() -> packed.Packing:
    p = _packs_here()
    if not p.packed:
        pytest.skip(f"this CPU's oneDNN does not pack bfloat16 linears bitwise equal to F.linear: {p.reason}")
    return p


@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_equals_f_linear_at_row_counts_the_check_never_tried(packing_here, bias):
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(256, 384, bias=bias, dtype=torch.bfloat16))
    w = root[0].weight.detach().clone()
    b = root[0].bias.detach().clone() if bias else None
    assert packed.pack_linears(root, torch.device("cpu"), torch.bfloat16).packed == 1
    assert isinstance(root[0], packed.PackedLinear)
    for rows in (4, 7, 11, 40, 100, 333):
        x = torch.randn(1, rows, 256).to(torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(root(x), nn.functional.linear(x, w, b)), rows


def test_packing_is_refused_where_it_would_not_be_exact():
    for dtype in (torch.float32, torch.float16):
        root = nn.Sequential(nn.Linear(256, 512, dtype=dtype))
        p = packed.pack_linears(root, torch.device("cpu"), dtype)
        assert p.packed == 0 and str(dtype) in p.reason
        assert type(root[0]) is nn.Linear


def test_a_tied_lm_head_is_packed_and_the_embedding_keeps_its_weight(packing_here):
    emb = nn.Embedding(512, 256, dtype=torch.bfloat16)
    head = nn.Linear(256, 512, bias=False, dtype=torch.bfloat16)
    head.weight = emb.weight
    root = nn.ModuleDict({"embed": emb, "head": head})
    w = emb.weight.detach().clone()
    p = packed.pack_linears(root, torch.device("cpu"), torch.bfloat16, decode_only=frozenset({"head"}))
    assert p.packed == 1 and isinstance(root["head"], packed.PackedLinear)
    ids = torch.tensor([[0, 7, 511]])
    with torch.inference_mode():
        assert torch.equal(root["embed"](ids), w[ids])
        x = torch.randn(1, 5, 256).to(torch.bfloat16)
        assert torch.equal(root["head"](x), nn.functional.linear(x, w))


def test_packed_stages_compute_the_same_bits_as_plain_ones_over_mixed_micro_batches(wide_model, packing_here):
    a = Stages(wide_model, torch.bfloat16, "exact", splits=2, prepack=True)
    b = Stages(wide_model, torch.bfloat16, "exact", splits=2, prepack=False)
    assert all(s.model.packing.packed for s in a.stages), [s.model.packing for s in a.stages]
    assert not any(s.model.packing.packed for s in b.stages)
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, a.vocab, (n,), generator=g)

    batches = [
        [("d1", 0, ids(5)), ("d2", 0, ids(40)), ("c", 0, ids(7))],
        [("d1", 5, ids(1)), ("d2", 40, ids(1)), ("c", 7, ids(30)), ("new", 0, ids(3))],
        [("d1", 6, ids(1)), ("d2", 41, ids(1)), ("c", 37, ids(1)), ("new", 3, ids(1)), ("one", 0, ids(1))],
    ]
    for work in batches:
        for ra, rb in zip(a.step(work), b.step(work)):
            for x, y in zip(ra, rb):
                if x.hidden is not None:
                    assert torch.equal(x.hidden, y.hidden)
                if x.token is not None:
                    assert x.token.token_id == y.token.token_id and x.token.logprob == y.token.logprob


@pytest.mark.parametrize("splits", [1, 2])  # 1: one stage whose lm_head is tied to its embedding
def test_packed_stages_decode_what_generate_decodes_in_bfloat16(wide_model, packing_here, splits):
    from services.common.checkpoint import open_checkpoint

    stages = Stages(wide_model, torch.bfloat16, "exact", splits=splits, prepack=True)
    assert all(s.model.packing.packed for s in stages.stages)
    if splits == 1:
        assert isinstance(stages.stages[0].model.lm_head, packed.PackedLinear)
    prompt = torch.randint(3, stages.vocab, (12,), generator=torch.Generator().manual_seed(3))
    got, start, feed = [], 0, prompt
    for _ in range(10):
        token = stages.step([("s", start, feed)])[-1][0].token
        assert token is not None
        got.append(token.token_id)
        start += feed.numel()
        feed = torch.tensor([token.token_id])
    cls = open_checkpoint(wide_model).family.for_generation
    model = cls.from_pretrained(str(wide_model), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=10, min_new_tokens=10, do_sample=False
        )
    assert got == out[0, 12:].tolist()
