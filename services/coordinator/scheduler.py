"""Which requests step next, and with how many tokens. Policy only: the scheduler never touches
tensors, sessions' contents or the network.

Continuous batching with chunked prefill, as vLLM schedules: every micro-batch carries at most
`chunk_tokens` tokens. Requests decoding (one token each) go first, then prompts, each taking as
much of the remaining token budget as it needs, so a long prompt (an image is hundreds of
tokens, a video thousands) is fed in chunks between the running requests' decode steps and a
newcomer never holds them up for longer than one chunk.

Pipelining: up to `pipeline_depth` micro-batches are in flight at once (one per layer range),
each with about 1/depth of the active requests, so every range computes at the same time instead
of one after another (GPipe's schedule; vLLM's virtual engines)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


class Schedulable(Protocol):
    @property
    def feedable(self) -> bool: ...  # prepared, placed and not in flight

    @property
    def remaining(self) -> int: ...  # tokens to feed before the next sample

    @property
    def in_flight(self) -> bool: ...


@dataclass
class SchedulerConfig:
    max_batch: int = 64  # sessions in one micro-batch
    chunk_tokens: int = 512  # tokens in one micro-batch (a decode step counts one)
    pipeline_depth: int = 1  # micro-batches in flight


@dataclass
class Scheduler:
    cfg: SchedulerConfig
    queue: list[Schedulable] = field(default_factory=list)  # arrival order

    def add(self, r: Schedulable) -> None:
        self.queue.append(r)

    def remove(self, r: Schedulable) -> None:
        if r in self.queue:
            self.queue.remove(r)

    @property
    def running(self) -> int:
        return len(self.queue)

    def next_batch(self, in_flight_batches: int) -> list[tuple[Schedulable, int]]:
        """(request, tokens to feed) for the next micro-batch; empty when none should start."""
        if in_flight_batches >= self.cfg.pipeline_depth:
            return []
        ready = [r for r in self.queue if r.feedable and r.remaining > 0]
        if not ready:
            return []
        active = sum(1 for r in self.queue if r.in_flight or r.feedable)
        share = max(1, math.ceil(active / self.cfg.pipeline_depth))
        limit = min(self.cfg.max_batch, share)
        budget = self.cfg.chunk_tokens
        picked: list[tuple[Schedulable, int]] = []
        for r in ready:  # decode steps first: they are what running requests wait on
            if len(picked) >= limit or budget <= 0:
                break
            if r.remaining == 1:
                picked.append((r, 1))
                budget -= 1
        for r in ready:  # then prompts, in arrival order, chunked to the budget left
            if len(picked) >= self.cfg.max_batch or budget <= 0:
                break
            if r.remaining > 1:
                n = min(r.remaining, budget)
                picked.append((r, n))
                budget -= n
        return picked
