"""The manifests run: each vlmesh workload's container command, args and environment are read from
k8s/ and started as a local process -- exactly those, with only what a cluster provides rewritten:
Service DNS names become 127.0.0.1 ports (Jaeger's is a local OTLP receiver), each container port
a free local port, mounted paths temporary directories (the mesh certificates made by
`vlmesh certs`, an API key file, emptyDirs, the state volume) and the image's model path the
checkout's. Then the manifests' own gRPC health probes are run against them, a Generate with an
image goes through the coordinator with the client library, the traces of every pod reach
"Jaeger", the metrics ports answer, and SIGTERM drains every process within its grace period.

One process per Deployment: a headless Service's several replicas would need a DNS server."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8sutil import ROOT, base, command_line, component, of_kind, selects, vlmesh_workloads
from otlp_sink import OtlpSink

from services.launcher import free_ports
from vlmesh import Client, VlmeshError

pytestmark = pytest.mark.slow

IMAGE_MODEL = "/opt/vlmesh/models/shapes-qwen2-vl"  # the Dockerfile's COPY destination (tests/test_dockerfile.py)
SHAPES = ROOT / "services" / "assets" / "shapes-qwen2-vl"
START_ORDER = {"vision": 0, "stage": 0, "coordinator": 1}  # the coordinator after what it calls, as `vlmesh up` does


@dataclass
class LocalPod:
    workload: dict
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # container port name -> local port
    log: Path
    proc: subprocess.Popen | None = None
    pod_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.workload["metadata"]["name"]

    @property
    def container(self) -> dict:
        return self.workload["spec"]["template"]["spec"]["containers"][0]


def _dns_rewrites(docs, pods: list[LocalPod], jaeger_port: int) -> list[tuple[re.Pattern, str]]:
    """Service name:port (any of the forms cluster DNS answers) -> 127.0.0.1:local port."""
    out = []
    for svc in of_kind(docs, "Service"):
        name = svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            if name == "jaeger":
                if port["port"] != 4317:
                    continue
                local = jaeger_port
            else:
                (pod,) = [p for p in pods if selects(svc["spec"]["selector"], p.workload["spec"]["template"]["metadata"]["labels"])]
                target = port.get("targetPort", port["port"])
                by_number = {c["containerPort"]: c["name"] for c in pod.container["ports"]}
                local = pod.ports[target if isinstance(target, str) else by_number[target]]
            host = rf"{re.escape(name)}(?:\.vlmesh(?:\.svc(?:\.cluster\.local)?)?)?"
            out.append((re.compile(rf"(?<![\w.-]){host}:{port['port']}(?!\d)"), f"127.0.0.1:{local}"))
    return out


def _mounts(pod: LocalPod, tmp: Path, certs: Path, api_keys: Path) -> list[tuple[str, str]]:
    """Mount path -> local directory, longest first."""
    volumes = {v["name"]: v for v in pod.workload["spec"]["template"]["spec"]["volumes"]}
    out = []
    for m in pod.container["volumeMounts"]:
        v = volumes[m["name"]]
        if "secret" in v:
            local = {"vlmesh-mesh-tls": certs, "vlmesh-api-keys": api_keys}[v["secret"]["secretName"]]
        elif "persistentVolumeClaim" in v:
            local = tmp / "pvc" / v["persistentVolumeClaim"]["claimName"]
        else:
            local = tmp / "emptydir" / pod.name / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        out.append((m["mountPath"], str(local)))
    out.append((IMAGE_MODEL, str(SHAPES)))  # a file of the image, not a mount
    return sorted(out, key=lambda x: -len(x[0]))


def _rewrite(text: str, dns, mounts) -> str:
    for pattern, local in dns:
        text = pattern.sub(local, text)
    # One pass, longest mount path first: a local directory may itself start with a mount path (/tmp).
    paths = "|".join(re.escape(path) for path, _ in mounts)
    local = dict(mounts)
    return re.sub(rf"(^|=)({paths})(?=/|$)", lambda m: m.group(1) + local[m.group(2)], text)


def local_pods(docs, tmp: Path, jaeger_port: int, certs: Path, api_keys: Path) -> list[LocalPod]:
    pods = []
    for w in sorted(vlmesh_workloads(docs), key=lambda w: START_ORDER[component(w)]):
        argv, env = command_line(w, docs)
        names = [p["name"] for p in w["spec"]["template"]["spec"]["containers"][0]["ports"]]
        ports = dict(zip(names, free_ports("127.0.0.1", len(names)), strict=True))
        pods.append(LocalPod(w, argv, env, ports, tmp / f"{w['metadata']['name']}.log"))
    dns = _dns_rewrites(docs, pods, jaeger_port)
    for pod in pods:
        pod.pod_name = pod.env.get("POD_NAME", "")
        mounts = _mounts(pod, tmp, certs, api_keys)
        by_number = {c["containerPort"]: pod.ports[c["name"]] for c in pod.container["ports"]}
        argv = []
        for i, a in enumerate(pod.argv):
            # a port the container listens on -> its local port (k8s gives every pod its own IP)
            m = re.fullmatch(r"(--[\w-]*port=)(\d+)", a)
            if m and int(m.group(2)) in by_number:
                a = f"{m.group(1)}{by_number[int(m.group(2))]}"
            elif i and re.fullmatch(r"--[\w-]*port", pod.argv[i - 1]) and a.isdigit() and int(a) in by_number:
                a = str(by_number[int(a)])
            argv.append(_rewrite(a, dns, mounts))
        assert argv[0] == "vlmesh"  # the image's entry point
        pod.argv = [sys.executable, "-m", "services.cli", *argv[1:]]
        pod.env = {k: _rewrite(v, dns, mounts) for k, v in pod.env.items()}
    return pods


def probe(port: int, spec: dict) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")), timeout=spec.get("timeoutSeconds", 1))
            .status
        )


def wait_started(pod: LocalPod) -> None:
    """The startupProbe as the kubelet runs it: every periodSeconds, up to failureThreshold times
    (polled faster here; the deadline is the manifest's)."""
    spec = pod.container["startupProbe"]
    port = pod.ports[next(c["name"] for c in pod.container["ports"] if c["containerPort"] == spec["grpc"]["port"])]
    deadline = time.monotonic() + spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3)
    while True:
        assert pod.proc.poll() is None, f"{pod.name} exited with {pod.proc.returncode}:\n{pod.log.read_text()[-3000:]}"
        try:
            if probe(port, spec) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, f"{pod.name}: startupProbe failed for the manifest's whole window\n{pod.log.read_text()[-3000:]}"
        time.sleep(0.2)


def health_port(pod: LocalPod, probe_name: str) -> int:
    spec = pod.container[probe_name]
    return pod.ports[next(c["name"] for c in pod.container["ports"] if c["containerPort"] == spec["grpc"]["port"])]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("k8s-run")
    docs = base()
    sink = OtlpSink().start()
    certs = tmp / "mesh-tls"
    made = subprocess.run(
        [sys.executable, "-m", "services.cli", "certs", "--out", str(certs)], capture_output=True, text=True, timeout=120, check=False
    )
    assert made.returncode == 0, f"`vlmesh certs --out DIR` makes the Secret vlmesh-mesh-tls's files: {made.stderr[-2000:]}"
    for key in ("ca.crt", "tls.crt", "tls.key"):  # the keys of the Secret, as the README creates it
        assert (certs / key).is_file(), f"vlmesh certs wrote no {key}"
    api_keys = tmp / "api-keys"
    api_keys.mkdir()
    made = subprocess.run(  # as the README makes the Secret vlmesh-api-keys's file
        [sys.executable, "-m", "services.cli", "keys", "new", "--name", "k8s-run", "--file", str(api_keys / "api-keys")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    key = made.stdout.strip()
    pods = local_pods(docs, tmp, sink.port, certs, api_keys)
    try:
        for order in sorted(set(START_ORDER.values())):
            started = [p for p in pods if START_ORDER[component(p.workload)] == order]
            for p in started:
                with open(p.log, "w") as log:
                    log.write(shlex.join(p.argv) + "\n")
                    log.flush()
                    p.proc = subprocess.Popen(p.argv, env={**os.environ, **p.env}, stdout=log, stderr=subprocess.STDOUT)
            for p in started:
                wait_started(p)
        yield pods, sink, key
    finally:
        for p in pods:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        sink.stop()


def coordinator_of(pods) -> LocalPod:
    (c,) = [p for p in pods if component(p.workload) == "coordinator"]
    return c


MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image", "image": str(ROOT / "services" / "assets" / "demo.png")}, {"type": "text", "text": "What is in this picture?"}],
    }
]


@pytest.fixture(scope="module")
def answer(mesh):
    """One Generate with an image through the coordinator, with the API key the Secret holds."""
    pods, _, key = mesh
    with Client(f"127.0.0.1:{coordinator_of(pods).ports['grpc']}", metadata=[("authorization", f"Bearer {key}")]) as client:
        return client.chat(MESSAGES, max_tokens=32)


def test_every_pod_passes_its_probes(mesh):
    pods, _, _ = mesh
    assert {component(p.workload) for p in pods} == {"vision", "stage", "coordinator"}
    for p in pods:
        for name in ("readinessProbe", "livenessProbe"):
            assert probe(health_port(p, name), p.container[name]) == health_pb2.HealthCheckResponse.SERVING, (p.name, name)


def test_generate_with_an_image_through_the_coordinator(mesh, answer):
    from services.shapes import data

    pods, sink, _ = mesh
    assert answer.text == data.demo_scene().caption()
    with Client(f"127.0.0.1:{coordinator_of(pods).ports['grpc']}", metadata=[("authorization", "Bearer wrong")]) as stranger:
        with pytest.raises(VlmeshError) as err:  # the public port wants a key the Secret holds
            stranger.chat(MESSAGES, max_tokens=4)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Every pod's spans reached the Jaeger Service's address, named by the pod (OTEL_RESOURCE_ATTRIBUTES).
    names = {p.pod_name for p in pods}
    assert names <= sink.wait_for("k8s.pod.name", names)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_ports_show_the_request(mesh, answer):
    pods, _, _ = mesh
    tokens = len(answer.token_ids)
    for p in pods:
        got = scrape(p.ports["metrics"])
        kind = component(p.workload)
        if kind == "coordinator":
            assert got[("vlmesh:generation_tokens_total", ())] == tokens
            assert got[("vlmesh:prompt_tokens_total", ())] > 0
            assert got[("vlmesh:e2e_request_latency_seconds_count", ())] == 1
            assert got[("vlmesh:time_to_first_token_seconds_count", ())] == 1
            hops = {labels: v for (n, labels), v in got.items() if n == "vlmesh:stage_hop_latency_seconds_count"}
            assert hops and all(v > 0 for v in hops.values())
            for labels, count in hops.items():  # every hop answered: each has the stage's compute and the rest
                assert got[("vlmesh:stage_compute_seconds_count", labels)] == count
                assert got[("vlmesh:stage_hop_overhead_seconds_count", labels)] == count
                assert 0 < got[("vlmesh:stage_compute_seconds_sum", labels)] < got[("vlmesh:stage_hop_latency_seconds_sum", labels)]
            assert got[("vlmesh:engine_round_seconds_count", ())] > 0
        elif kind == "stage":
            layers = next(a for a in p.argv if re.fullmatch(r"\d+:\d+", a))
            budget = int(p.argv[p.argv.index("--kv-budget-mb") + 1]) << 20
            assert got[("vlmesh:kv_cache_budget_bytes", (("layers", layers),))] == budget
            assert ("vlmesh:num_sessions", (("layers", layers),)) in got
        else:
            assert got[("vlmesh:vision_cache_misses_total", ())] == 1


def test_sigterm_drains_within_the_grace_period(mesh):
    pods, _, _ = mesh
    for p in reversed(pods):  # the coordinator first, as a rollout would find it
        spec = p.workload["spec"]["template"]["spec"]
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=spec["terminationGracePeriodSeconds"]) == 0, p.log.read_text()[-3000:]
