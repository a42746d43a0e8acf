"""What structured output costs on the sampling stage: building llguidance's tokenizer (once per
stage), compiling a typical JSON schema (cold, and cached by hash), the per-token mask (advance the
matcher by the sampled token, compute the bitmask, unpack it) and applying it in `sample()`, against
the same `sample()` unconstrained. Only the sampler runs: no model weights are read.

    python bench/bench_constrained.py                       # the shipped shapes model's tokenizer
    python bench/bench_constrained.py --model bench/results/models/qwen2-vl-2b-random-bfloat16
    python bench/bench_constrained.py --json                # one JSON object instead of the table

The masks are computed for `--sessions` sessions one after another, as one step of a batch with
that many constrained sessions in flight computes them.

`--engine xgrammar` measures the same with xgrammar (`pip install xgrammar`; not a dependency of
the project): its tokenizer info, compile (cold / cached by its compiler), and per token
accept + fill bitmask + apply to the logits, then the same `sample()`. The mesh uses llguidance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.shapes import SHIPPED_MODEL  # noqa: E402
from services.stage.sampler import Constraints, SamplingParams, eos_token_ids, sample  # noqa: E402
from vlmesh.v1 import tensor_pb2  # noqa: E402

# A typical extraction schema: enums, bounded integers, booleans, an array of objects, a string.
SCHEMA = {
    "type": "object",
    "properties": {
        "document": {"enum": ["invoice", "receipt", "form", "other"]},
        "pages": {"type": "integer", "minimum": 1, "maximum": 500},
        "signed": {"type": "boolean"},
        "vendor": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 16}, "quantity": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["name", "quantity"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["document", "pages", "signed", "vendor", "items"],
    "additionalProperties": False,
}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def run(model: Path, sessions: int, repeats: int, seed: int) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    vocab = config.get_text_config().vocab_size
    constraints = Constraints(model, vocab, eos_token_ids(model))
    t0 = time.perf_counter()
    constraints.tokenizer()
    tokenizer_ms = _ms(t0)
    c = tensor_pb2.Constraint(json_schema=json.dumps(SCHEMA))
    t0 = time.perf_counter()
    constraints.compiled(c)  # translate the schema to a grammar and compile it
    compile_cold_ms = _ms(t0)
    cached = []
    for _ in range(20):
        t0 = time.perf_counter()
        constraints.compiled(c)
        cached.append(_ms(t0))

    gen = torch.Generator().manual_seed(seed)
    mask_us: list[float] = []  # per token per session
    masked_sample_us: list[float] = []
    free_sample_us: list[float] = []
    lengths: list[int] = []
    params = SamplingParams(temperature=1.0, seed=seed)
    for rep in range(repeats):
        ids: list[list[int]] = [[] for _ in range(sessions)]
        done = [False] * sessions
        for position in range(400):
            if all(done):
                break
            live = [i for i in range(sessions) if not done[i]]
            logits = [torch.randn(vocab, generator=gen) * 4 for _ in live]
            t0 = time.perf_counter()
            masks = [constraints.mask(f"s{rep}.{i}", c, ids[i]) for i in live]
            mask_us.append((time.perf_counter() - t0) * 1e6 / len(live))
            t0 = time.perf_counter()
            picks = [sample(lg, SamplingParams(temperature=1.0, seed=seed, allowed=m), position).token_id for lg, m in zip(logits, masks)]
            masked_sample_us.append((time.perf_counter() - t0) * 1e6 / len(live))
            t0 = time.perf_counter()
            for lg in logits:
                sample(lg, params, position)
            free_sample_us.append((time.perf_counter() - t0) * 1e6 / len(live))
            for i, tok in zip(live, picks):
                if tok in constraints.eos_ids:
                    done[i] = True
                    lengths.append(len(ids[i]))
                else:
                    ids[i].append(tok)
    head = {"engine": "llguidance", "model": str(model), "vocab_size": vocab, "tokenizer_tokens": constraints.tokenizer().vocab_size}
    return _row(head, sessions, repeats, tokenizer_ms, compile_cold_ms, cached, mask_us, masked_sample_us, free_sample_us, lengths)


def _row(
    head: dict,
    sessions: int,
    repeats: int,
    tokenizer_ms: float,
    compile_cold_ms: float,
    cached: list[float],
    mask_us: list[float],
    masked_sample_us: list[float],
    free_sample_us: list[float],
    lengths: list[int],
) -> dict:
    """One engine's row: medians of the per-token timings, and what they add to a step."""
    mask = statistics.median(mask_us)
    masked = statistics.median(masked_sample_us)
    free = statistics.median(free_sample_us)
    return {
        **head,
        "sessions_in_flight": sessions,
        "tokenizer_build_ms": round(tokenizer_ms, 2),
        "compile_cold_ms": round(compile_cold_ms, 3),
        "compile_cached_ms": round(statistics.median(cached), 4),
        "mask_us_per_token": round(mask, 1),
        "sample_masked_us_per_token": round(masked, 1),
        "sample_free_us_per_token": round(free, 1),
        "constraint_us_per_token": round(mask + masked - free, 1),
        "per_step_ms_at_sessions": round((mask + masked - free) * sessions / 1e3, 3),
        "output_tokens_median": statistics.median(lengths) if lengths else None,
        "outputs_unfinished": sessions * repeats - len(lengths),
    }


def run_xgrammar(model: Path, sessions: int, repeats: int, seed: int) -> dict:
    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    vocab = config.get_text_config().vocab_size
    eos = eos_token_ids(model)
    hf = AutoTokenizer.from_pretrained(model)
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    tokenizer_ms = _ms(t0)
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, cache_enabled=True)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)  # compact, as the mesh's
    compile_cold_ms = _ms(t0)
    cached = []
    for _ in range(20):
        t0 = time.perf_counter()
        compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        cached.append(_ms(t0))
    gen = torch.Generator().manual_seed(seed)
    mask_us: list[float] = []
    masked_sample_us: list[float] = []
    free_sample_us: list[float] = []
    lengths: list[int] = []
    params = SamplingParams(temperature=1.0, seed=seed)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for _rep in range(repeats):
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(sessions)]
        count = [0] * sessions
        done = [False] * sessions
        for position in range(400):
            if all(done):
                break
            live = [i for i in range(sessions) if not done[i]]
            logits = [torch.randn(vocab, generator=gen) * 4 for _ in live]
            t0 = time.perf_counter()
            for i, lg in zip(live, logits):
                matchers[i].fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(lg[None], bitmask)
            mask_us.append((time.perf_counter() - t0) * 1e6 / len(live))
            t0 = time.perf_counter()
            picks = [sample(lg, params, position).token_id for lg in logits]
            for i, tok in zip(live, picks):
                if tok in eos or matchers[i].is_terminated():
                    done[i] = True
                    lengths.append(count[i])
                else:
                    assert matchers[i].accept_token(tok), "xgrammar refused a token its mask allowed"
                    count[i] += 1
            masked_sample_us.append((time.perf_counter() - t0) * 1e6 / len(live))
            t0 = time.perf_counter()
            for lg in logits:
                sample(lg, params, position)
            free_sample_us.append((time.perf_counter() - t0) * 1e6 / len(live))
    head = {"engine": "xgrammar", "model": str(model), "vocab_size": vocab}
    return _row(head, sessions, repeats, tokenizer_ms, compile_cold_ms, cached, mask_us, masked_sample_us, free_sample_us, lengths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="checkpoint directory (only its tokenizer and config are read)")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 8], help="constrained sessions in flight (one row each)")
    ap.add_argument("--repeats", type=int, default=3, help="outputs per session")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per row")
    ap.add_argument("--engine", choices=["llguidance", "xgrammar", "both"], default="llguidance", help="grammar engine(s) to measure")
    ap.add_argument("--smoke", action="store_true", help="one session, one output: to check the script runs (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sessions, args.repeats = [1], 1
    torch.set_num_threads(1)  # a stage's sampler runs on its runner thread
    engines = ["llguidance", "xgrammar"] if args.engine == "both" else [args.engine]
    for n in args.sessions:
        for engine in engines:
            row = (run if engine == "llguidance" else run_xgrammar)(args.model, n, args.repeats, args.seed)
            if args.json:
                print(json.dumps(row))
            else:
                for k, v in row.items():
                    print(f"{k:28} {v}")
                print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
