"""k8s/ checked offline: Kubernetes' OpenAPI schemas (kubernetes-validate, pinned), the policies
every workload must meet, flags that exist in the services' configs, sizes that follow `vlmesh plan`,
and the generated stage files being what tools/k8s_stages.py renders."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import subprocess
import sys

import kubernetes_validate
import pytest
from k8sutil import (
    K8S,
    OVERLAYS,
    ROOT,
    all_sets,
    base,
    command_line,
    component,
    config_maps,
    flags,
    load_file,
    memory_mib,
    of_kind,
    selects,
    vlmesh_workloads,
)

sys.path.insert(0, str(ROOT / "tools"))
from k8s_stages import TORCH_MIB as PROCESS_MIB  # noqa: E402 - one number for the generator and these checks

K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 ships
SETS = all_sets()


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def the_container(workload: dict) -> dict:
    (c,) = pod_spec(workload)["containers"]
    return c


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_manifest_validates_against_the_kubernetes_schemas(name):
    docs = list(SETS[name])
    if name == "k8s/":  # standalone files of the overlays that kustomize does not render
        docs += [d for p in OVERLAYS for f in p.glob("weights-*.yaml") for d in load_file(f)]
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_kubectl_apply_k8s_applies_the_namespace_first_and_nothing_else_than_manifests():
    top = sorted(p.name for p in K8S.iterdir() if p.is_file())
    assert not {"kustomization.yaml", "kustomization.yml", "Kustomization"} & set(top)
    # kubectl apply -f DIR reads every .json/.yaml/.yml in it: nothing else may sit there.
    assert [n for n in top if n.endswith((".json", ".yaml", ".yml"))] == top
    docs = base()
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == "vlmesh"
    for d in docs[1:]:
        assert d["metadata"]["namespace"] == "vlmesh", d["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_container_has_probes_resources_and_a_locked_down_security_context(name):
    docs = SETS[name]
    assert {component(w) for w in vlmesh_workloads(docs)} == {"vision", "stage", "coordinator"}
    for w in of_kind(docs, "Deployment"):
        spec, where = pod_spec(w), w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        mounts_tmp = False
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: no {probe}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc.get("privileged", False) is False, where
            empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
            mounts_tmp = any(m["mountPath"] == "/tmp" and m["name"] in empty_dirs for m in c["volumeMounts"])
        assert mounts_tmp, f"{where}: a read-only root filesystem needs an emptyDir at /tmp"
    for w in vlmesh_workloads(docs):
        c, where = the_container(w), w["metadata"]["name"]
        argv, env = command_line(w, docs)
        health = int(flags(argv)["health-port"])
        assert {"name": "health", "containerPort": health} in c["ports"], where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == health, f"{where}: {probe} must be a gRPC health probe on the health port"
        # Hugging Face caches must be writable under the read-only root.
        cache = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/home/vlmesh/.cache" in cache, where


@pytest.mark.parametrize("name", sorted(SETS))
def test_stages_and_vision_take_grpc_only_from_the_coordinator(name):
    docs = SETS[name]
    policies = of_kind(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] and p["spec"]["policyTypes"] == ["Ingress"] for p in policies), (
        "a default deny-ingress policy"
    )
    coordinator_labels = next(w for w in vlmesh_workloads(docs) if component(w) == "coordinator")["spec"]["template"]["metadata"]["labels"]
    for w in vlmesh_workloads(docs):
        if component(w) not in ("stage", "vision"):
            continue
        labels = w["spec"]["template"]["metadata"]["labels"]
        argv, _ = command_line(w, docs)
        grpc_port = int(flags(argv)["port"])
        covering = [p for p in policies if p["spec"]["podSelector"] != {} and selects(p["spec"]["podSelector"], labels)]
        assert covering, f"{w['metadata']['name']}: no NetworkPolicy selects its pods"
        allowed = [r for p in covering for r in p["spec"].get("ingress", []) if not r.get("ports") or grpc_port in [pp["port"] for pp in r["ports"]]]
        assert allowed, f"{w['metadata']['name']}: nothing may reach its gRPC port"
        for rule in allowed:
            sources = rule.get("from")
            assert sources, f"{w['metadata']['name']}: its gRPC port is open to every source"
            for src in sources:
                assert set(src) == {"podSelector"}, src  # this namespace's pods only
                assert selects(src["podSelector"], coordinator_labels), src
                assert all(
                    not selects(src["podSelector"], o["spec"]["template"]["metadata"]["labels"])
                    for o in vlmesh_workloads(docs)
                    if component(o) != "coordinator"
                ), src


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_service_exports_traces_to_the_jaeger_service(name):
    docs = SETS[name]
    (jaeger,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "jaeger"]
    (jaeger_pod,) = [d for d in of_kind(docs, "Deployment") if selects(jaeger["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    ports = {p["port"]: p["targetPort"] for p in jaeger["spec"]["ports"]}
    listens = {p["name"]: p["containerPort"] for p in the_container(jaeger_pod)["ports"]}
    assert listens[ports[4317]] == 4317 and listens[ports[16686]] == 16686
    for w in vlmesh_workloads(docs):
        f = flags(command_line(w, docs)[0])
        assert f["trace-exporter"] == "otlp", w["metadata"]["name"]
        assert f["otlp-endpoint"] == "http://jaeger.vlmesh:4317", w["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_service_port_is_one_its_container_listens_on(name):
    docs = SETS[name]
    for svc in of_kind(docs, "Service"):
        pods = [d for d in of_kind(docs, "Deployment") if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for w in pods:
            listens = {p["name"]: p["containerPort"] for p in the_container(w)["ports"]}
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in listens or target in listens.values(), f"{svc['metadata']['name']}:{port['port']} -> {target}"
            if component(w) in ("vision", "stage", "coordinator"):
                # and the service really binds the port named grpc
                assert int(flags(command_line(w, docs)[0])["port"]) == listens["grpc"]


@pytest.mark.parametrize("name", sorted(SETS))
def test_disruption_budgets_and_graceful_termination(name):
    docs = SETS[name]
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for w in vlmesh_workloads(docs):
        spec, where = pod_spec(w), w["metadata"]["name"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        if component(w) in ("stage", "vision"):
            assert w["spec"]["replicas"] >= 2, where
            assert [p["spec"]["minAvailable"] for p in pdbs if selects(p["spec"]["selector"], labels)] == [1], where
        # The services drain on SIGTERM: NOT_SERVING (readiness fails at once), then in-flight
        # calls get 5 s. The grace period covers the preStop delay, the drain and the exit.
        pre_stop = the_container(w)["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + 5 + 10, where
        assert the_container(w)["readinessProbe"]["failureThreshold"] == 1, where


def test_coordinator_keeps_its_state_on_a_volume_and_mounts_the_secrets():
    docs = base()
    (w,) = [w for w in vlmesh_workloads(docs) if component(w) == "coordinator"]
    argv, _ = command_line(w, docs)
    f = flags(argv)
    mounts = {m["mountPath"]: m["name"] for m in the_container(w)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
    claim = volumes[mounts[f["state-dir"]]]["persistentVolumeClaim"]["claimName"]
    assert claim in [p["metadata"]["name"] for p in of_kind(docs, "PersistentVolumeClaim")]
    assert w["spec"]["replicas"] == 1 and w["spec"]["strategy"]["type"] == "Recreate"  # one writer of a ReadWriteOnce volume
    keys_dir, keys_file = f["api-keys-file"].rsplit("/", 1)
    assert volumes[mounts[keys_dir]]["secret"]["secretName"] == "vlmesh-api-keys" and keys_file == "api-keys"
    for w in vlmesh_workloads(docs):
        f = flags(command_line(w, docs)[0])
        mounts = {m["mountPath"]: m["name"] for m in the_container(w)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        for flag, key in (("mesh-ca", "ca.crt"), ("mesh-cert", "tls.crt"), ("mesh-key", "tls.key")):
            directory, file = f[flag].rsplit("/", 1)
            assert file == key and volumes[mounts[directory]]["secret"]["secretName"] == "vlmesh-mesh-tls", (w["metadata"]["name"], flag)
        assert f["host"] == "0.0.0.0" and f["metrics-port"] == "9100"
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == f["metrics-port"]


def _config_class(service: str):
    from services.cli import _service_config

    return _service_config(service)


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_flag_and_variable_is_one_the_service_has(name):
    """A flag renamed in the code and not here fails: the manifests are parsed with the services'
    own config parsers. A VLMESH_* variable must name a config field too, and never one the args
    also set (args win, so an overlay changing the variable would change nothing)."""
    from services.common.config import add_config_arguments

    docs = SETS[name]
    for w in vlmesh_workloads(docs):
        argv, env = command_line(w, docs)
        assert argv[:3] == ["vlmesh", "serve", component(w)], argv[:3]
        cls = _config_class(component(w))
        fields = {f.name for f in dataclasses.fields(cls)}
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_config_arguments(parser, cls)
        given = set(flags(argv[3:]))
        required = {a.dest for a in parser._actions if a.required}
        filler = [x for d in sorted(required - {g.replace("-", "_") for g in given}) for x in ("--" + d.replace("_", "-"), "x")]
        _, unknown = parser.parse_known_args(argv[3:] + filler)
        assert unknown == [], f"{w['metadata']['name']}: flags `vlmesh serve {component(w)}` does not have: {unknown}"
        for var in env:
            if var.startswith("VLMESH_"):
                field = var.removeprefix("VLMESH_").lower()
                assert field in fields, f"{w['metadata']['name']}: {var} is no flag of `vlmesh serve {component(w)}`"
                assert field.replace("_", "-") not in given, f"{w['metadata']['name']}: both {var} and --{field.replace('_', '-')}"


def test_generated_stage_files_are_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "k8s_stages.py"), "--check"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", sorted(SETS))
def test_coordinator_stages_name_every_range_in_order(name):
    docs = SETS[name]
    stages = [w for w in vlmesh_workloads(docs) if component(w) == "stage"]
    ranges = sorted(tuple(int(x) for x in flags(command_line(w, docs)[0])["layers"].split(":")) for w in stages)
    (coordinator,) = [w for w in vlmesh_workloads(docs) if component(w) == "coordinator"]
    entries = flags(command_line(coordinator, docs)[0])["stages"].split(",")
    headless = {s["metadata"]["name"]: s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"}
    found = []
    for entry in entries:
        m = re.fullmatch(r"dns:///([a-z0-9-]+)\.vlmesh:(\d+)", entry)
        assert m, entry
        svc = headless[m.group(1)]  # a headless Service: DNS gives every replica's IP
        (w,) = [w for w in stages if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert int(m.group(2)) == svc["spec"]["ports"][0]["port"]
        found.append(tuple(int(x) for x in flags(command_line(w, docs)[0])["layers"].split(":")))
    assert found == ranges and found[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(found))
    vision = flags(command_line(coordinator, docs)[0])["vision"]
    assert re.fullmatch(r"dns:///vision\.vlmesh:50071", vision) and "vision" in headless


def _round64(mib: float) -> int:
    return int(math.ceil(mib / 64) * 64)


def test_memory_follows_the_plan():
    """Vision: its weights (vlmesh plan) + --cache-mb + a process's own memory; coordinator: its KV
    log bound (the sum over ranges of replicas x --kv-budget-mb) + a process's; threads = the CPU limit."""
    from services.common.checkpoint import load_config
    from services.plan import measure

    docs = base()
    cfg = load_config(ROOT / "services" / "assets" / "shapes-qwen2-vl")
    vision_mib = measure(cfg).vision / 2**20
    for w in vlmesh_workloads(docs):
        argv, env = command_line(w, docs)
        f = {**{k.removeprefix("VLMESH_").lower().replace("_", "-"): v for k, v in env.items() if k.startswith("VLMESH_")}, **flags(argv)}
        res = the_container(w)["resources"]
        assert res["requests"]["memory"] == res["limits"]["memory"], w["metadata"]["name"]
        assert f["threads"] == res["limits"]["cpu"] or component(w) == "coordinator", w["metadata"]["name"]
        if component(w) == "vision":
            assert memory_mib(res["limits"]["memory"]) == _round64(vision_mib + int(f["cache-mb"]) + PROCESS_MIB)
    stages = [w for w in vlmesh_workloads(docs) if component(w) == "stage"]
    kv_log = sum(w["spec"]["replicas"] * int(flags(command_line(w, docs)[0])["kv-budget-mb"]) for w in stages)
    (coordinator,) = [w for w in vlmesh_workloads(docs) if component(w) == "coordinator"]
    assert memory_mib(the_container(coordinator)["resources"]["limits"]["memory"]) == _round64(kv_log + PROCESS_MIB)


def test_real_checkpoint_overlay_serves_the_volume_on_four_stages():
    (path,) = [p for p in OVERLAYS if p.name == "real-checkpoint"]
    docs = SETS[str(path.relative_to(ROOT))]
    claims = [p["metadata"]["name"] for p in of_kind(docs, "PersistentVolumeClaim")]
    for w in vlmesh_workloads(docs):
        _, env = command_line(w, docs)
        assert env["VLMESH_MODEL"] == "/models/Qwen2-VL-2B-Instruct", w["metadata"]["name"]
        mounts = {m["name"]: m for m in the_container(w)["volumeMounts"]}
        (weights,) = [
            v for v in pod_spec(w)["volumes"] if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] == "vlmesh-weights"
        ]
        assert mounts[weights["name"]]["mountPath"] == "/models" and mounts[weights["name"]]["readOnly"] is True
    assert "vlmesh-weights" in claims
    stages = [w for w in vlmesh_workloads(docs) if component(w) == "stage"]
    assert len(stages) == 4 and {flags(command_line(w, docs)[0])["dtype"] for w in stages} == {"bfloat16"}
    assert config_maps(docs)["vlmesh-stages"]["stages"].count("dns:///") == 4
    kv_log = sum(w["spec"]["replicas"] * int(flags(command_line(w, docs)[0])["kv-budget-mb"]) for w in stages)
    (coordinator,) = [w for w in vlmesh_workloads(docs) if component(w) == "coordinator"]
    assert memory_mib(the_container(coordinator)["resources"]["limits"]["memory"]) == _round64(kv_log + PROCESS_MIB)


def test_grafana_dashboard_uses_exactly_the_defined_series():
    from services.common.metrics import CoordinatorMetrics, StageMetrics, VisionMetrics

    (cm,) = [d for d in base() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vlmesh-grafana-dashboard"]
    dashboard = json.loads(cm["data"]["vlmesh.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"vlmesh:[a-z0-9_]+", e)}
    samples = {}
    for m in (CoordinatorMetrics.create(), StageMetrics.create(), VisionMetrics.create()):
        for family in m.registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            samples[family.name] = {family.name + s for s in suffixes}
    assert used <= set().union(*samples.values()), used - set().union(*samples.values())
    unused = [name for name, names in samples.items() if not names & used]
    assert unused == [], f"series with no panel: {unused}"


def test_gpu_overlay_puts_stages_and_vision_on_a_gpu_with_the_cuda_image():
    docs = SETS["k8s/overlays/gpu"]
    for w in vlmesh_workloads(docs):
        c = the_container(w)
        assert c["image"] == "vlmesh:0.1.0-cuda", w["metadata"]["name"]
        on_gpu = component(w) in ("stage", "vision")
        assert (command_line(w, docs)[1].get("VLMESH_DEVICE") == "cuda") == on_gpu, w["metadata"]["name"]
        assert (c["resources"]["limits"].get("nvidia.com/gpu") == 1) == on_gpu, w["metadata"]["name"]
