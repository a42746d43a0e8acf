"""Score a checkpoint on held-out shapes questions, through transformers and through a mesh.

    vlmesh eval                                  # the shipped model: transformers and a 2-stage mesh
    vlmesh eval --model DIR                      # any checkpoint
    vlmesh eval --model DIR --through mesh --mesh 127.0.0.1:50051 --count 500

The held-out pictures come from EVAL_SEED on the evaluation stream, which training never draws
from (data.TRAIN_STREAM vs data.EVAL_STREAM). An answer is right when it equals the expected
one after trimming whitespace, case and a final full stop."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import SHIPPED_MODEL, data

EVAL_SEED = 20261123
MAX_NEW_TOKENS = 32  # the longest caption is 15 tokens


def messages_for(example: data.Example, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": example.question}]}]


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


@dataclass
class Result:
    examples: list[data.Example]
    answers: list[str]
    by_type: dict[str, list[bool]] = field(default_factory=dict)

    def __post_init__(self):
        for ex, ans in zip(self.examples, self.answers):
            self.by_type.setdefault(ex.qtype, []).append(normalise(ans) == ex.answer)

    @property
    def accuracy(self) -> float:
        right = [ok for oks in self.by_type.values() for ok in oks]
        return sum(right) / max(1, len(right))

    def type_accuracy(self) -> dict[str, float]:
        return {t: sum(oks) / len(oks) for t, oks in self.by_type.items()}

    def mistakes(self) -> list[tuple[str, str, str]]:
        return [(ex.question, ex.answer, ans) for ex, ans in zip(self.examples, self.answers) if normalise(ans) != ex.answer]

    def summary(self) -> dict:
        return {
            "count": len(self.answers),
            "accuracy": round(self.accuracy, 4),
            "by_type": {t: round(a, 4) for t, a in sorted(self.type_accuracy().items())},
            "generator_version": data.GENERATOR_VERSION,
        }


def report(result: Result, title: str = "held-out") -> str:
    lines = [f"{title}: {result.accuracy:.1%} of {len(result.answers)} questions"]
    for t in data.QUESTION_TYPES:
        if t in result.by_type:
            oks = result.by_type[t]
            lines.append(f"  {t:<9} {sum(oks) / len(oks):6.1%}  ({sum(oks)}/{len(oks)})")
    for q, want, got in result.mistakes()[:5]:
        lines.append(f"  wrong: {q!r} -> {got!r} (expected {want!r})")
    return "\n".join(lines)


def evaluate_transformers(model_dir: str | Path, examples: list[data.Example], progress: bool = True) -> Result:
    """Greedy `generate` one question at a time: the reference the mesh must equal."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    answers = []
    for ex in tqdm(examples, desc="transformers", unit="q", disable=not progress):
        text = processor.apply_chat_template(messages_for(ex, None), tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[ex.scene.render()], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return Result(examples, answers)


def evaluate_mesh(address: str, examples: list[data.Example], concurrency: int = 4, progress: bool = True) -> Result:
    """The same questions through a running mesh's coordinator; several in flight, so the stages
    batch their decode steps as they would for real users."""
    from vlmesh import Client

    with Client(address) as client:

        def ask(ex: data.Example) -> str:
            return client.chat(messages_for(ex, ex.scene.png()), max_tokens=MAX_NEW_TOKENS).text

        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(tqdm(pool.map(ask, examples), total=len(examples), desc="mesh", unit="q", disable=not progress))
    return Result(examples, answers)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="checkpoint directory (default: the shipped shapes model)")
    parser.add_argument("--count", type=int, default=500, help="held-out questions (the types take turns)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out seed (default: the one training never saw)")
    parser.add_argument("--through", default="transformers,mesh", help="comma list of: transformers, mesh")
    parser.add_argument("--mesh", help="address of a running coordinator (default: start one with --stages)")
    parser.add_argument("--stages", type=int, default=2, help="stages of the mesh started when --mesh is not given")
    parser.add_argument("--concurrency", type=int, default=4, help="questions in flight through the mesh")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def run(args: argparse.Namespace) -> int:
    through = [t.strip() for t in args.through.split(",") if t.strip()]
    if not through or set(through) - {"transformers", "mesh"}:
        print(f"eval: --through takes transformers and/or mesh, got {args.through!r}", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"eval: no checkpoint at {args.model} (train one with tools/train_shapes.py, or pass --model DIR)", file=sys.stderr)
        return 2
    examples = data.examples(args.seed, args.count)
    results: dict[str, Result] = {}
    if "transformers" in through:
        results["transformers"] = evaluate_transformers(args.model, examples)
    if "mesh" in through:
        results["mesh"] = _with_mesh(args, examples)
    out: dict = {"model": str(args.model), "seed": args.seed}
    for name, result in results.items():
        print(report(result, f"{name} ({args.model.name})"))
        out[name] = result.summary()
    if len(results) == 2:
        same = sum(a == b for a, b in zip(results["transformers"].answers, results["mesh"].answers))
        out["mesh_equals_transformers"] = same == len(examples)
        print(f"mesh answers equal transformers answers: {same}/{len(examples)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _with_mesh(args: argparse.Namespace, examples: list[data.Example]) -> Result:
    if args.mesh:
        return evaluate_mesh(args.mesh, examples, args.concurrency)
    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, split_layers

    layers = open_checkpoint(args.model).text_config.num_hidden_layers
    log_dir = tempfile.mkdtemp(prefix="vlmesh-eval-")
    print(f"eval: starting vision + {args.stages} stages + coordinator (logs in {log_dir})", file=sys.stderr)
    with LocalMesh(str(args.model), split_layers(layers, args.stages), log_dir=log_dir) as mesh:
        return evaluate_mesh(mesh.address, examples, args.concurrency)
