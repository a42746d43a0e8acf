"""`vlmesh quantize`: SmoothQuant calibration, then a compressed-tensors W8A8 int8 checkpoint.

    vlmesh quantize --model DIR --out DIR [--alpha 0.5] [--calibration shapes|DIR] [--samples N]

1. Calibration: image+text prompts (each with its answer, so the answer's tokens are seen too)
   go through the checkpoint's own transformers model; a forward hook on every decoder-layer
   linear (services.stage.quant.is_target) keeps the per-channel maximum of |input|.
   `--calibration shapes` (the default) draws pictures and questions from the shapes task's
   training stream (never the held-out one); `--calibration DIR` reads DIR/calibration.jsonl, one
   JSON object per line: {"image": "cat.jpg", "prompt": "What is this?", "response": "A cat."}
   ("image" relative to DIR and optional, "response" optional); without that file, every
   .png/.jpg/.jpeg/.webp in DIR is asked "Describe this image.".
2. SmoothQuant (Xiao et al., 2022): per input channel j of a linear, s_j = max|X_j|^alpha /
   max|W_j|^(1-alpha); X_j / s_j is folded into whatever produces X and W_j * s_j into the linear,
   which changes nothing in exact arithmetic but moves the activations' outlier channels into
   the weights, where per-channel int8 scales absorb them. See smooth_layer for where each fold goes.
3. Every decoder-layer linear is quantized to int8 with one scale per output channel and written
   as `<name>.weight` (int8) + `<name>.weight_scale` (float32 [out, 1]); every other tensor
   (vision tower, embeddings, norms -- with their folded smoothing --, LM head) is written as it
   was, under the same key and shard, and config.json gains compressed-tensors'
   `quantization_config`. Tokenizer, processor, chat template and generation files are copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from services.common.checkpoint import Checkpoint, build_on_meta, canonical_key, open_checkpoint
from services.stage import quant

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
DEFAULT_SAMPLES = 64
CALIBRATION_SEED = 20261130  # on the shapes training stream; the held-out set is another stream
CALIBRATION_FILE = "calibration.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
COPIED = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "*preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class Sample:
    """One calibration conversation."""

    prompt: str
    image: object | None  # a PIL image, or None for a text-only prompt
    response: str | None  # the assistant's answer, appended when known


def shapes_samples(count: int, seed: int = CALIBRATION_SEED) -> list[Sample]:
    """Pictures of the shapes task with one question each, the question types in turn."""
    from services.shapes import data

    rng = data.training_rng(seed)
    out: list[Sample] = []
    while len(out) < count:
        scene = data.draw_scene(rng)
        wanted = data.QUESTION_TYPES[len(out) % len(data.QUESTION_TYPES)]
        for question, answer, qtype, _ in data.questions(scene, rng):
            if qtype == wanted:
                out.append(Sample(question, scene.render(), answer))
                break
    return out


def directory_samples(path: Path, count: int) -> list[Sample]:
    from PIL import Image

    listing = path / CALIBRATION_FILE
    if listing.is_file():
        entries = []
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{listing}:{n}: not JSON ({e})") from None
                if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                    raise ValueError(f'{listing}:{n}: needs a "prompt" string')
                entries.append(entry)
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        entries = [{"image": p.name, "prompt": "Describe this image."} for p in files]
    if not entries:
        raise ValueError(f"{path}: no {CALIBRATION_FILE} and no images to calibrate on")
    out = []
    for entry in entries[:count]:
        image = None
        if entry.get("image"):
            with Image.open(path / entry["image"]) as img:
                image = img.convert("RGB")
        out.append(Sample(entry["prompt"], image, entry.get("response")))
    return out


def calibration_samples(spec: str, count: int) -> list[Sample]:
    if count < 1:
        raise ValueError(f"--samples must be at least 1, got {count}")
    if spec == "shapes":
        return shapes_samples(count)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--calibration takes 'shapes' or a directory, got {spec!r}")
    return directory_samples(path, count)


# --- calibration ---------------------------------------------------------------------------------


def activation_maxima(ckpt: Checkpoint, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Canonical linear name ("layers.3.mlp.up_proj") -> [in] float32 max |input| over all tokens
    of all samples, from the checkpoint's own transformers model in its own dtype."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt.path)
    generation: Any = ckpt.family.for_generation
    model = generation.from_pretrained(ckpt.path, dtype=ckpt.dtype()).eval()
    text = cast(torch.nn.Module, next(m for m in model.modules() if isinstance(m, ckpt.family.text_model)))
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in quant.targets(text).items()]
    try:
        for s in tqdm(samples, desc="calibration", unit="prompt", disable=None):
            content: list[dict] = ([{"type": "image"}] if s.image is not None else []) + [{"type": "text", "text": s.prompt}]
            messages = [{"role": "user", "content": content}]
            if s.response is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": s.response}]})
            prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=s.response is None)
            inputs = processor(text=[prompt], images=[s.image] if s.image is not None else None, return_tensors="pt")
            with torch.inference_mode():
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return maxima


# --- SmoothQuant ---------------------------------------------------------------------------------


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where a channel never fired or has no weight."""
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def _column_max(t: dict[str, torch.Tensor], linears: list[str]) -> torch.Tensor:
    return torch.cat([t[f"{n}.weight"] for n in linears]).abs().amax(0)


def smooth_layer(t: dict[str, torch.Tensor], maxima: dict[str, torch.Tensor], prefix: str, heads: int, kv_heads: int, alpha: float) -> list[str]:
    """Fold SmoothQuant's scales into one decoder layer's float32 tensors `t` (canonical names) in
    place; returns the linears whose input was smoothed. Every fold is exact in real arithmetic:

    - q/k/v_proj read input_layernorm's output, and gate/up_proj (dense MLP) read
      post_attention_layernorm's: an RMSNorm's output is its weight times the normalised input,
      so the norm's weight takes 1/s (one s shared by the linears that read it).
    - down_proj reads act(gate_proj(x)) * up_proj(x), linear in up_proj's output channel by
      channel: up_proj's output rows (and bias) take 1/s.
    - o_proj reads softmax(QK^T) V head by head, linear in V: v_proj's output rows take 1/s. With
      grouped-query attention one KV channel feeds the same channel of every query head in its
      group, so s is one value per KV channel (the maximum over the group's heads) repeated over
      the group's o_proj columns. This changes the V held in the KV cache, consistently.

    A MoE layer's post-attention norm feeds the router and the (unquantized) experts: no fold there.
    The folds into up_proj and v_proj rows cost those linears nothing: a per-output-channel int8
    scale absorbs any row scaling exactly."""
    attn, mlp = f"{prefix}self_attn.", f"{prefix}mlp."
    smoothed = []

    def into_norm(norm: str, linears: list[str]) -> None:
        if not all(f"{n}.weight" in t and n in maxima for n in linears):
            return
        x_max = torch.stack([maxima[n] for n in linears]).amax(0)
        s = smoothing_scales(x_max, _column_max(t, linears), alpha)
        t[f"{norm}.weight"] = t[f"{norm}.weight"] / s
        for n in linears:
            t[f"{n}.weight"] = t[f"{n}.weight"] * s
        smoothed.extend(linears)

    def into_rows(producer: str, consumer: str, s: torch.Tensor, columns: torch.Tensor) -> None:
        t[f"{producer}.weight"] = t[f"{producer}.weight"] / s[:, None]
        if f"{producer}.bias" in t:
            t[f"{producer}.bias"] = t[f"{producer}.bias"] / s
        t[f"{consumer}.weight"] = t[f"{consumer}.weight"] * columns
        smoothed.append(consumer)

    into_norm(f"{prefix}input_layernorm", [f"{attn}q_proj", f"{attn}k_proj", f"{attn}v_proj"])
    into_norm(f"{prefix}post_attention_layernorm", [f"{mlp}gate_proj", f"{mlp}up_proj"])
    up, down = f"{mlp}up_proj", f"{mlp}down_proj"
    if f"{up}.weight" in t and down in maxima:
        s = smoothing_scales(maxima[down], _column_max(t, [down]), alpha)
        into_rows(up, down, s, s)
    v, o = f"{attn}v_proj", f"{attn}o_proj"
    if f"{v}.weight" in t and o in maxima:
        group, head_dim = heads // kv_heads, t[f"{o}.weight"].shape[1] // heads

        def per_kv(x: torch.Tensor) -> torch.Tensor:  # [heads * head_dim] -> [kv_heads * head_dim]
            return x.view(kv_heads, group, head_dim).amax(1).reshape(-1)

        s = smoothing_scales(per_kv(maxima[o]), per_kv(_column_max(t, [o])), alpha)
        columns = s.view(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1)
        into_rows(v, o, s, columns)
    return smoothed


# --- writing -------------------------------------------------------------------------------------


def quantization_config(model_type: str) -> dict:
    """config.json's quantization_config: compressed-tensors' W8A8 preset over every Linear but
    the LM head and the vision tower, as llm-compressor writes it."""
    ignore = ["lm_head", "re:.*visual.*"]
    if model_type.endswith("_moe"):
        # The experts stay float here, and vLLM would also quantize the router (a Linear there).
        ignore += ["re:.*mlp.gate$", "re:.*mlp.experts.*"]
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": dict(quant.WEIGHTS_ARGS),
                "input_activations": dict(quant.ACTIVATION_ARGS),
                "output_activations": None,
                "format": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


@dataclass
class _Source:
    """The input checkpoint's tensors by canonical name, read lazily."""

    ckpt: Checkpoint

    def __post_init__(self) -> None:
        self.files = self.ckpt.weight_files()  # key -> file
        self.key_of = {}  # canonical text name -> checkpoint key
        for key in self.files:
            part, name = canonical_key(key)
            if part == "text":
                self.key_of[name] = key
        self._open: dict[Path, object] = {}

    def get(self, key: str) -> torch.Tensor:
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_tensor(key)  # type: ignore[attr-defined]


def _layer_of(name: str) -> int | None:
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return None


def quantize(model: str | Path, out: str | Path, alpha: float = DEFAULT_ALPHA, calibration: str = "shapes", samples: int = DEFAULT_SAMPLES) -> dict:
    """Calibrate, smooth, quantize and write; returns the record also written to out/quantize.json."""
    began = time.monotonic()
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be within [0, 1], got {alpha}")
    ckpt = open_checkpoint(model)
    if quant.checkpoint_config(ckpt.config) is not None:
        raise ValueError(f"{ckpt.path} is already quantized (config.json has a quantization_config)")
    out = Path(out)
    if out.resolve() == ckpt.path.resolve():
        raise ValueError("--out must be a new directory, not the model's own")
    out.mkdir(parents=True, exist_ok=True)
    chosen = calibration_samples(calibration, samples)
    log.info("calibrating on %d %s prompts", len(chosen), calibration)
    maxima = activation_maxima(ckpt, chosen)
    calibrated = time.monotonic()

    tc = ckpt.text_config
    text_targets = set(quant.targets(build_on_meta(ckpt.family.text_model, tc, torch.float32)))
    src = _Source(ckpt)
    layer_keys: dict[int, set[str]] = {}
    for name, key in src.key_of.items():
        i = _layer_of(name)
        if i is not None:
            layer_keys.setdefault(i, set()).add(key)

    smoothed: list[str] = []

    def process(i: int) -> dict[str, torch.Tensor]:
        """Layer i's output tensors, keyed by checkpoint key (int8 weights and their scales)."""
        names = {canonical_key(k)[1]: k for k in layer_keys[i]}
        originals = {n: src.get(k) for n, k in names.items()}
        t = {n: v.float() for n, v in originals.items()}
        smoothed.extend(smooth_layer(t, maxima, f"layers.{i}.", tc.num_attention_heads, tc.num_key_value_heads, alpha))
        result: dict[str, torch.Tensor] = {}
        for n, key in names.items():
            linear = n.removesuffix(".weight")
            if n.endswith(".weight") and linear in text_targets:
                q, scale = quant.quantize_weight(t[n])
                result[key] = q
                result[key.removesuffix(".weight") + quant.SCALE_SUFFIX] = scale
            elif torch.equal(t[n], originals[n].float()):
                result[key] = originals[n]  # untouched: the same bytes
            else:
                result[key] = t[n].to(originals[n].dtype)
        return result

    total = _write_shards(src, out, process)
    _write_config(ckpt, out)
    record = {
        "source": str(ckpt.path),
        "alpha": alpha,
        "calibration": calibration,
        "samples": len(chosen),
        "quantized_linears": len(text_targets),
        "smoothed_linears": len(smoothed),
        "calibration_s": round(calibrated - began, 2),
        "total_s": round(time.monotonic() - began, 2),
        "bytes": total,
    }
    (out / "quantize.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _write_shards(src: _Source, out: Path, process: Callable[[int], dict[str, torch.Tensor]]) -> int:
    """Every shard of the source, its decoder layers replaced by what `process` makes of them
    (each layer processed once, when its first tensor is written); returns the bytes written."""
    done: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its output tensors by key, until written
    by_file: dict[Path, list[str]] = {}
    for key, file in src.files.items():
        by_file.setdefault(file, []).append(key)
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=len(src.files), desc="quantize + write", unit="tensor", disable=None) as bar:
        for file in sorted(by_file):
            shard: dict[str, torch.Tensor] = {}
            for key in by_file[file]:
                part, name = canonical_key(key)
                i = _layer_of(name) if part == "text" else None
                if i is None:
                    shard[key] = src.get(key)
                else:
                    if i not in done:
                        done[i] = process(i)
                    shard[key] = done[i].pop(key)
                    scale_key = key.removesuffix(".weight") + quant.SCALE_SUFFIX
                    if scale_key in done[i]:
                        shard[scale_key] = done[i].pop(scale_key)
                    if not done[i]:
                        del done[i]
                bar.update(1)
            save_file({k: v.contiguous() for k, v in shard.items()}, out / file.name, metadata={"format": "pt"})
            (out / file.name).chmod(file.stat().st_mode & 0o777)  # safetensors writes 0600
            weight_map.update({k: file.name for k in shard})
            total += sum(v.numel() * v.element_size() for v in shard.values())
    if (src.ckpt.path / "model.safetensors.index.json").exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _write_config(ckpt: Checkpoint, out: Path) -> None:
    """config.json with the quantization_config, and the tokenizer and processor files as they are."""
    config = json.loads((ckpt.path / "config.json").read_text())
    config["quantization_config"] = quantization_config(ckpt.config.model_type)  # type: ignore[attr-defined]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for pattern in COPIED:
        for f in ckpt.path.glob(pattern):
            if f.is_file():
                shutil.copy2(f, out / f.name)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, type=Path, help="float checkpoint directory (HF layout)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the W8A8 checkpoint to")
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="SmoothQuant migration strength in [0, 1]: how much of the activations' range moves into the weights",
    )
    parser.add_argument(
        "--calibration",
        default="shapes",
        help=f"'shapes' (pictures and questions of the shapes task) or a directory (see {CALIBRATION_FILE} in the README)",
    )
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="calibration prompts")
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        record = quantize(args.model, args.out, args.alpha, args.calibration, args.samples)
    except (ValueError, FileNotFoundError) as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    linears, smoothed = record["quantized_linears"], record["smoothed_linears"]
    print(f"wrote {args.out}: {linears} int8 linears ({smoothed} smoothed) in {record['total_s']:.1f}s", file=sys.stderr)
    return 0
