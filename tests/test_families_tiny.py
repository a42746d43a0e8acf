"""services.tiny for Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: the real HF layout, loadable by the
family's own ForConditionalGeneration and AutoProcessor, and the family detected from config.json."""

from __future__ import annotations

import argparse
import io
import json
import logging
import warnings

import pytest
import torch
from conftest import FAMILY_TINY
from safetensors import safe_open

from services import tiny
from services.common.checkpoint import open_checkpoint

# family -> model_type, generation class, processor, video processor, patch size (qwen2-vl: test_tiny.py)
EXPECT = {
    "qwen2.5-vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14),
    "qwen3-vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16),
    "qwen3-vl-moe": ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16),
}


def _keys(path) -> dict[str, tuple]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out


@pytest.mark.parametrize("family", list(EXPECT))
def test_layout_and_loading(family_model, family):
    import transformers
    from transformers import AutoConfig, AutoProcessor

    model_type, arch, processor_cls, video_cls, patch = EXPECT[family]
    path = family_model(family)
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    } <= names
    assert json.loads((path / "config.json").read_text())["architectures"] == [arch]
    video_cfg = json.loads((path / "video_preprocessor_config.json").read_text())
    assert video_cfg["video_processor_type"] == video_cls and video_cfg["fps"] == 2.0

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = AutoConfig.from_pretrained(path)
            processor = AutoProcessor.from_pretrained(path)
            model, info = getattr(transformers, arch).from_pretrained(path, output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    assert buf.getvalue() == "" and not caught, (buf.getvalue(), [str(w.message) for w in caught])
    assert cfg.model_type == model_type
    assert type(processor).__name__ == processor_cls and type(processor.video_processor).__name__ == video_cls
    assert processor.image_processor.patch_size == processor.video_processor.patch_size == cfg.vision_config.patch_size == patch
    assert model.config.tie_word_embeddings is FAMILY_TINY[family]["tie_word_embeddings"]

    ckpt = open_checkpoint(path)  # the family comes from config.json's model_type
    assert ckpt.family.model_type == model_type and ckpt.family.for_generation.__name__ == arch
    assert ckpt.tied is FAMILY_TINY[family]["tie_word_embeddings"]
    assert ckpt.family.deepstack_layers(ckpt.config) == (2 if family.startswith("qwen3") else 0)


def test_moe_hub_layout_stores_experts_transposed(family_model):
    path = family_model("qwen3-vl-moe")
    cfg = open_checkpoint(path).text_config
    shapes = _keys(path)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (e, h, 2 * i)  # transformers: (e, 2i, h)
    assert shapes["model.language_model.layers.0.mlp.experts.down_proj"] == (e, i, h)
    assert shapes["model.language_model.layers.0.mlp.gate.weight"] == (e, h)
    last = cfg.num_hidden_layers - 1  # mlp_only_layers: a dense MLP
    assert f"model.language_model.layers.{last}.mlp.up_proj.weight" in shapes


def test_qwen3_chat_template_has_no_default_system_prompt(family_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(family_model("qwen3-vl"))
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    assert processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_cli_makes_each_family(tmp_path):
    parser = tiny.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "moe"), "--family", "qwen3-vl-moe", "--layers", "2", "--experts", "3"])
    assert tiny.run(args) == 0
    cfg = open_checkpoint(tmp_path / "moe").config
    assert cfg.model_type == "qwen3_vl_moe" and cfg.text_config.num_experts == 3 and cfg.text_config.num_hidden_layers == 2
    bad = parser.parse_args(["--out", str(tmp_path / "bad"), "--family", "qwen3-vl", "--deepstack-layers", "5"])
    assert tiny.run(bad) == 2


def test_stage_model_matches_transformers_layers(family_model):
    """The stage's decoder layers hold exactly the weights transformers loads (incl. the
    transposed experts), for every family."""
    import transformers

    from services.stage.model import StageModel

    for family in EXPECT:
        path = family_model(family)
        ckpt = open_checkpoint(path)
        ref = getattr(transformers, EXPECT[family][1]).from_pretrained(path, dtype=torch.float32)
        stage = StageModel(ckpt, 0, ckpt.text_config.num_hidden_layers, torch.float32)
        want = {f"layers.{k[len('layers.') :]}": v for k, v in ref.model.language_model.state_dict().items() if k.startswith("layers.")}
        got = {k: v for k, v in stage.state_dict().items() if k.startswith("layers.")}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (family, k)
        assert torch.equal(stage.lm_head.weight, ref.lm_head.weight)
