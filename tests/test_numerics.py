"""The fast numerics (one padded, masked attention call per layer per micro-batch) against the
exact one (transformers' call per session, equal to generate()): two stages each, driven in
lockstep on exact's greedy tokens (teacher forcing) over staggered sessions of mixed prompt lengths
whose prompts are fed in chunks beside the others' decodes. The measurement itself is
bench/bench_profile.py's `agreement` (`--part bitwise` prints the whole table).

Measured on CPU: not bitwise equal for two or more sessions (float32 nor bfloat16), so `fast` is a
mode of its own; a lone session takes the exact path and is bitwise equal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_profile import agreement  # noqa: E402

from services.shapes import SHIPPED_MODEL  # noqa: E402

BAR = 0.995  # teacher-forced top-1 agreement with exact
SESSIONS = 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_lone_session_is_bitwise_exact_in_fast_numerics(tiny_models, dtype):
    r = agreement(tiny_models["a"], dtype, 1)
    assert r.compared > 10
    assert r.hidden_equal and r.logprobs_equal and r.top1 == 1.0


def test_fast_numerics_agrees_with_exact_on_every_family_in_float32(family_model):
    compared = same = 0
    for family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe"):
        r = agreement(family_model(family), torch.float32, SESSIONS)
        compared, same = compared + r.compared, same + r.same_top1
    assert compared > 300
    assert same / compared >= BAR, f"{same} of {compared}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fast_numerics_agrees_with_exact_on_the_trained_model(dtype):
    r = agreement(SHIPPED_MODEL, dtype, SESSIONS, decode=16)
    assert r.compared > 100
    assert r.top1 >= BAR, f"{r.same_top1} of {r.compared}"


@pytest.mark.slow
def test_the_shapes_eval_keeps_its_accuracy_under_fast_numerics(tmp_path):
    """A real mesh (vlmesh up's launcher) with --numerics fast stages answers the held-out shapes
    questions as well as the exact mode does (the bar: 99%)."""
    from services.launcher import LocalMesh, split_layers
    from services.shapes import data
    from services.shapes.eval import EVAL_SEED, evaluate_mesh

    with LocalMesh(str(SHIPPED_MODEL), split_layers(4, 2), service_args={"stage": ["--numerics", "fast"]}, log_dir=str(tmp_path)) as mesh:
        result = evaluate_mesh(mesh.address, data.examples(EVAL_SEED, 200), progress=False)
    assert result.accuracy >= 0.99, result
