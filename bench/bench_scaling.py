"""Benchmark: a pipeline that scales. S stage processes, each pinned to cores of its own, against
transformers' batched generate() pinned to the cores of ONE such "machine".

    python bench/bench_scaling.py --model 2b --dtype bfloat16 --stages 1,2 --concurrency 16,32 --tokens 24
    python bench/bench_scaling.py --model tiny --stages 1,2 --cores-per-stage 1
    python bench/bench_scaling.py --smoke

Not a test: a markdown table on stdout (the CPU model and its bf16 / AMX flags above it), progress on
stderr, JSON in bench/results/scaling-<model>-<dtype>.json.

What is measured, for each S in --stages and each c in --concurrency:
- mesh: bench_load.start_mesh's mesh (vision + S stages + coordinator, LocalMesh), each stage with
  --threads K (K = --cores-per-stage) and, once it serves, every thread of stage i pinned to cores
  [i*K, (i+1)*K) with os.sched_setaffinity (per thread id, as `taskset -a -p` does; threads made
  later inherit it). The coordinator, the vision service and this driver float (unpinned). The
  request driver is bench_load.mesh_sweep: c concurrent Generate streams, distinct text prompts,
  --tokens each; aggregate tok/s = all tokens / wall time.
- transformers: bench_load.hf_batched (one left-padded generate() over the c prompts) in a child
  process pinned to K cores (cores [0, K)) with torch.set_num_threads(K): one "machine".
- ratio = mesh tok/s on S*K cores / transformers tok/s on K cores; ideal = S (S machines against one).

Every measurement records the CPU that processes outside this bench used meanwhile (the machine is
shared), and the pinning is checked after each sweep (every stage thread's affinity).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from bench_load import hf_batched, mesh_sweep, start_mesh  # noqa: E402
from bench_mesh import FOREIGN, RESULTS, SMOKE_HELP, log, prepare_model, watched  # noqa: E402

AMX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8")


# ----------------------------------------------------------------------------------------------
# the CPU and its cores
# ----------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    """The CPU model (lscpu's "Model name", /proc/cpuinfo without lscpu) and its bf16 / AMX flags."""
    text = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    model = re.search(r"^Model name:\s*(.+)$", text, re.M)
    flags = re.search(r"^Flags:\s*(.+)$", text, re.M)
    if not (model and flags):
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        model = model or re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        flags = flags or re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return {
        "model": model.group(1).strip() if model else "unknown",
        "cores": sorted(os.sched_getaffinity(0)),
        "avx512_bf16": "avx512_bf16" in have,
        "amx": sorted(f for f in AMX_FLAGS if f in have),
        "flags_known": bool(flags),
    }


def cpu_line(cpu: dict) -> str:
    if not cpu["flags_known"]:
        return f"CPU: {cpu['model']}, {len(cpu['cores'])} cores (flags unknown)"
    amx = ", ".join(cpu["amx"]) if cpu["amx"] else "no"
    return f"CPU: {cpu['model']}, {len(cpu['cores'])} cores; avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}; AMX: {amx}"


def tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pid: int, cores: set[int]) -> int:
    """Every thread of `pid` onto `cores` (threads made afterwards inherit it from their maker).
    Twice over, for threads born while the first pass ran. Returns the thread count."""
    for _ in range(2):
        for tid in tids(pid):
            try:
                os.sched_setaffinity(tid, cores)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that has just exited
    return len(tids(pid))


def affinity_of(pid: int) -> list[int]:
    """The union of the cores every thread of `pid` may run on."""
    allowed: set[int] = set()
    for tid in tids(pid):
        try:
            allowed |= os.sched_getaffinity(tid)
        except OSError:
            pass
    return sorted(allowed)


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


# ----------------------------------------------------------------------------------------------
# transformers on K cores: a child process pinned before it starts
# ----------------------------------------------------------------------------------------------


def hf_worker(args) -> int:
    import torch

    torch.set_num_threads(args.cores_per_stage)
    sizes = [int(x) for x in args.concurrency.split(",")]
    # Watched here, not in the parent: a child that has exited is no longer in the parent's tree.
    with watched(f"HF on {args.cores_per_stage} core(s)"):
        res = hf_batched(Path(args.hf_worker), args.dtype, sizes, args.tokens)
    info = {"affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(), "foreign_load": FOREIGN}
    Path(args.hf_out).write_text(json.dumps({"sweep": res, **info}, indent=2))
    log("HF: done")
    return 0


def hf_pinned(model_dir: Path, args, cores: set[int]) -> dict:
    out = RESULTS / f"hf-scaling-{os.getpid()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(model_dir), "--hf-out", str(out)]
    cmd += ["--dtype", args.dtype, "--concurrency", args.concurrency, "--tokens", str(args.tokens), "--cores-per-stage", str(args.cores_per_stage)]
    log(f"HF: batched generate() in a child pinned to cores {sorted(cores)}, {args.cores_per_stage} torch thread(s)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cores_per_stage)}
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    res = json.loads(out.read_text())
    out.unlink()
    FOREIGN.extend(res.pop("foreign_load"))
    res["sweep"] = {int(c): v for c, v in res["sweep"].items()}
    return res


# ----------------------------------------------------------------------------------------------
# the mesh, S stages pinned
# ----------------------------------------------------------------------------------------------


def mesh_pinned(model_dir: Path, args, s: int, cores: list[int], sizes: list[int]) -> dict:
    k = args.cores_per_stage
    # The CPU explicitly: pinning cores is the point, and transformers' side (hf_batched) is on the CPU.
    mesh, _ = start_mesh(model_dir, s, k, None, RESULTS / "logs-scaling", args.pipeline == "true", device="cpu")
    try:
        stages = [c for c in mesh.children.values() if c.service == "stage"]
        plan = {c.name: set(cores[i * k : (i + 1) * k]) for i, c in enumerate(stages)}
        for c in stages:
            n = pin(c.proc.pid, plan[c.name])
            log(f"mesh: {c.name} (pid {c.proc.pid}, {n} threads) pinned to cores {sorted(plan[c.name])}")
        cpu0 = {c.name: cpu_seconds(c.proc.pid) for c in mesh.children.values() if c.proc is not None}
        t0 = time.perf_counter()
        with watched(f"mesh {s} stage(s)"):
            sweep = asyncio.run(mesh_sweep(mesh.address, sizes, args.tokens))
        wall = time.perf_counter() - t0
        cpu = {name: round((cpu_seconds(c.proc.pid) - cpu0[name]) / wall, 3) for name, c in mesh.children.items() if c.proc is not None}
        pinning = {}
        for c in stages:
            seen = affinity_of(c.proc.pid)
            pinning[c.name] = {
                "cores": sorted(plan[c.name]),
                "threads": len(tids(c.proc.pid)),
                "affinity_after": seen,
                "ok": set(seen) <= plan[c.name],
            }
            if not pinning[c.name]["ok"]:
                log(f"  warning: {c.name}'s threads could run on cores {seen} after the sweep, not only {sorted(plan[c.name])}")
        floating = {c.name: affinity_of(c.proc.pid) for c in mesh.children.values() if c.service != "stage" and c.proc is not None}
        log(f"mesh: cores used on average during the sweep: {cpu}")
        return {"sweep": sweep, "pinning": pinning, "floating_affinity": floating, "cores_used": cpu}
    finally:
        mesh.stop()


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | 2b | a checkpoint directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stages", default="1,2", help="comma list of stage counts S (each needs S * --cores-per-stage cores)")
    p.add_argument("--concurrency", default="16,32", help="comma list of requests in flight at once")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per request, the first from the prefill")
    p.add_argument(
        "--cores-per-stage", type=int, default=1, help="cores of one 'machine' (a stage, and the transformers baseline), one torch thread each"
    )
    p.add_argument("--pipeline", default="true", help="the coordinator's --pipeline (true: micro-batches in flight on every stage at once)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)  # internal: the pinned transformers child
    p.add_argument("--hf-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        return hf_worker(args)
    if args.smoke:
        args.model, args.stages, args.concurrency, args.tokens = "tiny", "1,2", "2", 4
    args.model_dir = args.model if Path(args.model).is_dir() else None
    cpu = cpu_info()
    log(cpu_line(cpu))
    k = args.cores_per_stage
    stage_counts = []
    for s in [int(x) for x in args.stages.split(",")]:
        if s * k > len(cpu["cores"]):
            log(f"skipping {s} stage(s): {s} x {k} cores wanted, {len(cpu['cores'])} available")
        else:
            stage_counts.append(s)
    if not stage_counts:
        log("no stage count fits these cores")
        return 2
    model_dir = prepare_model(args)
    sizes = [int(x) for x in args.concurrency.split(",")]
    name = Path(args.model).name if args.model_dir else args.model
    report: dict = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "cores_per_stage": k,
        "pipeline": args.pipeline == "true",
        "cpu": cpu,
        "hf": {},
        "mesh": {},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if not args.no_hf:
        report["hf"] = hf_pinned(model_dir, args, set(cpu["cores"][:k]))
    for s in stage_counts:
        report["mesh"][s] = mesh_pinned(model_dir, args, s, cpu["cores"], sizes)
    report["foreign_load"] = FOREIGN
    out = Path(args.out) if args.out else RESULTS / f"scaling-{name}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    log(f"wrote {out}")
    return 0


def table(r: dict) -> str:
    k = r["cores_per_stage"]
    per = f"{k} core" + ("s" if k > 1 else "")
    lines = [
        cpu_line(r["cpu"]),
        "",
        f"{Path(r['model']).name}, {r['dtype']}, {r['tokens']} tokens per request, {per} and {k} torch thread(s) per stage"
        f" (pipeline {'on' if r['pipeline'] else 'off'}); coordinator and vision unpinned",
        "",
        f"| stages | in flight | mesh tok/s | transformers tok/s on {per} | ratio | ideal |",
        "|---|---|---|---|---|---|",
    ]
    hf = r["hf"].get("sweep", {}) if r["hf"] else {}
    for s, entry in r["mesh"].items():
        for c, m in entry["sweep"].items():
            base = hf.get(c)
            ratio = f"{m['tok_s'] / base['tok_s']:.2f}" if base else "-"
            lines.append(
                f"| {s} | {c} | {m['tok_s']:.2f} | {base['tok_s']:.2f} | {ratio} | {s} |"
                if base
                else f"| {s} | {c} | {m['tok_s']:.2f} | - | - | {s} |"
            )
    busy = [f for f in r.get("foreign_load", []) if f["foreign_cores"] > 0.2]
    if busy:
        lines += [
            "",
            "Other processes used " + "; ".join(f"{f['foreign_cores']:.2f} cores during {f['what']}" for f in busy) + " (figures disturbed).",
        ]
    bad = [f"{s} stage(s): {n}" for s, e in r["mesh"].items() for n, pin in e["pinning"].items() if not pin["ok"]]
    if bad:
        lines += ["", "Pinning did not hold for " + ", ".join(bad) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
