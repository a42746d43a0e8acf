"""The stage's KV cache alone: admission against the byte budget, blocks, rewind, leases on an
injected clock, release, restore and the one thread that may write it. No gRPC, no model."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from services.common.errors import KVBudgetFull, UnknownSession, WrongStage
from services.common.geometry import KVGeometry
from services.stage.kv_cache import BatchKV, KVCache, KVShape, Released

SHAPE = KVShape(range(2, 4), kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
BPT = 2 * 2 * 2 * 4 * 4  # K and V, 2 layers, 2 heads, head_dim 4, 4 bytes
BLOCK = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(budget_tokens: int = 64, lease: float = 10.0, clock: Clock | None = None) -> KVCache:
    return KVCache(SHAPE, budget_tokens * BPT, lease, block_tokens=BLOCK, clock=clock or Clock())


def fill(kv: KVCache, sid: str, start: int, count: int, value: float = 1.0) -> None:
    """A step of `count` positions from `start` whose K/V are `value + position`, committed."""
    s = kv.reserve(sid, start, count)
    for i in range(len(SHAPE.layers)):
        for buf in (s.keys[i], s.values[i]):
            buf[:, start : start + count] = (value + torch.arange(start, start + count, dtype=torch.float32))[None, :, None]
    kv.commit(s, start + count)


def positions(kv: KVCache, sid: str, layer: int = 2) -> list[float]:
    s = kv._sessions[sid]
    k, _ = kv.view(s, layer, s.length)  # [1, H, length, D]
    return k[0, 0, :, 0].tolist()


def test_bytes_per_token_is_the_shared_geometry():
    assert SHAPE.bytes_per_token == BPT
    assert KVShape(range(0, 3), 2, 4, torch.bfloat16, torch.device("cpu")).bytes_per_token == 2 * 3 * 2 * 4 * 2
    named = SimpleNamespace(num_key_value_heads=2, head_dim=16, hidden_size=64, num_attention_heads=8)  # head_dim != 64/8
    implied = SimpleNamespace(num_key_value_heads=2, hidden_size=64, num_attention_heads=4)
    assert KVGeometry.from_text_config(named) == KVGeometry(2, 16)
    assert KVGeometry.from_text_config(implied) == KVGeometry(2, 16)
    # The coordinator knows a stage's dtype by the name GetInfo reports.
    assert KVGeometry(2, 16).bytes_per_token(3, "bfloat16") == KVGeometry(2, 16).bytes_per_token(3, torch.bfloat16) == 2 * 3 * 2 * 16 * 2
    with pytest.raises(ValueError, match="dtype"):
        KVGeometry(2, 16).bytes_per_token(1, "float33")
    cpu = torch.device("cpu")
    assert KVShape.for_model(named, range(1, 2), torch.float16, cpu) == KVShape(range(1, 2), 2, 16, torch.float16, cpu)


def test_capacity_grows_by_blocks_keeping_what_was_written_and_the_budget_counts_capacity():
    kv = cache()
    fill(kv, "a", 0, 3)
    assert kv.used == BLOCK * BPT  # 3 positions take a whole block
    first = kv._sessions["a"].keys[0]
    fill(kv, "a", 3, 1)
    assert kv._sessions["a"].keys[0] is first  # within the block: written in place, nothing copied
    fill(kv, "a", 4, 2)
    assert kv._sessions["a"].capacity == 2 * BLOCK and kv.used == 2 * BLOCK * BPT
    assert positions(kv, "a") == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # the grown buffer kept the first block
    assert kv.length("a") == 6 and kv.length("nobody") == 0
    fill(kv, "b", 0, 1)
    assert len(kv) == 2 and kv.used == 3 * BLOCK * BPT


def test_a_step_beyond_the_budget_is_refused_alone_and_changes_nothing():
    kv = cache(budget_tokens=3 * BLOCK)
    fill(kv, "a", 0, 2 * BLOCK)
    fill(kv, "b", 0, BLOCK)
    used = kv.used
    with pytest.raises(KVBudgetFull):
        kv.reserve("a", 2 * BLOCK, 1)  # a third block for a: the budget is full
    with pytest.raises(KVBudgetFull):
        kv.reserve("c", 0, 1)  # a new session: nothing is evicted for it
    with pytest.raises(KVBudgetFull):
        kv.reserve("a", 5, 4)  # a rewind to 5 that needs a third block: refused before it drops anything
    assert kv.used == used and len(kv) == 2 and not kv.holds("c")
    assert kv.length("a") == 2 * BLOCK and positions(kv, "a") == [float(1 + i) for i in range(2 * BLOCK)]
    assert kv.length("b") == BLOCK
    kv.release("b")
    fill(kv, "a", 2 * BLOCK, 1)  # b's block is free again
    assert kv._sessions["a"].capacity == 3 * BLOCK


def test_a_restart_at_position_zero_is_admitted_for_its_new_size_only():
    kv = cache(budget_tokens=3 * BLOCK)
    fill(kv, "a", 0, 3 * BLOCK)
    fill(kv, "a", 0, 2)  # a new prompt of the same session: its old capacity is given back
    assert kv._sessions["a"].capacity == BLOCK and kv.used == BLOCK * BPT and kv.length("a") == 2


def test_rewind_drops_the_positions_after_start_and_keeps_those_before():
    kv = cache()
    fill(kv, "a", 0, 6)
    kv.check("a", 6)
    with pytest.raises(WrongStage):
        kv.check("a", 4)  # not where the session is, and no rewind asked for
    with pytest.raises(WrongStage):
        kv.check("a", 7, rewind=True)  # a rewind cannot skip ahead
    kv.check("a", 4, rewind=True)
    fill(kv, "a", 4, 1, value=100.0)
    assert positions(kv, "a") == [1.0, 2.0, 3.0, 4.0, 104.0]
    with pytest.raises(WrongStage):
        kv.check("a", 6)  # the dropped positions are gone
    with pytest.raises(UnknownSession):
        kv.check("nobody", 3)
    kv.check("nobody", 0)  # a first step needs nothing held


def test_leases_run_out_on_the_injected_clock_and_steps_and_renewals_extend_them():
    clock = Clock()
    kv = cache(lease=10.0, clock=clock)
    fill(kv, "a", 0, 1)
    clock.now = 5.0
    fill(kv, "b", 0, 1)
    clock.now = 9.5
    fill(kv, "a", 1, 1)  # a step is a renewal: a's lease now ends at 19.5
    clock.now = 12.0
    assert kv.renew(["b", "gone"]) == ["gone"]  # b's lease now ends at 22
    clock.now = 19.0
    assert kv.expire() == []
    clock.now = 20.0
    assert kv.expire() == ["a"] and not kv.holds("a") and kv.used == BLOCK * BPT
    clock.now = 21.9
    assert kv.expire() == []
    clock.now = 22.1
    assert kv.expire() == ["b"] and len(kv) == 0
    assert kv.renew(["b"]) == ["b"]


def test_release_says_whether_the_session_was_held_and_frees_its_capacity():
    kv = cache()
    fill(kv, "a", 0, BLOCK + 1)
    fill(kv, "b", 0, 1)
    assert kv.release("a") == Released(existed=True, freed_bytes=2 * BLOCK * BPT)
    assert kv.release("a") == Released(existed=False, freed_bytes=0)
    assert not kv.holds("a") and kv.holds("b") and kv.used == BLOCK * BPT


def test_restore_replaces_the_session_with_the_entries_given():
    kv = cache()
    fill(kv, "a", 0, 2 * BLOCK + 1, value=50.0)
    k = torch.arange(2 * 5 * 4, dtype=torch.float64).reshape(2, 5, 4)  # [H, length, D], cast to the cache's dtype
    kv.restore("a", 5, {2: (k, -k), 3: (k + 1, -k - 1)})
    s = kv._sessions["a"]
    assert s.length == 5 and s.capacity == 2 * BLOCK and kv.used == 2 * BLOCK * BPT
    for layer, (want_k, want_v) in {2: (k, -k), 3: (k + 1, -k - 1)}.items():
        got_k, got_v = kv.view(s, layer, 5)
        assert torch.equal(got_k[0], want_k.float()) and torch.equal(got_v[0], want_v.float())


def test_a_batch_writes_each_sessions_tokens_into_its_own_buffer():
    kv = cache()
    fill(kv, "a", 0, 2)
    sa, sb = kv.reserve("a", 2, 1), kv.reserve("b", 0, 3)
    batch = BatchKV(kv, [sa, sb], starts=[2, 0], spans=[(0, 1), (1, 3)], record=[True, False])
    new = torch.arange(4, dtype=torch.float32)[None, None, :, None].expand(1, 2, 4, 4).contiguous()  # [1, H, N=4, D]
    for layer in SHAPE.layers:
        batch.update(new * layer, -new, layer)
    batch.commit()
    assert kv.length("a") == 3 and kv.length("b") == 3
    assert positions(kv, "a", layer=3) == [1.0, 2.0, 0.0]  # a's token (batch row 0) went to a's position 2
    assert positions(kv, "b", layer=3) == [3.0, 6.0, 9.0]  # b's three (rows 1..3) to its positions 0..2
    assert sorted(batch.deltas[0]) == [2, 3] and batch.deltas[1] == {}  # only a asked for its K/V
    assert batch.deltas[0][3][0].shape == (2, 1, 4)


def test_only_the_thread_that_first_wrote_the_cache_may_write_it():
    kv = cache()
    fill(kv, "a", 0, 1)  # this thread is now the runner
    errors: list[BaseException] = []
    seen: list[object] = []

    def other() -> None:
        for write in (lambda: kv.reserve("b", 0, 1), lambda: kv.commit(kv._sessions["a"], 1)):
            try:
                write()
            except RuntimeError as err:
                errors.append(err)
        # What the RPC handlers do runs anywhere.
        seen.extend([kv.holds("a"), kv.renew(["a"]), kv.used, len(kv), kv.expire(), kv.release("a")])

    t = threading.Thread(target=other, name="handler")
    t.start()
    t.join(10)
    assert len(errors) == 2 and all("handler" in str(e) for e in errors)
    assert not kv.holds("b")
    assert seen == [True, [], BLOCK * BPT, 1, [], Released(True, BLOCK * BPT)]


def test_a_fork_copies_every_position_and_the_copies_go_their_own_ways():
    kv = cache(budget_tokens=64)
    fill(kv, "p", 0, 5, value=3.0)
    kv.admit_forks(5, 2)
    kv.fork("p", "a")
    kv.fork("p", "b")
    prompt = [3.0, 4.0, 5.0, 6.0, 7.0]
    assert positions(kv, "a") == positions(kv, "b") == positions(kv, "p") == prompt
    fill(kv, "a", 5, 1, value=10.0)  # a child decodes on: neither its parent nor its sibling sees it
    assert positions(kv, "a") == [*prompt, 15.0] and positions(kv, "p") == positions(kv, "b") == prompt
    with pytest.raises(UnknownSession):
        kv.fork("nope", "c")


def test_forks_beyond_the_budget_are_refused_before_anything_is_copied():
    kv = cache(budget_tokens=32)
    fill(kv, "p", 0, 5)
    with pytest.raises(KVBudgetFull):
        kv.admit_forks(5, 4)  # 4 more blocks of 8 positions do not fit beside the parent's
    assert kv.session_ids() == ["p"]
