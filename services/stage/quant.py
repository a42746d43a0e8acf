"""W8A8 int8 linears for the stages, in the compressed-tensors "int-quantized" layout.

A quantized linear keeps `weight` as int8 [out, in] with one scale per output channel
(`weight_scale`, [out, 1]) -- the tensors a compressed-tensors W8A8 checkpoint stores, loaded as
they are -- and quantizes its input per token at run time (symmetric, dynamic: each row's own
abs-max), so the matmul runs on int8 with int32 accumulation (`torch._int_mm`) and the two scales
are applied to the int32 result. Only the decoder layers' linears are quantized; embeddings,
norms, the LM head and the vision tower stay in the checkpoint's precision, and so do the
activations between the linears and the KV cache.

`prepare_stage` decides, per stage, what the state read from the checkpoint becomes:

    --quantize auto   as the checkpoint is (int8 where it stores int8 weights and scales)
    --quantize int8   an int8 checkpoint as is; a float one quantized at load time (no SmoothQuant)
    --quantize none   float linears; an int8 checkpoint is dequantized (weight * scale) as it
                      is read (Checkpoint.read without int8, as the vision service reads)
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

MODES = ("auto", "none", "int8")
NONE, W8A8 = "none", "w8a8-int8"  # StageModel.quantization
QMAX = 127  # symmetric int8: [-127, 127], so negating a value never overflows
SCALE_SUFFIX = ".weight_scale"
_LAYER = re.compile(r"^layers\.\d+\.")

# What `vlmesh quantize` writes and what a stage accepts: compressed-tensors' W8A8 preset (int8
# weights, symmetric, one scale per output channel; int8 input activations, symmetric, dynamic,
# one scale per token), as compressed_tensors.QuantizationConfig.model_dump() spells it.
WEIGHTS_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel", "dynamic": False}
ACTIVATION_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
FORMATS = ("int-quantized", "naive-quantized")


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized per token at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Parameters (not buffers) so that load_state_dict(assign=True) and weight_bytes() treat
        # them like any other weight; int8 ones can never require grad.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight.data)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype)
        out.weight.data, out.weight_scale.data = q, scale
        if linear.bias is not None:
            out.bias.data = linear.bias.data.clone()  # type: ignore[union-attr]
        return out

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32: the weight this module multiplies by."""
        return self.weight.float() * self.weight_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, x_scale = quantize_tokens(x.reshape(-1, self.in_features))
        acc = int8_matmul(xq, self.weight)  # [M, out] int32, exact
        # A checkpoint may store its scales in bfloat16: the product is formed in float32.
        y = acc.float().mul_(x_scale).mul_(self.weight_scale.float().view(1, -1))
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, w8a8 int8"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], float32 scale [out, 1]), symmetric per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / QMAX
    return torch.round(w / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], float32 scale [M, 1]), symmetric per row (token)."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / QMAX  # an all-zero row stays zero
    return torch.round(xf / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N]. On the CPU torch._int_mm takes any shape (and
    the transposed view of the stored weight: measured faster than a [K, N] copy, see
    bench/bench_int8.py); CUDA's kernel wants M > 16 and K, N multiples of 8, so short batches are
    padded and odd shapes fall back to a float32 product of the int8 values."""
    if xq.is_cuda:
        m, k = xq.shape
        if k % 8 or wq.shape[0] % 8:
            return torch.round(xq.float() @ wq.float().t()).to(torch.int32)
        if m <= 16:
            padded = torch.zeros(17, k, dtype=torch.int8, device=xq.device)
            padded[:m] = xq
            return torch._int_mm(padded, wq.t())[:m]
    return torch._int_mm(xq, wq.t())


def is_target(name: str, module: nn.Module) -> bool:
    """A linear `vlmesh quantize` and `--quantize int8` turn into int8: every nn.Linear inside a
    decoder layer (attention and dense-MLP projections). `name` is relative to the text model
    ("layers.3.mlp.up_proj"). MoE experts are fused 3-D parameters, not nn.Linear, and stay float,
    as does the MoE router."""
    return isinstance(module, nn.Linear) and bool(_LAYER.match(name))


def targets(text_model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in text_model.named_modules() if is_target(name, m)}  # type: ignore[misc]


def checkpoint_config(config: Any) -> dict | None:
    """The checkpoint's `quantization_config` when it is one a stage runs (compressed-tensors,
    int8 W8A8 with dynamic per-token activations); None for a float checkpoint. Anything else is
    refused with what it is, rather than loaded wrongly."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported (only compressed-tensors W8A8 int8)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    for name, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"compressed-tensors config group {name!r}: format {fmt!r} is not supported (int-quantized W8A8 only)")
        for what, want in (("weights", WEIGHTS_ARGS), ("input_activations", ACTIVATION_ARGS)):
            args = group.get(what) or {}
            wrong = {k: args.get(k) for k in ("num_bits", "type", "symmetric", "dynamic") if args.get(k) != want[k]}
            strategy = args.get("strategy")
            if what == "weights" and strategy not in ("channel", "tensor"):
                wrong["strategy"] = strategy
            if what == "input_activations" and strategy != "token":
                wrong["strategy"] = strategy
            if wrong:
                raise ValueError(
                    f"compressed-tensors config group {name!r}: {what} {wrong} is not supported "
                    "(int8 symmetric weights per channel or tensor; int8 symmetric dynamic per-token activations)"
                )
        if group.get("output_activations"):
            raise ValueError(f"compressed-tensors config group {name!r}: output activation quantization is not supported")
    if qc.get("kv_cache_scheme"):
        raise ValueError("compressed-tensors kv_cache_scheme is not supported: the stages keep the KV cache unquantized")
    return qc


def prepare_stage(model: nn.Module, state: dict[str, torch.Tensor], mode: str, dtype: torch.dtype, config: Any) -> str:
    """Make `model` (built on the meta device, names as in `state`) and `state` agree on which
    decoder-layer linears are int8, per `mode` (see the module doc); returns NONE or W8A8.
    Must run before the state is loaded into the model."""
    if mode not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    checkpoint_config(config)  # refuses a quantization this code cannot run
    stored = {k.removesuffix(SCALE_SUFFIX) for k in state if k.endswith(SCALE_SUFFIX)}
    if stored and mode == "none":
        raise ValueError("--quantize none: read the checkpoint without int8 (Checkpoint.read dequantizes)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    stray = sorted(stored - set(linears))
    if stray:
        raise ValueError(f"the checkpoint quantizes {len(stray)} tensors that are no nn.Linear of this stage, e.g. {stray[:3]}")
    if not stored and mode == "int8":
        stored = {name for name, m in linears.items() if is_target(name, m)}
        for name in stored:
            q, scale = quantize_weight(state[name + ".weight"])
            state[name + ".weight"], state[name + SCALE_SUFFIX] = q, scale
    if not stored:
        return NONE
    for name in stored:
        weight = state[name + ".weight"]
        if weight.dtype != torch.int8:
            raise ValueError(f"{name}.weight has a weight_scale but is {weight.dtype}, not int8")
        old = linears[name]
        scale = state[name + SCALE_SUFFIX]
        if scale.numel() == 1:  # strategy "tensor": one scale for the whole weight
            state[name + SCALE_SUFFIX] = scale.reshape(1, 1).expand(old.out_features, 1).contiguous()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int8Linear(old.in_features, old.out_features, old.bias is not None, "meta", dtype))
    return W8A8


def per_stage(value: str, stages: int) -> list[str]:
    """`vlmesh up --quantize`: one mode for every stage, or a comma list with one per stage."""
    modes = [v.strip() for v in value.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--quantize takes {', '.join(MODES)} (or a comma list of them, one per stage), got {value!r}")
    if len(modes) == 1:
        return modes * stages
    if len(modes) != stages:
        raise ValueError(f"--quantize lists {len(modes)} modes for {stages} stages")
    return modes
