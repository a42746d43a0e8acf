"""Per-session KV of one stage's layers, written in place, allocated against a byte budget.

Each session owns one K and one V buffer per owned layer, [kv_heads, capacity, head_dim], that
its steps write into at their positions. Capacity grows in blocks of `block_tokens` positions
(growing copies that session's cache once per block; nothing else ever copies it), and the
budget counts capacity, the memory really allocated. Admission is per session: a step that does
not fit is refused alone, and nothing of another session is ever evicted for it.

A session also holds a lease: it is dropped when neither a step nor a renewal has touched it for
`lease_seconds` (its coordinator is gone or forgot it)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from services.common.errors import KVBudgetFull, UnknownSession, WrongStage


@dataclass(frozen=True)
class KVShape:
    layers: range  # global indices of the owned decoder layers
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:  # K and V of every owned layer
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class SessionKV:
    keys: list[torch.Tensor]  # per owned layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    length: int = 0  # positions filled (the rest of the capacity is scratch)
    expires: float = 0.0  # time.monotonic() after which the lease has run out

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


class KVCache:
    """All sessions' KV on this stage. Only the model runner thread changes buffers; the lock
    guards the session table against the RPC handlers (release, renew, info)."""

    def __init__(self, shape: KVShape, budget_bytes: int, lease_seconds: float, block_tokens: int = 256):
        self.shape = shape
        self.budget = budget_bytes
        self.lease_seconds = lease_seconds
        self.block_tokens = block_tokens
        self._sessions: dict[str, SessionKV] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(s.capacity for s in self._sessions.values()) * self.shape.bytes_per_token

    def __len__(self) -> int:
        return len(self._sessions)

    def length(self, session_id: str) -> int:
        s = self._sessions.get(session_id)
        return s.length if s is not None else 0

    def check(self, session_id: str, start: int, rewind: bool = False) -> None:
        """Raise unless a step of this session may start at `start` (with `rewind`, at or below
        the length held); changes nothing."""
        if start == 0:
            return
        s = self._sessions.get(session_id)
        if s is None:
            raise UnknownSession("this stage holds no KV of the session", reason="KV_MISSING")
        if s.length != start and not (rewind and start < s.length):
            # Positions only: a cache length says nothing about the session's content.
            raise WrongStage(f"the step starts at position {start} but this stage holds a different length", reason="KV_POSITION_MISMATCH")

    def reserve(self, session_id: str, start: int, count: int) -> SessionKV:
        """Make room for positions [start, start + count) of a session (a step at 0 starts it
        afresh); KVBudgetFull if the budget cannot take it, changing nothing."""
        need = start + count
        with self._lock:
            s = self._sessions.get(session_id)
            if start == 0 or s is None:
                old = s.capacity if s is not None else 0
                cap = self._round(need)
                self._admit(cap - old, session_id)
                s = self._sessions[session_id] = self._allocate(cap)
            else:
                s.length = min(s.length, start)  # a rewind drops the positions after `start`
                if need > s.capacity:
                    cap = self._round(need)
                    self._admit(cap - s.capacity, session_id)
                    s.keys, s.values = self._grow(s.keys, s.length, cap), self._grow(s.values, s.length, cap)
            s.expires = time.monotonic() + self.lease_seconds
            return s

    def commit(self, s: SessionKV, length: int) -> None:
        """The step that wrote up to `length` succeeded."""
        s.length = length

    def view(self, s: SessionKV, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:  # [1, H, length, D] each
        i = layer - self.shape.layers.start
        return s.keys[i][None, :, :length], s.values[i][None, :, :length]

    def restore(self, session_id: str, length: int, entries: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace the session's KV with `entries` (layer -> ([H, length, D], [H, length, D]))."""
        s = self.reserve(session_id, 0, max(length, 1))
        for layer, (k, v) in entries.items():
            i = layer - self.shape.layers.start
            s.keys[i][:, :length] = k.to(self.shape.device, self.shape.dtype)
            s.values[i][:, :length] = v.to(self.shape.device, self.shape.dtype)
        s.length = length

    def release(self, session_id: str) -> int:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        return s.capacity * self.shape.bytes_per_token if s is not None else 0

    def renew(self, session_ids: list[str]) -> list[str]:
        """Extend the leases of the sessions held; return the ids not held."""
        until = time.monotonic() + self.lease_seconds
        unknown = []
        with self._lock:
            for sid in session_ids:
                s = self._sessions.get(sid)
                if s is None:
                    unknown.append(sid)
                else:
                    s.expires = until
        return unknown

    def expire(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            gone = [sid for sid, s in self._sessions.items() if s.expires < now]
            for sid in gone:
                del self._sessions[sid]
        return gone

    def _round(self, positions: int) -> int:
        b = self.block_tokens
        return -(-positions // b) * b

    def _admit(self, extra_tokens: int, session_id: str) -> None:
        used = sum(s.capacity for s in self._sessions.values()) * self.shape.bytes_per_token
        want = extra_tokens * self.shape.bytes_per_token
        if used + want > self.budget:
            raise KVBudgetFull(f"KV budget full: {used} of {self.budget} bytes in use, the step needs {want} more")

    def _allocate(self, capacity: int) -> SessionKV:
        sh = self.shape

        def buf() -> torch.Tensor:
            return torch.empty(sh.kv_heads, capacity, sh.head_dim, dtype=sh.dtype, device=sh.device)

        n = len(sh.layers)
        return SessionKV([buf() for _ in range(n)], [buf() for _ in range(n)])

    def _grow(self, bufs: list[torch.Tensor], length: int, capacity: int) -> list[torch.Tensor]:
        out = []
        for b in bufs:
            nb = torch.empty(b.shape[0], capacity, b.shape[2], dtype=b.dtype, device=b.device)
            nb[:, :length] = b[:, :length]
            out.append(nb)
        return out


@dataclass
class BatchKV:
    """The cache one forward pass sees: the sessions of a batch, their tokens side by side.
    `update()` is the one method transformers' attention calls on its cache; it writes each
    session's new K/V into that session's buffer, and the "vlmesh" attention reads the views."""

    cache: KVCache
    sessions: list[SessionKV]
    starts: list[int]  # [B] cached positions of each session before the step
    spans: list[tuple[int, int]]  # [B] (offset, count) of each session's tokens in the batch
    record: list[bool]  # [B] keep the step's K/V (KV deltas)
    deltas: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # [B] layer -> ([H, T, D], [H, T, D])

    def __post_init__(self) -> None:
        self.deltas = [{} for _ in self.sessions]

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):  # [1, kv_heads, N, D] each
        i_layer = layer_idx - self.cache.shape.layers.start
        for i, (s, start, (offset, count)) in enumerate(zip(self.sessions, self.starts, self.spans)):
            k = key_states[0, :, offset : offset + count]
            v = value_states[0, :, offset : offset + count]
            s.keys[i_layer][:, start : start + count] = k
            s.values[i_layer][:, start : start + count] = v
            if self.record[i]:
                self.deltas[i][layer_idx] = (
                    s.keys[i_layer][:, start : start + count],
                    s.values[i_layer][:, start : start + count],
                )
        return key_states, value_states

    def view(self, i: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, (_, count) = self.starts[i], self.spans[i]
        return self.cache.view(self.sessions[i], layer, start + count)

    def commit(self) -> None:
        for s, start, (_, count) in zip(self.sessions, self.starts, self.spans):
            self.cache.commit(s, start + count)
