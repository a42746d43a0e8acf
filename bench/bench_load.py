"""Benchmark: the mesh under load against transformers' batched generate() in the same run.

    python bench/bench_load.py --model 2b --dtype bfloat16 --stages 1,2 --concurrency 1,2,4,8,16,32
    python bench/bench_load.py --model 2b --dtype bfloat16 --stages 2 --threads 1 --no-hf   # pipelining
    python bench/bench_load.py --model 2b --dtype bfloat16 --stages 2 --part prefill --chunks 128,256,512,1024
    python bench/bench_load.py --model tiny --stages 2 --concurrency 1,4,16,32,64 --part sweep,hop

Not a test: a markdown table on stdout, progress on stderr, JSON in bench/results/.

Parts:
- sweep: for each concurrency c, c requests at once (distinct text prompts, --tokens generated each,
  the first coming from the prefill). transformers: one generate() over the c prompts, left-padded
  (its static batch). Mesh: c concurrent Generate streams through the coordinator (continuous
  batching). Aggregate tok/s = all tokens / wall time; TTFT and inter-token latency (ITL)
  percentiles from the client's arrival times. And where the mesh's time went over each
  concurrency (the coordinator's Prometheus series, scraped before and after it): per micro-batch,
  each stage's reported compute, the rest of its round trip (transport, queueing, protobuf), the
  coordinator building the request and running its engine rounds, and each stage's idle share of
  the wall time. Prompt micro-batches count with decode ones.
- prefill: 8 sessions decoding; then one image request (a 448x448 picture) arrives. The running
  sessions' ITL while the newcomer's prompt is fed, against their ITL before it arrived, for each
  --chunks size (the coordinator's --chunk-tokens; a mesh per size).
- hop: the wall time of one stage round trip minus the compute the stage reports, for decode
  steps driven straight at the stages (the coordinator's stage client, as its runner sends them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from bench_mesh import RESULTS, SMOKE_HELP, log, make_image, prepare_model  # noqa: E402

PROMPTS = [
    "Write a long story about a cat and a dog who live in a small house by the river.",
    "Describe a busy street market in the morning, with as much detail as you can.",
    "Tell me everything you know about the colours of the sky at sunset.",
    "List many different animals and say what each of them likes to eat.",
    "Explain, step by step, how to draw a picture of a red house next to a green tree.",
    "Hello! Please keep talking for a while about anything you like.",
    "What would a day on a sailing boat be like? Tell me about the wind and the waves.",
    "Invent a recipe for a soup that uses only green vegetables, and explain each step.",
]


def prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} (request {i})"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------


def hf_batched(model_dir: Path, dtype: str, sizes: list[int], tokens: int, device: str = "cpu") -> dict[int, dict]:
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    log(f"HF: loading {model_dir} ({dtype})")
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    processor.tokenizer.padding_side = "left"
    out = {}
    for c in [1, *sizes]:  # the first: warm-up
        texts = [
            processor.apply_chat_template([{"role": "user", "content": prompt(i)}], add_generation_prompt=True, tokenize=False) for i in range(c)
        ]
        inputs = processor(text=texts, return_tensors="pt", padding=True).to(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        wall = time.perf_counter() - t0
        made = (gen.shape[1] - inputs["input_ids"].shape[1]) * c
        out[c] = {"wall_s": wall, "tokens": made, "tok_s": made / wall}
        log(f"HF batched generate, {c} at once: {made / wall:.2f} tok/s ({wall:.1f} s)")
    del model
    return out


# ----------------------------------------------------------------------------------------------
# the mesh
# ----------------------------------------------------------------------------------------------


async def stream_one(client, text_or_messages, max_tokens: int, t_start: float) -> dict:
    times = []
    n = 0
    async for ev in client.stream_events(text_or_messages, max_tokens=max_tokens):
        if ev.token_ids:
            now = time.perf_counter()
            times += [now] * len(ev.token_ids)
            n += len(ev.token_ids)
    return {"tokens": n, "ttft": times[0] - t_start if times else None, "itl": [b - a for a, b in zip(times, times[1:])], "times": times}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample, sorted labels): value} of the coordinator's GET /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(x.name, tuple(sorted(x.labels.items()))): x.value for f in text_string_to_metric_families(text) for x in f.samples}


def breakdown(before: dict, after: dict, wall_s: float) -> dict:
    """Where the mesh's wall time went between two scrapes: per micro-batch (one Forward per layer
    range: one replica each here), milliseconds."""

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    ranges = sorted(
        (labels for (name, labels) in after if name == "vlmesh:stage_compute_seconds_count"), key=lambda lb: int(dict(lb)["stage"].split(":")[0])
    )
    batches = delta("vlmesh:stage_compute_seconds_count", ranges[0]) if ranges else 0
    if not batches:
        return {}
    stages = {}
    for labels in ranges:
        n = delta("vlmesh:stage_compute_seconds_count", labels) or 1
        compute = delta("vlmesh:stage_compute_seconds_sum", labels)
        stages[dict(labels)["stage"]] = {
            "compute_ms": compute / n * 1e3,
            "transport_queue_ms": delta("vlmesh:stage_hop_overhead_seconds_sum", labels) / n * 1e3,
            "build_ms": delta("vlmesh:stage_request_build_seconds_sum", labels) / n * 1e3,
            "idle": max(0.0, 1 - compute / wall_s),
        }
    return {
        "micro_batches": int(batches),
        "wall_per_batch_ms": wall_s / batches * 1e3,
        "engine_rounds_ms_per_batch": delta("vlmesh:engine_round_seconds_sum") / batches * 1e3,
        "stages": stages,
    }


async def mesh_sweep(address: str, sizes: list[int], tokens: int, metrics_port: int | None = None) -> dict[int, dict]:
    from vlmesh import AsyncClient

    out = {}
    async with AsyncClient(address, timeout=3600) as client:
        await stream_one(client, prompt(999), tokens, time.perf_counter())  # warm-up
        for c in sizes:
            before = scrape(metrics_port) if metrics_port else {}
            t0 = time.perf_counter()
            results = await asyncio.gather(*(stream_one(client, prompt(i), tokens, t0) for i in range(c)))
            wall = max(max(r["times"]) for r in results if r["times"]) - t0
            made = sum(r["tokens"] for r in results)
            ttft = [r["ttft"] for r in results if r["ttft"] is not None]
            itl = [x for r in results for x in r["itl"]]
            out[c] = {
                "wall_s": wall,
                "tokens": made,
                "tok_s": made / wall,
                "ttft_p50": pct(ttft, 50),
                "ttft_p99": pct(ttft, 99),
                "itl_p50": pct(itl, 50),
                "itl_p99": pct(itl, 99),
                "where": breakdown(before, scrape(metrics_port), wall) if metrics_port else {},
            }
            log(f"mesh, {c} at once: {made / wall:.2f} tok/s, TTFT p50 {out[c]['ttft_p50']:.2f} s, ITL p99 {out[c]['itl_p99']:.3f} s")
    return out


async def prefill_itl(address: str, image: Path, running: int = 8, settle_s: float = 15.0) -> dict:
    from vlmesh import AsyncClient

    times: list[list[float]] = [[] for _ in range(running)]

    async def run(i: int, client) -> None:
        async for ev in client.stream_events(prompt(i), max_tokens=2000):
            if ev.token_ids:
                times[i].append(time.perf_counter())

    picture = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "What is in this image?"}]}]
    async with AsyncClient(address, timeout=3600) as client:
        await stream_one(client, prompt(997), 2, time.perf_counter())
        # Encode the picture now: the vision service shares this machine's cores, and its tower
        # pass would otherwise be what slows the running sessions, not the prompt's feeding.
        await stream_one(client, picture, 1, time.perf_counter())
        tasks = [asyncio.create_task(run(i, client)) for i in range(running)]
        await asyncio.sleep(settle_s)
        t_new = time.perf_counter()
        new = await stream_one(client, picture, 1, t_new)
        t_first = t_new + (new["ttft"] or 0)
        await asyncio.sleep(2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    before = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b < t_new and a > t_new - settle_s / 2]
    during = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b > t_new and a < t_first]
    return {
        "newcomer_ttft_s": new["ttft"],
        "itl_before_p50": pct(before, 50),
        "itl_before_p99": pct(before, 99),
        "itl_during_p50": pct(during, 50),
        "itl_during_p99": pct(during, 99),
        "itl_during_max": max(during) if during else None,
    }


async def hop(stage_addresses: list[str], certs: str, num_layers: int, steps: int = 60, warmup: int = 10) -> dict:
    """Wall of one stage round trip minus the stage's compute_us, for decode steps."""
    import torch

    from services.common import tensors
    from services.common.tls import MeshTLS
    from services.coordinator.stage_client import Mesh
    from vlmesh.internal.v1 import stage_pb2

    with open(f"{certs}/ca.crt", "rb") as a, open(f"{certs}/coordinator.crt", "rb") as b, open(f"{certs}/coordinator.key", "rb") as c:
        tls = MeshTLS(a.read(), b.read(), c.read())
    mesh = Mesh(",".join(stage_addresses), tls, num_layers)
    await mesh.connect(60)
    reps = [g.replicas[0] for g in mesh.ranges]
    sid = f"bench-hop-{time.monotonic_ns()}"
    overhead: list[float] = []
    token, pos = 1, 0
    for i in range(warmup + steps + 1):
        ids = [1, 2, 3, 4] if i == 0 else [token]
        positions = torch.arange(pos, pos + len(ids)).expand(3, -1).contiguous()
        hidden = None
        for k, rep in enumerate(reps):
            req = stage_pb2.ForwardRequest()
            s = req.steps.add(session_id=sid, start_position=pos, return_kv_delta=True)
            s.position_ids.CopyFrom(tensors.to_proto(positions))
            if k == 0:
                s.tokens.ids.extend(ids)
            else:
                s.hidden_states.CopyFrom(hidden)
            if k == len(reps) - 1:
                s.sample.params.temperature = 0.0
            t0 = time.perf_counter_ns()
            resp = await rep.forward(req, 60)
            wall_us = (time.perf_counter_ns() - t0) / 1000
            if i > warmup:
                overhead.append(wall_us - resp.compute_us)
            out = resp.outputs[0]
            hidden = out.hidden_states
        token = out.token.token_id
        pos += len(ids)
    await mesh.close()
    return {"steps": steps, "overhead_us_p50": pct(overhead, 50), "overhead_us_mean": statistics.fmean(overhead)}


def start_mesh(
    model_dir: Path,
    stages: int,
    threads: int | None,
    chunk: int | None,
    log_dir: Path,
    pipeline: bool = True,
    device: str = "auto",
    numerics: str = "exact",
):
    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, free_port, split_layers

    layers = open_checkpoint(model_dir).text_config.num_hidden_layers
    env = {"VLMESH_PREFIX_CACHE_SESSIONS": "0", "VLMESH_DEFAULT_MAX_TOKENS": "4096"}
    if chunk:
        env["VLMESH_CHUNK_TOKENS"] = str(chunk)
    extra = ["--threads", str(threads)] if threads else []
    mesh = LocalMesh(
        str(model_dir),
        split_layers(layers, stages),
        env=env,
        log_dir=str(log_dir),
        service_args={"stage": [*extra, "--device", device, "--numerics", numerics], "vision": ["--device", device]},
        pipeline=pipeline,
        metrics_port=free_port(),
    )
    log(f"mesh: starting {stages} stage(s){' with --threads ' + str(threads) if threads else ''}{f', chunk {chunk}' if chunk else ''}")
    mesh.start(timeout=1800)
    return mesh, layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | 2b | a checkpoint directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stages", default="2")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per request, the first from the prefill")
    p.add_argument("--threads", type=int, default=None, help="torch threads per stage process")
    p.add_argument(
        "--device", default="auto", help="where transformers and the mesh's vision and stages compute: auto (a GPU when there is one), cpu, cuda"
    )
    p.add_argument("--part", default="sweep", help="comma list of sweep, prefill, hop")
    p.add_argument("--chunks", default="512", help="--chunk-tokens values for the prefill part")
    p.add_argument("--image-size", type=int, default=896, help="the prefill part's picture (896x896: 1024 image tokens on Qwen2-VL)")
    p.add_argument("--pipeline", default="true", help="the coordinator's --pipeline: true, false, or both (true,false)")
    p.add_argument(
        "--numerics",
        default="exact",
        help="the stages' --numerics: exact (bitwise generate()) or fast (one attention call per layer per micro-batch)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. when only the mesh's settings change)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.stages, args.concurrency, args.tokens, args.part, args.pipeline = "tiny", "2", "1,2", 4, "sweep,hop", "false"
    args.model_dir = args.model if Path(args.model).is_dir() else None
    model_dir = prepare_model(args)
    from services.common.devices import resolve_device

    device = str(resolve_device(args.device))
    sizes = [int(x) for x in args.concurrency.split(",")]
    parts = set(args.part.split(","))
    report: dict = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "device": device,
        "tokens": args.tokens,
        "threads": args.threads,
        "hf": {},
        "mesh": {},
    }
    logs = RESULTS / "logs-load"
    if "sweep" in parts and not args.no_hf:
        report["hf"] = hf_batched(model_dir, args.dtype, sizes, args.tokens, device)
    configs = [
        (s, chunk, pipe)
        for s in [int(x) for x in args.stages.split(",")]
        for chunk in ([int(c) for c in args.chunks.split(",")] if "prefill" in parts else [None])
        for pipe in [x == "true" for x in args.pipeline.split(",")]
    ]
    for s, chunk, pipe in configs:
        mesh, layers = start_mesh(model_dir, s, args.threads, chunk, logs, pipe, device, args.numerics)
        try:
            key = (
                f"{s}"
                + (f"/chunk{chunk}" if chunk else "")
                + ("" if pipe else "/no-pipeline")
                + ("" if args.numerics == "exact" else f"/{args.numerics}")
            )
            entry: dict = {}
            if "sweep" in parts and chunk in (None, 512):
                entry["sweep"] = asyncio.run(mesh_sweep(mesh.address, sizes, args.tokens, mesh.metrics_port))
            if "prefill" in parts:
                entry["prefill"] = asyncio.run(prefill_itl(mesh.address, make_image(7, args.image_size)))
                log(f"prefill under load (chunk {chunk}): {entry['prefill']}")
            if "hop" in parts:
                entry["hop"] = asyncio.run(hop(mesh.stage_addresses, mesh.certs or "", layers))
                log(f"hop overhead: {entry['hop']}")
            report["mesh"][key] = entry
        finally:
            mesh.stop()
    out = Path(args.out) if args.out else RESULTS / f"load-{Path(model_dir).name}-{args.dtype}{'-t' + str(args.threads) if args.threads else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    log(f"wrote {out}")
    return 0


def where_table(sweep: dict) -> list[str]:
    rows = [(c, m["where"]) for c, m in sweep.items() if m.get("where")]
    if not rows:
        return []
    labels = list(rows[0][1]["stages"])
    lines = [
        "\nWhere it went, ms per micro-batch (prompt ones included); per stage: compute / transport + queue / request build (idle share)\n",
        "| in flight | micro-batches | wall per micro-batch | engine rounds | " + " | ".join(f"stage {lb}" for lb in labels) + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    for c, w in rows:
        cells = [
            f"{x['compute_ms']:.1f} / {x['transport_queue_ms']:.2f} / {x['build_ms']:.2f} ({x['idle']:.0%})"
            for x in (w["stages"].get(lb) for lb in labels)
            if x
        ]
        lines.append(
            f"| {c} | {w['micro_batches']} | {w['wall_per_batch_ms']:.1f} | {w['engine_rounds_ms_per_batch']:.2f} | " + " | ".join(cells) + " |"
        )
    return lines


def table(r: dict) -> str:
    lines = []
    for key, entry in r["mesh"].items():
        if "sweep" in entry:
            lines += [
                f"\n{key} stage(s){' --threads ' + str(r['threads']) if r['threads'] else ''}, {r['dtype']} on {r.get('device', 'cpu')}, {r['tokens']} tokens per request\n",
                "| in flight | HF batched tok/s | mesh tok/s | mesh / batched | TTFT p50 / p99 s | ITL p50 / p99 s |",
                "|---|---|---|---|---|---|",
            ]
            for c, m in entry["sweep"].items():
                hf = r["hf"].get(c) or r["hf"].get(str(c))
                ratio = f"{m['tok_s'] / hf['tok_s']:.2f}" if hf else "-"
                lines.append(f"| {c} | {hf['tok_s']:.2f} |" if hf else f"| {c} | - |")
                lines[-1] += f" {m['tok_s']:.2f} | {ratio} | {m['ttft_p50']:.2f} / {m['ttft_p99']:.2f} | {m['itl_p50']:.3f} / {m['itl_p99']:.3f} |"
            lines += where_table(entry["sweep"])
        if "prefill" in entry:
            pf = entry["prefill"]
            lines.append(
                f"\n{key}: newcomer TTFT {pf['newcomer_ttft_s']:.2f} s; running sessions' ITL p99 {pf['itl_before_p99']:.3f} s before, "
                f"{pf['itl_during_p99']:.3f} s while it is prefilled ({pf['itl_during_p99'] / pf['itl_before_p99']:.2f}x)"
            )
        if "hop" in entry:
            lines.append(f"\n{key}: per-hop overhead p50 {entry['hop']['overhead_us_p50']:.0f} µs (mean {entry['hop']['overhead_us_mean']:.0f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
