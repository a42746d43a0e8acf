"""The KV log's layout (raw bytes per session and layer, Entry objects built only on entries()):
random sequences of appends, gaps, truncations, forks, drops and reads give what the former log
(an Entry of Tensor copies per delta, kept below as the reference) gave, and decode steps leave no
objects behind for the GC."""

from __future__ import annotations

import gc
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
import torch

from services.common import tensors
from services.coordinator import kv_log
from services.coordinator.kv_log import KVLog, chunks
from vlmesh.v1 import tensor_pb2

# -- the former KVLog, the reference ------------------------------------------------------------


@dataclass(frozen=True)
class _OldEntry:
    layer: int
    start: int
    key: tensor_pb2.Tensor
    value: tensor_pb2.Tensor

    @property
    def length(self) -> int:
        return self.key.shape[1]

    @property
    def nbytes(self) -> int:
        return len(self.key.data) + len(self.value.data)


@dataclass
class _OldSessionLog:
    layers: dict[int, list[_OldEntry]] = field(default_factory=dict)
    nbytes: int = 0

    def end(self, layer: int) -> int:
        entries = self.layers.get(layer)
        return entries[-1].start + entries[-1].length if entries else 0


def _old_cut(e: _OldEntry, n: int) -> _OldEntry:
    k = tensors.from_proto(e.key, "log key")[:, :n]
    v = tensors.from_proto(e.value, "log value")[:, :n]
    return _OldEntry(e.layer, e.start, tensors.to_proto(k), tensors.to_proto(v))


class OldKVLog:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        self._logs: OrderedDict[str, _OldSessionLog] = OrderedDict()

    def append(self, session_id, deltas):
        if self.budget <= 0 or not deltas:
            return
        log = self._logs.get(session_id)
        if log is None:
            log = self._logs[session_id] = _OldSessionLog()
        self._logs.move_to_end(session_id)
        for d in deltas:
            if d.start_position != log.end(d.layer):
                self.drop(session_id)
                return
            e = _OldEntry(d.layer, d.start_position, tensor_pb2.Tensor(), tensor_pb2.Tensor())
            e.key.CopyFrom(d.key)
            e.value.CopyFrom(d.value)
            log.layers.setdefault(d.layer, []).append(e)
            log.nbytes += e.nbytes
            self.bytes += e.nbytes
        while self.bytes > self.budget and self._logs:
            self.drop(next(iter(self._logs)))

    def truncate(self, session_id, length):
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
                    short = _old_cut(e, length - e.start)
                    keep.append(short)
                    log.nbytes += short.nbytes - e.nbytes
                    self.bytes += short.nbytes - e.nbytes
                else:
                    log.nbytes -= e.nbytes
                    self.bytes -= e.nbytes
            log.layers[layer] = keep

    def entries(self, session_id, layers, length):
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
                out.append(e if e.start + e.length <= length else _old_cut(e, length - e.start))
        self._logs.move_to_end(session_id)
        return out

    def merged(self, session_id):
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

    def fork(self, source_id, session_id):
        if self.budget <= 0:
            return
        self.drop(session_id)
        src = self._logs.get(source_id)
        if src is None:
            return
        log = self._logs[session_id] = _OldSessionLog({layer: list(entries) for layer, entries in src.layers.items()})
        log.nbytes = src.nbytes
        self.bytes += src.nbytes
        while self.bytes > self.budget and self._logs:
            self.drop(next(iter(self._logs)))

    def drop(self, session_id):
        log = self._logs.pop(session_id, None)
        if log is not None:
            self.bytes -= log.nbytes


# -- helpers ------------------------------------------------------------------------------------

LAYERS = 4


def _delta(layer: int, start: int, n: int, heads: int = 2, dim: int = 4, dtype=torch.bfloat16, vheads: int | None = None) -> tensor_pb2.KVDelta:
    """Distinct values everywhere (layer, position, head, channel), so a layout slip shows."""
    k = torch.randn(heads, n, dim).to(dtype)
    v = torch.randn(vheads or heads, n, dim + 2).to(dtype)  # values of another head_dim than keys
    return tensor_pb2.KVDelta(layer=layer, start_position=start, key=tensors.to_proto(k), value=tensors.to_proto(v))


def _step(log_end: dict[int, int], n: int, **kw) -> list[tensor_pb2.KVDelta]:
    return [_delta(layer, log_end.get(layer, 0), n, **kw) for layer in range(LAYERS)]


def _joined(entries, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    mine = [e for e in entries if e.layer == layer]
    at = 0
    for e in mine:
        assert e.start == at and e.length > 0  # in position order, no gap, no overlap
        at += e.length
    assert at == length
    return (
        torch.cat([tensors.from_proto(e.key, "k", shape=(None, None, None)) for e in mine], dim=1),
        torch.cat([tensors.from_proto(e.value, "v", shape=(None, None, None)) for e in mine], dim=1),
    )


def _same(new: KVLog, old: OldKVLog) -> None:
    assert new.bytes == old.bytes
    assert list(new._logs) == list(old._logs)  # the same sessions, in the same LRU order
    for sid in old._logs:
        a, b = new.merged(sid), old.merged(sid)
        assert a is not None and b is not None and a.keys() == b.keys()
        for layer in b:
            for x, y in zip(a[layer], b[layer]):
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        assert new._logs[sid].nbytes == old._logs[sid].nbytes


def _same_entries(new: KVLog, old: OldKVLog, sid: str, layers: range, length: int) -> None:
    a, b = new.entries(sid, layers, length), old.entries(sid, layers, length)
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert [e.layer for e in a] == sorted(e.layer for e in a) and {e.layer for e in a} == {e.layer for e in b}
    for layer in layers:
        for x, y in zip(_joined(a, layer, length), _joined(b, layer, length)):
            assert torch.equal(x, y)
    assert sum(e.nbytes for e in a) == sum(e.nbytes for e in b)
    assert list(new._logs) == list(old._logs)


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [kv_log.BLOCK, 4])  # 4: decode positions are joined often
@pytest.mark.parametrize("seed", range(10))
def test_random_histories_read_back_as_the_former_log_did(seed, block, monkeypatch):
    monkeypatch.setattr(kv_log, "BLOCK", block)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    one = len(_delta(0, 0, 1).key.data) + len(_delta(0, 0, 1).value.data)
    budget = rng.choice([1 << 30, one * LAYERS * 40])  # roomy, or tight enough that LRU drops happen
    new, old = KVLog(budget), OldKVLog(budget)
    sids = ["a", "b", "c", "d"]
    for _ in range(120):
        sid = rng.choice(sids)
        ends = {layer: old._logs[sid].end(layer) for layer in range(LAYERS)} if sid in old._logs else {}
        op = rng.random()
        if op < 0.45:
            deltas = _step(ends, 1)  # a decode step
        elif op < 0.6:
            deltas = _step(ends, rng.randint(2, 7))  # a prompt chunk
        elif op < 0.65:
            deltas = _step(ends, 1)
            deltas[rng.randrange(LAYERS)].start_position += rng.choice([-1, 1, 3])  # a gap
        elif op < 0.75:
            deltas = []
            length = rng.randint(0, max(ends.values(), default=0) + 2)
            new.truncate(sid, length)
            old.truncate(sid, length)
        elif op < 0.82:
            deltas = []
            other = rng.choice(sids)
            new.fork(sid, other)
            old.fork(sid, other)
        elif op < 0.85:
            deltas = []
            new.drop(sid)
            old.drop(sid)
        else:
            deltas = []
            lo = rng.randrange(LAYERS)
            layers = range(lo, rng.randint(lo, LAYERS))
            _same_entries(new, old, sid, layers, rng.randint(-1, max(ends.values(), default=0) + 1))
        if deltas:
            new.append(sid, deltas)
            old.append(sid, deltas)
        _same(new, old)


def test_a_fork_shares_the_prompt_and_grows_apart():
    new, old = KVLog(1 << 30), OldKVLog(1 << 30)
    for log in (new, old):
        log.append("p", [])
    prompt = _step({}, 5)
    new.append("p", prompt)
    old.append("p", prompt)
    step = _step(dict.fromkeys(range(LAYERS), 5), 1)
    new.append("p", step)
    old.append("p", step)
    for log in (new, old):
        log.fork("p", "c")
    assert new._logs["c"].layers[0].keys[0] is new._logs["p"].layers[0].keys[0]  # shared, not copied
    for sid in ("p", "c"):
        step = _step(dict.fromkeys(range(LAYERS), 6), 1)
        new.append(sid, step)
        old.append(sid, step)
    _same(new, old)
    assert not torch.equal(new.merged("p")[0][0], new.merged("c")[0][0])
    new.truncate("c", 3)
    old.truncate("c", 3)
    _same(new, old)
    _same_entries(new, old, "p", range(0, LAYERS), 7)


@pytest.mark.parametrize("block", [kv_log.BLOCK, 2])
def test_decode_then_a_new_turn_keeps_the_order(block, monkeypatch):
    monkeypatch.setattr(kv_log, "BLOCK", block)
    new, old = KVLog(1 << 30), OldKVLog(1 << 30)
    at = 0
    for n in (6, 1, 1, 1, 4, 1, 3, 1):
        deltas = _step(dict.fromkeys(range(LAYERS), at), n, heads=3, dim=8, dtype=torch.float16)
        new.append("s", deltas)
        old.append("s", deltas)
        at += n
    _same(new, old)
    for length in (1, 6, 7, 9, 13, at):
        _same_entries(new, old, "s", range(0, LAYERS), length)
    for length in (12, 10, 8, 6, 2):
        new.truncate("s", length)
        old.truncate("s", length)
        _same(new, old)


def test_entries_are_chunked_to_entry_bytes_and_decode_as_a_stage_does(monkeypatch):
    log = KVLog(1 << 30)
    log.append("s", _step({}, 10))
    for at in range(10, 30):
        log.append("s", _step(dict.fromkeys(range(LAYERS), at), 1))
    row = log._logs["s"].layers[0].krow + log._logs["s"].layers[0].vrow
    monkeypatch.setattr(kv_log, "ENTRY_BYTES", row * 7)
    entries = log.entries("s", range(1, 3), 25)
    assert entries is not None and [(e.layer, e.start, e.length) for e in entries] == [
        (layer, start, min(7, 25 - start)) for layer in (1, 2) for start in (0, 7, 14, 21)
    ]
    assert all(e.nbytes <= row * 7 for e in entries) and chunks(entries)[0] == entries
    k, v = log.merged("s")[1]
    for e in entries[:4]:
        got = tensors.from_proto(e.key, "key", dtypes=(torch.bfloat16,), shape=(2, None, 4))
        assert torch.equal(got, k[:, e.start : e.start + e.length])
        assert torch.equal(tensors.from_proto(e.value, "value", shape=(2, None, 6)), v[:, e.start : e.start + e.length])


@pytest.mark.parametrize(
    "bad",
    [
        _delta(0, 3, 2, dtype=torch.float16),  # several positions of another dtype
        _delta(0, 3, 2, vheads=1),  # values of another head count
        _delta(0, 3, 1, heads=1, dim=4),  # one position's worth of another size
        _delta(0, 3, 1, heads=2, dim=8),
    ],
)
def test_a_delta_that_does_not_fit_the_layer_drops_the_log_like_a_gap(bad):
    log = KVLog(1 << 20)
    log.append("s", [_delta(0, 0, 3), _delta(1, 0, 3)])
    log.append("t", [_delta(0, 0, 3)])
    log.append("s", [_delta(1, 3, 2), bad])
    assert log.merged("s") is None and log.entries("s", range(0, 1), 1) is None
    assert log.bytes == log._logs["t"].nbytes > 0


def test_malformed_first_deltas_are_refused():
    log = KVLog(1 << 20)
    d = _delta(0, 0, 2)
    d.key.data = d.key.data[:-2]  # bytes that do not fill the shape
    log.append("s", [d])
    assert log.merged("s") is None and log.bytes == 0
    log.append("s", [_delta(0, 0, 0), _delta(1, 0, 2)])  # no positions: nothing to keep for layer 0
    assert log._logs["s"].end(0) == 0 and log._logs["s"].end(1) == 2


def test_an_off_log_keeps_nothing():
    log = KVLog(0)
    log.append("s", [_delta(0, 0, 3)])
    log.fork("s", "t")
    assert not log.enabled and log.bytes == 0 and log.merged("s") is None and log.entries("s", range(0, 1), 1) is None


def test_decode_steps_leave_no_objects_for_the_gc():
    log = KVLog(1 << 30)
    layers = 28
    log.append("s", [_delta(layer, 0, 16) for layer in range(layers)])
    steps = [[_delta(layer, at, 1) for layer in range(layers)] for at in range(16, 216)]
    gc.collect()
    before = len(gc.get_objects())
    for deltas in steps:
        log.append("s", deltas)
    after = len(gc.get_objects())
    assert after - before < 10  # the former log left 3 per delta: 16,800 here
    lay = log._logs["s"].layers[0]
    assert lay.positions == 216 and [type(x) for x in lay.keys] == [bytes, bytearray] + [bytes] * 88  # 16 + 112 joined at 128, 88 to come
