"""Train the shapes model: a tiny Qwen2-VL that answers questions about pictures of coloured shapes.

    .venv/bin/python tools/train_shapes.py                      # writes services/assets/shapes-qwen2-vl
    .venv/bin/python tools/train_shapes.py --out /tmp/shapes --steps 200   # a quick try

Everything is made here, offline: the pictures (services/shapes/data.py), a byte-level BPE
tokenizer with Qwen's special tokens and chat template, the processor config and a real
`Qwen2VLForConditionalGeneration` with small dimensions. Deterministic for a given thread count:
fixed seeds, and the settings plus the data generator's version go into training.json beside the
weights, with the held-out accuracy the run reached.

The loss is on the assistant's answers only. Each training picture carries four to twelve of
its questions packed in one row (Batches): one vision pass, yet each question learnt exactly as
the one-question chat the held-out set asks. Two more losses, during training only, steer what
a from-scratch model this small does not find by itself in 20 minutes: auxiliary heads on the
vision tower's tokens (Cells) learn each cell's shape, colour and place, also in the language
model's word space, and the last layer's first head is told where to look (Settings.look_weight)."""

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
    steps: int = 1200  # 1600: 99.6% held-out in 19.1 min; 1200: 99.8% in 14.2 (validation 99% by step 800)
    batch_size: int = 20
    lr: float = 8e-4  # 1.5e-3: 49.6% held-out after 2000 steps; 8e-4: 59.6% (shape 32% -> 70%)
    warmup: int = 100
    weight_decay: float = 0.01
    min_turns: int = 4  # questions packed per picture (data.questions has up to 12)
    max_turns: int = 12
    aux_weight: float = 1.0  # weight of the per-token auxiliary loss on the vision tower (see Cells)
    # Of its part in the language model's word space (see Cells.loss). Validation at step 400
    # with the attention loss on one head: colour-given-shape 48% without it, 100% with it.
    word_weight: float = 1.0
    # Attention loss: where the answer's first token is predicted, a head of the last layer
    # should look at the image token of the shape the question is about (LOOK_HEADS).
    # Validation at step 400, packed rows, no word loss: position questions 54% -> 94% with it.
    look_weight: float = 1.0
    threads: int = 2
    # model
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4  # one key head per query head: see LOOK_HEADS
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


def single_turn_text(processor, question: str, answer: str) -> str:
    """The chat template's text of one picture, one question and its answer: what greedy decoding
    after the generation prompt must reproduce."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]
    return processor.apply_chat_template(messages, tokenize=False)


class Batches:
    """Random pictures, each with several questions that all share one pass of the vision tower
    yet are each learnt exactly as a one-question chat (the only kind the held-out set asks).

    A row is the chat template's text up to the picture's <|vision_end|>, then one segment per
    question ("What colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"). Each
    segment attends only to the prefix and to itself, and its positions restart where the
    prefix ends (`packed_inputs`). As one multi-turn conversation instead, a later question was
    often given away by an earlier answer ("What colour is the circle?" after "the red circle"),
    so those turns taught copying from the text, and held-out colour-given-shape stayed at 25% on
    three-shape pictures. Labels cover the answers and their <|im_end|> only."""

    def __init__(self, processor, settings: Settings):
        self.processor = processor
        self.settings = settings
        self.rng = data.training_rng(settings.seed)
        self.labels = AnswerLabels(processor.tokenizer)
        self.pad = processor.tokenizer.pad_token_id

    def row(self, scene: data.Scene, turns) -> tuple[dict[str, torch.Tensor], list[int], list[tuple[int, int, int]]]:
        """One picture's prefix and segments, and (segment, head, cell) for each segment whose
        answer is about one shape, for the attention loss (LOOK_HEADS)."""
        prefix = None
        ids: list[int] = []
        segment: list[int] = []
        looks = []
        for k, (question, answer, qtype, subject) in enumerate(turns, start=1):
            head, sep, tail = single_turn_text(self.processor, question, answer).partition("<|vision_end|>")
            if prefix is None:
                prefix = self.processor(text=[head + sep], images=[scene.render()], return_tensors="pt")
                ids = prefix["input_ids"][0].tolist()
                segment = [0] * len(ids)
            more = self.processor.tokenizer(tail, add_special_tokens=False)["input_ids"]
            ids += more
            segment += [k] * len(more)
            if subject is not None:
                looks.append((k, LOOK_HEADS[qtype], scene.cell(subject)))
        return {**prefix, "input_ids": ids}, segment, looks

    def __next__(self):
        rows, scenes = [], []
        for _ in range(self.settings.batch_size):
            scene = data.draw_scene(self.rng)
            turns = int(self.rng.integers(self.settings.min_turns, self.settings.max_turns + 1))
            rows.append(self.row(scene, data.questions(scene, self.rng)[:turns]))
            scenes.append(scene)
        length = max(len(seg) for _, seg, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        segments = torch.full((len(rows), length), -1, dtype=torch.long)  # -1: padding
        for b, (r, seg, _) in enumerate(rows):
            input_ids[b, : len(seg)] = torch.tensor(r["input_ids"])
            segments[b, : len(seg)] = torch.tensor(seg)
        labels = self.labels(input_ids)
        batch = {
            "input_ids": input_ids,  # [B, T]
            "attention_mask": (segments >= 0).long(),  # [B, T]
            "mm_token_type_ids": (input_ids == self.processor.image_token_id).int(),  # [B, T]
            "pixel_values": torch.cat([r["pixel_values"] for r, _, _ in rows]),  # [patches, C*P*P]
            "image_grid_thw": torch.cat([r["image_grid_thw"] for r, _, _ in rows]),  # [B, 3]
            "labels": labels,  # [B, T]
        }
        looks = []  # (row, head, the position that predicts the answer's first token, the subject's image token)
        for b, (_, _, row_looks) in enumerate(rows):
            image = (input_ids[b] == self.processor.image_token_id).nonzero()[:, 0]
            for k, head, cell in row_looks:
                answer = ((segments[b] == k) & (labels[b] != -100)).nonzero()[0, 0]
                looks.append((b, head, int(answer) - 1, int(image[cell])))
        return batch, segments, Cells.targets(scenes), torch.tensor(looks, dtype=torch.long).reshape(-1, 4)


# The last layer's head that the attention loss teaches each lookup: find a shape by its kind
# ("What colour is the circle?"), by its colour ("What shape is the red one?"), by its place.
# With one head for all three, validation at step 600 had colour-given-shape at 100% but position
# at 54% (and without the word loss the other way round: position 96%, colour 64%); with a head
# per lookup, 100% and 80% at step 600, both 100% at 800. With as many key heads as heads
# (Settings.num_kv_heads), no two lookups share their keys.
LOOK_HEADS = {"colour": 0, "shape": 1, "position": 2}


def packed_inputs(model, batch: dict[str, torch.Tensor], segments: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs for Batches' rows: a 4-D additive mask (the form both eager and sdpa attention
    take; eager is the one that returns attention weights) where a segment sees the prefix and
    itself, and M-RoPE positions (transformers' own get_rope_index) with every segment's text positions moved
    back to start where the first segment's start, as if it were the only question."""
    position_ids, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
    )  # [3, B, T]
    starts = torch.zeros_like(segments)  # [B, T]: how far each segment starts after the first one
    for b in range(segments.shape[0]):
        seg = segments[b].tolist()
        first = {}
        for t, k in enumerate(seg):
            first.setdefault(k, t)
        starts[b] = torch.tensor([first[k] - first.get(1, 0) if k > 1 else 0 for k in seg])
    position_ids = position_ids - starts[None]
    q, kv = segments[:, :, None], segments[:, None, :]  # [B, T, 1], [B, 1, T]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    visible = causal & (kv >= 0) & ((kv == 0) | (kv == q))
    visible |= torch.eye(segments.shape[1], dtype=torch.bool) & (q < 0)  # padding sees itself: no empty rows
    inputs = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[:, None]  # [B, 1, T, T]
    return {**inputs, "attention_mask": mask, "position_ids": position_ids}


class Cells(torch.nn.Module):
    """Auxiliary heads on the vision tower's merged tokens, used only while training (the saved
    model is a plain Qwen2-VL): each token is one 28-pixel cell (data.CELL), and from it they
    predict the cell's shape, colour (or canvas) and where the cell is on the picture. This gives
    the tower a direct, dense signal; through the language model alone it reaches a shape's token
    only once the model has learnt to look there, and shape stayed at chance for 800 steps."""

    def __init__(self, hidden: int, tokenizer, word_weight: float = 0.0):
        super().__init__()
        self.word_weight = word_weight
        self.kind_words = [_word(tokenizer, " " + k) for k in data.SHAPES]
        self.colour_words = [_word(tokenizer, " " + c) for c in data.COLOURS]
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
            k = torch.zeros(h * w, dtype=torch.long)
            c = torch.zeros(h * w, dtype=torch.long)
            for shape in scene.shapes:
                k[scene.cell(shape)] = data.SHAPES.index(shape.kind) + 1
                c[scene.cell(shape)] = colours.index(shape.colour) + 1
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            kind.append(k)
            colour.append(c)
            where.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        return {"kind": torch.cat(kind), "colour": torch.cat(colour), "where": torch.cat(where)}

    def loss(self, tokens: torch.Tensor, t: dict[str, torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:  # tokens [N, hidden]
        f = torch.nn.functional
        heads = (
            f.cross_entropy(self.kind(tokens), t["kind"])
            + f.cross_entropy(self.colour(tokens), t["colour"])
            + f.mse_loss(torch.sigmoid(self.where(tokens)), t["where"]) * 10
        )
        if not self.word_weight:
            return heads
        # A shape's token should also point the way its words do in the language model's own
        # embedding space, so "What colour is the circle?" can find it by matching " circle".
        shape = t["kind"] > 0
        on = tokens[shape]  # [S, hidden]
        words = f.cross_entropy(on @ embedding[self.kind_words].T, t["kind"][shape] - 1) + f.cross_entropy(
            on @ embedding[self.colour_words].T, t["colour"][shape] - 1
        )
        return heads + self.word_weight * words


def _word(tokenizer, word: str) -> int:
    (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]  # data.corpus() makes each a single token
    return token


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
            texts = [single_turn_text(processor, ex.question, ex.answer) for ex in part]
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
    if settings.look_weight:
        model.set_attn_implementation("eager")
    cells = Cells(model.config.text_config.hidden_size, processor.tokenizer, settings.word_weight)
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
            batch, segments, targets, looks = next(batches)
            merged.clear()
            output = model(**packed_inputs(model, batch, segments), output_attentions=bool(settings.look_weight))
            loss = output.loss
            if settings.look_weight and len(looks):
                # Where the answer is predicted, one head of the last layer per kind of lookup
                # should look at the shape the question is about (see LOOK_HEADS).
                p = output.attentions[-1][looks[:, 0], looks[:, 1], looks[:, 2], looks[:, 3]]
                loss = loss - settings.look_weight * torch.log(p + 1e-6).mean()
            if settings.aux_weight:
                loss = loss + settings.aux_weight * cells.loss(merged[0], targets, model.get_input_embeddings().weight)
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
    model.set_attn_implementation("sdpa")
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
