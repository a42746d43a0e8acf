"""`vlmesh plan`: where to cut a model's decoder layers into stages, from config.json alone.

    vlmesh plan --model DIR --stages 4 [--also 2,8] [--dtype bfloat16|int8] [--context 32768] [--json]

The model is built on the meta device (shapes, no memory, no weights on disk needed) with
transformers' own class for the config, so the byte counts follow transformers rather than a
hand-written formula per family. Parameters are grouped the way the services load them
(services.common.checkpoint.canonical_key on the transformers-5 names): the first stage holds
embed_tokens, the last the final norm and lm_head -- for a tied checkpoint the last stage still
reads a copy of the embedding as its head (services/stage/model.py), unless it is also the first.

From Python (`vlmesh up` can use it to choose `--layers`):

    from services.common.checkpoint import load_config
    from services.plan import plan
    stages = plan(load_config("/models/Qwen2-VL-2B-Instruct"), 4)   # [StagePlan(start=0, end=5, ...), ...]

Balancing: the cut minimises the largest stage's bytes (weights, plus the KV cache of
`context` tokens when asked), then, among the cuts that reach that minimum, the largest stage's
KV cache; it is an exact dynamic programme over contiguous partitions.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.common.checkpoint import canonical_key, config_dtype, load_config
from services.common.geometry import KVGeometry

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
KV_TOKENS = 1000  # the unit of the KV column: "bytes per 1k tokens"


@dataclass(frozen=True)
class ModelBytes:
    """One checkpoint's parameter bytes at one dtype, split the way the services load them.
    Every parameter is counted at `dtype` because the services cast everything they read to it,
    except, when `int8`, the decoder layers' linear weights: one byte each plus a float32 scale
    per output channel, as `vlmesh quantize` writes them (services/stage/quant.py)."""

    model_type: str
    dtype: torch.dtype
    tied: bool  # lm_head shares embed_tokens (the checkpoint stores no lm_head.weight)
    layers: tuple[int, ...]  # [num_layers] bytes of decoder layer i (attention, norms, MLP or all its experts)
    kv_per_token: tuple[int, ...]  # [num_layers] K+V bytes one token adds to layer i's cache
    embed: int  # embed_tokens, on the first stage
    norm: int  # the final norm, on the last stage
    head: int  # lm_head on the last stage; for a tied checkpoint, the embedding copy it reads
    vision: int  # the vision service: patch embed, blocks, merger (+ DeepStack mergers)
    int8: bool = False  # decoder-layer linears in W8A8 int8

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class StagePlan:
    """One stage of a plan: it serves `--layers start:end`."""

    index: int
    start: int  # first layer it owns
    end: int  # one past its last layer
    weight_bytes: int  # its layers + embed_tokens if first + norm and lm_head if last
    kv_bytes_per_1k: int  # K/V cache of 1000 tokens (all its sessions together) over its layers
    first: bool  # holds embed_tokens
    last: bool  # holds the final norm, lm_head and the sampler

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def total_bytes(self, context: int = 0) -> int:
        """Weights plus the KV cache of `context` tokens."""
        return self.weight_bytes + self.kv_bytes_per_1k * context // KV_TOKENS


def measure(config, dtype: torch.dtype | None = None, int8: bool | None = None) -> ModelBytes:
    """Build the model on the meta device and count its parameter bytes per owner. `int8`:
    count the decoder-layer linears as W8A8 int8 (default: whether the checkpoint is)."""
    from transformers import AutoModelForImageTextToText

    from services.stage import quant

    dtype = dtype or config_dtype(config)
    if int8 is None:
        int8 = quant.checkpoint_config(config) is not None
    config = copy.deepcopy(config)  # from_config writes the dtype into the config it is given
    config.quantization_config = None  # shapes only: nothing to quantize on the meta device
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"model_type {config.model_type!r}: transformers has no vision-language model for it ({e})") from e
    size = dtype.itemsize
    int8_weights = set()
    if int8:
        for key, module in model.named_modules():
            part, name = canonical_key(key)
            if part == "text" and quant.is_target(name, module):
                int8_weights.add(f"{key}.weight")
    tc = config.get_text_config()
    n = tc.num_hidden_layers
    layers, embed, norm, head, vision = [0] * n, 0, 0, 0, 0
    # remove_duplicate=False: a tied lm_head is listed too, and the last stage does hold a copy.
    for key, p in model.named_parameters(remove_duplicate=False):
        part, name = canonical_key(key)
        nbytes = p.numel() + p.shape[0] * 4 if key in int8_weights else p.numel() * size
        if part == "vision":
            vision += nbytes
        elif part == "head":
            head += nbytes
        elif part == "text" and name.startswith("layers."):
            layers[int(name.split(".")[1])] += nbytes
        elif part == "text" and name.startswith("embed_tokens."):
            embed += nbytes
        elif part == "text" and name.startswith("norm."):
            norm += nbytes
        else:
            # A tensor no service loads would make the plan disagree with the mesh: say so.
            raise ValueError(f"model_type {config.model_type!r}: no service owns parameter {key!r}")
    kv = KVGeometry.from_text_config(tc).bytes_per_token(1, dtype)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return ModelBytes(config.model_type, dtype, tied, tuple(layers), (kv,) * n, embed, norm, head, vision, int8)


def _ends(sizes: ModelBytes, first: bool, last: bool) -> int:
    """Bytes a stage holds besides its layers."""
    out = sizes.embed if first else 0
    if last:
        # A single stage shares the tied embedding with its head, as HF does; otherwise the
        # last stage reads its own copy of it.
        out += sizes.norm + (0 if first and sizes.tied else sizes.head)
    return out


def stage_plans(sizes: ModelBytes, ranges: Sequence[tuple[int, int]]) -> list[StagePlan]:
    """The StagePlans of given layer ranges (e.g. an even split, to compare with)."""
    n = sizes.num_layers
    out = []
    for i, (start, end) in enumerate(ranges):
        first, last = start == 0, end == n
        weights = sum(sizes.layers[start:end]) + _ends(sizes, first, last)
        kv = sum(sizes.kv_per_token[start:end]) * KV_TOKENS
        out.append(StagePlan(i, start, end, weights, kv, first, last))
    return out


def partition(sizes: ModelBytes, stages: int, context: int = 0) -> list[StagePlan]:
    """The balanced plan for `stages` stages of a measured model."""
    n = sizes.num_layers
    from services.launcher import stages_error

    error = stages_error(n, stages)
    if error:
        raise ValueError(error)
    if context < 0:
        raise ValueError(f"--context must be >= 0 tokens, got {context}")
    # Prefix sums: the search below evaluates O(stages * n^2) ranges.
    weights, kv = [0], [0]
    for w, k in zip(sizes.layers, sizes.kv_per_token):
        weights.append(weights[-1] + w)
        kv.append(kv[-1] + k)

    def cost(i: int, j: int) -> int:  # StagePlan.total_bytes(context) of layers [i, j)
        return weights[j] - weights[i] + _ends(sizes, i == 0, j == n) + (kv[j] - kv[i]) * context

    largest, _ = _min_max_cut(n, stages, cost)
    # Many cuts can share the largest stage (say the first, pinned by the embedding); of those,
    # take the one whose largest KV cache is smallest, i.e. whose other stages are most even.
    _, ranges = _min_max_cut(n, stages, lambda i, j: kv[j] - kv[i] if cost(i, j) <= largest else math.inf)
    return stage_plans(sizes, ranges)


def plan(config, stages: int, dtype: torch.dtype | None = None, context: int = 0) -> list[StagePlan]:
    """Balanced contiguous layer ranges for `stages` stages of the model `config` describes,
    at `dtype` (default: the checkpoint's). See partition() to plan several stage counts."""
    return partition(measure(config, dtype), stages, context)


def _min_max_cut(n: int, stages: int, cost: Callable[[int, int], float]) -> tuple[float, list[tuple[int, int]]]:
    """Cut [0, n) into `stages` non-empty contiguous ranges minimising the largest cost(i, j).
    O(stages * n^2) calls of cost: a few hundred thousand at most for real layer counts."""
    # best[k][j]: the smallest largest-cost of cutting [0, j) into k ranges; back[k][j]: where the k-th begins
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    back = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):  # leave a layer for each later stage
            for i in range(k - 1, j):
                v = max(best[k - 1][i], cost(i, j))
                if v < best[k][j]:
                    best[k][j], back[k][j] = v, i
    ranges, j = [], n
    for k in range(stages, 0, -1):
        ranges.append((back[k][j], j))
        j = back[k][j]
    return best[stages][n], ranges[::-1]


# --- CLI -------------------------------------------------------------------------------------------


def _even_ranges(n: int, stages: int) -> list[tuple[int, int]]:
    from services.launcher import split_layers  # what `vlmesh up` does today

    return split_layers(n, stages)


def _fmt(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _table(sizes: ModelBytes, stages: list[StagePlan], even: list[StagePlan], context: int) -> str:
    def largest(plans: list[StagePlan]) -> int:
        return max(s.total_bytes(context) for s in plans)

    head = "lm_head"
    if sizes.tied:
        head += " (tied: a copy of embed_tokens)" if len(stages) > 1 else " (tied: shares embed_tokens)"
    rows = [("stage", "layers", "n", "weights", "KV/1k tok") + ((f"total@{context}",) if context else ()) + ("holds",)]
    for s in stages:
        holds = ", ".join(["embed_tokens"] * s.first + ["norm", head] * s.last) or "-"
        total = (_fmt(s.total_bytes(context)),) if context else ()
        rows.append((str(s.index), f"{s.start}:{s.end}", str(s.num_layers), _fmt(s.weight_bytes), _fmt(s.kv_bytes_per_1k), *total, holds))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"{len(stages)} stage(s):"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    what = f"weights + KV of {context} tokens" if context else "weights"
    lines.append(f"  largest stage {_fmt(largest(stages))} ({what}); an even split of the layers: {_fmt(largest(even))}")
    return "\n".join(lines)


def _stage_counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected stage counts like 2,4,8, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory (only config.json is read)")
    parser.add_argument("--stages", type=int, required=True, help="number of transformer stages")
    parser.add_argument("--also", type=_stage_counts, default=[], metavar="N,N,...", help="plan these stage counts too")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="parameter dtype (default: the checkpoint's); int8: W8A8 decoder-layer linears, the rest at the checkpoint's",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=0,
        metavar="TOKENS",
        help="balance weights plus the KV cache of this many tokens per stage (default: weights only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser


def run(args: argparse.Namespace) -> int:
    from services.launcher import stages_error

    counts = list(dict.fromkeys([args.stages, *args.also]))  # --stages first, no repeats
    try:
        config = load_config(args.model)
        layers = config.get_text_config().num_hidden_layers
        error = stages_error(layers, args.stages)
        if error:
            raise ValueError(f"--stages {args.stages}: {error}")
        for s in counts[1:]:
            error = stages_error(layers, s)
            if error:  # one of several asked for: the others are still worth printing
                print(f"plan: skipping --also {s}: {error}", file=sys.stderr)
        counts = [s for s in counts if stages_error(layers, s) is None]
        dtype = None if args.dtype in ("auto", "int8") else getattr(torch, args.dtype)
        sizes = measure(config, dtype, True if args.dtype == "int8" else None)
        plans = {s: partition(sizes, s, args.context) for s in counts}
    except (ValueError, FileNotFoundError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    n = sizes.num_layers
    evens = {s: stage_plans(sizes, _even_ranges(n, s)) for s in counts}
    dtype_name = str(sizes.dtype).removeprefix("torch.")
    if args.json:
        out = {
            "model": str(args.model),
            "model_type": sizes.model_type,
            "dtype": dtype_name,
            "int8": sizes.int8,
            "num_layers": n,
            "tied": sizes.tied,
            "context": args.context,
            "vision_bytes": sizes.vision,
            "plans": [
                {
                    "stages": s,
                    "largest_stage_bytes": max(p.total_bytes(args.context) for p in plans[s]),
                    "even_split_largest_stage_bytes": max(p.total_bytes(args.context) for p in evens[s]),
                    "stage": [asdict(p) for p in plans[s]],
                }
                for s in counts
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    int8 = ", int8 W8A8 decoder-layer linears" if sizes.int8 else ""
    print(f"{args.model}: {sizes.model_type}, {n} layers, {dtype_name}{int8}, {'tied' if sizes.tied else 'untied'} head")
    print(f"vision service: {_fmt(sizes.vision)}")
    for s in counts:
        print()
        print(_table(sizes, plans[s], evens[s], args.context))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="vlmesh plan", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
