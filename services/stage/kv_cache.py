"""Per-session KV cache of one stage's layers, allocated against a byte budget.

`SessionKV.update()` has the signature transformers' attention calls on a Cache, so the HF
decoder layers write straight into it; it also keeps what the step appended (the KV delta)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from services.common.errors import KVBudgetFull, UnknownSession, WrongStage


@dataclass
class SessionKV:
    """K/V of one session for layers [start, end). Tensors are [1, kv_heads, L, head_dim]."""

    start: int
    end: int
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.cat, as transformers' DynamicCache does: the attention kernel then sees the same
        # contiguous K/V as in `generate`, which keeps the mesh bit-exact with it.
        if layer in self.keys:
            key = torch.cat([self.keys[layer], key], dim=-2)
            value = torch.cat([self.values[layer], value], dim=-2)
        self.keys[layer], self.values[layer] = key, value
        return key, value

    def truncate(self, length: int) -> None:
        for d in (self.keys, self.values):
            for layer, t in d.items():
                d[layer] = t[:, :, :length]


class BatchKV:
    """The Cache view one forward pass sees: B sessions, each appending T new positions.

    With B > 1 (batched decode) sessions of different lengths are right-padded to the longest;
    `attention_mask()` hides the padding."""

    def __init__(self, sessions: list[SessionKV], new_tokens: int, record_deltas: list[bool]):
        self.sessions = sessions
        self.new_tokens = new_tokens
        self.past = [s.length for s in sessions]
        self.record = record_deltas
        self.deltas: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in sessions]

    # The one method transformers' attention calls on its cache.
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):  # [B, H, T, D] each
        outs_k, outs_v = [], []
        for i, s in enumerate(self.sessions):
            k, v = key_states[i : i + 1], value_states[i : i + 1]
            if self.record[i]:
                self.deltas[i][layer_idx] = (k[0], v[0])  # [H, T, D]
            fk, fv = s.append(layer_idx, k, v)
            outs_k.append(fk)
            outs_v.append(fv)
        if len(outs_k) == 1:
            return outs_k[0], outs_v[0]
        longest = max(k.shape[2] for k in outs_k)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[2]))

        return torch.cat([pad(k) for k in outs_k]), torch.cat([pad(v) for v in outs_v])

    def attention_mask(self) -> torch.Tensor | None:  # [B, 1, T, L] bool, True = attend
        """None where sdpa's own masking is exact and is what `generate` uses: a fresh prefill
        (is_causal) or one decode token over an unpadded cache."""
        t = self.new_tokens
        totals = [p + t for p in self.past]
        if len(self.sessions) == 1 and (self.past[0] == 0 or t == 1):
            return None
        if t == 1 and len(set(totals)) == 1:
            return None
        longest = max(totals)
        cols = torch.arange(longest)
        masks = []
        for p, total in zip(self.past, totals):
            rows = torch.arange(t)[:, None] + p  # absolute position of each query
            masks.append((cols[None, :] <= rows) & (cols[None, :] < total))
        return torch.stack(masks)[:, None]


class KVCache:
    """All sessions' KV on this stage. Admission is by bytes: a step that would push the total
    over the budget is refused before it runs, so nothing of other sessions is ever evicted."""

    def __init__(self, budget_bytes: int, bytes_per_token: int, start: int, end: int):
        self.budget = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.start, self.end = start, end
        self._sessions: dict[str, SessionKV] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return sum(s.length for s in self._sessions.values()) * self.bytes_per_token

    def __len__(self) -> int:
        return len(self._sessions)

    def check(self, session_id: str, start_position: int) -> None:
        """Raise unless a step of this session may start at `start_position`; changes nothing."""
        if start_position == 0:
            return
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise UnknownSession(f"session {session_id!r} holds no KV on this stage (start_position {start_position})")
        if s.length != start_position:
            raise WrongStage(
                f"session {session_id!r}: step starts at position {start_position} but this stage holds {s.length}"
            )

    def get(self, session_id: str, start_position: int) -> SessionKV:
        """The session's KV; a step starting at position 0 opens (or restarts) the session."""
        with self._lock:
            s = self._sessions.get(session_id)
            if start_position == 0:
                s = self._sessions[session_id] = SessionKV(self.start, self.end)
            elif s is None:
                raise UnknownSession(f"session {session_id!r} holds no KV on this stage (start_position {start_position})")
            s.last_used = time.monotonic()
            return s

    @contextmanager
    def reserve(self, new_tokens: dict[str, int]) -> Iterator[None]:
        """Admission control for one batch: refuse it whole if the budget cannot take it."""
        with self._lock:
            want = sum(new_tokens.values()) * self.bytes_per_token
            if self.used + want > self.budget:
                sid = max(new_tokens, key=new_tokens.get)
                raise KVBudgetFull(
                    f"KV budget full: {self.used} of {self.budget} bytes used, step of session {sid!r} needs {want} more"
                )
        yield

    def release(self, session_id: str) -> int:
        with self._lock:
            s = self._sessions.pop(session_id, None)
            return s.length * self.bytes_per_token if s else 0

    def expire(self, idle_seconds: float) -> list[str]:
        now = time.monotonic()
        with self._lock:
            gone = [sid for sid, s in self._sessions.items() if now - s.last_used > idle_seconds]
            for sid in gone:
                del self._sessions[sid]
        return gone
