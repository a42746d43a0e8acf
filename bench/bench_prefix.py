"""Benchmark: a stateless client's conversation (each turn resends the whole of it, as OpenAI's API
does) with automatic prefix caching on and off.

    python bench/bench_prefix.py --model 2b --dtype bfloat16 [--turns 6] [--tokens 16]

Turn 1 asks about a 448x448 picture; each later turn adds the answer and a new question. Per turn:
time to first token at the client and the cached tokens the coordinator reports. Caching on: the
stages keep the previous turn's KV (the finished request is parked) and only the new tokens are
fed. Off: the coordinator restarted with --prefix-cache-sessions 0 feeds the whole history.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mesh import RESULTS, SMOKE_HELP, log, make_image, prepare_model, stream_times  # noqa: E402

QUESTIONS = [
    "What is in this picture?",
    "What colours do you see?",
    "Is there anything round in it?",
    "Describe the left half.",
    "And the right half?",
    "Summarise the picture in one sentence.",
    "What would you change in it?",
    "Thank you. Anything else?",
]


def conversation(client, image: Path, turns: int, tokens: int) -> list[dict]:
    history: list[dict] = []
    out = []
    for t in range(turns):
        content = [{"type": "image", "image": str(image)}, {"type": "text", "text": QUESTIONS[t]}] if t == 0 else QUESTIONS[t]
        history.append({"role": "user", "content": content})
        t0 = time.perf_counter()
        times, _, text, last = stream_times(client, history, tokens)
        usage = last.usage
        out.append({"turn": t + 1, "ttft_s": times[0] - t0, "cached_tokens": usage.cached_tokens, "prompt_tokens": usage.prompt_tokens})
        history.append({"role": "assistant", "content": text})
        log(f"turn {t + 1}: TTFT {out[-1]['ttft_s']:.2f} s, cached {usage.cached_tokens}, fed {usage.prompt_tokens}")
    return out


def main(argv: list[str] | None = None) -> int:
    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, split_layers
    from vlmesh import Client

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.turns, args.tokens = "tiny", 2, 4
    args.model_dir = args.model if Path(args.model).is_dir() else None
    model_dir = prepare_model(args)
    layers = open_checkpoint(model_dir).text_config.num_hidden_layers
    mesh = LocalMesh(str(model_dir), split_layers(layers, 2), log_dir=str(RESULTS / "logs-prefix"))
    log("starting vision + 2 stages + coordinator")
    mesh.start(timeout=1800)
    report: dict = {"model": str(model_dir), "dtype": args.dtype}
    try:
        with Client(mesh.address, timeout=3600) as client:
            warm = make_image(3)
            conversation(client, warm, 2, 2)  # warm-up (another picture: turn 1 below is a cache miss)
            report["on"] = conversation(client, make_image(11), args.turns, args.tokens)
        mesh.respawn("coordinator", ["--prefix-cache-sessions", "0"])
        with Client(mesh.address, timeout=3600) as client:
            report["off"] = conversation(client, make_image(12), args.turns, args.tokens)
    finally:
        mesh.stop()
    out = RESULTS / f"prefix-{Path(model_dir).name}.json"
    out.write_text(json.dumps(report, indent=2))
    print("| turn | TTFT s, caching on | cached tokens | TTFT s, caching off | fed tokens without caching |\n|---|---|---|---|---|")
    for a, b in zip(report["on"], report["off"]):
        print(f"| {a['turn']} | {a['ttft_s']:.2f} | {a['cached_tokens']} | {b['ttft_s']:.2f} | {b['prompt_tokens']} |")
    on = report["on"]
    if len(on) >= 6:
        print(f"\nturn 6 / turn 2 TTFT with caching: {on[5]['ttft_s'] / on[1]['ttft_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
