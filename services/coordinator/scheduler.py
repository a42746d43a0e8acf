"""Which requests step next, and with how many tokens. Policy only: the scheduler never touches
tensors, sessions' contents or the network.

Continuous batching with chunked prefill, as vLLM schedules: every micro-batch carries at most
`chunk_tokens` tokens (by default sized from what steps have cost: StepCosts). Requests decoding (one token each) go first, then prompts, each taking as
much of the remaining token budget as it needs, so a long prompt (an image is hundreds of
tokens, a video thousands) is fed in chunks between the running requests' decode steps and a
newcomer never holds them up for longer than one chunk. When as many requests wait for their
first token as are decoding (a burst), the auto budget lets their prompts in at once instead.

Pipelining: up to `pipeline_depth` micro-batches are in flight at once (one per layer range),
each with about 1/depth of the active requests (decodes by count, waiting prompts by tokens), so
every range computes at the same time instead of one after another (GPipe's schedule; vLLM's
virtual engines)."""

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
    chunk_tokens: int = 0  # tokens in one micro-batch (a decode step counts one); 0 = auto (StepCosts)
    pipeline_depth: int = 1  # micro-batches in flight


@dataclass
class StepCosts:
    """What micro-batches have cost, to size the prompt chunk when chunk_tokens is 0 (auto): as
    many prompt tokens as cost about half a decode step, so a new prompt at most about doubles the
    running requests' time per token (what that comes to on the 2B and tiny models:
    bench/results/NOTES.md)."""

    decode_s: float | None = None  # EWMA wall time of a micro-batch without prompt tokens
    token_s: float | None = None  # EWMA wall time per prompt token beyond that
    floor: int = 16
    ceiling: int = 2048  # also the chunk when nothing is decoding (no one to hold up)
    start: int = 32  # until both are measured: small, so the first chunk beside decodes measures cheaply

    def observe(self, prompt_tokens: int, wall_s: float) -> None:
        if prompt_tokens == 0:
            self.decode_s = wall_s if self.decode_s is None else 0.8 * self.decode_s + 0.2 * wall_s
        elif self.decode_s is not None and wall_s > self.decode_s:
            per = (wall_s - self.decode_s) / prompt_tokens
            self.token_s = per if self.token_s is None else 0.8 * self.token_s + 0.2 * per

    def budget(self) -> int:
        if self.decode_s is None or not self.token_s:
            return self.start
        # Half a decode step's worth: the estimate is noisy (micro-batches in flight together
        # share the stages), and a chunk that costs a whole step already doubles the wait.
        return max(self.floor, min(self.ceiling, int(0.5 * self.decode_s / self.token_s)))


@dataclass
class Scheduler:
    cfg: SchedulerConfig
    queue: list[Schedulable] = field(default_factory=list)  # arrival order
    costs: StepCosts = field(default_factory=StepCosts)

    def add(self, r: Schedulable) -> None:
        self.queue.append(r)

    def remove(self, r: Schedulable) -> None:
        if r in self.queue:
            self.queue.remove(r)

    def next_batch(self, in_flight_batches: int) -> list[tuple[Schedulable, int]]:
        """(request, tokens to feed) for the next micro-batch; empty when none should start."""
        if in_flight_batches >= self.cfg.pipeline_depth:
            return []
        # One pass over the queue (each request's properties read once): ready decodes and
        # prompts in arrival order, how many are active, whether any is decoding.
        decodes: list[Schedulable] = []
        prompts: list[tuple[Schedulable, int]] = []
        active = 0
        decoding = 0  # requests past their prompt (ready or in flight)
        pending = 0  # prompt tokens not yet fed (ready or in flight)
        for r in self.queue:
            remaining, in_flight, feedable = r.remaining, r.in_flight, r.feedable
            if in_flight or feedable:
                active += 1
            if remaining == 1 or (in_flight and remaining <= 1):
                decoding += 1
            elif remaining > 1 and (in_flight or feedable):
                pending += remaining
            if feedable:
                if remaining == 1:
                    decodes.append(r)
                elif remaining > 1:
                    prompts.append((r, remaining))
        if not decodes and not prompts:
            return []
        share = max(1, math.ceil(active / self.cfg.pipeline_depth))
        limit = min(self.cfg.max_batch, share)
        # Auto: a chunk of about half a decode step protects the decoding requests' pace, unless
        # at least as many requests wait for their first token (a burst arriving together): then
        # their wait is the larger cost, and their prompts go in as one chunk of up to the ceiling.
        protect = decoding and len(prompts) < decoding
        budget = self.cfg.chunk_tokens or (self.costs.budget() if protect else self.costs.ceiling)
        # Pipelined, a micro-batch takes about 1/depth of the prompt tokens not yet fed (those in
        # flight included), so that the ranges prefill at the same time rather than one after the
        # other: one micro-batch holding every prompt of a burst leaves each range idle half the
        # prefill, and so does one that takes all the rest behind the burst's first arrival. A
        # prompt is not cut to balance: the share only stops further prompts joining.
        depth = self.cfg.pipeline_depth
        prompt_share = math.ceil(pending / depth) if depth > 1 else budget
        # Decode steps first: they are what running requests wait on.
        picked: list[tuple[Schedulable, int]] = [(r, 1) for r in decodes[: max(0, min(limit, budget))]]
        budget -= len(picked)
        prompt_tokens = 0
        for r, remaining in prompts:  # then prompts, in arrival order, chunked to the budget left
            if len(picked) >= self.cfg.max_batch or budget <= 0 or prompt_tokens >= prompt_share:
                break
            n = min(remaining, budget)
            picked.append((r, n))
            budget -= n
            prompt_tokens += n
        return picked
