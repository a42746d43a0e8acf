"""Benchmark: `n` continuations of one prompt (GenerateRequest.n, one prefill forked on the stages)
against the same `n` sent as separate requests at once (each prefills), on one mesh.

    python bench/bench_choices.py --model 2b --dtype bfloat16 --n 4 --tokens 16
    python bench/bench_choices.py --smoke

Not a test: a markdown table on stdout, progress on stderr, JSON in bench/results/. The prompt is
a picture question (448x448 picture: 256 image tokens), sampled (temperature 1, seeds s .. s+n-1),
so both arms generate the same tokens; the prefix cache is off, so the separate requests prefill
each. Reported: wall time of the whole call, time to every continuation's first token, and the
prompt positions the stages ran (usage.prompt_tokens summed over what ran).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_load import start_mesh  # noqa: E402
from bench_mesh import RESULTS, SMOKE_HELP, log, make_image, prepare_model  # noqa: E402


def _messages(image: bytes):
    from vlmesh.v1 import coordinator_pb2 as pb

    return [pb.Message(role=pb.ROLE_USER, content=[pb.Content(image=image), pb.Content(text="What is in this image? Describe it.")])]


async def _call(stub, request) -> tuple[float, dict[int, float], int, list[list[int]]]:
    """(wall s, first-token s per continuation, prompt positions run, tokens per continuation)."""
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    tokens: dict[int, list[int]] = {}
    prompt = 0
    async for r in stub.Generate(request, timeout=1800):
        if r.token_ids and r.index not in first:
            first[r.index] = time.perf_counter() - t0
        tokens.setdefault(r.index, []).extend(r.token_ids)
        if r.finish_reason:
            prompt = max(prompt, r.usage.prompt_tokens)
    return time.perf_counter() - t0, first, prompt, [tokens[i] for i in sorted(tokens)]


async def measure(address: str, image: bytes, n: int, tokens: int, seed: int, repeats: int) -> dict:
    import grpc

    from vlmesh.v1 import coordinator_pb2 as pb
    from vlmesh.v1 import coordinator_pb2_grpc as pb_grpc
    from vlmesh.v1 import tensor_pb2

    def request(count: int, s: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(messages=_messages(image), sampling=tensor_pb2.SamplingParams(temperature=1.0, seed=s), max_tokens=tokens, n=count)

    out: dict = {"forked": [], "separate": []}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        await _call(stub, request(1, seed))  # warm-up
        for rep in range(repeats):
            wall, first, prompt, forked_tokens = await _call(stub, request(n, seed))
            out["forked"].append({"wall_s": wall, "ttft_s": max(first.values()), "prompt_positions": prompt})
            t0 = time.perf_counter()
            alone = await asyncio.gather(*(_call(stub, request(1, seed + i)) for i in range(n)))
            wall_sep = time.perf_counter() - t0
            out["separate"].append({"wall_s": wall_sep, "ttft_s": max(a[1][0] for a in alone), "prompt_positions": sum(a[2] for a in alone)})
            same = [a[3][0] for a in alone] == forked_tokens
            log(f"repeat {rep + 1}: forked {wall:.2f} s, separate {wall_sep:.2f} s, same tokens: {same}")
            out.setdefault("same_tokens", []).append(same)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | 2b | a checkpoint directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16, help="tokens per continuation")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.n, args.tokens, args.repeats = "tiny", 2, 3, 1
    args.model_dir = args.model if Path(args.model).is_dir() else None
    model_dir = prepare_model(args)
    image = make_image(0).read_bytes()
    logs = RESULTS / "logs-choices"
    mesh, _ = start_mesh(model_dir, args.stages, None, None, logs)
    try:
        res = asyncio.run(measure(mesh.address, image, args.n, args.tokens, args.seed, args.repeats))
    finally:
        mesh.stop()
    rows = []
    for arm in ("forked", "separate"):
        runs = res[arm]
        rows.append(
            (
                arm,
                statistics.median(r["wall_s"] for r in runs),
                statistics.median(r["ttft_s"] for r in runs),
                statistics.median(r["prompt_positions"] for r in runs),
            )
        )
    print(f"\n{Path(model_dir).name}, {args.stages} stage(s), n = {args.n}, {args.tokens} tokens each, median of {args.repeats}\n")
    print("| arm | wall s | last first token s | prompt positions run |\n|---|---|---|---|")
    for arm, wall, ttft, prompt in rows:
        label = f"one request, n = {args.n}" if arm == "forked" else f"{args.n} requests at once"
        print(f"| {label} | {wall:.2f} | {ttft:.2f} | {prompt:.0f} |")
    print(f"\nsame tokens in both arms: {all(res['same_tokens'])}")
    out = Path(args.out) if args.out else RESULTS / f"choices-{Path(model_dir).name}.json"
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "model_dir"}, **res}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
