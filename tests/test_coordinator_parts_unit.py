"""The coordinator's policy parts with no model: the scheduler, the step-cost estimate, the prefix
cache, the KV log and the per-client session rate (an injected clock, no sleeping)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common import tensors
from services.coordinator.kv_log import KVLog
from services.coordinator.limits import RateLimiter, peer_host
from services.coordinator.prefix import PrefixCache
from services.coordinator.scheduler import Scheduler, SchedulerConfig, StepCosts
from services.coordinator.session import Session
from vlmesh.v1 import tensor_pb2


@dataclass(eq=False)
class Req:
    remaining: int
    in_flight: bool = False
    feedable: bool = True


def test_decodes_go_first_and_prompts_are_chunked_to_the_token_budget():
    s = Scheduler(SchedulerConfig(max_batch=8, chunk_tokens=10))
    prompt, d1, d2, long = Req(6), Req(1), Req(1), Req(30)
    for r in (prompt, d1, long, d2):
        s.add(r)
    picked = s.next_batch(0)
    assert picked[:2] == [(d1, 1), (d2, 1)]  # decodes, in arrival order, before any prompt
    assert picked[2:] == [(prompt, 6), (long, 2)]  # then prompts, the last cut to what is left
    assert sum(n for _, n in picked) == 10


def test_pipelining_splits_the_active_requests_across_micro_batches_and_bounds_them():
    s = Scheduler(SchedulerConfig(max_batch=64, chunk_tokens=100, pipeline_depth=2))
    reqs = [Req(1) for _ in range(6)]
    for r in reqs:
        s.add(r)
    first = s.next_batch(0)
    assert len(first) == 3  # half of the six
    for r, _ in first:
        r.in_flight, r.feedable = True, False
    second = s.next_batch(1)
    assert {id(r) for r, _ in second}.isdisjoint({id(r) for r, _ in first}) and len(second) == 3
    assert s.next_batch(2) == []  # both slots taken
    s.remove(reqs[0])
    assert reqs[0] not in s.queue


def test_pipelined_prompts_are_shared_out_by_tokens_and_no_prompt_is_cut_for_it():
    s = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=2))
    big, small = Req(100), [Req(10) for _ in range(3)]
    for r in (big, *small):
        s.add(r)
    first = s.next_batch(0)  # 130 tokens wait, two micro-batches can start: about 65 each
    assert first == [(big, 100)]  # whole: the share stops others joining, it does not cut
    big.in_flight, big.feedable = True, False
    assert s.next_batch(1) == [(r, 10) for r in small]  # the rest go in the second micro-batch
    even = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=2))
    burst = [Req(30) for _ in range(4)]
    for r in burst:
        even.add(r)
    assert even.next_batch(0) == [(r, 30) for r in burst[:2]]
    staggered = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=2))
    first_come, rest = Req(30, in_flight=True, feedable=False), [Req(30) for _ in range(15)]
    for r in (first_come, *rest):
        staggered.add(r)
    # the burst's first arrival went alone: the next micro-batch takes about an eighth of what is
    # left to prefill (480 tokens: 60), held to the 64-token floor, so three prompts, not all the
    # rest behind it
    assert staggered.next_batch(1) == [(r, 30) for r in rest[:3]]
    lone = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=2))
    lone.add(alone := Req(300))
    assert lone.next_batch(0) == [(alone, 300)]  # one prompt alone is not split to fill both
    serial = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=1))
    for r in burst:
        serial.add(r)
    assert serial.next_batch(0) == [(r, 30) for r in burst]  # not pipelined: one micro-batch


def test_a_pipelined_burst_is_prefilled_in_pieces_no_smaller_than_an_efficient_chunk():
    # 16 prompts of 60 tokens, 2 ranges: pieces of about 960 / 8 = 120 tokens (two prompts), so the
    # first range's lone first piece (the pipeline's fill) is an eighth of the prefill, not a half.
    s = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=2))
    burst = [Req(60) for _ in range(16)]
    for r in burst:
        s.add(r)
    assert s.next_batch(0) == [(r, 60) for r in burst[:2]]
    # Measured costs where a piece that small would mostly pay a decode step's weight reads: a
    # decode micro-batch 0.25 s, a prompt token 1/1024 s -> worth at least 4 * 256 = 1024 tokens;
    # the share is then that, never more than 1/depth of what waits (480 tokens).
    s.costs.observe(0, 0.25)
    s.costs.observe(1024, 1.25)
    assert s.costs.efficient() == 1024
    assert sum(n for _, n in s.next_batch(0)) == 480
    # Nothing measured, or chunks cheap to start: the floor.
    assert StepCosts().efficient() == StepCosts().pipeline_floor


def test_a_burst_s_early_members_do_not_hold_the_rest_of_it_to_small_chunks():
    s = Scheduler(SchedulerConfig(max_batch=64, pipeline_depth=2))
    s.costs.observe(0, 0.5)
    s.costs.observe(100, 1.5)  # measured: half a decode step is 25 prompt tokens
    burst = [Req(60) for _ in range(12)]
    for r in burst:
        s.add(r)
    for r in burst[:8]:  # fed in earlier pieces: decoding now, 8 against 4 still waiting
        r.remaining = 1
    picked = s.next_batch(0)
    assert sum(n for r, n in picked if r.remaining > 1) >= 60  # whole prompts, not 25-token chunks
    # A newcomer arriving while those twelve decode is held to half a decode step's worth.
    for r in burst:
        r.remaining = 1
    s.add(newcomer := Req(300))
    fed = dict((id(r), n) for r, n in s.next_batch(0))
    assert 0 < fed[id(newcomer)] <= 25
    s.remove(newcomer)
    assert id(newcomer) not in s._arrival


def test_nothing_runs_when_no_request_is_feedable():
    s = Scheduler(SchedulerConfig())
    s.add(Req(5, feedable=False))
    s.add(Req(0))
    assert s.next_batch(0) == []


def test_step_costs_size_the_chunk_as_half_a_decode_step_within_bounds():
    c = StepCosts()
    assert c.budget() == c.start  # nothing measured yet
    c.observe(0, 0.5)  # a decode step: 0.5 s
    c.observe(100, 1.5)  # 100 prompt tokens cost 1 s more: 10 ms each
    assert c.budget() == 25  # half a decode step's worth: 0.25 s / 10 ms
    for _ in range(50):
        c.observe(100, 0.5 + 100 * 1e-6)  # prompt tokens become nearly free
    assert c.budget() == c.ceiling


def test_auto_chunks_protect_decoding_requests_unless_as_many_wait_for_a_first_token():
    s = Scheduler(SchedulerConfig(max_batch=64))
    s.costs.observe(0, 0.5)
    s.costs.observe(100, 1.5)  # budget: 25 tokens
    decoding = [Req(1), Req(1), Req(1)]
    waiting = [Req(40), Req(40)]
    for r in (*decoding, *waiting):
        s.add(r)
    picked = s.next_batch(0)  # three decoding, two waiting: chunked to half a decode step
    assert picked[:3] == [(r, 1) for r in decoding] and picked[3:] == [(waiting[0], 22)]
    late = Req(40)
    s.add(late)
    picked = s.next_batch(0)  # three waiting, three decoding: the prompts go in whole
    assert picked[3:] == [(waiting[0], 40), (waiting[1], 40), (late, 40)]


def _session(tokens: list[int], cached: int, owner: str = "k") -> Session:
    s = Session.new(owner, persistent=False, now=0.0)
    s.token_ids, s.cached = list(tokens), cached
    return s


def test_the_prefix_cache_hands_over_the_longest_prefix_of_the_same_key_once():
    cache = PrefixCache(capacity=2)
    a, b = _session([1, 2, 3, 4], 4), _session([1, 2, 9], 3)
    assert cache.park(a) == [] and cache.park(b) == []
    assert cache.take([5, 6], [], [], "k") is None
    assert cache.take([1, 2, 3, 4, 7], [], [], "other") is None  # another key's KV is never shared
    hit = cache.take([1, 2, 3, 4, 7], [], [], "k")
    assert hit is not None and hit[0] is a and hit[1] == 4
    assert cache.take([1, 2, 3, 4, 7], [], [], "k")[0] is b  # a was taken: only b's 2 tokens are left to share
    # A whole history equal to the parked one still leaves one token to feed (the sample needs it).
    cache.park(_session([1, 2, 3], 3))
    assert cache.take([1, 2, 3], [], [], "k")[1] == 2


def test_the_prefix_cache_evicts_the_oldest_past_its_capacity():
    cache = PrefixCache(capacity=1)
    a, b = _session([1], 1), _session([2], 1)
    cache.park(a)
    assert cache.park(b) == [a]
    assert cache.evict_of("nobody") is None and cache.evict() is b and cache.evict() is None


def _delta(layer: int, start: int, n: int, value: float = 0.0) -> tensor_pb2.KVDelta:
    t = tensors.to_proto(torch.full((1, n, 2), value))
    return tensor_pb2.KVDelta(layer=layer, start_position=start, key=t, value=t)


def test_the_kv_log_restores_what_was_appended_truncates_and_drops_on_a_gap():
    log = KVLog(1 << 20)
    log.append("s", [_delta(0, 0, 3, 1.0), _delta(1, 0, 3, 1.0)])
    log.append("s", [_delta(0, 3, 2, 2.0), _delta(1, 3, 2, 2.0)])
    entries = log.entries("s", range(0, 2), 4)
    assert entries is not None and sum(e.length for e in entries if e.layer == 0) == 4
    assert log.entries("s", range(0, 2), 6) is None  # shorter than asked
    log.truncate("s", 2)
    k, _ = log.merged("s")[0]
    assert k.shape == (1, 2, 2) and torch.all(k == 1.0)
    log.append("s", [_delta(0, 5, 1)])  # a gap: the log can no longer restore the session
    assert log.entries("s", range(0, 1), 1) is None and log.bytes == 0


def test_the_kv_log_stays_within_its_budget_by_dropping_the_least_recent_session():
    one = len(_delta(0, 0, 4).key.data) * 2
    log = KVLog(int(one * 2.5))
    log.append("a", [_delta(0, 0, 4)])
    log.append("b", [_delta(0, 0, 4)])
    log.entries("a", range(0, 1), 4)  # a is used: b becomes the least recent
    log.append("c", [_delta(0, 0, 4)])
    assert log.entries("b", range(0, 1), 4) is None
    assert log.entries("a", range(0, 1), 4) is not None and log.bytes <= log.budget


def test_the_session_rate_refills_with_the_clock_per_client():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another client has its own bucket
    now[0] += 0.5  # one token back
    assert limiter.allow("a") and not limiter.allow("a")
    assert RateLimiter(rate=0, burst=0).allow("x")  # 0 = off
    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1" and peer_host("ipv6:[::1]:80") == "::1"
