"""A Qwen2-VL-2B-sized checkpoint with random weights, for speed work (no hub access needed).

    from bench.make_2b import make_random_2b
    path = make_random_2b("bench/results/models/qwen2-vl-2b-random-bfloat16", "bfloat16")

CLI: `python bench/make_2b.py --out DIR --dtype float32|bfloat16 [--force]`

How it is built:
  1. `services.tiny.make_tiny(out, min_pixels=3136, max_pixels=12845056)` writes the tokenizer,
     chat template, image/video processor configs (with the real checkpoint's min/max pixels, so a
     448x448 image is not downscaled: 32x32 patches -> 256 image tokens) and generation_config.json.
     Its tiny config.json and model.safetensors are then replaced.
  2. config.json: the tiny config with the real Qwen/Qwen2-VL-2B-Instruct dimensions (text 1536 hidden,
     28 layers, 12/2 heads, 8960 intermediate, vocab 151936, 32768 positions, rope_theta 1e6,
     mrope_section [16,24,24], tied embeddings; vision depth 32, embed_dim 1280, 16 heads,
     mlp_ratio 4). The special token ids are the tiny tokenizer's (read from the tiny config.json).
  3. Weights: the model is built on the meta device (no memory, no init), materialised with
     `to_empty`, and every parameter is drawn from N(0, 0.02) (norm weights 1, biases 0) -- cheap and
     good enough for timing. As make_tiny does, the (tied) embedding rows of ids the tokenizer does
     not have (len(tokenizer)..151935) and of the vision placeholders are zeroed, so greedy decoding
     only emits tokens the detokenizer knows.
  4. `save_pretrained(out, max_shard_size="2GB")` in the requested dtype, hub key layout (transformers'
     default `save_original_format=True`: `model.layers.*`, `visual.*`, no `lm_head.weight` since tied),
     float32 ~8.9 GB, bfloat16 ~4.4 GB. generation_config.json is the one make_tiny wrote.
  5. A marker file `bench_2b.json` is written last; a directory that has it (same dtype) is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

MIN_PIXELS = 56 * 56  # 3136, as Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json
MAX_PIXELS = 28 * 28 * 16384  # 12845056
INIT_STD = 0.02
MARKER = "bench_2b.json"

TEXT_2B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    max_position_embeddings=32768,
    max_window_layers=28,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    sliding_window=None,
    hidden_act="silu",
)
ROPE_2B = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
VISION_2B = dict(
    depth=32,
    embed_dim=1280,
    num_heads=16,
    mlp_ratio=4,
    hidden_size=1536,
    hidden_act="quick_gelu",
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


def _log(msg: str) -> None:
    print(f"[make_2b {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _dir_bytes(path: Path) -> int:
    total = 0
    for f in path.iterdir():
        try:
            if f.is_file():
                total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _build_config(tiny: dict, dtype: str, text_overrides: dict | None = None, vision_overrides: dict | None = None):
    from transformers import Qwen2VLConfig

    d = json.loads(json.dumps(tiny))  # deep copy
    tc = d["text_config"]
    tc.update(TEXT_2B)
    tc.update(text_overrides or {})
    tc["rope_parameters"] = dict(ROPE_2B)
    tc["layer_types"] = ["full_attention"] * tc["num_hidden_layers"]
    tc["max_window_layers"] = tc["num_hidden_layers"]
    tc["dtype"] = dtype
    vc = d["vision_config"]
    vc.update(VISION_2B)
    vc.update(vision_overrides or {})
    vc["hidden_size"] = tc["hidden_size"]
    vc["dtype"] = dtype
    d["dtype"] = dtype
    d["tie_word_embeddings"] = tc["tie_word_embeddings"]
    d.pop("transformers_version", None)
    d.pop("model_type", None)
    # image/video/vision_start/vision_end ids stay the tiny tokenizer's (they are in `tiny`).
    return Qwen2VLConfig(**d)


def is_complete(out: str | Path, dtype: str) -> bool:
    m = Path(out) / MARKER
    if not m.exists():
        return False
    try:
        return json.loads(m.read_text()).get("dtype") == dtype
    except (OSError, ValueError):
        return False


def _set_pixel_limits(out: Path) -> None:
    """The processors' pixel limits, as the real checkpoint sets them."""
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        p = out / name
        cfg = json.loads(p.read_text())
        cfg.update(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        if isinstance(cfg.get("size"), dict):
            cfg["size"].update(shortest_edge=MIN_PIXELS, longest_edge=MAX_PIXELS)
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _initialise(params: list, norms: set[str], seed: int, total: int) -> None:
    """N(0, INIT_STD) matrices, norm weights 1, biases 0, with progress every 10 s."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    done, last = 0, time.perf_counter()
    with torch.no_grad():
        for name, p in params:
            if name in norms:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() < 2:
                p.zero_()
            else:
                p.normal_(0.0, INIT_STD, generator=gen)
            done += p.numel()
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                _log(f"  init {done / total:6.1%} ({done / 1e9:.2f} / {total / 1e9:.2f} G params)")


def make_random_2b(
    out: str | Path,
    dtype: str = "bfloat16",
    *,
    force: bool = False,
    seed: int = 0,
    max_shard_size: str = "2GB",
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
) -> Path:
    """Write (or reuse) a random-weight Qwen2-VL-2B-sized checkpoint at `out`; return its path.
    `text_overrides` / `vision_overrides` shrink it for quick checks of this function itself."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from services.tiny import _never_generated_ids, make_tiny

    out = Path(out)
    if not force and not text_overrides and not vision_overrides and is_complete(out, dtype):
        _log(f"reusing {out} ({_dir_bytes(out) / 1e9:.2f} GB on disk)")
        return out
    torch_dtype = getattr(torch, dtype)
    began = time.perf_counter()
    if out.exists():
        (out / MARKER).unlink(missing_ok=True)
        for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
    _log(f"step 1/4: tokenizer, processor (min_pixels {MIN_PIXELS}, max_pixels {MAX_PIXELS}) via make_tiny -> {out}")
    make_tiny(out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tiny = json.loads((out / "config.json").read_text())
    generation_config = (out / "generation_config.json").read_bytes()
    _set_pixel_limits(out)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # the tiny weights

    config = _build_config(tiny, dtype, text_overrides, vision_overrides)
    tc, vc = config.text_config, config.vision_config
    _log(
        f"step 2/4: building the model on meta: text {tc.num_hidden_layers} layers x {tc.hidden_size} "
        f"({tc.num_attention_heads}/{tc.num_key_value_heads} heads, ffn {tc.intermediate_size}, vocab {tc.vocab_size}), "
        f"vision depth {vc.depth} x {vc.embed_dim}, {dtype}"
    )
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    emb = model.get_input_embeddings().weight
    if emb.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after materialising")

    norms: set[str] = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm")):
            norms.update(f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False))
    params = [(n, p) for n, p in model.named_parameters()]  # remove_duplicate: the tied head once
    total = sum(p.numel() for _, p in params)
    _log(f"step 3/4: initialising {total:,} parameters (N(0, {INIT_STD}), norms 1, biases 0)")
    _initialise(params, norms, seed, total)
    with torch.no_grad():
        tokenizer = AutoTokenizer.from_pretrained(out)
        zero = torch.tensor(_never_generated_ids(tokenizer, tc.vocab_size), dtype=torch.long)
        emb[zero] = 0  # tied: the output rows too
    # Non-persistent buffers (rotary inv_freq) are garbage after to_empty; they are not saved.
    _log(f"  init done ({len(zero):,} never-generated embedding rows zeroed)")

    expect = total * torch.empty((), dtype=torch_dtype).element_size()
    _log(f"step 4/4: save_pretrained ({expect / 1e9:.2f} GB of {dtype} weights, shards of {max_shard_size})")
    stop = threading.Event()
    base = _dir_bytes(out)

    def progress() -> None:
        while not stop.wait(10):
            _log(f"  written {(_dir_bytes(out) - base) / 1e9:.2f} / {expect / 1e9:.2f} GB")

    t = threading.Thread(target=progress, daemon=True)
    t.start()
    try:
        model.save_pretrained(str(out), max_shard_size=max_shard_size)
    finally:
        stop.set()
        t.join()
    (out / "generation_config.json").write_bytes(generation_config)  # "generation_config stays"
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)
    del model, params, emb
    (out / MARKER).write_text(
        json.dumps(
            {
                "dtype": dtype,
                "parameters": total,
                "init_std": INIT_STD,
                "seed": seed,
                "min_pixels": MIN_PIXELS,
                "max_pixels": MAX_PIXELS,
                "seconds": round(time.perf_counter() - began, 1),
            },
            indent=2,
        )
        + "\n"
    )
    _log(f"wrote {out} ({_dir_bytes(out) / 1e9:.2f} GB on disk) in {time.perf_counter() - began:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--force", action="store_true", help="rewrite even if a complete checkpoint is there")
    args = ap.parse_args(argv)
    make_random_2b(args.out, args.dtype, force=args.force)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
