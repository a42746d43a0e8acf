"""Automatic prefix caching across the mesh.

When a one-shot request ends, its session is parked here instead of released: the stages keep
its KV. A later one-shot request of the same API key whose tokens start with a parked session's
cached tokens (images compared by content hash, not by their placeholder tokens, which are the
same for every image of a size) takes that session over: the stages drop the positions after the
common prefix and only the rest is fed. This is what keeps a stateless client's conversation
(the OpenAI API resends it whole every turn) from being recomputed from token 0 each turn.
Parked sessions are bounded in number and are the first KV given back when a stage is full."""

from __future__ import annotations

from collections import OrderedDict

from .session import Session
from .visual import Visual


class PrefixCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._parked: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._parked)

    def sessions(self) -> list[Session]:
        return list(self._parked.values())

    def park(self, s: Session) -> list[Session]:
        """Keep `s` (its KV stays on the stages); returns the sessions evicted to make room."""
        self._parked[s.id] = s
        evicted = []
        while len(self._parked) > self.capacity:
            evicted.append(self._parked.popitem(last=False)[1])
        return evicted

    def evict(self) -> Session | None:
        """The least recently parked session, removed (its KV is to be released)."""
        return self._parked.popitem(last=False)[1] if self._parked else None

    def evict_of(self, owner: str) -> Session | None:
        """The least recently parked session of one key, removed."""
        for sid, s in self._parked.items():
            if s.owner == owner:
                del self._parked[sid]
                return s
        return None

    def take(self, token_ids: list[int], visuals: list[Visual], visual_positions: list[int], owner: str) -> tuple[Session, int] | None:
        """The parked session sharing the longest prefix with this history (at least one token
        is left to feed), removed from the cache, and that prefix's length."""
        best: tuple[Session, int] | None = None
        for p in self._parked.values():
            if p.owner != owner:
                continue
            n = _common(p, token_ids, visuals, visual_positions)
            if n > 0 and (best is None or n > best[1]):
                best = (p, n)
        if best is not None:
            del self._parked[best[0].id]
        return best


def _common(p: Session, token_ids: list[int], visuals: list[Visual], visual_positions: list[int]) -> int:
    held = p.token_ids[: p.cached]
    n = 0
    limit = min(len(held), len(token_ids) - 1)
    while n < limit and held[n] == token_ids[n]:
        n += 1
    # Equal placeholder tokens say nothing about the pictures: compare each visual that starts
    # inside the prefix by content, and stop the prefix where they first differ.
    row = 0
    for k, v in enumerate(p.visuals):
        if row >= len(p.visual_positions):
            break
        start = p.visual_positions[row]
        if start >= n:
            break
        same = k < len(visuals) and visuals[k].content_hash == v.content_hash and row < len(visual_positions) and visual_positions[row] == start
        if not same:
            return start
        row += v.rows
    return n
