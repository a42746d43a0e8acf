"""services.plan: stage layer ranges and their bytes, from config.json alone.

Expected bytes are computed here from the models' shape formulas (the published architectures),
not from plan's grouping code; the tiny checkpoints check that the plan agrees with what the
stage services really load."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from services import plan
from services.common.checkpoint import config_dtype
from services.launcher import split_layers

# Qwen/Qwen2-VL-2B-Instruct's config.json as the hub has it (flat text fields, torch_dtype, rope_scaling).
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Qwen3-VL-235B-A22B-Instruct-like. As in the hub's Qwen3-VL MoE configs, text_config says nothing
# about tying (its class default is True) and only the outer config says False: untied.
QWEN3_VL_MOE = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"],
    "model_type": "qwen3_vl_moe",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "attention_bias": False,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_vl_moe_text",
        "moe_intermediate_size": 1536,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 94,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "intermediate_size": 4304,
        "model_type": "qwen3_vl_moe",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

BF16 = 2


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _expected_2b() -> dict:
    """Parameter counts of Qwen2-VL-2B from its architecture."""
    h, i, v, kv = 1536, 8960, 151936, 2 * 128  # kv: KV heads * head_dim (1536 / 12)
    layer = _linear(h, h) + 2 * _linear(h, kv) + _linear(h, h, bias=False) + 3 * _linear(h, i, bias=False) + 2 * h
    e, merged = 1280, 1280 * 4
    block = 2 * 2 * e + _linear(e, 3 * e) + _linear(e, e) + _linear(e, 4 * e) + _linear(4 * e, e)
    vision = e * 3 * 2 * 14 * 14 + 32 * block + 2 * e + _linear(merged, merged) + _linear(merged, h)
    return dict(layer=layer, embed=v * h, norm=h, vision=vision, kv_per_token=2 * kv * BF16)


def _expected_moe() -> dict:
    """Parameter counts of the Qwen3-VL-MoE config above from its architecture."""
    h, v, q, kv, experts, moe_i = 4096, 151936, 64 * 128, 4 * 128, 128, 1536
    attention = _linear(h, q, False) + 2 * _linear(h, kv, False) + _linear(q, h, False) + 2 * 128  # + q/k norms
    moe = experts * h + experts * h * 2 * moe_i + experts * moe_i * h  # router, gate_up, down: every expert
    layer = attention + moe + 2 * h
    e, i, merged = 1152, 4304, 1152 * 4
    block = 2 * 2 * e + _linear(e, 3 * e) + _linear(e, e) + _linear(e, i) + _linear(i, e)
    merger = 2 * e + _linear(merged, merged) + _linear(merged, h)
    deepstack = 3 * (2 * merged + _linear(merged, merged) + _linear(merged, h))  # norm after the 2x2 shuffle
    vision = _linear(3 * 2 * 16 * 16, e) + 2304 * e + 27 * block + merger + deepstack
    return dict(layer=layer, embed=v * h, norm=h, vision=vision, kv_per_token=2 * kv * BF16)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, config in (("2b", QWEN2_VL_2B), ("moe", QWEN3_VL_MOE)):
        d = tmp_path_factory.mktemp(name)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        out[name] = d
    return out


@pytest.fixture(scope="module")
def sizes(models) -> dict[str, plan.ModelBytes]:
    return {name: plan.measure(plan.load_config(d)) for name, d in models.items()}


def _check_ranges(stages: list[plan.StagePlan], n: int, count: int) -> None:
    assert len(stages) == count
    assert stages[0].start == 0 and stages[-1].end == n
    for a, b in itertools.pairwise(stages):
        assert a.end == b.start
    assert all(s.end > s.start for s in stages)
    assert [s.index for s in stages] == list(range(count))
    assert [(s.first, s.last) for s in stages] == [(i == 0, i == count - 1) for i in range(count)]


def _largest(stages: list[plan.StagePlan], context: int = 0) -> int:
    return max(s.total_bytes(context) for s in stages)


def test_2b_bytes_match_the_architecture(sizes):
    s, x = sizes["2b"], _expected_2b()
    assert (s.model_type, s.dtype, s.tied, s.num_layers) == ("qwen2_vl", torch.bfloat16, True, 28)  # dtype: torch_dtype
    assert s.layers == (x["layer"] * BF16,) * 28
    assert (s.embed, s.norm, s.vision) == (x["embed"] * BF16, x["norm"] * BF16, x["vision"] * BF16)
    assert s.head == s.embed  # tied: the last stage reads the embedding as its head
    assert s.kv_per_token == (x["kv_per_token"],) * 28
    # Qwen2-VL-2B-Instruct's published parameter count (the tied head counted once).
    assert (sum(s.layers) + s.embed + s.norm + s.vision) // BF16 == 2_208_985_600


def test_2b_plans(sizes):
    s, x = sizes["2b"], _expected_2b()
    layer, kv_1k = x["layer"] * BF16, x["kv_per_token"] * 1000
    for count in range(1, 9):
        stages = plan.partition(s, count)
        _check_ranges(stages, 28, count)
        for st in stages:
            ends = (s.embed if st.first else 0) + ((s.norm + (0 if st.first else s.embed)) if st.last else 0)
            assert st.weight_bytes == st.num_layers * layer + ends
            assert st.kv_bytes_per_1k == st.num_layers * kv_1k
        even = plan.stage_plans(s, split_layers(28, count))
        assert _largest(stages) <= _largest(even)
    # The embedding (~0.43 GiB) weighs ~5 layers, so the end stages take fewer layers.
    four = plan.partition(s, 4)
    assert [(st.start, st.end) for st in four] == [(0, 5), (5, 14), (14, 23), (23, 28)]
    assert _largest(four) < _largest(plan.stage_plans(s, split_layers(28, 4)))


def test_2b_plan_is_optimal(sizes):
    s = sizes["2b"]
    for count in (3, 4):
        best = min(_largest(plan.stage_plans(s, list(zip((0, *cuts), (*cuts, 28))))) for cuts in itertools.combinations(range(1, 28), count - 1))
        assert _largest(plan.partition(s, count)) == best


def test_moe_bytes_match_the_architecture(sizes, models):
    s, x = sizes["moe"], _expected_moe()
    assert (s.model_type, s.dtype, s.tied, s.num_layers) == ("qwen3_vl_moe", torch.bfloat16, False, 94)
    assert s.layers == (x["layer"] * BF16,) * 94  # all 128 experts live in their layer
    assert (s.embed, s.norm, s.head, s.vision) == (x["embed"] * BF16, x["norm"] * BF16, x["embed"] * BF16, x["vision"] * BF16)
    assert s.kv_per_token == (x["kv_per_token"],) * 94
    assert (sum(s.layers) + s.embed + s.norm + s.head + s.vision) // BF16 == 235_670_022_896

    # Meta device: nothing allocated, so after the one-off import of the modeling code a
    # 235B-parameter model is built and counted in well under a second.
    config = plan.load_config(models["moe"])
    began = time.perf_counter()
    assert plan.measure(config) == s
    assert time.perf_counter() - began < 5


def test_moe_plans(sizes):
    s, x = sizes["moe"], _expected_moe()
    layer, head = x["layer"] * BF16, x["embed"] * BF16
    for count in (1, 2, 3, 4, 8, 16, 94):
        stages = plan.partition(s, count)
        _check_ranges(stages, 94, count)
        for st in stages:
            ends = (head if st.first else 0) + ((x["norm"] * BF16 + head) if st.last else 0)  # untied: own head
            assert st.weight_bytes == st.num_layers * layer + ends
        assert _largest(stages) <= _largest(plan.stage_plans(s, split_layers(94, count)))
    # With 32k tokens of KV in the balance the stages' totals include it, and it still beats the even split.
    stages = plan.partition(s, 8, context=32768)
    _check_ranges(stages, 94, 8)
    assert stages[1].total_bytes(32768) == stages[1].weight_bytes + stages[1].num_layers * x["kv_per_token"] * 32768
    assert _largest(stages, 32768) < _largest(plan.stage_plans(s, split_layers(94, 8)), 32768)


def test_dtype_override(models, sizes):
    config = plan.load_config(models["2b"])
    stages = plan.plan(config, 2, torch.float32)
    assert [st.weight_bytes for st in stages] == [2 * st.weight_bytes for st in plan.partition(sizes["2b"], 2)]
    assert stages[0].kv_bytes_per_1k == 14 * 2 * 256 * 4 * 1000
    assert config_dtype(config) == torch.bfloat16  # building did not rewrite the caller's config


def test_bad_stage_counts(sizes):
    with pytest.raises(ValueError, match="cannot split 28 layers into 29 stages"):
        plan.partition(sizes["2b"], 29)
    with pytest.raises(ValueError, match=r"cannot split 28 layers into 0 stages \(1 to 28"):
        plan.partition(sizes["2b"], 0)
    with pytest.raises(ValueError, match="context"):
        plan.partition(sizes["2b"], 2, context=-1)


def _cli(*argv: str) -> argparse.Namespace:
    return plan.add_arguments(argparse.ArgumentParser(prog="vlmesh plan")).parse_args(list(argv))


def test_cli_reads_only_config_json(models, capsys):
    d = models["2b"]
    assert [p.name for p in d.iterdir()] == ["config.json"]  # no weights on disk
    assert plan.run(_cli("--model", str(d), "--stages", "2", "--also", "4,2")) == 0
    text = capsys.readouterr().out
    assert "qwen2_vl, 28 layers, bfloat16, tied head" in text
    assert "2 stage(s):" in text and "4 stage(s):" in text and text.count("stage(s):") == 2
    assert " 23:28 " in text and "lm_head (tied: a copy of embed_tokens)" in text

    assert plan.run(_cli("--model", str(models["moe"]), "--stages", "4", "--also", "2", "--json", "--dtype", "float16")) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model_type"], out["dtype"], out["num_layers"], out["tied"]) == ("qwen3_vl_moe", "float16", 94, False)
    assert out["vision_bytes"] == _expected_moe()["vision"] * 2
    assert [p["stages"] for p in out["plans"]] == [4, 2]
    four = out["plans"][0]
    assert [(st["start"], st["end"]) for st in four["stage"]] == [
        (st.start, st.end) for st in plan.partition(plan.measure(plan.load_config(models["moe"]), torch.float16), 4)
    ]
    assert four["largest_stage_bytes"] == max(st["weight_bytes"] for st in four["stage"])
    assert four["largest_stage_bytes"] <= four["even_split_largest_stage_bytes"]


def test_cli_errors(models, tmp_path, capsys):
    assert plan.run(_cli("--model", str(models["2b"]), "--stages", "29")) == 2
    assert "cannot split 28 layers into 29 stages" in capsys.readouterr().err
    # One of several counts beyond the rule is skipped with a note; the others are still planned.
    assert plan.run(_cli("--model", str(models["2b"]), "--stages", "2", "--also", "0,4,29")) == 0
    out = capsys.readouterr()
    assert "2 stage(s):" in out.out and "4 stage(s):" in out.out and out.out.count("stage(s):") == 2
    assert "skipping --also 0: cannot split 28 layers into 0 stages" in out.err
    assert "skipping --also 29: cannot split 28 layers into 29 stages" in out.err
    assert plan.run(_cli("--model", str(tmp_path), "--stages", "2")) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("--model", str(models["2b"]), "--stages", "2", "--also", "two")


@pytest.mark.parametrize("tied", [True, False])
def test_plan_agrees_with_what_stages_load(tmp_path, tied):
    from services.common.checkpoint import open_checkpoint
    from services.stage.model import StageModel
    from services.tiny import make_tiny

    path = make_tiny(tmp_path / "tiny", num_layers=5, tie_word_embeddings=tied)
    ckpt = open_checkpoint(path)
    sizes = plan.measure(plan.load_config(path))
    assert sizes.tied is ckpt.tied
    vision = ckpt.read(lambda part, name: name if part == "vision" else None, sizes.dtype, desc="vision")
    assert sizes.vision == sum(t.numel() * t.element_size() for t in vision.values())
    for count in (1, 2, 3, 5):
        for st in plan.partition(sizes, count):
            stage = StageModel(ckpt, st.start, st.end, sizes.dtype)
            # Memory, not StageModel.weight_bytes(): a single tied stage's head is a second
            # Parameter over the embedding's storage, which parameters() would count twice.
            storages = {p.data_ptr(): p.numel() * p.element_size() for p in stage.parameters()}
            assert sum(storages.values()) == st.weight_bytes, (count, st)


@pytest.mark.parametrize(("model_type", "tied"), [("qwen2_5_vl", True), ("qwen3_vl", False)])
def test_other_families(tmp_path, model_type, tied):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(model_type, tie_word_embeddings=tied)  # transformers' default sizes
    config.save_pretrained(tmp_path)
    sizes = plan.measure(plan.load_config(tmp_path))
    tc = config.get_text_config()
    n, head_dim = tc.num_hidden_layers, getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    assert (sizes.model_type, sizes.tied, sizes.dtype) == (model_type, tied, torch.float32)  # no dtype: float32
    assert sizes.kv_per_token == (2 * tc.num_key_value_heads * head_dim * 4,) * n
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = 4 * sum(p.numel() for p in model.parameters())  # each tied tensor once
    assert sum(sizes.layers) + sizes.embed + sizes.norm + sizes.head * (not tied) + sizes.vision == total
    assert sizes.vision == 4 * sum(p.numel() for p in model.model.visual.parameters())
    for count in (1, 2, 3):
        stages = plan.partition(sizes, count)
        _check_ranges(stages, n, count)
        copy = sizes.head if tied and count > 1 else 0  # the last stage's own copy of a tied head
        assert sum(st.weight_bytes for st in stages) + sizes.vision == total + copy


def test_k8s_stages_too_many_stages_is_one_line(models):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "tools" / "k8s_stages.py"), "--model", str(models["2b"]), "--stages", "29"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "k8s_stages: error: cannot split 28 layers into 29 stages (1 to 28: a stage holds at least one layer)"
    )
