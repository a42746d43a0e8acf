"""Which requests step next. Policy only: the scheduler never touches tensors or the network."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Schedule:
    prefill: list  # requests whose prompt runs this iteration (each alone: shapes differ)
    decode: list  # requests that each add one token, batched into one forward pass


@dataclass
class Scheduler:
    max_batch: int = 32
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)

    def add(self, request) -> None:
        self.waiting.append(request)

    def _reap(self) -> None:
        """Drop requests that finished or whose caller went away, and tell their handlers."""
        for r in [*self.running, *self.waiting]:
            if r.done:
                r.released.set()
        self.running = [r for r in self.running if not r.done]
        self.waiting = deque(r for r in self.waiting if not r.done)

    def schedule(self) -> Schedule:
        self._reap()
        decode = self.running[: self.max_batch]
        prefill = []
        # One prompt per iteration keeps decode latency of running requests bounded.
        if self.waiting and len(self.running) < self.max_batch:
            prefill.append(self.waiting.popleft())
        return Schedule(prefill, decode)

    def started(self, request) -> None:
        if not request.done:
            self.running.append(request)

    def has_work(self) -> bool:
        self._reap()
        return bool(self.waiting or self.running)
