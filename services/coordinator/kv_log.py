"""The KV log: every K/V entry the stages returned for a session, kept so that a replica that
takes over a layer range can be restored without recomputing anything.

Entries are kept as the bytes the stages sent (appending costs a copy of the step's deltas, never
a decode), under one byte budget for the whole coordinator. Beyond the budget the log of the
least recently used session is dropped whole: that session falls back to replay (its tokens
are run again) if one of its replicas is lost. Nothing is spilled to disk.

Layout, per session and layer, for keys and values alike: one list of byte strings in position
order, of two kinds. A `bytes` is a delta's Tensor data as the wire carries it ([kv_heads, n,
head_dim], C order, little-endian), kept as read from the field and never copied again; for one
position (a decode step) that is also position-major. A `bytearray` is a run of decode positions
joined, position-major ([n, kv_heads, head_dim]), every BLOCK positions. So a decode step appends
two byte strings per layer to lists and makes no object that the GC tracks (the former layout made
an Entry and two Tensor protos per layer per step, and the GC scanned them all, ~1.1 ms a batch at
32 sessions). The byte strings are never changed in place (truncate and the joins replace them),
so a fork shares them. Entry objects, wire Tensors, are built only when entries() asks: a failover."""

from __future__ import annotations

import ctypes
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch

from services.common import tensors
from vlmesh.v1 import tensor_pb2

ENTRY_BYTES = 8 << 20  # the most K+V bytes of one Entry that entries() builds (one position at least)
BLOCK = 128  # decode positions joined into one bytearray (a power of two)


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


class _Layer:
    """One layer's K/V of one session, positions [0, positions): `keys` and `values` (see above)."""

    __slots__ = ("kdtype", "vdtype", "kdims", "vdims", "krow", "vrow", "row", "positions", "keys", "values")

    def __init__(
        self,
        kdtype: tensor_pb2.DType.ValueType,
        vdtype: tensor_pb2.DType.ValueType,
        kdims: tuple[int, int],
        vdims: tuple[int, int],
        krow: int,
        vrow: int,
    ):
        self.kdtype, self.vdtype = kdtype, vdtype  # the wire dtype enums
        self.kdims, self.vdims = kdims, vdims  # (kv_heads, head_dim)
        self.krow, self.vrow = krow, vrow  # bytes per position
        self.row = krow + vrow
        self.positions = 0
        self.keys: list[bytes | bytearray] = []
        self.values: list[bytes | bytearray] = []

    @staticmethod
    def of(k: tensor_pb2.Tensor, v: tensor_pb2.Tensor, n: int, kd: bytes, vd: bytes) -> _Layer | None:
        """An empty layer shaped as its first delta (of n > 0 positions); None if that is malformed."""
        kdims, vdims = (k.shape[0], k.shape[2]), (v.shape[0], v.shape[2])
        krow, vrow = len(kd) // n, len(vd) // n
        for (heads, dim), row, data in ((kdims, krow, kd), (vdims, vrow, vd)):
            if heads <= 0 or dim <= 0 or row * n != len(data) or row % (heads * dim):
                return None
        return _Layer(k.dtype, v.dtype, kdims, vdims, krow, vrow)

    def fits(self, k: tensor_pb2.Tensor, v: tensor_pb2.Tensor, n: int, kd: bytes, vd: bytes) -> bool:
        return (
            k.dtype == self.kdtype
            and v.dtype == self.vdtype
            and (k.shape[0], k.shape[2]) == self.kdims
            and (v.shape[0], v.shape[2]) == self.vdims
            and len(kd) == n * self.krow
            and len(vd) == n * self.vrow
        )

    def join(self) -> None:
        """Join the trailing decode positions (single-position items) into one position-major block."""
        keys, krow = self.keys, self.krow
        i = len(keys)
        while i > 0 and type(keys[i - 1]) is bytes and len(keys[i - 1]) == krow:
            i -= 1
        if len(keys) - i > 1:
            keys[i:] = [bytearray().join(keys[i:])]
            self.values[i:] = [bytearray().join(self.values[i:])]

    def copy(self) -> _Layer:
        """The same K/V to append to apart (the byte strings shared: they are never changed)."""
        c = _Layer(self.kdtype, self.vdtype, self.kdims, self.vdims, self.krow, self.vrow)
        c.positions, c.keys, c.values = self.positions, list(self.keys), list(self.values)
        return c

    def cut(self, n: int) -> int:
        """Keep positions [0, n); returns the bytes freed."""
        if n >= self.positions:
            return 0
        freed = (self.positions - n) * self.row
        at = 0
        for i, item in enumerate(self.keys):
            m = len(item) // self.krow
            if at + m > n:
                if at < n:
                    self.keys[i] = _head(item, self.kdims[0], self.krow, n - at)
                    self.values[i] = _head(self.values[i], self.vdims[0], self.vrow, n - at)
                    i += 1
                del self.keys[i:], self.values[i:]
                break
            at += m
        self.positions = n
        return freed

    def wire(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [0, length) as uint8 tensors [kv_heads, length, head_dim * itemsize]."""
        return _gather(self.keys, self.kdims[0], self.krow, length), _gather(self.values, self.vdims[0], self.vrow, length)

    def entries(self, layer: int, length: int) -> list[Entry]:
        k, v = self.wire(length)
        step = max(1, ENTRY_BYTES // self.row)
        out = []
        for a in range(0, length, step):
            n = min(step, length - a)
            key = tensor_pb2.Tensor(dtype=self.kdtype, shape=[self.kdims[0], n, self.kdims[1]], data=_bytes(k[:, a : a + n]))
            value = tensor_pb2.Tensor(dtype=self.vdtype, shape=[self.vdims[0], n, self.vdims[1]], data=_bytes(v[:, a : a + n]))
            out.append(Entry(layer, a, key, value))
        return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _head(item: bytes | bytearray, heads: int, row: int, n: int) -> bytes | bytearray:
    """The first n positions of an item, in its own layout."""
    if type(item) is bytearray:
        return item[: n * row]  # position-major: a prefix (a copy)
    return _bytes(torch.frombuffer(item, dtype=torch.uint8).view(heads, -1, row // heads)[:, :n])


def _gather(items: list[bytes | bytearray], heads: int, row: int, length: int) -> torch.Tensor:
    """The first `length` positions of a layer's items, in the wire's layout [heads, length, row / heads]."""
    pieces = []
    run: list[bytes | bytearray] = []  # position-major items in a row

    def flush() -> None:
        if run:
            t = torch.frombuffer(b"".join(run), dtype=torch.uint8)  # a copy: nothing aliases the log
            pieces.append(t.view(-1, heads, row // heads).transpose(0, 1))
            run.clear()

    at = 0
    for item in items:
        if at >= length:
            break
        m = len(item) // row
        take = item if at + m <= length else _head(item, heads, row, length - at)
        if type(item) is bytearray or m == 1:
            run.append(take)
        else:
            flush()
            pieces.append(torch.frombuffer(take, dtype=torch.uint8).view(heads, -1, row // heads))
        at += m
    flush()
    return torch.cat(pieces, dim=1)


def _dtype(enum: tensor_pb2.DType.ValueType, name: str) -> torch.dtype:
    return tensors.from_proto(tensor_pb2.Tensor(dtype=enum, shape=[0]), name).dtype  # InvalidArgument if unknown


class SessionLog:
    __slots__ = ("layers", "nbytes")

    def __init__(self, layers: dict[int, _Layer] | None = None, nbytes: int = 0):
        self.layers: dict[int, _Layer] = layers if layers is not None else {}
        self.nbytes = nbytes

    def end(self, layer: int) -> int:
        lay = self.layers.get(layer)
        return lay.positions if lay is not None else 0


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
        gap), or does not match the dtype and shape of the layer's first delta, leaves the session
        without a usable log: it is dropped. (A decode step's delta is taken for one position by
        its byte length: its shape and dtype are not read.)"""
        if self.budget <= 0 or not deltas:
            return
        log = self._logs.get(session_id)
        if log is None:
            log = self._logs[session_id] = SessionLog()
        else:
            self._logs.move_to_end(session_id)
        layers = log.layers
        get, mask = layers.get, BLOCK - 1
        added = 0
        for d in deltas:
            kd = d.key.data
            vd = d.value.data
            lay = get(d.layer)
            if lay is not None and len(kd) == lay.krow and len(vd) == lay.vrow:
                at = lay.positions
                if d.start_position == at:
                    lay.keys.append(kd)
                    lay.values.append(vd)
                    lay.positions = at = at + 1
                    added += lay.row
                    if not at & mask:
                        lay.join()
                    continue
            n = _add(layers, d, lay, kd, vd)
            if n < 0:
                self.drop(session_id)  # this step's bytes were not counted yet
                return
            added += n
        log.nbytes += added
        self.bytes += added
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
        freed = sum(lay.cut(max(length, 0)) for lay in log.layers.values())
        log.nbytes -= freed
        self.bytes -= freed

    def entries(self, session_id: str, layers: range, length: int) -> list[Entry] | None:
        """The entries covering positions [0, length) of every layer in `layers`, or None when
        the log cannot (off, dropped, or short). Built now, each of at most ENTRY_BYTES."""
        log = self._logs.get(session_id)
        if log is None or length <= 0:
            return None
        if any(log.end(layer) < length for layer in layers):
            return None
        out = []
        for layer in layers:
            out.extend(log.layers[layer].entries(layer, length))
        self._logs.move_to_end(session_id)
        return out

    def merged(self, session_id: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:  # layer -> ([H, L, D], [H, L, D])
        log = self._logs.get(session_id)
        if log is None:
            return None
        out = {}
        for layer, lay in sorted(log.layers.items()):
            if lay.positions:
                k, v = lay.wire(lay.positions)
                out[layer] = (k.view(_dtype(lay.kdtype, "log key")), v.view(_dtype(lay.vdtype, "log value")))
        return out

    def fork(self, source_id: str, session_id: str) -> None:
        """Start `session_id`'s log as `source_id`'s (a continuation forked from its prefill). The
        bytes are shared, not copied; the budget counts them for each log that holds them."""
        if not self.enabled:
            return
        self.drop(session_id)
        src = self._logs.get(source_id)
        if src is None:
            return  # the fork's own steps will not continue a log: it is replayed if lost
        self._logs[session_id] = SessionLog({layer: lay.copy() for layer, lay in src.layers.items()}, src.nbytes)
        self.bytes += src.nbytes
        while self.bytes > self.budget and self._logs:
            self.drop(next(iter(self._logs)))

    def drop(self, session_id: str) -> None:
        log = self._logs.pop(session_id, None)
        if log is not None:
            self.bytes -= log.nbytes


def _add(layers: dict[int, _Layer], d: tensor_pb2.KVDelta, lay: _Layer | None, kd: bytes, vd: bytes) -> int:
    """Append a delta that the decode path did not take; returns its bytes, or -1 for a gap or a misfit."""
    if d.start_position != (lay.positions if lay is not None else 0):
        return -1
    k, v = d.key, d.value
    if len(k.shape) != 3 or len(v.shape) != 3 or k.shape[1] != v.shape[1]:
        return -1
    n = k.shape[1]
    if n == 0:
        return 0 if not kd and not vd else -1
    if lay is None:
        lay = _Layer.of(k, v, n, kd, vd)
        if lay is None:
            return -1
        layers[d.layer] = lay
    elif not lay.fits(k, v, n, kd, vd):
        return -1
    lay.keys.append(kd)
    lay.values.append(vd)
    lay.positions += n
    if n == 1 and not lay.positions & (BLOCK - 1):
        lay.join()
    return n * lay.row


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
