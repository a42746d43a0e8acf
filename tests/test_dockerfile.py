"""The Dockerfile, checked without a Docker engine (none runs here or in CI): the final image runs
`vlmesh` as a non-root user, ships the default model where VLMESH_MODEL points, pins the torch that
pyproject.toml pins, and every file it copies exists and is not excluded by .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

from k8sutil import base, vlmesh_workloads

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        continued = line.rstrip().endswith("\\")
        pending += line.rstrip().rstrip("\\").strip() + " "
        if not continued:
            if pending.strip():
                word, _, rest = pending.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def env_of(stage) -> dict[str, str]:
    env = {}
    for k, rest in stage:
        if k == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps if "==" in d)


def test_runs_vlmesh_as_a_non_root_user():
    stage = final_stage()
    users = [rest for k, rest in stage if k == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    pod_users = {w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for w in vlmesh_workloads(base())}
    assert pod_users == {int(uid)}
    (entrypoint,) = [json.loads(rest) for k, rest in stage if k == "ENTRYPOINT"]
    assert entrypoint == ["vlmesh"]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["vlmesh"] == "services.cli:main"
    # and the manifests' command is that entry point
    assert {tuple(w["spec"]["template"]["spec"]["containers"][0]["command"][:1]) for w in vlmesh_workloads(base())} == {("vlmesh",)}


def test_ships_the_default_model_where_the_manifests_point():
    stage = final_stage()
    copies = [rest.split() for k, rest in stage if k == "COPY" and not rest.startswith("--from")]
    (dest,) = [c[-1] for c in copies if c[0] == "services/assets/shapes-qwen2-vl"]
    assert (ROOT / "services/assets/shapes-qwen2-vl/config.json").is_file()
    assert env_of(stage)["VLMESH_MODEL"] == dest
    for w in vlmesh_workloads(base()):
        env = {e["name"]: e.get("value") for e in w["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["VLMESH_MODEL"] == dest, w["metadata"]["name"]


def test_pins_the_torch_of_pyproject_from_the_cpu_index_by_default():
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for k, rest in instructions() if k == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == pins()["torch"]
    assert args["TORCHVISION_VERSION"] == pins()["torchvision"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(rest for k, rest in instructions() if k == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert "pip install ." in runs and "pip install -e" not in runs


def test_everything_copied_exists_and_is_not_ignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for k, rest in instructions():
        if k != "COPY" or rest.startswith("--from"):
            continue
        for src in rest.split()[:-1]:
            assert (ROOT / src).exists(), src
            assert not any(fnmatch.fnmatch(src, pat) or src.startswith(pat.rstrip("/") + "/") for pat in ignored), src
    for must in (".git", ".venv"):
        assert must in ignored
