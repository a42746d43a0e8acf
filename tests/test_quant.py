"""The int8 W8A8 linear (services/stage/quant.py) and SmoothQuant's folds (services/quantize.py),
against float references; and what a stage makes of --quantize on float and int8 checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.quantize import smooth_layer, smoothing_scales
from services.stage import quant
from services.stage.quant import Int8Linear

K, N, M = 512, 384, 64


def _linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    lin.weight.data = w.clone()
    if bias is not None:
        lin.bias.data = bias.clone()
    return lin


# A few channels 60x the others in every token: LLM activations have such persistent outlier
# channels, which is SmoothQuant's premise.
OUTLIERS = torch.randperm(K, generator=torch.Generator().manual_seed(0))[:8]


def _activations(kind: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(M, K, generator=g)
    if kind == "outliers":
        x[:, OUTLIERS] *= 60
    return x


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_int8_linear_error_is_within_int8_rounding(kind):
    """Every output element is within the worst case that rounding x and W to int8 allows:
    x = s_x x_q + e_x with |e_x| <= s_x / 2 per token, W = s_w W_q + e_w with |e_w| <= s_w / 2 per
    output channel, so |x W^T - x_q W_q^T s_x s_w| <= sum_j (s_x |W_ij| + |x_j| s_w_i + s_x s_w_i / 2) / 2
    (integer accumulation is exact; float32 scaling adds ~1e-7 relative)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    x = _activations(kind, g)
    lin = Int8Linear.from_float(_linear(w, b))
    assert lin.weight.dtype == torch.int8 and lin.weight_scale.shape == (N, 1)
    y = lin(x)
    ref = x.double() @ w.double().t() + b.double()
    s_x = x.abs().amax(1, keepdim=True).double() / 127  # [M, 1]
    s_w = w.abs().amax(1).double() / 127  # [N]
    bound = (s_x @ w.abs().double().sum(1, keepdim=True).t() + x.abs().double().sum(1, keepdim=True) @ s_w[None] + s_x * s_w[None] * K / 2) / 2
    slack = 1e-5 * (x.abs().double() @ w.abs().double().t() + b.abs().double())
    err = (y.double() - ref).abs()
    assert (err <= bound + slack).all(), float((err - bound).max())
    assert err.max() > 1e-4  # it really is int8, not a float matmul
    assert _rel(y, ref) < {"random": 0.02, "outliers": 0.06}[kind]
    # The same numbers as the dequantized weight times the per-token dequantized input, in float64.
    xq, xs = quant.quantize_tokens(x)
    fake = (xq.double() * xs.double()) @ lin.dequantized().double().t() + b.double()
    torch.testing.assert_close(y.double(), fake, rtol=1e-5, atol=1e-5)


def test_smoothquant_reduces_the_error_on_outlier_activations():
    """X / s into the input, W * s into the weight (s = max|X|^a / max|W|^(1-a)) leaves x W^T
    unchanged and moves the outlier channels' range into the weights: the int8 error against the
    float product drops several-fold on outlier-heavy inputs and does not grow on plain ones."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N, K, generator=g) * 0.05
    errors = {}
    for kind in ("random", "outliers"):
        calibration, x = _activations(kind, g), _activations(kind, g)
        ref = x.double() @ w.double().t()
        s = smoothing_scales(calibration.abs().amax(0), w.abs().amax(0), 0.5)
        torch.testing.assert_close((x / s).double() @ (w * s).double().t(), ref, rtol=1e-5, atol=1e-5)  # exact but for float32 rounding
        plain = _rel(Int8Linear.from_float(_linear(w))(x), ref)
        smoothed = _rel(Int8Linear.from_float(_linear(w * s))(x / s), ref)
        errors[kind] = (plain, smoothed)
    plain, smoothed = errors["outliers"]
    assert smoothed < plain / 3, errors  # measured: 0.035 -> 0.008
    plain, smoothed = errors["random"]
    assert smoothed < plain * 1.1, errors


@pytest.mark.parametrize(("m", "k", "n"), [(1, 128, 384), (1, 1536, 256), (37, 128, 384), (3, 17, 9), (300, 64, 96)])
def test_int8_matmul_is_exact_on_any_shape(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(quant.int8_matmul(x, w).long(), x.long() @ w.long().t())


def test_all_zero_tokens_stay_zero():
    lin = Int8Linear.from_float(_linear(torch.randn(8, 16)))
    y = lin(torch.zeros(2, 3, 16, dtype=torch.bfloat16))
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16 and not y.any()


def _text_model(family: str) -> nn.Module:
    """A small random float64 text model with grouped-query attention (4 heads, 2 KV heads)."""
    kw = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=100,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

        model = Qwen2VLTextModel(Qwen2VLTextConfig(**kw, rope_parameters=rope))
    else:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

        model = Qwen3VLTextModel(Qwen3VLTextConfig(**kw, head_dim=16, rope_parameters={**rope, "mrope_interleaved": True}))
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, biases away from 0
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_smoothing_folds_leave_the_decoder_layers_function_unchanged(family):
    """Each fold (into input_layernorm, post_attention_layernorm, up_proj's rows, and v_proj's rows
    per KV group for o_proj) is exact: transformers' own layers give the same hidden states."""
    torch.manual_seed(3)
    model = _text_model(family)
    x, pos = torch.randn(1, 7, 64, dtype=torch.float64), torch.arange(7).expand(3, 1, 7)
    with torch.no_grad():
        before = model(inputs_embeds=x, position_ids=pos, output_hidden_states=True).hidden_states
    state = {k: v.clone() for k, v in model.state_dict().items()}
    maxima = {name: torch.rand(m.in_features, dtype=torch.float64) * 10 for name, m in quant.targets(model).items()}
    smoothed = []
    for i in range(2):
        smoothed += smooth_layer(state, maxima, f"layers.{i}.", 4, 2, 0.5)
    assert sorted(smoothed) == sorted(quant.targets(model))  # all seven linears of both layers
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert {k.split(".", 2)[2] for k in changed} >= {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.v_proj.bias" if family == "qwen2_vl" else "self_attn.v_proj.weight",
        "mlp.up_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
    }
    model.load_state_dict(state)
    with torch.no_grad():
        after = model(inputs_embeds=x, position_ids=pos, output_hidden_states=True).hidden_states
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_smoothing_scales_leave_dead_channels_alone():
    s = smoothing_scales(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]


def test_per_stage_modes():
    assert quant.per_stage("int8", 3) == ["int8"] * 3
    assert quant.per_stage("int8, none", 2) == ["int8", "none"]
    with pytest.raises(ValueError, match="2 modes for 3 stages"):
        quant.per_stage("int8,none", 3)
    with pytest.raises(ValueError, match="auto, none, int8"):
        quant.per_stage("fp8", 1)


def _qc(**changes) -> dict:
    from services.quantize import quantization_config

    qc = quantization_config("qwen2_vl")
    group = qc["config_groups"]["group_0"]
    for path, value in changes.items():
        where, key = path.split("__")
        (qc if where == "top" else group[where])[key] = value
    return qc


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights__num_bits": 4}, "num_bits"),
        ({"input_activations__dynamic": False}, "dynamic"),
        ({"input_activations__strategy": "tensor"}, "strategy"),
        ({"weights__symmetric": False}, "symmetric"),
        ({"weights__type": "float"}, "type"),
        ({"top__format": "pack-quantized"}, "pack-quantized"),
        ({"top__quant_method": "awq"}, "awq"),
        ({"top__kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
    ],
)
def test_unsupported_quantization_configs_are_refused(changes, message):
    class Config:
        quantization_config = _qc(**changes)

    with pytest.raises(ValueError, match=message):
        quant.checkpoint_config(Config())


def test_our_quantization_config_is_accepted():
    class Config:
        quantization_config = _qc()

    assert quant.checkpoint_config(Config())["format"] == "int-quantized"


def test_stage_modes_on_a_float_checkpoint():
    from services.common.checkpoint import open_checkpoint
    from services.shapes import SHIPPED_MODEL
    from services.stage.model import StageModel

    ckpt = open_checkpoint(SHIPPED_MODEL)
    plain, auto, int8 = (StageModel(ckpt, 0, 2, torch.float32, quantize=mode) for mode in ("none", "auto", "int8"))
    assert plain.quantization == auto.quantization == "none"
    assert int8.quantization == "w8a8-int8"
    layer = int8.layers[0]
    q = {name: m for name, m in int8.named_modules() if isinstance(m, Int8Linear)}
    assert len(q) == 2 * 7 and not any(isinstance(m, nn.Linear) for name, m in int8.named_modules() if name.startswith("layers."))
    assert layer.self_attn.q_proj.weight.dtype == torch.int8 and layer.input_layernorm.weight.dtype == torch.float32
    assert int8.embed_tokens.weight.dtype == torch.float32
    # Load-time quantization without smoothing: exactly the per-channel rounding of the float weight.
    for name, m in q.items():
        w = plain.get_submodule(name).weight
        torch.testing.assert_close(m.dequantized(), w.detach(), atol=float(w.detach().abs().max()) / 254 + 1e-7, rtol=0)
    assert int8.weight_bytes() < 0.6 * plain.weight_bytes()
    with pytest.raises(ValueError, match="--quantize must be one of"):
        StageModel(ckpt, 0, 2, torch.float32, quantize="int4")
