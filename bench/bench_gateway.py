"""Benchmark: what the OpenAI-compatible gateway adds on top of the gRPC client, on one mesh.

    python bench/bench_gateway.py                       # tiny random-weight model, 2 stages
    python bench/bench_gateway.py --model DIR [--requests N] [--stream-tokens T] [--out PATH]

Not a test: it prints a markdown table to stdout, progress to stderr, and writes JSON (default
bench/results/gateway-<model>.json).

One mesh (services.launcher.LocalMesh with its gateway: vision + stages + coordinator + gateway as
real child processes). The same requests go through both ways, alternating request by request so
that both see the same machine load:

- gRPC: `vlmesh.Client` straight to the coordinator.
- HTTP: `POST /v1/chat/completions` to the gateway with the standard library's http.client on one
  kept-alive connection (the SDK's own cost is not the gateway's), which then calls the
  coordinator through `vlmesh.AsyncClient`.

1. Per request: a one-shot request with a 64x64 PNG (a data URL both ways) and a question,
   max_tokens=1, not streamed: wall time from the call to the whole answer. Added latency =
   HTTP - gRPC, median and mean over --requests pairs.
2. Per streamed token: a text prompt the model answers at length, max_tokens=T, streamed. Time per
   token = (arrival of the finish - arrival of the first token) / (tokens - 1), per stream, with
   the first token's time (TTFT) beside it. Added latency per token = HTTP - gRPC.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import http.client
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # see bench_mesh.py: LocalMesh forks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

sys.path.insert(0, str(ROOT / "bench"))

from bench_mesh import RESULTS, SMOKE_HELP  # noqa: E402

QUESTION = "What is in this image?"
STREAM_PROMPT = "Tell me about shapes and colours."


def log(msg: str) -> None:
    print(f"[bench_gateway] {msg}", file=sys.stderr, flush=True)


def png_data_url(seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Http:
    """One kept-alive connection to the gateway."""

    def __init__(self, url: str, model: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=300)
        self.model = model

    def _post(self, body: dict[str, Any]) -> http.client.HTTPResponse:
        data = json.dumps({"model": self.model, **body}).encode()
        self.conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"gateway answered {resp.status}: {resp.read()[:300]!r}")
        return resp

    def request(self, messages: list[dict[str, Any]], max_tokens: int) -> float:
        start = time.perf_counter()
        json.loads(self._post({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).read())
        return time.perf_counter() - start

    def stream(self, messages: list[dict[str, Any]], max_tokens: int) -> tuple[float, float, int]:
        """(TTFT, seconds per token after the first, tokens)."""
        start = time.perf_counter()
        resp = self._post(
            {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        first = finish = 0.0
        tokens = 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and not first:
                    first = now
                if choice["finish_reason"]:
                    finish = now
        return first - start, (finish - first) / max(tokens - 1, 1), tokens


def grpc_request(client: Any, messages: list[dict[str, Any]], max_tokens: int) -> float:
    start = time.perf_counter()
    client.chat(messages, max_tokens=max_tokens)
    return time.perf_counter() - start


def grpc_stream(client: Any, messages: list[dict[str, Any]], max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = finish = 0.0
    tokens = 0
    for event in client.stream_events(messages, max_tokens=max_tokens):
        now = time.perf_counter()
        if event.text and not first:
            first = now
        if event.finish_reason:
            finish = now
            tokens = event.usage.completion_tokens if event.usage else 0
    return first - start, (finish - first) / max(tokens - 1, 1), tokens


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the gateway's added latency against the gRPC client")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random-weight Qwen2-VL, made here)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--requests", type=int, default=20, help="request pairs (gRPC, HTTP) for the per-request figure")
    ap.add_argument("--streams", type=int, default=5, help="stream pairs for the per-token figure")
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gateway-<model>.json)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.requests, args.streams, args.stream_tokens, args.warmup = None, 2, 1, 8, 1

    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, split_layers

    tmp = tempfile.mkdtemp(prefix="bench-gateway-")
    if args.model is None:
        from services.tiny import make_tiny

        log(f"making a tiny random-weight checkpoint in {tmp}")
        model = str(make_tiny(Path(tmp) / "tiny"))
    else:
        model = args.model
    layers = open_checkpoint(model).text_config.num_hidden_layers
    log(f"starting vision + {args.stages} stages + coordinator + gateway for {model} (logs in {tmp})")
    mesh = LocalMesh(model, split_layers(layers, args.stages), log_dir=tmp, openai_port=0).start()
    try:
        from vlmesh import Client

        model_id = Path(model).name
        image = png_data_url()
        picture = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}],
            }
        ]
        talk = [{"role": "user", "content": STREAM_PROMPT}]
        with Client(mesh.address, timeout=300) as client:
            gateway = Http(mesh.openai_url, model_id)
            log(f"warm-up ({args.warmup} of each)")
            for _ in range(args.warmup):
                grpc_request(client, picture, 1)
                gateway.request(picture, 1)
                grpc_stream(client, talk, 8)
                gateway.stream(talk, 8)

            per_request: dict[str, list[float]] = {"grpc": [], "http": []}
            for i in range(args.requests):
                per_request["grpc"].append(grpc_request(client, picture, 1))
                per_request["http"].append(gateway.request(picture, 1))
                if (i + 1) % 5 == 0:
                    log(f"requests: {i + 1}/{args.requests}")

            streams: dict[str, list[tuple[float, float, int]]] = {"grpc": [], "http": []}
            for i in range(args.streams):
                streams["grpc"].append(grpc_stream(client, talk, args.stream_tokens))
                streams["http"].append(gateway.stream(talk, args.stream_tokens))
                log(f"streams: {i + 1}/{args.streams}")
    finally:
        mesh.stop()

    req = {k: summary(v) for k, v in per_request.items()}
    ttft = {k: summary([s[0] for s in v]) for k, v in streams.items()}
    per_token = {k: summary([s[1] for s in v]) for k, v in streams.items()}
    tokens = {k: sorted({s[2] for s in v}) for k, v in streams.items()}
    result = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": model,
        "stages": args.stages,
        "requests": args.requests,
        "streams": args.streams,
        "stream_tokens": tokens,
        "per_request_s": req,
        "stream_ttft_s": ttft,
        "per_token_s": per_token,
        "added": {
            "per_request_ms_median": 1e3 * (req["http"]["median"] - req["grpc"]["median"]),
            "per_request_ms_mean": 1e3 * (req["http"]["mean"] - req["grpc"]["mean"]),
            "ttft_ms_median": 1e3 * (ttft["http"]["median"] - ttft["grpc"]["median"]),
            "per_token_ms_median": 1e3 * (per_token["http"]["median"] - per_token["grpc"]["median"]),
            "per_token_ms_mean": 1e3 * (per_token["http"]["mean"] - per_token["grpc"]["mean"]),
        },
    }
    out = Path(args.out) if args.out else RESULTS / f"gateway-{Path(model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    def ms(x: float) -> str:
        return f"{1e3 * x:.2f}"

    print("| measure (ms) | gRPC client median / mean | gateway (HTTP) median / mean | added median / mean | HTTP / gRPC (median) |")
    print("|---|---|---|---|---|")
    for name, table in (("request (image, 1 token)", req), ("stream TTFT", ttft), ("per streamed token", per_token)):
        g, h = table["grpc"], table["http"]
        print(
            f"| {name} | {ms(g['median'])} / {ms(g['mean'])} | {ms(h['median'])} / {ms(h['mean'])} | "
            f"{ms(h['median'] - g['median'])} / {ms(h['mean'] - g['mean'])} | {h['median'] / g['median']:.3f} |"
        )
    print(f"\n{args.requests} request pairs, {args.streams} stream pairs of {tokens['http']} tokens; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
