"""Token selection on the last stage, with transformers' own logits processors (same order as
`generate`: repetition penalty, temperature, top-k, top-p), so sampling means what HF users expect.

Sampling keeps no state between steps: the token at position p is drawn with a generator seeded
from (seed, p). So a replica that takes over a session draws exactly what the lost one would
have, and nothing about a session's sampling has to be saved or restored."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.common.errors import InvalidArgument

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0  # 0 or 1 = off
    repetition_penalty: float = 1.0  # 0 or 1 = off
    seed: int = 0

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 <= self.top_p <= 1.0):  # also refuses NaN
            raise InvalidArgument(f"top_p must be in [0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty >= 0.0):
            raise InvalidArgument(f"repetition_penalty must be a finite number >= 0 (0 or 1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty not in (0.0, 1.0)

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.penalised:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if 0.0 < self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class Sample:
    token_id: int
    logprob: float  # of the raw distribution, as vLLM reports it
    top: list[tuple[int, float]]


def generator_for(seed: int, position: int) -> torch.Generator:
    """splitmix64 of (seed, position): neighbouring positions get unrelated streams."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed(z ^ (z >> 31))


def sample(
    logits: torch.Tensor,  # [V] float32, last position
    params: SamplingParams,
    position: int,  # the position the sampled token will take
    penalty_ids: torch.Tensor | None = None,  # [K] int64: the session's distinct tokens so far
    top_logprobs: int = 0,
) -> Sample:
    logits = logits.cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    procs = params.processors()
    history = penalty_ids if penalty_ids is not None else torch.empty(0, dtype=torch.long)
    scores = procs(history[None], logits[None])[0] if len(procs) else logits  # type: ignore[arg-type]
    if params.greedy:
        token = int(torch.argmax(scores))
    else:
        probs = torch.softmax(scores, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator_for(params.seed, position)))
    top: list[tuple[int, float]] = []
    if top_logprobs > 0:
        vals, idx = torch.topk(logprobs, min(top_logprobs, logprobs.numel()))
        top = list(zip(idx.tolist(), vals.tolist()))
    return Sample(token, float(logprobs[token]), top)
