"""Render the stage workloads of k8s/ from `vlmesh plan`: per layer range one Deployment (R replicas),
one headless Service (the coordinator resolves `dns:///stage-A-B.vlmesh:50061` to every ready pod
of the range) and one PodDisruptionBudget, plus the ConfigMap `vlmesh-stages` that gives the
coordinator's `--stages` every range's address.

    python tools/k8s_stages.py                   # rewrite the checked-in files (k8s/stages.yaml, the overlay's)
    python tools/k8s_stages.py --check           # exit 1 if they differ from what this renders (CI)
    python tools/k8s_stages.py --model DIR --stages 8 --dtype bfloat16 --kv-budget-mb 1024 \\
        --model-path /models/NAME --model-pvc vlmesh-weights --out k8s/overlays/real-checkpoint/stages.yaml

Only DIR/config.json is read (the plan is built on the meta device). Memory per stage pod, as a
request equal to its limit (a pod over it is killed, never slowed):

    weights of its layers at --dtype (vlmesh plan: + embed_tokens on the first, norm + lm_head on the last)
  + --kv-budget-mb (the stage refuses KV beyond it: RESOURCE_EXHAUSTED)
  + 800 MiB per process for torch, transformers, gRPC, OpenTelemetry and the interpreter (the README
    says torch alone is "about 0.7 GB each"; the shipped model's processes measured 760-780 MiB RSS
    after one image request, with tracing on)
  rounded up to 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMESPACE = "vlmesh"
IMAGE = "vlmesh:0.1.0"
IMAGE_MODEL = "/opt/vlmesh/models/shapes-qwen2-vl"  # where the Dockerfile copies the shipped model
STAGE_PORT, HEALTH_PORT, METRICS_PORT = 50061, 8081, 9100
TORCH_MIB = 800  # a process before its weights and KV: torch, transformers, gRPC, OpenTelemetry, Python
MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    stages: int = 2
    dtype: str = "auto"
    kv_budget_mb: int = 256
    replicas: int = 2
    threads: int = 2  # torch threads = the CPU limit (torch would otherwise start one per node core)
    image: str = IMAGE
    model_path: str = IMAGE_MODEL  # --model inside the pod
    model_pvc: str = ""  # a PersistentVolumeClaim holding the checkpoint, mounted read-only at model_path's parent
    startup_seconds: int = 300  # how long loading may take before the kubelet restarts the pod


def stage_memory_mib(weight_bytes: int, kv_budget_mb: int) -> int:
    return int(math.ceil((weight_bytes / MIB + kv_budget_mb + TORCH_MIB) / 64) * 64)


def name(start: int, end: int) -> str:
    return f"stage-{start}-{end}"


def stages_address(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"dns:///{name(a, b)}.{NAMESPACE}:{STAGE_PORT}" for a, b in ranges)


def _labels(start: int, end: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vlmesh",
        "app.kubernetes.io/part-of": "vlmesh",
        "app.kubernetes.io/component": "stage",
        "vlmesh.io/layers": f"{start}-{end}",
    }


def _deployment(start: int, end: int, memory_mib: int, s: Settings) -> dict:
    labels = _labels(start, end)
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/home/vlmesh/.cache"},
        {"name": "mesh-tls", "mountPath": "/etc/vlmesh/mesh", "readOnly": True},
    ]
    volumes: list[dict] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "mesh-tls", "secret": {"secretName": "vlmesh-mesh-tls", "defaultMode": 0o440}},
    ]
    if s.model_pvc:
        mounts.append({"name": "weights", "mountPath": str(Path(s.model_path).parent), "readOnly": True})
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": s.model_pvc, "readOnly": True}})
    probe = {"grpc": {"port": HEALTH_PORT, "service": ""}}
    container = {
        "name": "stage",
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vlmesh", "serve", "stage"],
        "args": [
            "--layers",
            f"{start}:{end}",
            "--dtype",
            s.dtype,
            "--kv-budget-mb",
            str(s.kv_budget_mb),
            "--threads",
            str(s.threads),
            "--host",
            "0.0.0.0",
            "--port",
            str(STAGE_PORT),
            "--health-port",
            str(HEALTH_PORT),
            "--metrics-port",
            str(METRICS_PORT),
            "--mesh-ca",
            "/etc/vlmesh/mesh/ca.crt",
            "--mesh-cert",
            "/etc/vlmesh/mesh/tls.crt",
            "--mesh-key",
            "/etc/vlmesh/mesh/tls.key",
            "--trace-exporter",
            "otlp",
            "--otlp-endpoint",
            f"http://jaeger.{NAMESPACE}:4317",
            "--log-format",
            "json",
        ],
        "env": [
            {"name": "VLMESH_MODEL", "value": s.model_path},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": f"k8s.pod.name=$(POD_NAME),k8s.namespace.name={NAMESPACE}"},
        ],
        "ports": [
            {"name": "grpc", "containerPort": STAGE_PORT},
            {"name": "health", "containerPort": HEALTH_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": {
            "requests": {"cpu": "1", "memory": f"{memory_mib}Mi"},
            "limits": {"cpu": str(s.threads), "memory": f"{memory_mib}Mi"},
        },
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": s.startup_seconds // 5},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 1},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name(start, end), "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/component": "stage", "vlmesh.io/layers": f"{start}-{end}"}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    # preStop 5 s (DNS and endpoints drop the pod while it still serves) + the drain
                    # (NOT_SERVING, then in-flight calls finish within 5 s) + margin to exit.
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "stage", "vlmesh.io/layers": f"{start}-{end}"}},
                        }
                    ],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _service(start: int, end: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name(start, end), "namespace": NAMESPACE, "labels": _labels(start, end)},
        "spec": {
            "clusterIP": "None",  # headless: DNS answers every ready pod's IP, one replica each
            "selector": {"app.kubernetes.io/component": "stage", "vlmesh.io/layers": f"{start}-{end}"},
            "ports": [{"name": "grpc", "port": STAGE_PORT, "targetPort": "grpc"}],
        },
    }


def _pdb(start: int, end: int) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name(start, end), "namespace": NAMESPACE, "labels": _labels(start, end)},
        "spec": {
            "minAvailable": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/component": "stage", "vlmesh.io/layers": f"{start}-{end}"}},
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &id001 anchors: each object reads on its own
        return True


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=200)


def render(config, s: Settings) -> str:
    """The YAML stream of the stage workloads for the model `config` describes."""
    import torch

    from services.plan import measure, partition

    dtype = None if s.dtype == "auto" else getattr(torch, s.dtype)
    sizes = measure(config, dtype)
    plans = partition(sizes, s.stages)
    ranges = [(p.start, p.end) for p in plans]
    dtype_name = str(sizes.dtype).removeprefix("torch.")
    out = [
        "# Generated by tools/k8s_stages.py from `vlmesh plan` -- edit the script or rerun it, not this file.\n"
        f"# Model: {sizes.model_type}, {sizes.num_layers} decoder layers, {dtype_name}; {s.stages} stages x {s.replicas} replicas;\n"
        f"# --kv-budget-mb {s.kv_budget_mb}, --threads {s.threads}, --model {s.model_path}"
        + (f" (PVC {s.model_pvc})" if s.model_pvc else " (inside the image)")
        + ".\n"
        "# Memory per stage pod (request = limit): its weights (vlmesh plan) + the KV budget + 800 MiB for\n"
        "# torch/transformers/gRPC/Python, rounded up to 64 MiB. CPU: request 1, limit = --threads.\n",
        "---\n",
        _dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "vlmesh-stages", "namespace": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "vlmesh"}},
                # The coordinator's --stages: one dns:/// name per layer range; every ready pod behind
                # it is a replica. After changing the ranges: kubectl -n vlmesh rollout restart deployment/coordinator
                "data": {"stages": stages_address(ranges)},
            }
        ),
    ]
    for p in plans:
        memory = stage_memory_mib(p.weight_bytes, s.kv_budget_mb)
        out.append(
            f"---\n# layers {p.start}:{p.end}: weights {p.weight_bytes / MIB:.2f} MiB + KV budget {s.kv_budget_mb} MiB"
            f" + process {TORCH_MIB} MiB -> {memory} MiB\n"
        )
        out.append(_dump(_deployment(p.start, p.end, memory, s)))
        out += ["---\n", _dump(_service(p.start, p.end)), "---\n", _dump(_pdb(p.start, p.end))]
    return "".join(out)


# --- the checked-in outputs ------------------------------------------------------------------------


def _shipped_config():
    from services.common.checkpoint import load_config

    return load_config(ROOT / "services" / "assets" / "shapes-qwen2-vl")


def qwen2_vl_2b_config():
    """Qwen/Qwen2-VL-2B-Instruct's dimensions (bench/make_2b.py's), for sizing the real-checkpoint overlay."""
    sys.path.insert(0, str(ROOT / "bench"))
    from make_2b import _build_config

    tiny = json.loads((ROOT / "services" / "assets" / "shapes-qwen2-vl" / "config.json").read_text())
    return _build_config(tiny, "bfloat16")


REAL_CHECKPOINT = Settings(
    stages=4,
    dtype="bfloat16",
    kv_budget_mb=1024,  # the 2B at bfloat16 holds 1 KiB of KV per token per layer: ~115k tokens on a 9-layer stage
    threads=4,
    model_path="/models/Qwen2-VL-2B-Instruct",
    model_pvc="vlmesh-weights",
    startup_seconds=900,
)
TARGETS = {
    "k8s/stages.yaml": (_shipped_config, Settings()),
    "k8s/overlays/real-checkpoint/stages.yaml": (qwen2_vl_2b_config, REAL_CHECKPOINT),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--check", action="store_true", help="compare the checked-in files with what this renders")
    parser.add_argument("--model", type=Path, help="checkpoint directory (only config.json is read)")
    parser.add_argument("--out", type=Path, help="file to write (default: stdout)")
    d = Settings()
    parser.add_argument("--stages", type=int, default=d.stages)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=d.dtype)
    parser.add_argument("--kv-budget-mb", type=int, default=d.kv_budget_mb)
    parser.add_argument("--replicas", type=int, default=d.replicas)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--image", default=d.image)
    parser.add_argument("--model-path", default=d.model_path, help="the checkpoint's path inside the pod")
    parser.add_argument("--model-pvc", default=d.model_pvc, help="PersistentVolumeClaim holding it (mounted at the path's parent)")
    parser.add_argument("--startup-seconds", type=int, default=d.startup_seconds)
    args = parser.parse_args(argv)
    if args.model:
        from services.common.checkpoint import load_config

        s = Settings(
            args.stages, args.dtype, args.kv_budget_mb, args.replicas, args.threads, args.image, args.model_path, args.model_pvc, args.startup_seconds
        )
        try:
            text = render(load_config(args.model), s)
        except (ValueError, FileNotFoundError) as e:  # too many stages, no config.json: one line, as `vlmesh plan` says it
            print(f"k8s_stages: error: {e}", file=sys.stderr)
            return 2
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    stale = []
    for rel, (config, settings) in TARGETS.items():
        text, path = render(config(), settings), ROOT / rel
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}", file=sys.stderr)
    if stale:
        print(f"out of date (run python tools/k8s_stages.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
