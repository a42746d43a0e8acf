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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.errors import KVBudgetFull, UnknownSession, WrongStage
from services.common.geometry import KVGeometry


@dataclass(frozen=True)
class KVShape:
    layers: range  # global indices of the owned decoder layers
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def for_model(cls, text_config: Any, layers: range, dtype: torch.dtype, device: torch.device) -> KVShape:
        g = KVGeometry.from_text_config(text_config)
        return cls(layers, g.kv_heads, g.head_dim, dtype, device)

    @property
    def bytes_per_token(self) -> int:  # K and V of every owned layer
        return KVGeometry(self.kv_heads, self.head_dim).bytes_per_token(len(self.layers), self.dtype)


@dataclass
class SessionKV:
    keys: list[torch.Tensor]  # per owned layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    length: int = 0  # positions filled (the rest of the capacity is scratch)
    expires: float = 0.0  # the cache's clock() after which the lease has run out

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


@dataclass(frozen=True)
class Released:
    existed: bool  # the stage held KV of the session
    freed_bytes: int


class KVCache:
    """All sessions' KV on this stage.

    One thread, the model runner, writes buffers and lengths (reserve, commit, restore): the
    first of those calls binds the cache to its thread and a call from any other thread is
    refused, so the single writer is checked, not just agreed. The lock guards the session
    table, which the RPC handlers also change (release, renew, expire) and read (info).
    Leases run on `clock` (seconds, monotonic), injectable so that tests need not wait."""

    def __init__(
        self,
        shape: KVShape,
        budget_bytes: int,
        lease_seconds: float,
        block_tokens: int = 256,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.shape = shape
        self.budget = budget_bytes
        self.lease_seconds = lease_seconds
        self.block_tokens = block_tokens
        self._clock = clock
        self._sessions: dict[str, SessionKV] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id of the model runner, bound by its first write

    @property
    def used(self) -> int:
        with self._lock:
            return self._used()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def holds(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def length(self, session_id: str) -> int:
        with self._lock:
            s = self._sessions.get(session_id)
        return s.length if s is not None else 0

    def check(self, session_id: str, start: int, rewind: bool = False) -> None:
        """Raise unless a step of this session may start at `start` (with `rewind`, at or below
        the length held); changes nothing."""
        if start == 0:
            return
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise UnknownSession("this stage holds no KV of the session", reason="KV_MISSING")
        if s.length != start and not (rewind and start < s.length):
            # Positions only: a cache length says nothing about the session's content.
            raise WrongStage(f"the step starts at position {start} but this stage holds a different length", reason="KV_POSITION_MISMATCH")

    def reserve(self, session_id: str, start: int, count: int) -> SessionKV:
        """Make room for positions [start, start + count) of a session (a step at 0 starts it
        afresh, a lower `start` drops the positions after it); KVBudgetFull if the budget cannot
        take it, changing nothing."""
        need = start + count
        with self._lock:
            self._check_owner()
            s = self._sessions.get(session_id)
            if start == 0 or s is None:
                old = s.capacity if s is not None else 0
                cap = self._round(need)
                self._admit(cap - old)
                s = self._sessions[session_id] = self._allocate(cap)
            else:
                kept = min(s.length, start)
                if need > s.capacity:
                    cap = self._round(need)
                    self._admit(cap - s.capacity)
                    s.keys, s.values = self._grow(s.keys, kept, cap), self._grow(s.values, kept, cap)
                s.length = kept  # only once admitted: a refused step leaves the session as it was
            s.expires = self._clock() + self.lease_seconds
            return s

    def commit(self, s: SessionKV, length: int) -> None:
        """The step that wrote up to `length` succeeded."""
        self._check_owner()
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

    def admit_forks(self, positions: int, forks: int) -> None:
        """KVBudgetFull unless `forks` copies of `positions` positions fit besides what is held."""
        with self._lock:
            self._admit(self._round(max(positions, 1)) * forks)

    def fork(self, source_id: str, session_id: str) -> None:
        """Start `session_id` as a copy of every position `source_id` holds (replacing it)."""
        with self._lock:
            src = self._sessions.get(source_id)
        if src is None:
            raise UnknownSession("this stage holds no KV of the session to fork", reason="KV_MISSING")
        s = self.reserve(session_id, 0, max(src.length, 1))
        for i in range(len(src.keys)):
            s.keys[i][:, : src.length] = src.keys[i][:, : src.length]
            s.values[i][:, : src.length] = src.values[i][:, : src.length]
        s.length = src.length

    def release(self, session_id: str) -> Released:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return Released(False, 0)
        return Released(True, s.capacity * self.shape.bytes_per_token)

    def renew(self, session_ids: list[str]) -> list[str]:
        """Extend the leases of the sessions held; return the ids not held."""
        until = self._clock() + self.lease_seconds
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
        now = self._clock()
        with self._lock:
            gone = [sid for sid, s in self._sessions.items() if s.expires < now]
            for sid in gone:
                del self._sessions[sid]
        return gone

    def _check_owner(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me  # under the lock (reserve), so two first writers cannot both bind
        elif self._owner != me:
            raise RuntimeError(f"the KV cache is written only by the model runner's thread; {threading.current_thread().name} tried")

    def _used(self) -> int:  # with the lock held
        return sum(s.capacity for s in self._sessions.values()) * self.shape.bytes_per_token

    def _round(self, positions: int) -> int:
        b = self.block_tokens
        return -(-positions // b) * b

    def _admit(self, extra_tokens: int) -> None:  # with the lock held
        used = self._used()
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

    def update(
        self,
        key_states: torch.Tensor,  # [1, kv_heads, N, D]
        value_states: torch.Tensor,  # [1, kv_heads, N, D]
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
