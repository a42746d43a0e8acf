"""Benchmark: single-process transformers `generate` vs the vlmesh gRPC mesh at 1, 2, 4 stages.

    python bench/bench_mesh.py --model tiny --dtype float32
    python bench/bench_mesh.py --model 2b --dtype bfloat16 [--stages 1,2,4] [--decode-tokens N] [--out PATH]

Not a test: it prints a markdown table to stdout, progress to stderr, and writes JSON
(default bench/results/<model>-<dtype>.json).

What is measured, for HF (Qwen2VLForConditionalGeneration.from_pretrained + generate, greedy) and
for the mesh (services.launcher.LocalMesh: vision + S stage processes + coordinator as real child
processes, queried through vlmesh.Client) at each S:

1. TTFT with one 448x448 image (synthetic PNG) and a short question.
   HF: wall time of [open image + chat template + processor(...) + generate(max_new_tokens=1)].
   Mesh: from calling Client.stream_events(...) to the first streamed event carrying token ids.
   Both run a warm-up request first with a DIFFERENT image; the measured image has never been seen
   by that vision process (its embedding cache is keyed by content hash), so the encoder really runs.
2. Decode tokens/s: N tokens after a text prompt; (N-1) / (time of token N - time of token 1).
   HF: a BaseStreamer records the time of every token put() during one generate(max_new_tokens=N,
   min_new_tokens=N) call. This is cleaner than generate(N) - generate(1): one call, no second
   prefill whose run-to-run noise would land in the difference.
   Mesh: event arrival times at the client (max_tokens=N; the mesh has no min_tokens, so the prompt
   is chosen beforehand with HF greedy as one that does not hit EOS within N tokens; the count
   actually produced is reported).
3. (Per-hop overhead: bench/bench_load.py --part hop.)
4. RSS (psutil): HF = RSS of this process after from_pretrained minus before; mesh = every child
   process (vision, stage i, coordinator) after warm-up.

Order: HF first, then it is freed (del + gc), then each mesh configuration one after the other.
Threads: by default every process keeps torch's default intra-op thread count (= cores);
--threads N sets it in this process (HF) and, through VLMESH_THREADS, in the vision and stage
processes. With S stages + vision on one small machine the processes share the cores, but in the
decode chain only one stage computes at a time.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# gRPC core's fork support (on by default in grpcio's Linux builds) installs pthread_atfork handlers.
# LocalMesh spawns its children with preexec_fn, i.e. a real fork() of this multi-threaded gRPC client
# process; we saw that fork() deadlock in gRPC's prefork handler (main thread in __run_prefork_handlers
# -> cygrpc, a "grpc_shutdown" thread left over from closed channels waiting too) while LocalMesh.start
# spawned the coordinator of the third mesh. This process never needs gRPC to survive a fork (the
# children exec at once), so fork support is switched off here; the mesh processes inherit the
# variable, which changes nothing for them (they never fork).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

# A --smoke run (every bench script has one: a tiny model and a few steps, run by
# tests/test_bench_smoke.py) writes to a throwaway directory, never over real figures.
SMOKE = "--smoke" in sys.argv[1:]
RESULTS = Path(tempfile.mkdtemp(prefix="vlmesh-bench-smoke-")) if SMOKE else ROOT / "bench" / "results"
if SMOKE:
    atexit.register(shutil.rmtree, RESULTS, True)
SMOKE_HELP = "a tiny model and a few steps, to check the script runs (results in a temp dir, not bench/results)"
IMAGE_SIZE = 448
QUESTION = "What is in this image? Describe it briefly."
# Decode prompts, tried in order: the first for which HF greedy does not emit EOS within N tokens
# is used for HF and every mesh configuration (greedy mesh output equals generate's).
DECODE_PROMPTS = (
    "Write a long story about a cat and a dog who live in a small house by the river.",
    "Describe a busy street market in the morning, with as much detail as you can.",
    "Tell me everything you know about the colours of the sky at sunset.",
    "List many different animals and say what each of them likes to eat.",
    "Explain, step by step, how to draw a picture of a red house next to a green tree.",
    "Hello! Please keep talking for a while about anything you like.",
)
HOP_PROMPT = "Count the objects in the picture and tell me about them."

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss


class CpuWatch:
    """CPU used during a measurement by processes OUTSIDE this bench's process tree (other users of
    the machine), in cores on average: system busy time minus this process tree's CPU time."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil

    def _tree_cpu(self) -> float:
        me = self.psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self.psutil.Error:
                pass
        return total

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def __enter__(self) -> CpuWatch:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._tree_cpu()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(1e-9, time.perf_counter() - self.t0)
        busy, own = self._busy() - self.busy0, self._tree_cpu() - self.own0
        self.foreign_cores = max(0.0, busy - own) / wall
        self.own_cores = own / wall


FOREIGN: list[dict] = []  # one entry per measurement: CPU load from outside this bench


QUIET = {"wait_s": 0.0, "threshold": 0.25}  # set from --quiet-wait / --quiet-threshold


def wait_for_quiet(what: str) -> float:
    """Other people share this machine: before a measurement, wait (at most QUIET['wait_s']) until
    processes outside this bench used less than QUIET['threshold'] cores over a 2 s window.
    Returns the seconds waited."""
    if QUIET["wait_s"] <= 0:
        return 0.0
    began = time.perf_counter()
    said = False
    while True:
        w = CpuWatch()
        with w:
            time.sleep(2.0)
        if w.foreign_cores < QUIET["threshold"]:
            return time.perf_counter() - began
        if time.perf_counter() - began > QUIET["wait_s"]:
            log(f"  machine still busy ({w.foreign_cores:.2f} cores used by other processes); measuring '{what}' anyway")
            return time.perf_counter() - began
        if not said:
            log(f"  waiting for the machine to be quiet before '{what}' ({w.foreign_cores:.2f} cores used by other processes)")
            said = True


@contextlib.contextmanager
def watched(what: str):
    waited = wait_for_quiet(what)
    w = CpuWatch()
    with w:
        yield w
    FOREIGN.append(
        {
            "what": what,
            "seconds": round(time.perf_counter() - w.t0, 3),
            "foreign_cores": round(w.foreign_cores, 3),
            "bench_tree_cores": round(w.own_cores, 3),
            "waited_for_quiet_s": round(waited, 1),
        }
    )
    if w.foreign_cores > 0.2:
        log(f"  note: other processes used {w.foreign_cores:.2f} cores on average during '{what}'")


def make_image(seed: int, size: int = IMAGE_SIZE) -> Path:
    """A deterministic synthetic picture (gradient, shapes, noise), different for every seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = RESULTS / "images" / f"synthetic-{size}-{seed}.png"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(80, 200, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randint(0, size - 80, size=2)
        w, h = rng.randint(30, 160, size=2)
        colour = tuple(int(c) for c in rng.randint(0, 256, size=3))
        if rng.rand() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    img.save(out, format="PNG")
    return out


def stats_us(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {
        "n": len(s),
        "mean": statistics.fmean(s),
        "p50": statistics.median(s),
        "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
        "min": s[0],
        "max": s[-1],
    }


def median_or_none(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def image_messages(path: Path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": QUESTION}]}]


def text_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def stream_times(client, messages, max_tokens: int, on_token=None) -> tuple[list[float], list[int], str, object]:
    """(arrival time of each token, the tokens, the text, the last event) of one Generate stream."""
    times: list[float] = []
    tokens: list[int] = []
    text, last = [], None
    for ev in client.stream_events(messages, max_tokens=max_tokens):
        if ev.token_ids:
            now = time.perf_counter()
            times += [now] * len(ev.token_ids)
            tokens += ev.token_ids
            if on_token is not None:
                on_token(len(tokens))
        text.append(ev.text)
        last = ev
    return times, tokens, "".join(text), last


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def prepare_model(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    models = RESULTS / "models"
    models.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        from services.tiny import make_tiny

        out = models / ("tiny-qwen2-vl" if args.dtype == "float32" else f"tiny-qwen2-vl-{args.dtype}")
        if not (out / "config.json").exists() or not list(out.glob("*.safetensors")):
            log(f"creating the tiny checkpoint at {out}")
            if args.dtype == "float32":
                make_tiny(out)  # default args
            else:
                make_tiny(out, dtype=args.dtype)
        else:
            log(f"reusing the tiny checkpoint at {out}")
        return out
    from bench.make_2b import make_random_2b

    out = models / f"qwen2-vl-2b-random-{args.dtype}"
    log(f"2B-sized random checkpoint at {out} (created if missing; takes minutes)")
    return make_random_2b(out, args.dtype)


# --------------------------------------------------------------------------------------------
# HF single process
# --------------------------------------------------------------------------------------------


class TimingStreamer:
    """generate() calls put() once with the prompt, then once per new token (after it is chosen)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        ids = value.reshape(-1).tolist()
        self.times.extend([now] * len(ids))
        self.tokens.extend(ids)

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float | None:
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def bench_hf(args, model_dir: Path, warm_image: Path, images: list[Path]) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    res: dict = {"config": "HF generate (1 process)"}
    torch_dtype = getattr(torch, args.dtype)
    gc.collect()
    rss0 = rss_bytes()
    res["bench_process_before_load"] = {"rss_mb": rss0 / 2**20, "uss_mb": __import__("psutil").Process().memory_full_info().uss / 2**20}
    log(f"HF: loading {model_dir} ({args.dtype}) with from_pretrained")
    t = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch_dtype).to(args.device)
    model.eval()
    res["load_s"] = time.perf_counter() - t
    rss1 = rss_bytes()
    res["rss_before_load_mb"] = rss0 / 2**20
    res["rss_after_load_mb"] = rss1 / 2**20
    res["rss_model_mb"] = (rss1 - rss0) / 2**20
    log(f"HF: loaded in {res['load_s']:.1f} s; RSS +{res['rss_model_mb']:.0f} MB")
    processor = AutoProcessor.from_pretrained(str(model_dir))
    tok = processor.tokenizer

    def ttft(path: Path) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        img = Image.open(path).convert("RGB")
        text = processor.apply_chat_template(image_messages(path), add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[img], return_tensors="pt").to(args.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        dt = time.perf_counter() - t0
        n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert out.shape[1] == inputs["input_ids"].shape[1] + 1
        return dt, int(inputs["input_ids"].shape[1]), n_img

    log(f"HF: TTFT warm-up with {warm_image.name}")
    res["ttft_warmup_s"], _, _ = ttft(warm_image)
    log(f"HF: TTFT warm-up took {res['ttft_warmup_s']:.2f} s")
    # transformers 5 maps the safetensors lazily: right after from_pretrained few weight pages are
    # resident, so the RSS growth is also taken after the warm-up, once every weight was read.
    res["rss_after_warmup_mb"] = rss_bytes() / 2**20
    res["rss_model_warm_mb"] = res["rss_after_warmup_mb"] - rss0 / 2**20
    log(f"HF: RSS after warm-up +{res['rss_model_warm_mb']:.0f} MB over the RSS before loading")
    res["ttft_s_all"] = []
    for p in images:
        log(f"HF: TTFT with unseen image {p.name}")
        with watched(f"HF TTFT {p.name}"):
            dt, plen, nimg = ttft(p)
        res["ttft_s_all"].append(dt)
        res["ttft_prompt_tokens"], res["image_tokens"] = plen, nimg
        log(f"HF: TTFT {dt:.3f} s (prompt {plen} tokens, {nimg} image tokens)")
    res["ttft_s"] = median_or_none(res["ttft_s_all"])

    n = args.decode_tokens
    eos = set(
        model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id]
    )

    def text_inputs(prompt: str):
        text = processor.apply_chat_template(text_messages(prompt), add_generation_prompt=True, tokenize=False)
        return processor(text=[text], return_tensors="pt").to(args.device)

    # Pick a prompt whose unconstrained greedy continuation has no EOS in N tokens (also the
    # decode warm-up): the mesh, which has no min_tokens, then produces exactly N tokens too.
    chosen, chosen_tokens = None, None
    for i, prompt in enumerate(DECODE_PROMPTS):
        log(f"HF: decode prompt check {i + 1}/{len(DECODE_PROMPTS)} (greedy, {n} tokens, EOS allowed)")
        inputs = text_inputs(prompt)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        if len(new) == n and not (set(new) & eos):
            chosen, chosen_tokens = prompt, new
            break
        log(f"HF: prompt {i + 1} hit EOS after {len(new)} tokens; trying the next")
    if chosen is None:
        chosen = DECODE_PROMPTS[0]
        log("HF: every decode prompt hits EOS before N tokens; using the first (mesh counts will be short)")
    res["decode_prompt"] = chosen
    res["decode_prompt_hits_eos"] = chosen_tokens is None
    inputs = text_inputs(chosen)
    res["decode_prompt_tokens"] = int(inputs["input_ids"].shape[1])
    rates, runs = [], []
    for r in range(args.repeats):
        log(f"HF: decode {n} tokens (min_new_tokens={n}), run {r + 1}/{args.repeats}")
        streamer = TimingStreamer()
        with watched(f"HF decode run {r + 1}"), torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        total = time.perf_counter() - t0
        rate = decode_rate(streamer.times)
        rates.append(rate)
        runs.append({"tokens": len(streamer.tokens), "total_s": total, "first_token_s": streamer.times[0] - t0, "tok_s": rate})
        log(f"HF: decode {rate:.2f} tok/s ({len(streamer.tokens)} tokens; first token after {streamer.times[0] - t0:.2f} s)")
    res["decode_runs"] = runs
    res["decode_tok_s"] = median_or_none(rates)
    res["decode_tokens"] = runs[-1]["tokens"]
    res["decode_token_ids"] = streamer.tokens
    res["rss_after_run_mb"] = rss_bytes() / 2**20
    res["threads"] = torch.get_num_threads()
    del tok, inputs
    model = processor = None  # free the weights before the mesh runs (the closures above keep them otherwise)
    gc.collect()
    res["rss_after_free_mb"] = rss_bytes() / 2**20
    log(f"HF: freed (RSS now {res['rss_after_free_mb']:.0f} MB)")
    return res


# --------------------------------------------------------------------------------------------
# mesh
# --------------------------------------------------------------------------------------------


def mesh_ttft(client, path: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    first = None
    usage = None
    for ev in client.stream_events(image_messages(path), max_tokens=1, temperature=0.0):
        if ev.token_ids and first is None:
            first = time.perf_counter() - t0
        if ev.usage is not None:
            usage = ev.usage
    return first, {"prompt_tokens": usage.prompt_tokens if usage else None}


def mesh_decode(client, prompt: str, n: int) -> dict:
    times, tokens = [], []
    usage, finish = None, None
    t0 = time.perf_counter()
    for ev in client.stream_events(text_messages(prompt), max_tokens=n, temperature=0.0):
        now = time.perf_counter()
        for tid in ev.token_ids:
            times.append(now)
            tokens.append(tid)
        if ev.usage is not None:
            usage, finish = ev.usage, ev.finish_reason
    return {
        "tok_s": decode_rate(times),
        "tokens": len(tokens),
        "token_ids": tokens,
        "first_token_s": times[0] - t0 if times else None,
        "total_s": time.perf_counter() - t0,
        "finish_reason": finish,
        "prompt_tokens": usage.prompt_tokens if usage else None,
    }


def bench_mesh(args, model_dir: Path, num_layers: int, stages: int, warm_image: Path, images: list[Path], decode_prompt: str) -> dict:
    import psutil

    from services.launcher import LocalMesh, split_layers
    from vlmesh import Client

    ranges = split_layers(num_layers, stages)
    res: dict = {"config": f"mesh S={stages}", "stages": stages, "ranges": [f"{a}:{b}" for a, b in ranges]}
    log_dir = RESULTS / "logs" / f"{args.tag}-s{stages}"
    env = dict(args.env)
    if args.threads:
        env["VLMESH_THREADS"] = str(args.threads)
    log(f"mesh S={stages}: starting vision + stages {res['ranges']} + coordinator (logs in {log_dir})")
    for attempt in range(1, 4):
        t = time.perf_counter()
        mesh = LocalMesh(str(model_dir), ranges, log_dir=str(log_dir), env=env)
        try:
            mesh.start(timeout=args.start_timeout)
        except Exception as exc:  # noqa: BLE001
            log(f"mesh S={stages}: start failed (attempt {attempt}): {type(exc).__name__}: {exc}")
            res.setdefault("start_failures", []).append(f"{type(exc).__name__}: {exc}")
            if attempt == 3:
                raise
            continue
        # LocalMesh picks ports with bind(0)+close() before the children bind them, and gRPC servers
        # bind with SO_REUSEPORT: two children can end up listening on the same port without an
        # error (seen here: two stages on one port). Check and restart rather than measure nonsense.
        addrs = [mesh.vision_address, *mesh.stage_addresses, mesh.address]
        if len(set(addrs)) != len(addrs):
            log(f"mesh S={stages}: PORT COLLISION among {addrs} (attempt {attempt}); restarting the mesh")
            res.setdefault("port_collisions", []).append(addrs)
            mesh.stop()
            if attempt == 3:
                raise RuntimeError(f"port collision in 3 attempts: {addrs}")
            continue
        break
    res["startup_s"] = time.perf_counter() - t
    procs = {c.name: c.proc for c in mesh.children.values()}
    log(f"mesh S={stages}: up in {res['startup_s']:.1f} s at {mesh.address}")
    try:
        client = Client(mesh.address, timeout=3600)
        log(f"mesh S={stages}: TTFT warm-up with {warm_image.name}")
        res["ttft_warmup_s"], _ = mesh_ttft(client, warm_image)
        log(f"mesh S={stages}: TTFT warm-up took {res['ttft_warmup_s']:.2f} s")
        log(f"mesh S={stages}: decode warm-up (4 tokens)")
        mesh_decode(client, decode_prompt, 4)
        res["rss_mb"] = {name: rss_bytes(p.pid) / 2**20 for name, p in procs.items()}
        res["rss_total_mb"] = sum(res["rss_mb"].values())
        full = {name: psutil.Process(p.pid).memory_full_info() for name, p in procs.items()}
        res["uss_mb"] = {name: m.uss / 2**20 for name, m in full.items()}  # pages private to the process
        res["pss_mb"] = {name: m.pss / 2**20 for name, m in full.items()}  # shared library pages split
        res["pss_total_mb"] = sum(res["pss_mb"].values())
        log(f"mesh S={stages}: RSS after warm-up " + ", ".join(f"{k} {v:.0f} MB" for k, v in res["rss_mb"].items()))
        res["ttft_s_all"] = []
        for p in images:
            log(f"mesh S={stages}: TTFT with unseen image {p.name}")
            with watched(f"mesh S={stages} TTFT {p.name}"):
                dt, info = mesh_ttft(client, p)
            res["ttft_s_all"].append(dt)
            res["ttft_prompt_tokens"] = info["prompt_tokens"]
            log(f"mesh S={stages}: TTFT {dt:.3f} s (prompt {info['prompt_tokens']} tokens)")
        res["ttft_s"] = median_or_none(res["ttft_s_all"])
        runs = []
        for r in range(args.repeats):
            log(f"mesh S={stages}: decode {args.decode_tokens} tokens, run {r + 1}/{args.repeats}")
            with watched(f"mesh S={stages} decode run {r + 1}"):
                d = mesh_decode(client, decode_prompt, args.decode_tokens)
            runs.append(d)
            log(f"mesh S={stages}: decode {d['tok_s'] or float('nan'):.2f} tok/s ({d['tokens']} tokens, finish {d['finish_reason']})")
        res["decode_runs"] = [{k: v for k, v in d.items() if k != "token_ids"} for d in runs]
        res["decode_tok_s"] = median_or_none([d["tok_s"] for d in runs])
        res["decode_tokens"] = runs[-1]["tokens"]
        res["decode_token_ids"] = runs[-1]["token_ids"]
        res["decode_prompt_tokens"] = runs[-1]["prompt_tokens"]
        client.close()

        res["rss_end_mb"] = {name: rss_bytes(p.pid) / 2**20 for name, p in procs.items()}
    finally:
        log(f"mesh S={stages}: stopping")
        mesh.stop()
    return res


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def table(report: dict) -> str:
    hf = report.get("hf") or {}
    rows = [
        "| config | TTFT s | TTFT ratio vs HF | decode tok/s | decode ratio vs HF | RSS MB per process |",
        "|---|---|---|---|---|---|",
    ]
    if hf:
        rows.append(
            f"| {hf['config']} | {fmt(hf['ttft_s'], '.3f')} | 1.00 | {fmt(hf['decode_tok_s'], '.2f')} | 1.00 "
            f"| model +{hf['rss_model_warm_mb']:.0f} after warm-up (+{hf['rss_model_mb']:.0f} right after from_pretrained); "
            f"process {hf['rss_after_warmup_mb']:.0f} |"
        )
    for m in report["mesh"]:
        if "error" in m:
            rows.append(f"| {m['config']} | failed: {m['error']} | | | | |")
            continue
        rss = ", ".join(f"{k.replace('stage', 's').replace('coordinator', 'coord')} {v:.0f}" for k, v in m["rss_mb"].items())
        short = "" if m["decode_tokens"] == report["decode_tokens"] else f" ({m['decode_tokens']} tok)"
        rows.append(
            f"| {m['config']} ({', '.join(m['ranges'])}) | {fmt(m['ttft_s'], '.3f')} | {fmt(m.get('ttft_ratio'), '.2f')} "
            f"| {fmt(m['decode_tok_s'], '.2f')}{short} | {fmt(m.get('decode_ratio'), '.3f')} "
            f"| {rss} (total {m['rss_total_mb']:.0f}) |"
        )
    return "\n".join(rows)


def notes(report: dict) -> str:
    hf = report.get("hf") or {}
    lines = [
        f"model {report['model']} ({report['model_dir']}), {report['dtype']} on {report.get('device', 'cpu')}, {report['machine']['cores']} cores, "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, threads per process: "
        f"{report['threads_note']}",
        f"TTFT: one {IMAGE_SIZE}x{IMAGE_SIZE} image ({hf.get('image_tokens', '?')} image tokens, prompt "
        f"{hf.get('ttft_prompt_tokens', '?')} tokens) + a short question; measured with an image the vision cache had not "
        "seen (the warm-up request used a different image); median of "
        f"{report['repeats']} run(s).",
        f"decode: N={report['decode_tokens']} tokens after a {hf.get('decode_prompt_tokens', '?')}-token text prompt, "
        "(N-1)/(t_last - t_first); HF timed with a streamer inside one generate call; median of "
        f"{report['repeats']} run(s).",
        "RSS of mesh processes after warm-up. Per-hop overhead: bench/bench_load.py --part hop.",
    ]
    if report.get("foreign_cpu"):
        worst = max(report["foreign_cpu"], key=lambda f: f["foreign_cores"])
        mean = statistics.fmean(f["foreign_cores"] for f in report["foreign_cpu"])
        lines.append(
            f"load from other processes on the machine during the measurements: mean {mean:.2f} cores, worst "
            f"{worst['foreign_cores']:.2f} cores ({worst['what']}); see foreign_cpu in the JSON"
        )
    for m in report["mesh"]:
        if "error" in m:
            continue
        match = "n/a" if not hf else ("yes" if m["decode_token_ids"] == hf.get("decode_token_ids") else "NO")
        lines.append(
            f"{m['config']}: decode tokens equal HF's: {match}; startup {m['startup_s']:.0f} s; PSS total {m['pss_total_mb']:.0f} MB "
            f"(RSS total {m['rss_total_mb']:.0f} MB counts torch's shared library pages once per process)"
        )
    return "\n".join(f"- {x}" for x in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HF generate vs the vlmesh mesh at 1/2/4 stages")
    ap.add_argument("--model", choices=("tiny", "2b"), required="--smoke" not in (sys.argv[1:] if argv is None else argv))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--stages", default="1,2,4", help="comma-separated stage counts")
    ap.add_argument("--decode-tokens", type=int, default=None, help="N (default 128 for tiny, 32 for 2b)")
    ap.add_argument("--repeats", type=int, default=None, help="TTFT/decode runs per config (default 3 tiny, 1 2b)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default)")
    ap.add_argument(
        "--device", default="auto", help="where transformers and the mesh's vision and stages compute: auto (a GPU when there is one), cpu, cuda"
    )
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the mesh processes")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help="before each measurement wait up to this many seconds for other processes to go idle (0 = off)",
    )
    ap.add_argument("--quiet-threshold", type=float, default=0.25, help="cores other processes may use and still count as idle")
    ap.add_argument("--model-dir", default=None, help="use this checkpoint directory instead of making one")
    ap.add_argument("--skip-hf", action="store_true", help="no HF baseline (debugging)")
    ap.add_argument("--start-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<model>-<dtype>.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.stages, args.decode_tokens, args.repeats, args.quiet_wait = "tiny", "1,2", 8, 1, 0.0
    if args.decode_tokens is None:
        args.decode_tokens = 128 if args.model == "tiny" else 32
    if args.repeats is None:
        args.repeats = 3 if args.model == "tiny" else 1
    args.env = dict(kv.split("=", 1) for kv in args.env)
    from services.common.devices import resolve_device

    args.device = str(resolve_device(args.device))
    args.env.setdefault("VLMESH_DEVICE", args.device)  # the vision and stage services' --device
    QUIET.update(wait_s=args.quiet_wait, threshold=args.quiet_threshold)
    stage_counts = [int(s) for s in args.stages.split(",") if s.strip()]
    out = Path(args.out) if args.out else RESULTS / f"{args.model}-{args.dtype}.json"
    args.tag = out.stem

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args)
    from services.common.checkpoint import open_checkpoint

    num_layers = open_checkpoint(model_dir).text_config.num_hidden_layers
    stage_counts = [s for s in stage_counts if s <= num_layers]
    warm_image = make_image(0)
    images = [make_image(100 + i) for i in range(args.repeats)]

    report: dict = {
        "model": args.model,
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "num_layers": num_layers,
        "stages": stage_counts,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else " ".join(argv),
        "cwd": os.getcwd(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {
            "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "mem_total_gb": __import__("psutil").virtual_memory().total / 1e9,
        },
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})",
        "threads": args.threads or torch.get_num_threads(),
        "threads_note": f"{args.threads} (--threads)" if args.threads else f"torch default ({torch.get_num_threads()})",
        "mesh_env": args.env,
        "quiet_gate": dict(QUIET),
        "grpc_enable_fork_support": os.environ.get("GRPC_ENABLE_FORK_SUPPORT"),
        "images": {"warmup": str(warm_image), "measured": [str(p) for p in images]},
        "hf": None,
        "mesh": [],
    }

    def save() -> None:
        report["foreign_cpu"] = FOREIGN
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    decode_prompt = DECODE_PROMPTS[0]
    if not args.skip_hf:
        report["hf"] = bench_hf(args, model_dir, warm_image, images)
        decode_prompt = report["hf"]["decode_prompt"]
        save()
    report["decode_prompt"] = decode_prompt
    hf = report["hf"] or {}
    for s in stage_counts:
        try:
            m = bench_mesh(args, model_dir, num_layers, s, warm_image, images, decode_prompt)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next configuration
            log(f"mesh S={s}: FAILED: {type(exc).__name__}: {exc}")
            m = {"config": f"mesh S={s}", "stages": s, "error": f"{type(exc).__name__}: {exc}"}
        if hf and "error" not in m:
            m["decode_ratio"] = m["decode_tok_s"] / hf["decode_tok_s"] if m["decode_tok_s"] and hf["decode_tok_s"] else None
            m["ttft_ratio"] = m["ttft_s"] / hf["ttft_s"] if m["ttft_s"] and hf["ttft_s"] else None
        report["mesh"].append(m)
        save()
        gc.collect()

    report["foreign_cpu"] = FOREIGN
    report["table_markdown"] = table(report)
    report["notes"] = notes(report)
    save()
    print(f"## vlmesh benchmark: {args.model} {args.dtype}\n")
    print(report["table_markdown"])
    print()
    print(report["notes"])
    print(f"\nJSON: {out}")
    log(f"done; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
