"""Train the shapes model: a tiny Qwen2-VL that answers questions about pictures of coloured shapes.

    .venv/bin/python tools/train_shapes.py                      # writes services/assets/shapes-qwen2-vl
    .venv/bin/python tools/train_shapes.py --out /tmp/shapes --steps 200   # a quick try

Everything is made here, offline: the pictures (services/shapes/data.py), a byte-level BPE
tokenizer with Qwen's special tokens and chat template, the processor config and a real
`Qwen2VLForConditionalGeneration` with small dimensions. Deterministic for a given thread count:
fixed seeds, and the settings plus the data generator's version go into training.json beside the
weights, with the held-out accuracy the run reached.

The loss is on the assistant's answers only. Each training picture comes with two to four
questions in one conversation, so one vision pass teaches several answers."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services import tiny  # noqa: E402 - after the path fix, so the script runs from a checkout
from services.shapes import SHIPPED_MODEL, data  # noqa: E402
from services.shapes.eval import EVAL_SEED, evaluate_transformers, report  # noqa: E402


@dataclass
class Settings:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 20
    lr: float = 8e-4  # 1.5e-3: 49.6% held-out after 2000 steps; 8e-4: 59.6% (shape 32% -> 70%)
    warmup: int = 100
    weight_decay: float = 0.01
    min_turns: int = 2
    max_turns: int = 4
    threads: int = 2
    # model
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vision_depth: int = 4
    vision_embed_dim: int = 128
    vision_heads: int = 4
    # The spatial M-RoPE sections get the lowest frequencies: at head_dim 32 and Qwen's theta of
    # 1e6 they turn by ~1e-4 rad across a picture. 20 turns them 0.5-1.2 rad across 8 merged
    # columns, yet trained worse at lr 1.5e-3 (loss 0.36 vs 0.27, step 1650) and at 8e-4 (0.43 vs
    # 0.28, step 950): it also changes every text-position frequency. Qwen's value stays.
    rope_theta: float = 1e6
    # processor: every canvas of data.CANVASES keeps its size; larger user images are scaled down
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 168
    eval_count: int = 500
    generator_version: str = data.GENERATOR_VERSION


def build(settings: Settings):
    """Tokenizer, processor and a freshly initialised model."""
    from transformers import Qwen2VLForConditionalGeneration

    raw = tiny.build_tokenizer(extra_corpus=data.corpus())
    tokenizer = tiny.build_hf_tokenizer(raw)
    processor = tiny._build_processor(tokenizer, settings.min_pixels, settings.max_pixels)
    config = tiny.build_config(
        tokenizer,
        num_layers=settings.num_layers,
        hidden_size=settings.hidden_size,
        num_heads=settings.num_heads,
        num_kv_heads=settings.num_kv_heads,
        intermediate_size=settings.intermediate_size,
        vision_depth=settings.vision_depth,
        vision_embed_dim=settings.vision_embed_dim,
        vision_heads=settings.vision_heads,
        tie_word_embeddings=True,
        dtype="float32",
    )
    config.text_config.rope_parameters["rope_theta"] = settings.rope_theta
    torch.manual_seed(settings.seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = tiny.build_generation_config(tokenizer)
    return processor, model


class Batches:
    """Random conversations about random pictures, tokenised with the checkpoint's own processor
    and chat template; labels mask everything but the assistant's answers and their <|im_end|>."""

    def __init__(self, processor, settings: Settings):
        self.processor = processor
        self.settings = settings
        self.rng = data.training_rng(settings.seed)
        tok = processor.tokenizer
        self.answer_start = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def __next__(self) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for _ in range(self.settings.batch_size):
            scene = data.draw_scene(self.rng)
            turns = data.conversation(scene, self.rng, int(self.rng.integers(self.settings.min_turns, self.settings.max_turns + 1)))
            messages = []
            for i, (q, a, _) in enumerate(turns):
                content = [{"type": "image"}, {"type": "text", "text": q}] if i == 0 else [{"type": "text", "text": q}]
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
            texts.append(self.processor.apply_chat_template(messages, tokenize=False))
            images.append([scene.render()])
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        batch["labels"] = self._labels(batch["input_ids"])
        return batch

    def _labels(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T]
        labels = torch.full_like(ids, -100)
        n = len(self.answer_start)
        for b, row in enumerate(ids.tolist()):
            inside = False
            for t in range(len(row)):
                if inside:
                    labels[b, t] = row[t]
                    inside = row[t] != self.im_end
                elif t >= n and row[t - n : t] == self.answer_start:
                    labels[b, t] = row[t]
                    inside = row[t] != self.im_end
        return labels


def lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(settings: Settings, out: Path) -> dict:
    torch.set_num_threads(settings.threads)
    began = time.monotonic()
    processor, model = build(settings)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train-shapes: {n_params:,} parameters; {settings.steps} steps of {settings.batch_size} pictures", file=sys.stderr)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    batches = Batches(processor, settings)
    model.train()
    smooth = None
    with tqdm(range(settings.steps), desc="training", unit="step") as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
            loss = model(**next(batches)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
            bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
    train_s = time.monotonic() - began
    model.eval()
    save(processor, model, settings, out)
    print(f"train-shapes: evaluating on {settings.eval_count} held-out questions (seed {EVAL_SEED})", file=sys.stderr)
    result = evaluate_transformers(out, data.examples(EVAL_SEED, settings.eval_count))
    print(report(result), file=sys.stderr)
    record = {
        "settings": asdict(settings),
        "parameters": n_params,
        "final_loss": round(smooth, 5),
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "held_out": {"seed": EVAL_SEED, **result.summary()},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def save(processor, model, settings: Settings, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    tiny._save_processor(processor, out, settings.min_pixels, settings.max_pixels)
    model.save_pretrained(str(out), safe_serialization=True, save_original_format=False)
    tiny._rewrite_safetensors(out, "hub")  # the key layout of Qwen/Qwen2-VL-2B-Instruct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL, help=f"checkpoint directory (default {SHIPPED_MODEL})")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        if name != "generator_version":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = Settings(**{k: getattr(args, k) for k in asdict(defaults) if k != "generator_version"})
    record = train(settings, args.out)
    print(json.dumps(record["held_out"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
