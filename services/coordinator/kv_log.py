"""The KV log: every K/V entry the stages returned for a session, kept so that a replica that
takes over a layer range can be restored without recomputing anything.

Entries are kept as the bytes the stages sent (appending costs a copy of the step's deltas, never
a decode), under one byte budget for the whole coordinator. Beyond the budget the log of the
least recently used session is dropped whole: that session falls back to replay (its tokens
are run again) if one of its replicas is lost. Nothing is spilled to disk."""

from __future__ import annotations

import ctypes
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from services.common import tensors
from vlmesh.v1 import tensor_pb2


def pin_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Pin glibc's mmap threshold (its default, 128 KiB) so that it stops adapting.

    Why: glibc raises the threshold to the size of every large block freed, after which blocks of
    that size come from the heap. The coordinator frees a prefill's reply (tens of MB of K/V)
    right after copying its deltas into the log, so the heap fills with holes that RSS keeps.
    Measured (2B bfloat16, 4k tokens of sessions): the coordinator grew 39 MiB per 1k tokens of
    which the log's entries are 27; pinned, 28. Returns False where malloc is not glibc's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, nbytes))


@dataclass(frozen=True)
class Entry:
    """K/V of one layer for positions [start, start + length)."""

    layer: int
    start: int
    key: tensor_pb2.Tensor  # [kv_heads, length, head_dim]
    value: tensor_pb2.Tensor

    @property
    def length(self) -> int:
        return self.key.shape[1]

    @property
    def nbytes(self) -> int:
        return len(self.key.data) + len(self.value.data)


@dataclass
class SessionLog:
    layers: dict[int, list[Entry]] = field(default_factory=dict)  # layer -> entries in position order
    nbytes: int = 0

    def end(self, layer: int) -> int:
        entries = self.layers.get(layer)
        return entries[-1].start + entries[-1].length if entries else 0


class KVLog:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        self._logs: OrderedDict[str, SessionLog] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def append(self, session_id: str, deltas: list[tensor_pb2.KVDelta]) -> None:
        """Add a step's deltas. A delta that does not continue its layer where the log ends (a
        gap) leaves the session without a usable log: it is dropped."""
        if not self.enabled or not deltas:
            return
        log = self._logs.get(session_id)
        if log is None:
            log = self._logs[session_id] = SessionLog()
        self._logs.move_to_end(session_id)
        for d in deltas:
            if d.start_position != log.end(d.layer):
                self.drop(session_id)
                return
            e = Entry(d.layer, d.start_position, tensor_pb2.Tensor(), tensor_pb2.Tensor())
            e.key.CopyFrom(d.key)
            e.value.CopyFrom(d.value)
            log.layers.setdefault(d.layer, []).append(e)
            log.nbytes += e.nbytes
            self.bytes += e.nbytes
        while self.bytes > self.budget and self._logs:
            self.drop(next(iter(self._logs)))

    def truncate(self, session_id: str, length: int) -> None:
        """Forget positions from `length` on (a failed turn, a reused prefix)."""
        log = self._logs.get(session_id)
        if log is None:
            return
        if length == 0:
            self.drop(session_id)
            return
        for layer, entries in log.layers.items():
            keep = []
            for e in entries:
                if e.start + e.length <= length:
                    keep.append(e)
                elif e.start < length:
                    short = _cut(e, length - e.start)
                    keep.append(short)
                    log.nbytes += short.nbytes - e.nbytes
                    self.bytes += short.nbytes - e.nbytes
                else:
                    log.nbytes -= e.nbytes
                    self.bytes -= e.nbytes
            log.layers[layer] = keep

    def entries(self, session_id: str, layers: range, length: int) -> list[Entry] | None:
        """The entries covering positions [0, length) of every layer in `layers`, or None when
        the log cannot (off, dropped, or short)."""
        log = self._logs.get(session_id)
        if log is None or length <= 0:
            return None
        out = []
        for layer in layers:
            if log.end(layer) < length:
                return None
            for e in log.layers[layer]:
                if e.start >= length:
                    break
                out.append(e if e.start + e.length <= length else _cut(e, length - e.start))
        self._logs.move_to_end(session_id)
        return out

    def merged(self, session_id: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:  # layer -> ([H, L, D], [H, L, D])
        log = self._logs.get(session_id)
        if log is None:
            return None
        return {
            layer: (
                torch.cat([tensors.from_proto(e.key, "log key") for e in entries], dim=1),
                torch.cat([tensors.from_proto(e.value, "log value") for e in entries], dim=1),
            )
            for layer, entries in sorted(log.layers.items())
            if entries
        }

    def drop(self, session_id: str) -> None:
        log = self._logs.pop(session_id, None)
        if log is not None:
            self.bytes -= log.nbytes


def _cut(e: Entry, n: int) -> Entry:
    """The first n positions of an entry."""
    k = tensors.from_proto(e.key, "log key")[:, :n]
    v = tensors.from_proto(e.value, "log value")[:, :n]
    return Entry(e.layer, e.start, tensors.to_proto(k), tensors.to_proto(v))


def chunks(entries: list[Entry], max_bytes: int = 32 << 20) -> list[list[Entry]]:
    """Entries grouped into messages of at most about max_bytes each (one entry may exceed it)."""
    out: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if out[-1] and size + e.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(e)
        size += e.nbytes
    return [c for c in out if c] or [[]]
