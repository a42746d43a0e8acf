"""Benchmark of the int8 W8A8 stages (issue 15). Not a test: tables to stdout, progress to stderr,
JSON to bench/results/int8-<part>.json.

    python bench/bench_int8.py --part kernels     # which int8 matmul, on the 2B layer shapes (a minute)
    python bench/bench_int8.py --part accuracy    # shapes task: float32 vs int8 meshes, 500 held-out (minutes)
    python bench/bench_int8.py --part speed       # 2B: vlmesh quantize; HF bf16 vs bf16 / int8 meshes at 1, 2 stages

kernels: one linear of each Qwen2-VL-2B shape (q/o 1536->1536, k/v 1536->256, gate/up 1536->8960,
down 8960->1536) for M = 1 (decode) and 64..512 (prefill) tokens, bfloat16 in and out: the
bfloat16 F.linear; services.stage.quant.Int8Linear (per-token int8 activations, torch._int_mm on
the stored [out, in] int8 weight's transposed view) and the same with a [in, out] contiguous copy;
and torchao's Int8DynamicActivationInt8WeightConfig when torchao is installed. The fastest of 7
groups of calls; the whole quantize-matmul-rescale path is timed, not the matmul alone.

accuracy: the shipped shapes model and its `vlmesh quantize` W8A8 version; held-out questions
through transformers (float32, the reference) and through real 2-stage meshes: int8 (SmoothQuant),
int8 without SmoothQuant (the float checkpoint with --quantize int8, quantized at load), mixed
(int8 stage 0, float32 stage 1); accuracy per type and answers identical to float32's.

speed: bench/make_2b.py's random Qwen2-VL-2B-sized checkpoint in bfloat16; `vlmesh quantize` on it
(wall time and peak RSS of the process); then as bench/bench_mesh.py measures (its helpers):
single-process transformers bfloat16 (TTFT, decode), then at each stage count a bfloat16 mesh and
an int8 mesh (the quantized checkpoint): TTFT with an unseen 448x448 image, decode tok/s after a
text prompt, each stage's weight bytes (GetInfo) and RSS/USS after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # as bench_mesh.py: LocalMesh forks this gRPC client process

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

from bench import bench_mesh as bm  # noqa: E402 - after sys.path

RESULTS = bm.RESULTS
SHAPES_2B = {"q_proj/o_proj": (1536, 1536), "k_proj/v_proj": (1536, 256), "gate_proj/up_proj": (1536, 8960), "down_proj": (8960, 1536)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}
TOKENS = (1, 64, 256, 512)


# --- kernels -------------------------------------------------------------------------------------


def _time(fn, budget_s: float = 0.5) -> float:
    """Seconds per call: warm up, then about `budget_s` of calls in 7 groups; the fastest group
    (on a shared machine the others measure the neighbours as much as the kernel)."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    reps = max(1, int(budget_s / 7 / one))
    groups = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        groups.append((time.perf_counter() - t) / reps)
    return min(groups)


def bench_kernels() -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from services.stage import quant

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        quantize_ = None
        bm.log("kernels: torchao is not installed; its row stays empty (pip install torchao to measure it)")
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, (k, n) in SHAPES_2B.items():
            w = torch.randn(n, k) * 0.02
            lin = nn.Linear(k, n, bias=False)
            lin.weight.data = w.clone()
            int8 = quant.Int8Linear.from_float(lin)
            wq_kn = int8.weight.t().contiguous()
            wb = w.bfloat16()
            ao = None
            if quantize_ is not None:
                ao = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                ao.weight.data = wb.clone()
                quantize_(ao, Int8DynamicActivationInt8WeightConfig())

            def contiguous_kn(x: torch.Tensor) -> torch.Tensor:
                xq, s = quant.quantize_tokens(x)
                return (torch._int_mm(xq, wq_kn).float() * s * int8.weight_scale.view(1, -1)).to(x.dtype)

            for m in TOKENS:
                x = torch.randn(m, k).bfloat16()
                with bm.watched(f"kernels {name} M={m}"):
                    row = {
                        "linear": name,
                        "in": k,
                        "out": n,
                        "tokens": m,
                        "bf16_ms": _time(lambda: F.linear(x, wb)) * 1e3,
                        "int8_int_mm_ms": _time(lambda: int8(x)) * 1e3,
                        "int8_int_mm_kn_copy_ms": _time(lambda: contiguous_kn(x)) * 1e3,
                        "torchao_ms": _time(lambda: ao(x)) * 1e3 if ao is not None else None,
                    }
                rows.append(row)
                bm.log(f"kernels {name:18} M={m:4}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms") and v))
    return {"rows": rows, "torch_threads": torch.get_num_threads()}


def kernels_table(res: dict) -> str:
    keys = [
        ("bf16_ms", "bf16 F.linear"),
        ("int8_int_mm_ms", "Int8Linear (_int_mm, [out,in].t())"),
        ("int8_int_mm_kn_copy_ms", "_int_mm, [in,out] copy"),
        ("torchao_ms", "torchao int8 dyn"),
    ]
    lines = [
        "| linear (in→out) | tokens | " + " | ".join(label for _, label in keys) + " | Int8Linear vs bf16 |",
        "|---|---|" + "---|" * len(keys) + "---|",
    ]
    for r in res["rows"]:
        cells = [bm.fmt(r[k], ".3f") for k, _ in keys]
        speedup = r["bf16_ms"] / r["int8_int_mm_ms"]
        lines.append(f"| {r['linear']} ({r['in']}→{r['out']}) | {r['tokens']} | " + " | ".join(cells) + f" | {speedup:.2f}× |")
    lines.append("")
    lines.append("| one decoder layer (7 linears), ms | tokens | " + " | ".join(label for _, label in keys) + " |")
    lines.append("|---|---|" + "---|" * len(keys))
    for m in TOKENS:
        sums = []
        for k, _ in keys:
            vals = [r[k] * PER_LAYER[r["linear"]] for r in res["rows"] if r["tokens"] == m]
            sums.append(bm.fmt(sum(vals) if all(v is not None for v in vals) else None, ".2f"))
        lines.append(f"| | {m} | " + " | ".join(sums) + " |")
    return "\n".join(lines)


# --- accuracy ------------------------------------------------------------------------------------


def bench_accuracy(count: int) -> dict:
    from services.launcher import LocalMesh, split_layers
    from services.quantize import quantize
    from services.shapes import SHIPPED_MODEL, data
    from services.shapes.eval import EVAL_SEED, evaluate_mesh, evaluate_transformers

    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    quantized = work / "shapes-w8a8"
    bm.log(f"accuracy: vlmesh quantize {SHIPPED_MODEL} -> {quantized}")
    record = quantize(SHIPPED_MODEL, quantized)
    examples = data.examples(EVAL_SEED, count)
    bm.log(f"accuracy: {count} held-out questions through transformers float32")
    results = {"transformers float32": evaluate_transformers(SHIPPED_MODEL, examples)}
    ranges = split_layers(4, 2)
    configs = [
        ("2-stage mesh float32", SHIPPED_MODEL, []),
        ("2-stage mesh int8 (SmoothQuant, vlmesh quantize)", quantized, []),
        ("2-stage mesh int8 without SmoothQuant (--quantize int8 at load)", SHIPPED_MODEL, ["int8", "int8"]),
        ("2-stage mesh mixed: int8 stage 0, float32 stage 1", quantized, ["auto", "none"]),
    ]
    for name, model, modes in configs:
        bm.log(f"accuracy: {name}")
        with LocalMesh(str(model), ranges, quantize=modes, log_dir=str(work / "logs" / name.split(" (")[0].replace(" ", "-"))) as mesh:
            results[name] = evaluate_mesh(mesh.address, examples)
    ref = results["transformers float32"].answers
    out = {"count": count, "seed": EVAL_SEED, "quantize": record, "rows": []}
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r.answers, ref))
        out["rows"].append({"config": name, **r.summary(), "same_as_float32": same, "mistakes": r.mistakes()[:5]})
    bm.log("accuracy: teacher-forced logits of the int8 models against float32's")
    out["logit_count"] = min(count, 200)
    out["logits"] = logit_agreement(examples[: out["logit_count"]], ref, quantized)
    return out


def _int8_transformers(quantized: Path | None):
    """The shipped model in transformers with its decoder-layer linears replaced by Int8Linear:
    from the `vlmesh quantize` checkpoint (SmoothQuant folded into its norms and rows), or, with
    None, quantized from the float weights without smoothing."""
    from torch import nn
    from transformers import Qwen2VLForConditionalGeneration

    from services.common.checkpoint import canonical_key
    from services.shapes import SHIPPED_MODEL
    from services.stage import quant

    model = Qwen2VLForConditionalGeneration.from_pretrained(SHIPPED_MODEL).eval()
    text = model.model.language_model
    state = {}
    if quantized is not None:
        from safetensors import safe_open

        with safe_open(quantized / "model.safetensors", "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                part, name = canonical_key(key)
                if part == "text":
                    state[name] = f.get_tensor(key)
    for name, lin in quant.targets(text).items():
        if quantized is None:
            new = quant.Int8Linear.from_float(lin)
        else:
            new = quant.Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
            weight, scale = (state.pop(f"{name}.{k}") for k in ("weight", "weight_scale"))
            new.weight, new.weight_scale = nn.Parameter(weight, requires_grad=False), nn.Parameter(scale, requires_grad=False)
            if lin.bias is not None:
                new.bias = nn.Parameter(state.pop(f"{name}.bias"), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(text.get_submodule(parent), attr, new)
    if state:
        text.load_state_dict(state, strict=False)  # the norms with SmoothQuant folded in
    return model


def logit_agreement(examples, answers: list[str], quantized: Path) -> list[dict]:
    """Teacher-forced on the float32 answers: how far each int8 model's next-token distribution is
    from float32's, at every position of the conversation (image, question, answer) and at the
    answer's positions alone (finer than whether greedy answers match)."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from services.shapes import SHIPPED_MODEL

    processor = AutoProcessor.from_pretrained(SHIPPED_MODEL)
    models = {
        "float32": Qwen2VLForConditionalGeneration.from_pretrained(SHIPPED_MODEL).eval(),
        "int8 SmoothQuant": _int8_transformers(quantized),
        "int8 without SmoothQuant": _int8_transformers(None),
    }
    logits: dict[str, list] = {name: [] for name in models}
    answer_rows = []  # [positions] bool: the position predicts an answer token
    for ex, answer in zip(examples, answers):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prompt + answer], images=[ex.scene.render()], return_tensors="pt")
        start = len(processor(text=[prompt], images=[ex.scene.render()])["input_ids"][0]) - 1
        n = inputs["input_ids"].shape[1]
        answer_rows.append((torch.arange(n) >= start) & (torch.arange(n) < n - 1))
        with torch.inference_mode():
            for name, model in models.items():
                logits[name].append(model(**inputs).logits[0].float())
    ref, on_answer = torch.cat(logits["float32"]), torch.cat(answer_rows)
    out = []
    for name in list(models)[1:]:
        full = torch.cat(logits[name])
        for where, rows in (("all positions", slice(None)), ("answer positions", on_answer)):
            got, want = full[rows], ref[rows]
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
            out.append(
                {
                    "model": name,
                    "where": where,
                    "positions": int(want.shape[0]),
                    "mean_kl": float(kl.mean()),
                    "max_kl": float(kl.max()),
                    "logit_rel_error": float((got - want).norm() / want.norm()),
                    "top1_agree": float(agree),
                }
            )
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in out[-1].items() if k not in ("model", "where"))
            bm.log(f"accuracy: logits {name}, {where}: {numbers}")
    return out


def accuracy_table(res: dict) -> str:
    from services.shapes import data

    lines = [
        f"| held-out ({res['count']} questions, seed {res['seed']}) | overall | "
        + " | ".join(data.QUESTION_TYPES)
        + " | answers identical to float32 |",
        "|---|---|" + "---|" * len(data.QUESTION_TYPES) + "---|",
    ]
    for r in res["rows"]:
        # A few questions (--smoke) need not cover every type.
        types = " | ".join(f"{r['by_type'][t]:.0%}" if t in r["by_type"] else "-" for t in data.QUESTION_TYPES)
        lines.append(f"| {r['config']} | {r['accuracy']:.1%} | {types} | {r['same_as_float32']}/{r['count']} |")
    lines += [
        "",
        f"| teacher-forced on float32's answers ({res['logit_count']} questions; transformers, decoder linears swapped "
        "for Int8Linear) | positions | mean KL(float32 ‖ int8) | max KL | logit error ‖Δ‖/‖logits‖ | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["logits"]:
        lines.append(
            f"| {r['model']}, {r['where']} | {r['positions']} | {r['mean_kl']:.2e} | {r['max_kl']:.2e} "
            f"| {r['logit_rel_error']:.4f} | {r['top1_agree']:.2%} |"
        )
    return "\n".join(lines)


# --- speed ---------------------------------------------------------------------------------------


def run_quantize(model_dir: Path, out: Path, samples: int) -> dict:
    """`vlmesh quantize` as a child process: wall time and its peak RSS."""
    cmd = [sys.executable, "-m", "services.cli", "quantize", "--model", str(model_dir), "--out", str(out), "--samples", str(samples)]
    bm.log(f"speed: {' '.join(cmd[2:])}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    with bm.watched("vlmesh quantize 2b"):
        run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if run.returncode:
        raise RuntimeError(f"vlmesh quantize failed: {run.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    record = json.loads((out / "quantize.json").read_text())
    return {
        "wall_s": wall,
        "peak_rss_mb": peak / 1024 if peak > before else None,
        "record": record,
        "bytes_on_disk": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }


def mesh_run(model_dir: Path, label: str, stages: int, warm_image: Path, image: Path, prompt: str, decode_tokens: int, repeats: int) -> dict:
    import psutil

    from services.common.channels import sync_mesh_channel
    from services.launcher import LocalMesh, split_layers
    from vlmesh import Client
    from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

    ranges = split_layers(28, stages)
    res: dict = {"config": f"{label} S={stages}", "ranges": [f"{a}:{b}" for a, b in ranges]}
    log_dir = RESULTS / "logs" / f"int8-{label}-s{stages}"
    bm.log(f"speed: {res['config']}: starting (logs in {log_dir})")
    t = time.perf_counter()
    with LocalMesh(str(model_dir), ranges, log_dir=str(log_dir)) as mesh:
        res["startup_s"] = time.perf_counter() - t
        procs = {c.name: c.proc for c in mesh.children.values()}
        res["stage_info"] = []
        for address in mesh.stage_addresses:
            with sync_mesh_channel(address, mesh.mesh_tls()) as ch:
                info = stage_pb2_grpc.StageServiceStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=30)
            layers = f"{info.layer_start}:{info.layer_end}"
            res["stage_info"].append({"layers": layers, "weight_bytes": info.weight_bytes, "dtype": info.dtype})
        with Client(mesh.address, timeout=3600) as client:
            bm.mesh_ttft(client, warm_image)
            bm.mesh_decode(client, prompt, 4)
            full = {name: psutil.Process(p.pid).memory_full_info() for name, p in procs.items()}
            res["rss_mb"] = {name: m.rss / 2**20 for name, m in full.items()}
            res["uss_mb"] = {name: m.uss / 2**20 for name, m in full.items()}
            with bm.watched(f"{res['config']} TTFT"):
                res["ttft_s"], _ = bm.mesh_ttft(client, image)
            runs = []
            for r in range(repeats):
                with bm.watched(f"{res['config']} decode run {r + 1}"):
                    runs.append(bm.mesh_decode(client, prompt, decode_tokens))
            res["decode_tok_s"] = bm.median_or_none([d["tok_s"] for d in runs])
            res["decode_tokens"] = runs[-1]["tokens"]
            res["decode_token_ids"] = runs[-1]["token_ids"]
    bm.log(
        f"speed: {res['config']}: TTFT {res['ttft_s']:.2f} s, decode {bm.fmt(res['decode_tok_s'], '.2f')} tok/s, stage weights "
        + ", ".join(f"{s['layers']} {s['weight_bytes'] / 2**20:.0f} MiB" for s in res["stage_info"])
    )
    return res


def bench_speed(args) -> dict:
    from bench.make_2b import make_random_2b
    from services import plan

    models = RESULTS / "models"
    bf16 = make_random_2b(models / "qwen2-vl-2b-random-bfloat16", "bfloat16")
    int8 = models / "qwen2-vl-2b-random-bfloat16-w8a8"
    out: dict = {}
    if args.requantize or not (int8 / "quantize.json").exists():
        out["quantize"] = run_quantize(bf16, int8, args.samples)
        q = out["quantize"]
        bm.log(f"speed: quantize took {q['wall_s']:.0f} s, peak RSS {bm.fmt(q['peak_rss_mb'], '.0f')} MB")
    else:
        bm.log(f"speed: reusing {int8} (--requantize to time vlmesh quantize again)")
    sizes = {name: plan.measure(plan.load_config(path)) for name, path in (("bf16", bf16), ("int8", int8))}
    out["decoder_layer_bytes"] = {name: sum(s.layers) for name, s in sizes.items()}
    warm_image, image = bm.make_image(0), bm.make_image(100)
    hf_args = argparse.Namespace(dtype="bfloat16", decode_tokens=args.decode_tokens, repeats=args.repeats)
    out["hf"] = bm.bench_hf(hf_args, bf16, warm_image, [image])
    gc.collect()
    prompt = out["hf"]["decode_prompt"]
    out["mesh"] = []
    for s in args.stages:
        for label, path in (("bf16", bf16), ("int8", int8)):
            out["mesh"].append(mesh_run(path, label, s, warm_image, image, prompt, args.decode_tokens, args.repeats))
    return out


def speed_table(res: dict) -> str:
    hf = res["hf"]
    by = {m["config"]: m for m in res["mesh"]}
    lines = [
        "| config | TTFT s | decode tok/s | decode vs HF bf16 | decode int8/bf16 mesh | stage weights MiB (GetInfo) "
        "| weights int8/bf16 | stage RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.append(
        f"| HF generate bfloat16 (1 process) | {hf['ttft_s']:.2f} | {hf['decode_tok_s']:.2f} | 1.00 | | "
        f"model +{hf['rss_model_warm_mb']:.0f} RSS | | |"
    )
    for m in res["mesh"]:
        other = by.get(m["config"].replace("int8", "bf16"))
        weights = ", ".join(f"{s['weight_bytes'] / 2**20:.0f}" for s in m["stage_info"])
        ratio_w = ratio_d = ""
        if m["config"].startswith("int8") and other:
            ratio_w = ", ".join(f"{a['weight_bytes'] / b['weight_bytes']:.2f}" for a, b in zip(m["stage_info"], other["stage_info"]))
            both = m["decode_tok_s"] and other["decode_tok_s"]
            ratio_d = bm.fmt(m["decode_tok_s"] / other["decode_tok_s"] if both else None, ".2f") + "×"
        rss = ", ".join(f"{v:.0f}" for k, v in m["rss_mb"].items() if k.startswith("stage"))
        vs_hf = bm.fmt(m["decode_tok_s"] / hf["decode_tok_s"] if m["decode_tok_s"] else None, ".2f")
        lines.append(
            f"| mesh {m['config']} ({', '.join(m['ranges'])}) | {m['ttft_s']:.2f} | {bm.fmt(m['decode_tok_s'], '.2f')} "
            f"({m['decode_tokens']} tok) | {vs_hf} | {ratio_d} | {weights} | {ratio_w} | {rss} |"
        )
    layer = res["decoder_layer_bytes"]
    lines.append("")
    lines.append(
        f"decoder layers alone (28, vlmesh plan): bf16 {layer['bf16'] / 2**20:.0f} MiB, int8 {layer['int8'] / 2**20:.0f} MiB "
        f"({layer['int8'] / layer['bf16']:.3f}×); embeddings and the (tied) head stay bfloat16"
    )
    if "quantize" in res:
        q = res["quantize"]
        lines.append(
            f"vlmesh quantize on the 2B (bf16 in, {q['record']['samples']} shapes calibration prompts): "
            f"{q['wall_s']:.0f} s wall (calibration {q['record']['calibration_s']:.0f} s), "
            f"peak RSS {bm.fmt(q['peak_rss_mb'], '.0f')} MB, "
            f"{q['bytes_on_disk'] / 2**30:.2f} GiB written"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", action="append", choices=("kernels", "accuracy", "speed"), help="what to run (repeatable; default all)")
    ap.add_argument("--count", type=int, default=500, help="accuracy: held-out questions")
    ap.add_argument("--stages", default="1,2", help="speed: stage counts")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64, help="speed: calibration prompts for vlmesh quantize on the 2B")
    ap.add_argument("--requantize", action="store_true", help="speed: run vlmesh quantize even if its output exists")
    ap.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to this long for other processes to go idle before each measurement")
    ap.add_argument("--threads", type=int, default=0, help="kernels: torch threads (0 = torch's default)")
    ap.add_argument("--smoke", action="store_true", help=bm.SMOKE_HELP + "; the accuracy part on 2 questions (the others need the 2B)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.part, args.count = ["accuracy"], 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # on a shared machine one thread measures the kernel, not the neighbours
    args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    bm.QUIET.update(wait_s=args.quiet_wait)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for part in args.part or ["kernels", "accuracy", "speed"]:
        if part == "kernels":
            res, table = bench_kernels(), kernels_table
        elif part == "accuracy":
            res, table = bench_accuracy(args.count), accuracy_table
        else:
            res, table = bench_speed(args), speed_table
        res["foreign_cpu"] = list(bm.FOREIGN)
        res["date"] = time.strftime("%Y-%m-%d %H:%M")
        res["table_markdown"] = table(res)
        path = RESULTS / f"int8-{part}.json"
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"## int8 {part}\n\n{res['table_markdown']}\n\nJSON: {path}\n", flush=True)
        bm.FOREIGN.clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
