"""Session state owned by the coordinator: token history, rope delta, images and videos seen, the
messages for the chat template, and the KV-delta log (the basis of restore and failover)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from services.common.errors import Conflict, UnknownSession

from .visual import Visual


class KVLog:
    """Every K/V entry the stages returned, per layer, in order. Merged on read."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # layer -> [(start, [H,T,D], [H,T,D])]

    def append(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        chunks = self.chunks.setdefault(layer, [])
        # A rebuilt session restarts at 0: its old entries are superseded.
        while chunks and chunks[-1][0] >= start:
            chunks.pop()
        if chunks:
            last_start, k, v = chunks[-1]
            if last_start + k.shape[1] > start:
                chunks[-1] = (last_start, k[:, : start - last_start], v[:, : start - last_start])
        chunks.append((start, key.clone(), value.clone()))

    def merged(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:  # layer -> ([H, L, D], [H, L, D])
        return {
            layer: (torch.cat([k for _, k, _ in c], dim=1), torch.cat([v for _, _, v in c], dim=1))
            for layer, c in sorted(self.chunks.items())
        }

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for c in self.chunks.values() for _, k, _ in c)


@dataclass
class Session:
    id: str
    persistent: bool  # False: a one-shot request's session, dropped when it ends
    token_ids: list[int] = field(default_factory=list)  # the whole conversation so far
    cached: int = 0  # leading tokens whose KV the stages hold
    # Every image and video so far, in prompt order: grids and video sampling for M-RoPE, the
    # inputs to re-encode if the KV must be rebuilt.
    visuals: list[Visual] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # for the chat template (no image bytes)
    rope_delta: int = 0
    kv_log: KVLog = field(default_factory=KVLog)
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, persistent: bool = True) -> Session:
        s = Session(uuid.uuid4().hex, persistent)
        with self._lock:
            self._sessions[s.id] = s
        return s

    def get(self, session_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise UnknownSession(f"unknown session {session_id!r} (closed, expired, or never created)")
        return s

    def acquire(self, session_id: str) -> Session:
        """Take the session for one turn; a second concurrent turn is refused, not interleaved."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(f"unknown session {session_id!r} (closed, expired, or never created)")
            if s.busy:
                raise Conflict(f"session {session_id!r} is already generating")
            s.busy = True
            return s

    def release(self, s: Session) -> None:
        with self._lock:
            s.busy = False
            s.last_used = time.monotonic()

    def pop(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(session_id, None)

    def idle(self, ttl: float) -> list[Session]:
        now = time.monotonic()
        with self._lock:
            gone = [s for s in self._sessions.values() if not s.busy and now - s.last_used > ttl]
            for s in gone:
                del self._sessions[s.id]
        return gone
