"""Token selection on the last stage, with transformers' own logits processors (same order as
`generate`: repetition penalty, temperature, top-k, top-p), so sampling means what HF users expect."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.common.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if not (self.temperature >= 0.0):
            raise InvalidInput(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 <= self.top_p <= 1.0):
            raise InvalidInput(f"top_p must be in [0, 1], got {self.top_p}")
        if not (self.repetition_penalty >= 0.0):
            raise InvalidInput(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty not in (0.0, 1.0):
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


def sample(
    logits: torch.Tensor,  # [V] float32, last position
    params: SamplingParams,
    history: torch.Tensor,  # [L] int64: prompt + generated so far, for the repetition penalty
    generator: torch.Generator | None,
    top_logprobs: int = 0,
) -> Sample:
    logprobs = torch.log_softmax(logits, dim=-1)
    procs = params.processors()
    scores = procs(history[None], logits[None])[0] if len(procs) else logits
    if params.greedy:
        token = int(torch.argmax(scores))
    else:
        probs = torch.softmax(scores, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: list[tuple[int, float]] = []
    if top_logprobs > 0:
        vals, idx = torch.topk(logprobs, min(top_logprobs, logprobs.numel()))
        top = list(zip(idx.tolist(), vals.tolist()))
    return Sample(token, float(logprobs[token]), top)
