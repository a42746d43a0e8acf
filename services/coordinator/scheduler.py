"""Which requests step next, and with how many tokens. Policy only: the scheduler never touches
tensors, sessions' contents or the network.

Continuous batching with chunked prefill, as vLLM schedules: every micro-batch carries at most
`chunk_tokens` tokens (by default sized from what steps have cost: StepCosts). Requests decoding (one token each) go first, then prompts, each taking as
much of the remaining token budget as it needs, so a long prompt (an image is hundreds of
tokens, a video thousands) is fed in chunks between the running requests' decode steps and a
newcomer never holds them up for longer than one chunk. When as many requests wait for their
first token as were decoding when they arrived (a burst), the auto budget lets their prompts in
at once instead.

Pipelining: up to `pipeline_depth` micro-batches are in flight at once (one per layer range),
each with about 1/depth of the active requests by count, so every range computes at the same time
instead of one after another (GPipe's schedule; vLLM's virtual engines). A burst's prompts go in
smaller pieces, about 1/(4 x depth) of the prompt tokens waiting each (GPipe's many micro-batches
per stage), but never fewer tokens than a chunk needs to be worth its fixed cost
(StepCosts.efficient)."""

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
    pipeline_floor: int = 64  # the least prompt tokens a pipelined micro-batch is held to (efficient)

    def observe(self, prompt_tokens: int, wall_s: float) -> None:
        if prompt_tokens == 0:
            self.decode_s = wall_s if self.decode_s is None else 0.8 * self.decode_s + 0.2 * wall_s
        elif self.decode_s is not None and wall_s > self.decode_s:
            per = (wall_s - self.decode_s) / prompt_tokens
            self.token_s = per if self.token_s is None else 0.8 * self.token_s + 0.2 * per

    def efficient(self) -> int:
        """The fewest prompt tokens worth a pipelined micro-batch of their own: their cost at least
        four times a decode micro-batch's (which is mostly reading the weights), so that cost is at
        most a fifth of the chunk's. `pipeline_floor` until both are measured."""
        if self.decode_s is None or not self.token_s:
            return self.pipeline_floor
        return max(self.pipeline_floor, min(self.ceiling, int(4 * self.decode_s / self.token_s)))

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
    # Arrivals counted (add), each request's number, and the count when it was first seen decoding:
    # which decoders were already running when a prompt arrived (the ones its chunks protect).
    _arrivals: int = 0
    _arrival: dict[int, int] = field(default_factory=dict)  # id(request) -> its arrival number
    _decoding_since: dict[int, int] = field(default_factory=dict)  # id(request) -> _arrivals then

    def add(self, r: Schedulable) -> None:
        for q in self.queue:  # whoever decodes now was decoding before r arrived
            if q.remaining == 1 or (q.in_flight and q.remaining <= 1):
                self._decoding_since.setdefault(id(q), self._arrivals)
        self.queue.append(r)
        self._arrivals += 1
        self._arrival[id(r)] = self._arrivals

    def remove(self, r: Schedulable) -> None:
        if r in self.queue:
            self.queue.remove(r)
        self._arrival.pop(id(r), None)
        self._decoding_since.pop(id(r), None)

    def next_batch(self, in_flight_batches: int) -> list[tuple[Schedulable, int]]:
        """(request, tokens to feed) for the next micro-batch; empty when none should start."""
        if in_flight_batches >= self.cfg.pipeline_depth:
            return []
        # One pass over the queue (each request's properties read once): ready decodes and
        # prompts in arrival order, how many are active, whether any is decoding.
        decodes: list[Schedulable] = []
        prompts: list[tuple[Schedulable, int]] = []
        active = 0
        decoding_since: list[int] = []  # per request past its prompt (ready or in flight)
        first_prompt = self._arrivals + 1  # the arrival number of the oldest request in its prompt
        pending = 0  # prompt tokens not yet fed (ready or in flight)
        for r in self.queue:
            remaining, in_flight, feedable = r.remaining, r.in_flight, r.feedable
            if in_flight or feedable:
                active += 1
            if remaining == 1 or (in_flight and remaining <= 1):
                decoding_since.append(self._decoding_since.setdefault(id(r), self._arrivals))
            elif remaining > 1 and (in_flight or feedable):
                pending += remaining
                first_prompt = min(first_prompt, self._arrival.get(id(r), 0))
            if feedable:
                if remaining == 1:
                    decodes.append(r)
                elif remaining > 1:
                    prompts.append((r, remaining))
        if not decodes and not prompts:
            return []
        share = max(1, math.ceil(active / self.cfg.pipeline_depth))
        limit = min(self.cfg.max_batch, share)
        # Auto: a chunk of about half a decode step protects the pace of the requests that were
        # already decoding when the waiting prompts arrived, unless at least as many requests wait
        # for their first token (a burst arriving together): then their wait is the larger cost,
        # and their prompts go in as chunks of up to the ceiling. A burst's own early members,
        # decoding since part of it was fed, do not count: they would have the rest of their burst
        # fed a few tokens at a time (each chunk paying a whole decode step's weight reads).
        running = sum(1 for since in decoding_since if since < first_prompt)
        protect = running and len(prompts) < running
        budget = self.cfg.chunk_tokens or (self.costs.budget() if protect else self.costs.ceiling)
        # Pipelined, the ranges should prefill at the same time rather than one after the other.
        # The first range computes the burst's first micro-batch alone and the last one its last
        # (GPipe's bubble): with a share of 1/depth of the prompt tokens not yet fed (those in flight
        # included), each range sat idle for half of a 2-range prefill. Taking about 1/(4 x depth)
        # shrinks that bubble to about an eighth, down to the smallest chunk still worth its fixed
        # cost (measured, StepCosts.efficient), and never more than 1/depth. A prompt is not cut to
        # balance: the share only stops further prompts joining.
        depth = self.cfg.pipeline_depth
        prompt_share = budget
        if depth > 1:
            prompt_share = min(math.ceil(pending / depth), max(self.costs.efficient(), math.ceil(pending / (4 * depth))))
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
