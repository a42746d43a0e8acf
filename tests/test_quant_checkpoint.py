"""`vlmesh quantize` writes a compressed-tensors W8A8 checkpoint: the ecosystem's own reader
(compressed-tensors through transformers) loads it, a stage reads only its own layers of it (int8
weights and scales as stored), and the vision service reads its float tower from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from services.common.checkpoint import canonical_key, open_checkpoint
from services.quantize import CALIBRATION_FILE, quantize
from services.shapes import SHIPPED_MODEL, data
from services.stage.quant import Int8Linear

VLMESH = [sys.executable, "-m", "services.cli"]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "shapes-w8a8"
    run = subprocess.run(
        [*VLMESH, "quantize", "--model", str(SHIPPED_MODEL), "--out", str(out), "--samples", "32"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}: 28 int8 linears (28 smoothed)" in run.stderr
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def test_checkpoint_is_compressed_tensors_w8a8(quantized):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config, source = json.loads((quantized / "config.json").read_text()), json.loads((SHIPPED_MODEL / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config.pop("quantization_config"))
    assert config == source  # nothing else in config.json changes
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    (group,) = qc.config_groups.values()
    assert group.targets == ["Linear"] and group.weights == preset.weights and group.input_activations == preset.input_activations
    assert qc.format == "int-quantized" and qc.quant_method == "compressed-tensors" and qc.kv_cache_scheme is None
    assert "lm_head" in qc.ignore and any(i.startswith("re:") and "visual" in i for i in qc.ignore)

    before, after = _tensors(SHIPPED_MODEL), _tensors(quantized)
    linears = {f"model.layers.{i}.{n}" for i in range(4) for n in LINEARS}
    assert set(after) == set(before) | {f"{n}.weight_scale" for n in linears}
    for n in linears:
        q, scale = after[f"{n}.weight"], after[f"{n}.weight_scale"]
        assert q.dtype == torch.int8 and q.shape == before[f"{n}.weight"].shape and int(q.abs().max()) == 127
        assert scale.dtype == torch.float32 and scale.shape == (q.shape[0], 1)
    changed = {k for k in before if k in after and not (after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]))}
    folded = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.bias")
    smoothed = {f"model.layers.{i}.{n}" for i in range(4) for n in folded}
    assert changed == {f"{n}.weight" for n in linears} | smoothed  # vision, embeddings, final norm: the same bytes
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (quantized / name).read_bytes() == (SHIPPED_MODEL / name).read_bytes()
    record = json.loads((quantized / "quantize.json").read_text())
    assert record["alpha"] == 0.5 and record["samples"] == 32 and record["calibration"] == "shapes"


def test_compressed_tensors_reader_loads_it(quantized):
    """transformers' compressed-tensors integration builds the model from our config.json, loads
    our int8 weights and scales into the modules it quantizes (exactly the decoder layers'
    linears), and decompresses them to what a stage multiplies by."""
    from compressed_tensors import decompress_module
    from compressed_tensors.compressors import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from transformers import Qwen2VLForConditionalGeneration

    from services.stage.model import StageModel

    model = Qwen2VLForConditionalGeneration.from_pretrained(quantized)
    files = _tensors(quantized)
    schemed = {name for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert schemed == {f"model.language_model.layers.{i}.{n}" for i in range(4) for n in LINEARS}
    stage = StageModel(open_checkpoint(quantized), 0, 4, torch.float32)
    text = model.model.language_model
    for i in range(4):
        for n in LINEARS:
            theirs, ours = text.layers[i].get_submodule(n), stage.layers[i].get_submodule(n)
            assert theirs.quantization_status == QuantizationStatus.COMPRESSED
            assert torch.equal(theirs.weight, files[f"model.layers.{i}.{n}.weight"]) and theirs.weight.dtype == torch.int8
            assert torch.equal(theirs.weight_scale, files[f"model.layers.{i}.{n}.weight_scale"])
            scheme = theirs.quantization_scheme
            decompressed = IntQuantizationCompressor.decompress({"weight": theirs.weight, "weight_scale": theirs.weight_scale}, scheme)
            assert torch.equal(decompressed["weight"], ours.dequantized())
            decompress_module(theirs)
            assert torch.equal(theirs.weight, ours.dequantized())
    for key, t in stage.state_dict().items():  # norms (smoothed), biases, embeddings: as the reader has them
        if not key.endswith(("weight_scale",)) and t.dtype != torch.int8:
            assert torch.equal(t, text.state_dict()[key] if not key.startswith("lm_head") else model.lm_head.weight), key


def test_stage_reads_only_its_own_layers_as_stored(quantized, monkeypatch):
    from services import plan
    from services.stage.model import StageModel

    ckpt = open_checkpoint(quantized)
    read = ckpt.read
    seen: dict[str, torch.Tensor] = {}

    def spy(*args, **kwargs):
        out = read(*args, **kwargs)
        seen.update(out)
        return out

    monkeypatch.setattr(ckpt, "read", spy)
    stage = StageModel(ckpt, 2, 4, torch.bfloat16)
    assert stage.quantization == "w8a8-int8"
    layers = {k.split(".")[1] for k in seen if k.startswith("layers.")}
    assert layers == {"0", "1"} and set(seen) - {k for k in seen if k.startswith("layers.")} == {"norm.weight", "lm_head.weight"}
    files = _tensors(quantized)
    for i in (2, 3):
        for n in LINEARS:
            m = stage.layers[i - 2].get_submodule(n)
            assert isinstance(m, Int8Linear)
            assert seen[f"layers.{i - 2}.{n}.weight"].dtype == torch.int8  # read as int8, never through float
            assert torch.equal(m.weight, files[f"model.layers.{i}.{n}.weight"])
            assert m.weight_scale.dtype == torch.float32  # scales keep their stored precision in a bfloat16 stage
            assert torch.equal(m.weight_scale, files[f"model.layers.{i}.{n}.weight_scale"])
    assert stage.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    # `vlmesh plan` counts what the stages hold: int8 linears, float32 scales, the rest as loaded.
    sizes = plan.measure(plan.load_config(quantized))
    assert sizes.int8
    for a, b in ((0, 2), (2, 4), (0, 4)):
        (st,) = plan.stage_plans(sizes, [(a, b)])
        assert StageModel(ckpt, a, b, torch.float32).weight_bytes() == st.weight_bytes
    float_sizes = plan.measure(plan.load_config(SHIPPED_MODEL))
    assert plan.measure(plan.load_config(SHIPPED_MODEL), int8=True) == sizes
    assert sum(sizes.layers) < 0.3 * sum(float_sizes.layers)  # float32 -> int8


def test_quantize_none_dequantizes(quantized):
    from services.stage.model import StageModel

    ckpt = open_checkpoint(quantized)
    q, plain = StageModel(ckpt, 0, 2, torch.float32), StageModel(ckpt, 0, 2, torch.float32, quantize="none")
    assert plain.quantization == "none" and not any(isinstance(m, Int8Linear) for m in plain.modules())
    for n in LINEARS:
        assert torch.equal(plain.layers[1].get_submodule(n).weight, q.layers[1].get_submodule(n).dequantized())


def test_vision_service_reads_its_float_tower_from_the_quantized_checkpoint(quantized):
    from services.vision.encoder import VisionEncoder

    def tower(path: Path) -> dict[str, torch.Tensor]:
        enc = VisionEncoder(open_checkpoint(path), torch.float32, 0, 1 << 24)
        return enc.model.state_dict()

    ours, source = tower(quantized), tower(SHIPPED_MODEL)
    assert ours.keys() == source.keys() and all(torch.equal(ours[k], source[k]) for k in ours)
    assert all(t.dtype == torch.float32 for t in ours.values())


def test_calibration_directory(tmp_path):
    """DIR/calibration.jsonl (image optional, response optional); without it, every image."""
    images = tmp_path / "images"
    images.mkdir()
    for i, example in enumerate(data.examples(1, 2, stream=data.TRAIN_STREAM)):
        example.scene.render().save(images / f"{i}.png")
    lines = [
        {"image": "0.png", "prompt": "What colour is the circle?", "response": "red"},
        {"image": "1.png", "prompt": "Describe the image."},
        {"prompt": "How many shapes are there?"},
    ]
    (images / CALIBRATION_FILE).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    record = quantize(SHIPPED_MODEL, tmp_path / "a", calibration=str(images), samples=8)
    assert record["samples"] == 3 and record["smoothed_linears"] == 28
    (images / CALIBRATION_FILE).unlink()
    assert quantize(SHIPPED_MODEL, tmp_path / "b", calibration=str(images), samples=1)["samples"] == 1
    for name in ("0.png", "1.png"):
        (images / name).unlink()
    with pytest.raises(ValueError, match="no calibration.jsonl and no images"):
        quantize(SHIPPED_MODEL, tmp_path / "c", calibration=str(images))
    (images / CALIBRATION_FILE).write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="calibration.jsonl:2: not JSON"):
        quantize(SHIPPED_MODEL, tmp_path / "c", calibration=str(images))


def test_quantize_refuses_bad_input(quantized, tmp_path):
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantized, tmp_path / "x")
    with pytest.raises(ValueError, match="--alpha"):
        quantize(SHIPPED_MODEL, tmp_path / "x", alpha=1.5)
    with pytest.raises(ValueError, match="--calibration"):
        quantize(SHIPPED_MODEL, tmp_path / "x", calibration=str(tmp_path / "missing"))
    run = subprocess.run([*VLMESH, "quantize", "--model", str(quantized), "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "quantize: error:" in run.stderr and "already quantized" in run.stderr


def test_sharded_untied_checkpoint_in_the_transformers_layout(tiny_models, tmp_path):
    """Shards, an index, `model.language_model.*` keys and an untied head are written back as
    they were: each tensor in its shard under its key, the scales next to their weights."""
    from services.stage.model import StageModel

    source = tiny_models["b"]
    out = tmp_path / "b-w8a8"
    quantize(source, out, samples=4)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    before, after = _tensors(source), _tensors(out)
    assert set(index) == set(after) and {f for f in index.values()} == {p.name for p in source.glob("*.safetensors")}
    source_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    for key, file in index.items():
        base = key.removesuffix("_scale")
        assert file == source_index[base], key
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert all(canonical_key(k)[0] == "text" for k in after if k.endswith("weight_scale"))
    stage = StageModel(open_checkpoint(out), 0, 5, torch.float32)
    assert stage.quantization == "w8a8-int8" and sum(isinstance(m, Int8Linear) for m in stage.modules()) == 5 * 7


def test_readers_that_run_float_get_int8_tensors_dequantized(quantized, tmp_path):
    """A checkpoint that also quantizes a vision linear: the vision service (which runs float)
    gets weight * scale, as does a stage started with --quantize none."""
    import shutil

    from safetensors.torch import save_file

    from services.stage import quant
    from services.vision.encoder import VisionEncoder

    for f in quantized.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = _tensors(quantized)
    q, scale = quant.quantize_weight(tensors["visual.blocks.0.attn.qkv.weight"])
    tensors["visual.blocks.0.attn.qkv.weight"], tensors["visual.blocks.0.attn.qkv.weight_scale"] = q, scale
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    encoder = VisionEncoder(open_checkpoint(tmp_path), torch.float32, 0, 1 << 24)
    weight = encoder.model.blocks[0].attn.qkv.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, q.float() * scale)
    assert "blocks.0.attn.qkv.weight_scale" not in encoder.model.state_dict()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe"])
def test_other_families_quantize_and_load(family, family_model, tmp_path):
    """Every decoder-layer nn.Linear becomes int8 and is smoothed; MoE experts (fused, not
    nn.Linear) and the router stay float and are listed in `ignore` for vLLM."""
    from torch import nn

    from services.stage.model import StageModel

    source = family_model(family)
    record = quantize(source, tmp_path / "q", samples=4)
    ckpt = open_checkpoint(tmp_path / "q")
    float_stage, stage = StageModel(open_checkpoint(source), 0, 4, torch.float32), StageModel(ckpt, 0, 4, torch.float32)
    linears = [n for n, m in float_stage.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]
    assert record["quantized_linears"] == record["smoothed_linears"] == len(linears) > 0
    assert all(isinstance(stage.get_submodule(n), Int8Linear) for n in linears)
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ("re:.*mlp.experts.*" in ignore) == (family == "qwen3-vl-moe")
    if family == "qwen3-vl-moe":
        assert any(p.dtype == torch.float32 and "experts" in n for n, p in stage.named_parameters())
