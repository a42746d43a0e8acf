"""Reading an HF checkpoint directory: config, model family, and only the tensors a service owns.

Two key layouts exist for the same model: the hub's (`model.layers.N.*`, `visual.*`, as in
Qwen/Qwen2-VL-2B-Instruct) and transformers 5's save_pretrained (`model.language_model.*`,
`model.visual.*`). Both are mapped to one canonical form here, so every service is layout-blind."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """The transformers classes one model family is built from."""

    model_type: str
    for_generation: type  # e.g. Qwen2VLForConditionalGeneration: the reference for parity
    base_model: type  # owns get_rope_index
    text_model: type  # embed_tokens / layers / norm / rotary_emb (/ _deepstack_process)
    vision_model: type  # forward(pixels, grid_thw) -> pooler_output (+ deepstack_features)
    # Parameter names (suffixes) that the hub stores transposed in dims 1 and 2 and transformers
    # transposes on load when the shape disagrees (conversion_mapping's Transpose(1, 2,
    # check_dims=True) for qwen3_vl_moe's fused experts).
    transposed_on_load: tuple[str, ...] = ()

    def deepstack_layers(self, config) -> int:
        """How many decoder layers (0..k-1) get a DeepStack feature added after them."""
        return len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())


def _qwen2_vl() -> Family:
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m

    return Family(
        "qwen2_vl",
        m.Qwen2VLForConditionalGeneration,
        m.Qwen2VLModel,
        m.Qwen2VLTextModel,
        m.Qwen2VisionTransformerPretrainedModel,
    )


def _qwen2_5_vl() -> Family:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    return Family(
        "qwen2_5_vl",
        m.Qwen2_5_VLForConditionalGeneration,
        m.Qwen2_5_VLModel,
        m.Qwen2_5_VLTextModel,
        m.Qwen2_5_VisionTransformerPretrainedModel,  # window attention + full-attention blocks
    )


def _qwen3_vl() -> Family:
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m

    return Family(
        "qwen3_vl",
        m.Qwen3VLForConditionalGeneration,
        m.Qwen3VLModel,
        m.Qwen3VLTextModel,
        m.Qwen3VLVisionModel,
    )


def _qwen3_vl_moe() -> Family:
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    return Family(
        "qwen3_vl_moe",
        m.Qwen3VLMoeForConditionalGeneration,
        m.Qwen3VLMoeModel,
        m.Qwen3VLMoeTextModel,
        m.Qwen3VLMoeVisionModel,
        transposed_on_load=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    )


FAMILIES: dict[str, Callable[[], Family]] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": _qwen3_vl_moe,
}


def config_dtype(config) -> torch.dtype:
    """The checkpoint's own dtype (what "auto" means): the text config's, else the outer one's."""
    d = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None) or "float32"
    return d if isinstance(d, torch.dtype) else getattr(torch, str(d).removeprefix("torch."))


@dataclass
class Checkpoint:
    path: Path
    config: PretrainedConfig  # the model's (text_config, vision_config inside)
    family: Family

    @property
    def text_config(self):
        return self.config.text_config

    @property
    def vision_config(self):
        return self.config.vision_config

    @property
    def tied(self) -> bool:
        # Qwen2-VL-2B ties lm_head to embed_tokens. transformers 5 ties on the outer config's flag
        # only (PreTrainedModel.tie_weights); the Qwen2(.5)-VL configs copy a True text-level flag
        # up to it, while Qwen3-VL-MoE's text config defaults to True without tying anything.
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def dtype(self, requested: str = "auto", device: torch.device | None = None) -> torch.dtype:
        """ "auto": the checkpoint's own dtype; on a GPU, bfloat16 where the checkpoint says float32
        (GPUs are built for it, and a float32 checkpoint there is almost always a training artefact)."""
        if requested != "auto":
            if requested not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"unknown dtype {requested!r}: auto, float32, bfloat16 or float16")
            return getattr(torch, requested)
        own = config_dtype(self.config)
        if device is not None and device.type == "cuda" and own == torch.float32:
            return torch.bfloat16
        return own

    def weight_files(self) -> dict[str, Path]:
        """checkpoint key -> file holding it."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.path / f for k, f in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

    def read(self, select: Callable[[str, str], str | None], dtype: torch.dtype, desc: str, int8: bool = False) -> dict[str, torch.Tensor]:
        """Read the tensors that `select(part, name)` maps to a local name; nothing else is
        touched, so a stage's memory scales with its share of the layers. A W8A8 checkpoint's
        int8 weights and their `weight_scale`s are kept as stored with `int8` (a stage running
        them, services/stage/quant.py), else dequantized to `dtype`."""
        files = self.weight_files()
        wanted: dict[str, tuple[str, Path]] = {}
        for key, file in files.items():
            part, name = canonical_key(key)
            local = select(part, name)
            if local is not None:
                wanted[key] = (local, file)
        out: dict[str, torch.Tensor] = {}
        began = time.monotonic()
        by_file: dict[Path, list[str]] = {}
        for key, (_, file) in wanted.items():
            by_file.setdefault(file, []).append(key)
        with tqdm(total=len(wanted), desc=desc, unit="tensor", disable=None) as bar:
            for file, keys in by_file.items():
                with safe_open(file, framework="pt") as f:
                    for key in keys:
                        out[wanted[key][0]] = _cast(f.get_tensor(key), key, dtype)
                        bar.update(1)
        if not int8:
            for name in [n for n in out if n.endswith(".weight_scale")]:
                scale, weight = out.pop(name), name.removesuffix("_scale")
                out[weight] = (out[weight].float() * scale.float()).to(dtype)
        size = sum(t.numel() * t.element_size() for t in out.values())
        log.info("%s: %d tensors, %.1f MiB in %.1fs from %s", desc, len(out), size / 2**20, time.monotonic() - began, self.path)
        return out


def _cast(t: torch.Tensor, key: str, dtype: torch.dtype) -> torch.Tensor:
    # A W8A8 checkpoint's int8 weights stay int8, and their scales keep the precision they were
    # stored in (services/stage/quant.py applies them in float32; read() dequantizes in float32).
    if not t.is_floating_point() or key.endswith(".weight_scale"):
        return t
    return t.to(dtype)


_KEY_RULES = [
    (re.compile(r"^model\.language_model\.(.+)$"), "text"),
    (re.compile(r"^model\.visual\.(.+)$"), "vision"),
    (re.compile(r"^visual\.(.+)$"), "vision"),
    (re.compile(r"^lm_head\.(.+)$"), "head"),
    (re.compile(r"^model\.(.+)$"), "text"),
]


def canonical_key(key: str) -> tuple[str, str]:
    """('text', 'layers.3.mlp.up_proj.weight'), ('vision', 'blocks.0...'), ('head', 'weight')."""
    for pattern, part in _KEY_RULES:
        m = pattern.match(key)
        if m:
            return part, m.group(1)
    return "other", key


def load_config(path: str | Path):
    """The PretrainedConfig of a checkpoint directory; only config.json has to be there."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    return AutoConfig.from_pretrained(path)


def open_checkpoint(path: str | Path, attn_implementation: str = "sdpa") -> Checkpoint:
    path = Path(path)
    config = load_config(path)
    if config.model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    # The layers are built directly, not through from_pretrained, so the attention kernel has to
    # be chosen here; sdpa is what from_pretrained picks, and parity needs the same kernel.
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn_implementation
    return Checkpoint(path, config, FAMILIES[config.model_type]())


def build_on_meta(cls: type, config, dtype: torch.dtype) -> Any:  # a transformers PreTrainedModel of `cls`
    """Instantiate a transformers module without allocating or initialising its weights."""
    with torch.device("meta"):
        return cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, transposed: tuple[str, ...] = ()) -> None:
    """Move `state` into a meta-built module; recompute the buffers that checkpoints never hold
    (rotary inv_freq) by rebuilding their owner from its config on the CPU. Tensors named in
    `transposed` (Family.transposed_on_load) are transposed in dims 1, 2 when their shape is the
    module's transposed, exactly as transformers' loader decides."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors of {what}, e.g. {missing[:3]}")
    for name, t in state.items():
        want = expected.get(name)
        if want is not None and t.shape != want.shape and name.endswith(transposed) and t.dim() == 3:
            state[name] = t.transpose(1, 2).contiguous()
    module.load_state_dict(state, strict=False, assign=True)
    for sub in module.modules():
        meta = [name for name, buf in sub.named_buffers(recurse=False) if buf.is_meta]
        if meta:
            fresh = type(sub)(sub.config)
            for name in meta:
                sub.register_buffer(name, getattr(fresh, name), persistent=False)
