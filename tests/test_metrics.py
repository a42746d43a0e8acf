"""services.common.metrics: each service's series on its own registry, served over real HTTP on
127.0.0.1 and read back with Prometheus' own text parser."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics
from services.common.metrics import CoordinatorMetrics, StageMetrics, VisionMetrics, serve_metrics
from services.common.ports import PortInUse
from services.launcher import free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def names(samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def served():
    servers = []

    def serve(m):
        server = serve_metrics(m.registry, free_port(), "127.0.0.1")
        servers.append(server)
        return server.port

    yield serve
    for s in servers:
        s.close()


def test_coordinator_series_and_counts_over_http(served):
    m = CoordinatorMetrics.create()
    port = served(m)
    m.time_to_first_token.observe(0.3)
    for gap in (0.02, 0.03, 0.2):
        m.inter_token_latency.observe(gap)
    m.e2e_request_latency.observe(0.55)
    m.request_queue_time.observe(0.001)
    m.prompt_tokens.inc(301)
    m.generation_tokens.inc(4)
    m.request_success.labels("stop").inc()
    m.requests_running.set(3)
    m.requests_waiting.set(1)
    m.stage_hop_latency.labels("0:14").observe(0.0012)
    m.stage_hop_latency.labels("14:28").observe(0.0016)
    m.stage_hop_latency.labels("14:28").observe(0.004)
    m.request_errors.labels("UNAVAILABLE").inc()

    got = scrape(port)
    assert got[("vlmesh:time_to_first_token_seconds_count", ())] == 1
    assert got[("vlmesh:time_to_first_token_seconds_sum", ())] == pytest.approx(0.3)
    assert got[("vlmesh:time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 0
    assert got[("vlmesh:time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("vlmesh:inter_token_latency_seconds_count", ())] == 3
    assert got[("vlmesh:inter_token_latency_seconds_bucket", (("le", "0.05"),))] == 2
    assert got[("vlmesh:e2e_request_latency_seconds_count", ())] == 1
    assert got[("vlmesh:request_queue_time_seconds_count", ())] == 1
    assert got[("vlmesh:prompt_tokens_total", ())] == 301
    assert got[("vlmesh:generation_tokens_total", ())] == 4
    assert got[("vlmesh:request_success_total", (("finished_reason", "stop"),))] == 1
    assert got[("vlmesh:num_requests_running", ())] == 3
    assert got[("vlmesh:num_requests_waiting", ())] == 1
    assert got[("vlmesh:stage_hop_latency_seconds_count", (("stage", "0:14"),))] == 1
    assert got[("vlmesh:stage_hop_latency_seconds_count", (("stage", "14:28"),))] == 2
    assert got[("vlmesh:stage_hop_latency_seconds_bucket", (("le", "0.002"), ("stage", "14:28")))] == 1
    assert got[("vlmesh:request_errors_total", (("code", "UNAVAILABLE"),))] == 1
    # Only the coordinator's series: a stage's KV gauges are not on its page.
    assert not any(n.startswith(("vlmesh:kv_cache", "vlmesh:vision_cache")) for n in names(got))


def test_the_engine_observer_splits_a_hop_into_compute_transport_and_building(served):
    from services.coordinator.request import HopTimed
    from services.coordinator.telemetry import EngineMetrics

    m = CoordinatorMetrics.create()
    port = served(m)
    obs = EngineMetrics(m)
    obs.on_hop(HopTimed("0:14", build_s=0.0001, rpc_s=0.0105, compute_s=0.01))
    obs.on_hop(HopTimed("0:14", build_s=0.0002, rpc_s=0.002, compute_s=None))  # failed: no compute reported
    obs.on_round(0.0003)
    got = scrape(port)
    one = (("stage", "0:14"),)
    assert got[("vlmesh:stage_hop_latency_seconds_count", one)] == 2
    assert got[("vlmesh:stage_hop_latency_seconds_sum", one)] == pytest.approx(0.0128)
    assert got[("vlmesh:stage_request_build_seconds_sum", one)] == pytest.approx(0.0003)
    assert got[("vlmesh:stage_compute_seconds_count", one)] == 1
    assert got[("vlmesh:stage_compute_seconds_sum", one)] == pytest.approx(0.01)
    assert got[("vlmesh:stage_hop_overhead_seconds_sum", one)] == pytest.approx(0.0005)
    assert got[("vlmesh:engine_round_seconds_count", ())] == 1


def test_stage_kv_gauges_read_current_values(served):
    m = StageMetrics.create()
    port = served(m)
    state = {"used": 0, "sessions": 0}
    m.track_kv("2:4", used=lambda: state["used"], budget=64 << 20, sessions=lambda: state["sessions"])
    labels = (("layers", "2:4"),)
    got = scrape(port)
    assert got[("vlmesh:kv_cache_usage_bytes", labels)] == 0
    assert got[("vlmesh:kv_cache_usage_perc", labels)] == 0
    state.update(used=16 << 20, sessions=3)  # what the stage holds now, read at scrape time
    got = scrape(port)
    assert got[("vlmesh:kv_cache_usage_bytes", labels)] == 16 << 20
    assert got[("vlmesh:kv_cache_budget_bytes", labels)] == 64 << 20
    assert got[("vlmesh:kv_cache_usage_perc", labels)] == 0.25
    assert got[("vlmesh:num_sessions", labels)] == 3


def test_vision_cache_counters(served):
    m = VisionMetrics.create()
    port = served(m)
    m.cache_misses.inc()
    m.cache_hits.inc(2)
    m.request_errors.labels("INVALID_ARGUMENT").inc()
    got = scrape(port)
    assert got[("vlmesh:vision_cache_hits_total", ())] == 2
    assert got[("vlmesh:vision_cache_misses_total", ())] == 1
    assert got[("vlmesh:request_errors_total", (("code", "INVALID_ARGUMENT"),))] == 1


def test_services_in_one_process_keep_separate_registries(served):
    a, b = StageMetrics.create(), StageMetrics.create()
    a.track_kv("0:2", used=lambda: 5, budget=10, sessions=lambda: 1)
    b.track_kv("2:4", used=lambda: 7, budget=10, sessions=lambda: 2)
    got_a, got_b = scrape(served(a)), scrape(served(b))
    assert ("vlmesh:kv_cache_usage_bytes", (("layers", "0:2"),)) in got_a
    assert ("vlmesh:kv_cache_usage_bytes", (("layers", "2:4"),)) not in got_a
    assert got_b[("vlmesh:kv_cache_usage_bytes", (("layers", "2:4"),))] == 7
    assert not any(n.startswith("vlmesh:") for n in REGISTRY._names_to_collectors)  # the global registry is untouched


def test_port_zero_is_off_and_a_port_in_use_is_named(served):
    m = VisionMetrics.create()
    assert serve_metrics(m.registry, 0) is None
    port = served(m)
    with pytest.raises(PortInUse, match=f"metrics port {port}"):
        serve_metrics(VisionMetrics.create().registry, port, "127.0.0.1")


def test_the_module_doc_lists_exactly_the_series():
    """The docstring is the reference the README and the dashboard point to: keep it true."""
    documented = set(re.findall(r"(vlmesh:[a-z0-9_]+)", metrics.__doc__))
    defined = set()
    for m in (CoordinatorMetrics.create(), StageMetrics.create(), VisionMetrics.create()):
        for family in m.registry.collect():
            defined.add(family.name + ("_total" if family.type == "counter" else ""))
    assert documented == defined
