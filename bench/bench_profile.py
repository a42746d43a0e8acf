"""Where a step's time goes on the stages, and what the two attention numerics do.

Parts (--part, default all):

- profile: 2 stages in this process (StageBackend, the code the stage service runs; layers split in
  half), B sessions in flight (--batch, default 1,8,16), each prefilled with a --prompt-token
  prompt, then --steps decode micro-batches of all B sessions. Per micro-batch and stage: the
  stage's compute (StageBackend.run) split into linear layers (every nn.Linear's forward, lm_head
  included), attention (the registered attention function: gathering K/V and the kernel), the
  rest of the layers (norms, rotary, activations, residuals, KV writes), sampling (the sampler,
  last stage) and the backend's own work (validation, embedding, batching, commit); then
  transformers' own decode step for the same batch (generate() of B prompts of the same length,
  (time of 1 + steps tokens - time of 1 token) / steps). Both numerics (--numerics exact,fast).
  Coordinator, transport, queueing and idle time are mesh-level figures this in-process profile
  does not see (bench_load's per-hop part measures the hop).
- ceiling: what the throughput goals allow on this machine. For B requests of bench_load's prompts
  (chat-templated, about 35 tokens each), the same measured in this process, with the same threads:
  transformers' prefill (one forward over the left-padded batch) and decode step (generate()), and
  each of 2 stages' (exact, prepacked) prefill of the B prompts and decode micro-batch of B and of
  B/2 sessions. From these, the mesh/transformers throughput ratio of B requests of --tokens tokens
  each (the first from the prefill) if the hops, the coordinator and scheduling cost nothing: on one
  machine (the stages run in turn: their sum), and on one machine per stage pipelined with two
  micro-batches of B/2 (prefill fully overlapped, each stage running both micro-batches per round).
  Measure the second with one core per stage: `taskset -c 0 ... --threads 1` against transformers
  on that core, as bench_scaling pins them.
- bitwise: exact against fast over tiny checkpoints of every family, float32 and bfloat16, 1..16
  sessions, mixed prompt lengths, chunked prefill beside decodes, the sessions staggered; both
  driven in lockstep on exact's greedy tokens (teacher forcing). Prints whether stage 0's hidden
  states and the last stage's log-probabilities are bitwise equal, and the top-1 agreement.

    python bench/bench_profile.py --smoke                        # tiny model, seconds (CI)
    python bench/bench_profile.py --part profile --model 2b --dtype bfloat16
    python bench/bench_profile.py --part bitwise                 # tiny checkpoints only
    python bench/bench_profile.py --part ceiling --model 2b --dtype bfloat16 --batch 8,16
    taskset -c 0 python bench/bench_profile.py --part ceiling --model 2b --dtype bfloat16 --batch 16,32 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.checkpoint import open_checkpoint  # noqa: E402
from services.stage import attention  # noqa: E402
from services.stage import backend as backend_mod
from services.stage.backend import SampleSpec, StageBackend, Step, StepResult  # noqa: E402
from services.stage.sampler import SamplingParams  # noqa: E402

KV_BUDGET = 8 << 30
GREEDY = SampleSpec(SamplingParams(), top_logprobs=5)

# Tiny checkpoints for the bitwise part: each family, GQA / MHA / one KV head, tied and untied.
TINY = {
    "qwen2-vl gqa tied": dict(family="qwen2-vl", num_layers=4, num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2-vl mha untied": dict(family="qwen2-vl", num_layers=5, num_heads=4, num_kv_heads=4, tie_word_embeddings=False, seed=1),
    "qwen2-vl 1kv": dict(family="qwen2-vl", num_layers=3, hidden_size=48, num_heads=3, num_kv_heads=1, intermediate_size=96, seed=2),
    "qwen2.5-vl": dict(family="qwen2.5-vl", tie_word_embeddings=False, seed=3),
    "qwen3-vl": dict(family="qwen3-vl", seed=4),
    "qwen3-vl-moe": dict(family="qwen3-vl-moe", tie_word_embeddings=False, seed=5),
}


# ---------------------------------------------------------------- driving stages in-process


class Stages:
    """The stages of one mesh split, in this process: a micro-batch goes through them in order,
    as the coordinator sends it (token ids to the first, hidden states on, sampling at the last)."""

    def __init__(self, path: Path, dtype: torch.dtype, numerics: str, splits: int = 2, prepack: bool = True):
        ckpt = open_checkpoint(path)
        n = ckpt.text_config.num_hidden_layers
        cuts = [round(i * n / splits) for i in range(splits + 1)]
        self.stages = [StageBackend(ckpt, a, b, dtype, KV_BUDGET, numerics=numerics, prepack=prepack) for a, b in zip(cuts, cuts[1:])]
        self.vocab = ckpt.text_config.vocab_size

    def step(self, work: list[tuple[str, int, torch.Tensor]]) -> list[list[StepResult]]:
        """work: (session, start, token ids [T]) per session -> each stage's results."""
        per_stage: list[list[StepResult]] = []
        hidden: list[torch.Tensor | None] = [None] * len(work)
        for si, stage in enumerate(self.stages):
            steps = []
            for j, (sid, start, ids) in enumerate(work):
                t = ids.numel()
                pos = torch.arange(start, start + t)[None].expand(3, t).contiguous()
                steps.append(
                    Step(
                        sid,
                        start,
                        pos,
                        token_ids=ids if si == 0 else None,
                        hidden=hidden[j] if si else None,
                        sample=GREEDY if stage.is_last else None,
                    )
                )
            results = stage.run(steps)  # type: ignore[arg-type]
            for r in results:
                if r.error is not None:
                    raise RuntimeError(f"stage {si}: {r.error}")
            hidden = [r.hidden for r in results]
            per_stage.append(results)
        return per_stage


# ---------------------------------------------------------------- bitwise / agreement


@dataclass
class Agreement:
    compared: int = 0  # sampled positions
    same_top1: int = 0
    hidden_equal: bool = True  # stage 0's output, every step
    logprobs_equal: bool = True  # the last stage's top-5 log-probabilities, every step
    max_hidden_diff: float = 0.0

    @property
    def top1(self) -> float:
        return self.same_top1 / self.compared if self.compared else 1.0


def schedule(rng: random.Random, sessions: int, vocab: int, chunk: int, decode: int) -> Iterator[list[tuple[int, int, list[int] | None]]]:
    """Micro-batches of (session, start, prompt tokens, or None for a decode step) for `sessions`
    sessions of mixed prompt lengths, prefilled `chunk` tokens at a time, one more joining each
    step, each decoding `decode` tokens after its prompt."""
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 3 * chunk))] for _ in range(sessions)]
    at, made, step = [0] * sessions, [0] * sessions, 0
    while any(m < decode for m in made):
        batch: list[tuple[int, int, list[int] | None]] = []
        for i in range(min(sessions, step + 1)):
            if at[i] < len(prompts[i]):
                part = prompts[i][at[i] : at[i] + chunk]
                batch.append((i, at[i], part))
                at[i] += len(part)
            elif made[i] < decode:
                batch.append((i, at[i], None))
                at[i] += 1
                made[i] += 1
        step += 1
        yield batch


def agreement(
    path: Path,
    dtype: torch.dtype,
    sessions: int,
    *,
    chunk: int = 8,
    decode: int = 12,
    seed: int = 0,
    against: tuple[str, torch.dtype] | None = None,
) -> Agreement:
    """exact and fast (or, with `against`, that numerics and dtype) in lockstep on exact's greedy
    tokens (teacher forcing)."""
    exact = Stages(path, dtype, "exact")
    fast = Stages(path, against[1], against[0]) if against else Stages(path, dtype, "fast")
    out = Agreement()
    last: dict[int, int] = {}  # session -> exact's last sampled token
    for batch in schedule(random.Random(seed), sessions, exact.vocab, chunk, decode):
        work = []
        for i, start, part in batch:
            ids = torch.tensor(part if part is not None else [last[i]], dtype=torch.long)
            work.append((f"s{i}", start, ids))
        a, b = exact.step(work), fast.step(work)
        for ra, rb in zip(a[0], b[0]):
            if ra.hidden is not None and rb.hidden is not None and not torch.equal(ra.hidden, rb.hidden):
                out.hidden_equal = False
                out.max_hidden_diff = max(out.max_hidden_diff, float((ra.hidden.float() - rb.hidden.float()).abs().max()))
        # Every step samples; a mid-prompt chunk's token is not fed back, but it is the same inputs'
        # top-1 all the same, so it counts.
        for (i, _, _), ra, rb in zip(batch, a[-1], b[-1]):
            assert ra.token is not None and rb.token is not None  # the last stage samples every step
            out.compared += 1
            out.same_top1 += ra.token.token_id == rb.token.token_id
            out.logprobs_equal &= ra.token.top == rb.token.top
            last[i] = ra.token.token_id
    return out


def bitwise(args: argparse.Namespace) -> None:
    from services.shapes import SHIPPED_MODEL
    from services.tiny import make_tiny

    root = Path(tempfile.mkdtemp(prefix="vlmesh-bitwise-"))
    sizes = [1, 2, 3, 5, 8, 16] if not args.smoke else [1, 3]
    models: dict[str, dict | Path] = {**TINY, "shapes (trained)": SHIPPED_MODEL}
    models = {k: v for k, v in models.items() if not args.checkpoints or any(c in k for c in args.checkpoints)}
    if args.smoke:
        models = dict(list(models.items())[:1])
    print("exact vs fast attention (2 stages, teacher-forced, chunked prefill beside decodes)")
    print("(last column: top-1 agreement of exact bfloat16 with exact float32, the dtype's own noise for scale)")
    print(f"{'checkpoint':22s} {'dtype':9s} {'B':>3s} {'hidden ==':>10s} {'logprobs ==':>12s} {'top-1':>8s} {'max |dh|':>10s} {'bf16/f32':>8s}")
    for name, kw in models.items():
        path = kw if isinstance(kw, Path) else make_tiny(root / name.replace(" ", "-").replace(".", ""), **kw)
        for dt in (torch.float32, torch.bfloat16):
            for b in sizes:
                r = agreement(path, dt, b)
                noise = f"{agreement(path, torch.float32, b, against=('exact', dt)).top1:8.4f}" if dt != torch.float32 else ""
                print(
                    f"{name:22s} {str(dt).removeprefix('torch.'):9s} {b:3d} {str(r.hidden_equal):>10s} {str(r.logprobs_equal):>12s} "
                    f"{r.top1:8.4f} {r.max_hidden_diff:10.2e} {noise}"
                )


# ---------------------------------------------------------------- the step profile


@dataclass
class Split:
    """Seconds per category for one stage, summed over the timed micro-batches."""

    run: float = 0.0  # StageBackend.run, all of it
    forward: float = 0.0  # the layer stack (StageModel.forward)
    linear: float = 0.0
    attention: float = 0.0
    logits: float = 0.0  # final norm + lm_head (lm_head also counted in linear)
    head: float = 0.0  # lm_head alone
    sampling: float = 0.0
    attention_calls: int = 0

    @property
    def linear_layers(self) -> float:  # the decoder layers' linears (inside forward)
        return self.linear - self.head


class AttentionCalls(TorchFunctionMode):
    """Counts torch's scaled_dot_product_attention calls per decoder layer: a pre-hook on each
    layer's self_attn says which layer is running, this mode sees every call torch makes."""

    def __init__(self, stages: list[StageBackend]) -> None:
        super().__init__()
        self.per_layer: dict[int, int] = {}
        self._layer = -1
        attns = [cast(torch.nn.Module, layer.self_attn) for st in stages for layer in st.model.layers]
        self._hooks = [a.register_forward_pre_hook(self._enter) for a in attns]

    def _enter(self, module, args) -> None:
        self._layer = module.layer_idx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.per_layer[self._layer] = self.per_layer.get(self._layer, 0) + 1
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class Profiler:
    """Forward hooks and wrappers on the stages of this process (nothing changes what they compute)."""

    def __init__(self) -> None:
        self.current: Split | None = None
        self.calls: AttentionCalls | None = None
        self._undo: list[Callable[[], None]] = []

    def timed(self, add: Callable[[Split, float], None], fn: Callable) -> Callable:
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.current is not None:
                    add(self.current, time.perf_counter() - t0)

        return wrapper

    def install(self, stages: list[StageBackend]) -> None:
        from transformers import AttentionInterface

        def add_attention(s: Split, dt: float) -> None:
            s.attention += dt

        for name, fn in ((attention.NAME, attention.batch_attention), (attention.BATCHED_NAME, attention.batched_attention)):
            AttentionInterface.register(name, self.timed(add_attention, fn))
            self._undo.append(functools.partial(AttentionInterface.register, name, fn))
        original_sample = backend_mod.sample
        backend_mod.sample = self.timed(lambda s, dt: setattr(s, "sampling", s.sampling + dt), original_sample)
        self._undo.append(lambda: setattr(backend_mod, "sample", original_sample))
        self.calls = AttentionCalls(stages)
        self._undo.append(self.calls.remove)
        for stage in stages:
            model = stage.model
            model.forward = self.timed(lambda s, dt: setattr(s, "forward", s.forward + dt), model.forward)  # type: ignore[method-assign]
            model.logits = self.timed(lambda s, dt: setattr(s, "logits", s.logits + dt), model.logits)  # type: ignore[method-assign]
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("Linear"):  # int8 linears too
                    m.register_forward_pre_hook(self._pre)
                    m.register_forward_hook(self._post_head if m is model.lm_head else self._post)

    def _pre(self, module, inputs) -> None:
        module._vlmesh_t0 = time.perf_counter()

    def _post(self, module, inputs, output) -> None:
        if self.current is not None:
            self.current.linear += time.perf_counter() - module._vlmesh_t0

    def _post_head(self, module, inputs, output) -> None:
        if self.current is not None:
            dt = time.perf_counter() - module._vlmesh_t0
            self.current.linear += dt
            self.current.head += dt

    def uninstall(self) -> None:
        for undo in self._undo:
            undo()

    @contextmanager
    def measuring(self, split: Split) -> Iterator[None]:
        self.current = split
        t0 = time.perf_counter()
        try:
            yield
        finally:
            split.run += time.perf_counter() - t0
            self.current = None

    @contextmanager
    def counting(self, split: Split) -> Iterator[None]:
        """Attention kernel calls, on an untimed step (a function mode slows every torch call)."""
        assert self.calls is not None  # installed
        before = sum(self.calls.per_layer.values())
        try:
            with self.calls:
                yield
        finally:
            split.attention_calls += sum(self.calls.per_layer.values()) - before


def profile_stages(
    path: Path, dtype: torch.dtype, numerics: str, batch: int, prompt: int, steps: int, prepack: bool = True
) -> tuple[list[Split], int]:
    """Per stage the timed split, and how many linears the stages packed."""
    stages = Stages(path, dtype, numerics, prepack=prepack)
    prof = Profiler()
    prof.install(stages.stages)
    rng = random.Random(0)
    try:
        tokens = {i: [rng.randrange(3, stages.vocab) for _ in range(prompt)] for i in range(batch)}
        results = stages.step([(f"s{i}", 0, torch.tensor(tokens[i])) for i in range(batch)])  # prefill, untimed
        nxt = [r.token.token_id for r in results[-1]]  # type: ignore[union-attr]
        splits = [Split() for _ in stages.stages]
        for k in range(steps + 1):  # the first decode step is a warm-up, its attention calls counted
            start = prompt + k
            hidden: list[torch.Tensor | None] = [None] * batch
            for si, stage in enumerate(stages.stages):
                work = [
                    Step(
                        f"s{i}",
                        start,
                        torch.full((3, 1), start),
                        token_ids=torch.tensor([nxt[i]]) if si == 0 else None,
                        hidden=hidden[i] if si else None,
                        sample=GREEDY if stage.is_last else None,
                    )
                    for i in range(batch)
                ]
                with prof.measuring(splits[si]) if k else prof.counting(splits[si]):
                    out = stage.run(work)  # type: ignore[arg-type]
                hidden = [r.hidden for r in out]
            nxt = [r.token.token_id for r in out]  # type: ignore[union-attr]
        return splits, sum(stage.model.packing.packed for stage in stages.stages)
    finally:
        prof.uninstall()


def transformers_step(path: Path, dtype: torch.dtype, batch: int, prompt: int, steps: int) -> float:
    """Seconds per decode step of transformers' generate() over `batch` prompts of `prompt` tokens:
    the median interval between its logits-processor calls (one per step), the prefill left out."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            self.times.append(time.perf_counter())
            return scores

    cls: Any = open_checkpoint(path).family.for_generation
    model = cls.from_pretrained(str(path), dtype=dtype).eval()
    rng = random.Random(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[rng.randrange(3, min(vocab, 200)) for _ in range(prompt)] for _ in range(batch)])
    clock = Clock()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=2 + steps,
            min_new_tokens=2 + steps,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # the first decode step warms up
    return statistics.median(gaps)


def profile(args: argparse.Namespace) -> None:
    path = model_path(args)
    dtype = getattr(torch, args.dtype)
    per = args.steps
    print(f"step profile: {path.name}, {args.dtype}, 2 stages in-process, prompt {args.prompt}, {per} decode steps timed; ms per micro-batch")
    head = f"{'B':>3s} {'numerics':14s} {'stage':5s} {'compute':>8s} {'linear':>8s} {'attn':>8s} {'calls/L':>7s} {'rest':>8s} {'sampling':>8s} {'backend':>8s}"
    for b in args.batch:
        ref = transformers_step(path, dtype, b, args.prompt, per) if not args.no_hf else float("nan")
        print(head)
        for numerics, prepack in [(n, p) for n in args.numerics for p in args.prepack]:
            splits, packed = profile_stages(path, dtype, numerics, b, args.prompt, per, prepack)
            label = f"{numerics}/{'packed' if packed else 'plain'}"
            total = 0.0
            for si, s in enumerate(splits):
                n_layers = _layers_of(path, si)
                rest = s.forward - s.linear_layers - s.attention
                backend_own = s.run - s.forward - s.logits - s.sampling
                ms = 1e3 / per
                print(
                    f"{b:3d} {label:14s} {si:5d} {s.run * ms:8.2f} {s.linear * ms:8.2f} {s.attention * ms:8.2f} "
                    f"{s.attention_calls / n_layers:7.1f} {rest * ms:8.2f} {s.sampling * ms:8.2f} {backend_own * ms:8.2f}"
                )
                total += s.run
            print(f"{b:3d} {label:14s} {'sum':5s} {total * 1e3 / per:8.2f}")
        print(f"{b:3d} transformers generate() decode step: {ref * 1e3:.2f} ms\n")


def _chat_prompts(path: Path, batch: int) -> tuple[Any, list[torch.Tensor]]:
    """bench_load's B prompts through the checkpoint's chat template: the processor (left padding)
    and each prompt's token ids [T_i]."""
    from transformers import AutoProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_load import prompt  # type: ignore[import-not-found]

    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template([{"role": "user", "content": prompt(i)}], add_generation_prompt=True, tokenize=False) for i in range(batch)
    ]
    ids = [torch.tensor(processor.tokenizer(t)["input_ids"]) for t in texts]
    return processor, ids


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def transformers_costs(path: Path, dtype: torch.dtype, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """(prefill s, decode step s) of transformers over bench_load's B prompts, left-padded as its
    generate() batch runs them."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            self.times.append(time.perf_counter())
            return scores

    processor, ids = _chat_prompts(path, batch)
    width = max(t.numel() for t in ids)
    inputs = {
        "input_ids": torch.stack([torch.cat([torch.full((width - t.numel(),), processor.tokenizer.pad_token_id), t]) for t in ids]),
        "attention_mask": torch.stack([torch.cat([torch.zeros(width - t.numel(), dtype=torch.long), torch.ones_like(t)]) for t in ids]),
    }
    cls: Any = open_checkpoint(path).family.for_generation
    model = cls.from_pretrained(str(path), dtype=dtype).eval()
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)  # warm-up
        prefill = _median_time(lambda: model(**inputs, use_cache=True, logits_to_keep=1), repeats)
        clock = Clock()
        model.generate(**inputs, max_new_tokens=2 + steps, min_new_tokens=2 + steps, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # the first decode step warms up
    return prefill, statistics.median(gaps)


def stage_costs(path: Path, dtype: torch.dtype, batch: int, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Per stage of 2 (exact, prepacked): the prefill of bench_load's B prompts in one micro-batch
    (s), and the decode micro-batch of B sessions (s)."""
    _, ids = _chat_prompts(path, batch)
    stages = Stages(path, dtype, "exact")
    prefill: list[list[float]] = [[] for _ in stages.stages]
    decode: list[list[float]] = [[] for _ in stages.stages]

    def timed(work: list[tuple[str, int, torch.Tensor]], into: list[list[float]]) -> list[int]:
        hidden: list[torch.Tensor | None] = [None] * len(work)
        out: list[StepResult] = []
        for si, stage in enumerate(stages.stages):
            steps_ = [
                Step(
                    sid,
                    start,
                    torch.arange(start, start + t.numel())[None].expand(3, -1).contiguous(),
                    token_ids=t if si == 0 else None,
                    hidden=hidden[j] if si else None,
                    sample=GREEDY if stage.is_last else None,
                )
                for j, (sid, start, t) in enumerate(work)
            ]
            t0 = time.perf_counter()
            out = stage.run(steps_)  # type: ignore[arg-type]
            into[si].append(time.perf_counter() - t0)
            hidden = [r.hidden for r in out]
        return [r.token.token_id for r in out]  # type: ignore[union-attr]

    for rep in range(repeats + 1):  # the first a warm-up
        into = prefill if rep else [[] for _ in stages.stages]
        nxt = timed([(f"r{rep}s{i}", 0, t) for i, t in enumerate(ids)], into)
    at = [t.numel() for t in ids]
    for k in range(steps + 1):
        work = [(f"r{repeats}s{i}", at[i], torch.tensor([nxt[i]])) for i in range(batch)]
        nxt = timed(work, decode if k else [[] for _ in stages.stages])
        at = [a + 1 for a in at]
    return [statistics.median(p) for p in prefill], [statistics.median(d) for d in decode]


def ceiling(args: argparse.Namespace) -> None:
    path = model_path(args)
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    print(f"ceiling: {path.name}, {args.dtype}, {threads} torch thread(s) on {cores} core(s); 2 stages, exact, prepacked")
    print("costs in s (prefill: the B prompts at once) and ms (decode step); ceilings: mesh/transformers tok/s at --tokens per request")
    heads = [f"{n} tok: 1 machine" for n in args.tokens] + [f"{n} tok: pipelined" for n in args.tokens]
    print(f"| B | HF prefill s | stages' prefill s | HF decode ms | stages' decode ms, B | stages' decode ms, B/2 | {' | '.join(heads)} |")
    print("|" + "---|" * (6 + len(heads)))
    for b in args.batch:
        hf_p, hf_d = transformers_costs(path, dtype, b, args.steps, args.repeats)
        p, d = stage_costs(path, dtype, b, args.steps, args.repeats)
        _, half = stage_costs(path, dtype, max(1, b // 2), args.steps, args.repeats)
        one_machine = [(hf_p + (n - 1) * hf_d) / (sum(p) + (n - 1) * sum(d)) for n in args.tokens]
        # Pipelined on a machine per stage: the prefill overlaps fully (the larger stage's), and each
        # round every stage runs both micro-batches of B/2.
        piped = [(hf_p + (n - 1) * hf_d) / (max(p) + (n - 1) * 2 * max(half)) for n in args.tokens]
        cells = [f"{r:.2f}" for r in one_machine + piped]
        print(
            f"| {b} | {hf_p:.2f} | {' + '.join(f'{x:.2f}' for x in p)} | {hf_d * 1e3:.0f} | {' + '.join(f'{x * 1e3:.0f}' for x in d)} "
            f"| {' + '.join(f'{x * 1e3:.0f}' for x in half)} | {' | '.join(cells)} |",
            flush=True,
        )


def _layers_of(path: Path, stage: int, splits: int = 2) -> int:
    n = open_checkpoint(path).text_config.num_hidden_layers
    cuts = [round(i * n / splits) for i in range(splits + 1)]
    return cuts[stage + 1] - cuts[stage]


def model_path(args: argparse.Namespace) -> Path:
    if args.model == "2b":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_2b import make_random_2b  # type: ignore[import-not-found]

        return Path(make_random_2b(f"bench/results/models/qwen2-vl-2b-random-{args.dtype}", args.dtype))
    from services.tiny import make_tiny

    return make_tiny(Path(tempfile.mkdtemp(prefix="vlmesh-profile-")) / "tiny", num_layers=4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "profile", "bitwise", "ceiling"), default="all")
    ap.add_argument("--model", choices=("tiny", "2b"), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16], help="sessions in flight")
    ap.add_argument("--numerics", type=lambda s: s.split(","), default=["exact", "fast"])
    ap.add_argument(
        "--prepack",
        type=lambda s: [x == "true" for x in s.split(",")],
        default=[True],
        help="true, false or true,false: linears packed for oneDNN at load (the stage's --prepack)",
    )
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per session")
    ap.add_argument("--steps", type=int, default=8, help="decode micro-batches timed")
    ap.add_argument("--repeats", type=int, default=2, help="ceiling: prefills timed (the median)")
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[16, 24], help="ceiling: tokens per request")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' step")
    ap.add_argument("--checkpoints", type=lambda s: s.split(","), default=[], help="bitwise: checkpoints whose name has one of these")
    ap.add_argument("--smoke", action="store_true", help="tiny model, small sizes: seconds (CI)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.model, args.batch, args.steps, args.prompt, args.repeats = "tiny", [1, 3], 2, 8, 1
    if args.part in ("all", "profile"):
        profile(args)
    if args.part in ("all", "bitwise"):
        bitwise(args)
    if args.part in ("all", "ceiling"):
        ceiling(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
