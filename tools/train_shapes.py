"""Train the shapes model: a tiny Qwen2-VL that answers questions about pictures of coloured shapes.

    .venv/bin/python tools/train_shapes.py                      # writes services/assets/shapes-qwen2-vl
    .venv/bin/python tools/train_shapes.py --out /tmp/shapes --steps 200   # a quick try

Everything is made here, offline: the pictures (services/shapes/data.py), a byte-level BPE
tokenizer with Qwen's special tokens and chat template, the processor config and a real
`Qwen2VLForConditionalGeneration` with small dimensions. Deterministic for a given thread count:
fixed seeds, and the settings plus the data generator's version go into training.json beside the
weights, with the held-out accuracy the run reached.

The loss is on the assistant's answers only. Each training picture comes with four to eight
questions in one conversation, so one vision pass teaches several answers; during training only,
auxiliary heads on the vision tower's tokens (Cells) learn each cell's shape, colour and place."""

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
    steps: int = 2200
    batch_size: int = 20
    lr: float = 8e-4  # 1.5e-3: 49.6% held-out after 2000 steps; 8e-4: 59.6% (shape 32% -> 70%)
    warmup: int = 100
    weight_decay: float = 0.01
    min_turns: int = 4
    max_turns: int = 8
    aux_weight: float = 1.0  # weight of the per-token auxiliary loss on the vision tower (see Cells)
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
    validate_every: int = 200
    validate_count: int = 250
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


def conversation_text(processor, turns) -> str:
    messages = []
    for i, (q, a, _) in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": q}] if i == 0 else [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return processor.apply_chat_template(messages, tokenize=False)


class Batches:
    """Random conversations about random pictures, tokenised with the checkpoint's own processor
    and chat template; labels mask everything but the assistant's answers and their <|im_end|>."""

    def __init__(self, processor, settings: Settings):
        self.processor = processor
        self.settings = settings
        self.rng = data.training_rng(settings.seed)
        self.labels = AnswerLabels(processor.tokenizer)

    def __next__(self) -> dict[str, torch.Tensor]:
        texts, images, scenes = [], [], []
        for _ in range(self.settings.batch_size):
            scene = data.draw_scene(self.rng)
            scenes.append(scene)
            turns = data.conversation(scene, self.rng, int(self.rng.integers(self.settings.min_turns, self.settings.max_turns + 1)))
            texts.append(conversation_text(self.processor, turns))
            images.append([scene.render()])
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        batch["labels"] = self.labels(batch["input_ids"])
        return batch, Cells.targets(scenes)


class Cells(torch.nn.Module):
    """Auxiliary heads on the vision tower's merged tokens, used only while training (the saved
    model is a plain Qwen2-VL): each token is one 28-pixel cell (data.CELL), and from it they
    predict the cell's shape, colour (or canvas) and where the cell is on the picture. This gives
    the tower a direct, dense signal; through the language model alone it reaches a shape's token
    only once the model has learnt to look there, and shape stayed at chance for 800 steps."""

    def __init__(self, hidden: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden, len(data.SHAPES) + 1)
        self.colour = torch.nn.Linear(hidden, len(data.COLOURS) + 1)
        self.where = torch.nn.Linear(hidden, 2)

    @staticmethod
    def targets(scenes: list[data.Scene]) -> dict[str, torch.Tensor]:
        """Per merged token, in the processor's order (each picture's cells row by row)."""
        kind, colour, where = [], [], []
        colours = list(data.COLOURS)
        for scene in scenes:
            w, h = scene.size[0] // data.CELL, scene.size[1] // data.CELL
            k = torch.zeros(h, w, dtype=torch.long)
            c = torch.zeros(h, w, dtype=torch.long)
            for shape in scene.shapes:
                row, col = shape.box[1] // data.CELL, shape.box[0] // data.CELL
                k[row, col] = data.SHAPES.index(shape.kind) + 1
                c[row, col] = colours.index(shape.colour) + 1
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            kind.append(k.flatten())
            colour.append(c.flatten())
            where.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        return {"kind": torch.cat(kind), "colour": torch.cat(colour), "where": torch.cat(where)}

    def loss(self, tokens: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:  # tokens [N, hidden]
        f = torch.nn.functional
        return f.cross_entropy(self.kind(tokens), t["kind"]) + f.cross_entropy(self.colour(tokens), t["colour"]) + f.mse_loss(torch.sigmoid(self.where(tokens)), t["where"]) * 10


class AnswerLabels:
    def __init__(self, tokenizer):
        self.answer_start = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T]
        labels = torch.full_like(ids, -100)
        n = len(self.answer_start)
        for b, row in enumerate(ids.tolist()):
            inside = False
            for t in range(len(row)):
                if inside or (t >= n and row[t - n : t] == self.answer_start):
                    labels[b, t] = row[t]
                    inside = row[t] != self.im_end
        return labels


class Validation:
    """Accuracy on validation questions (data.VALID_STREAM, not the held-out stream) by teacher
    forcing: an answer is right when every one of its tokens and its <|im_end|> is the argmax,
    which is exactly when greedy decoding would produce it. One forward pass, so training can
    report it every few hundred steps."""

    def __init__(self, processor, count: int, chunk: int = 50):
        self.examples = data.examples(EVAL_SEED, count, stream=data.VALID_STREAM)
        labels = AnswerLabels(processor.tokenizer)
        self.batches = []
        for i in range(0, count, chunk):
            part = self.examples[i : i + chunk]
            texts = [conversation_text(processor, [(ex.question, ex.answer, ex.qtype)]) for ex in part]
            batch = processor(text=texts, images=[[ex.scene.render()] for ex in part], padding=True, return_tensors="pt")
            self.batches.append((batch, labels(batch["input_ids"])))

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        right: dict[str, list[bool]] = {}
        k = 0
        for batch, labels in self.batches:
            predicted = model(**batch).logits[:, :-1].argmax(-1)  # [B, T-1]
            target = labels[:, 1:]
            ok = ((predicted == target) | (target == -100)).all(-1)
            for flag in ok.tolist():
                right.setdefault(self.examples[k].qtype, []).append(flag)
                k += 1
        model.train(was_training)
        by_type = {t: sum(v) / len(v) for t, v in right.items()}
        return {"all": sum(sum(v) for v in right.values()) / k, **{t: by_type[t] for t in data.QUESTION_TYPES}}


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
    cells = Cells(model.config.text_config.hidden_size)
    merged: list[torch.Tensor] = []
    model.model.visual.merger.register_forward_hook(lambda _m, _i, out: merged.append(out))
    named = list(model.named_parameters()) + list(cells.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    batches = Batches(processor, settings)
    validation = Validation(processor, settings.validate_count) if settings.validate_every else None
    model.train()
    smooth = None
    curve = []
    with tqdm(range(settings.steps), desc="training", unit="step") as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
            batch, targets = next(batches)
            merged.clear()
            loss = model(**batch).loss
            if settings.aux_weight:
                loss = loss + settings.aux_weight * cells.loss(merged[0], targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
            bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
            if validation and ((step + 1) % settings.validate_every == 0 or step + 1 == settings.steps):
                acc = validation(model)
                curve.append({"step": step + 1, "loss": round(smooth, 4), **{k: round(v, 3) for k, v in acc.items()}})
                bar.write(f"step {step + 1}: loss {smooth:.4f}  validation " + "  ".join(f"{k} {v:.0%}" for k, v in acc.items()))
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
        "validation": curve,
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
