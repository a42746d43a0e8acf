"""What the coordinator itself costs per micro-batch: the real Engine and Runner (planning, step
messages, spans, applying outcomes, detokenizing), with the stages replaced by in-process
replicas that answer at once (no network, no model). The goal of issue 19: at most 1 ms plus
20 us per session of the coordinator's CPU per micro-batch.

Every range answers what a real stage does: K/V deltas of every layer for every position of the
step, which the coordinator copies into its KV log (--kv-log-mb, the coordinator's own default).
With --kv-log-mb 0 (as `vlmesh coordinator --kv-log-mb 0`) the steps ask for no deltas.

Not a test: a markdown table on stdout (median and spread over --repeats runs), JSON with --out.

    python bench/bench_engine.py                    # 1, 8, 16, 32 sessions, 2 ranges, KV log on
    python bench/bench_engine.py --kv-log-mb 0      # the same without the KV log
    python bench/bench_engine.py --smoke            # seconds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common import tensors  # noqa: E402
from services.common.tracing import setup_tracing  # noqa: E402
from services.coordinator.engine import Engine, EngineConfig  # noqa: E402
from services.coordinator.kv_log import KVLog  # noqa: E402
from services.coordinator.prepare import Prepared  # noqa: E402
from services.coordinator.request import GenerateParams, RequestSpec  # noqa: E402
from services.coordinator.runner import Runner  # noqa: E402
from services.coordinator.scheduler import SchedulerConfig  # noqa: E402
from services.coordinator.stage_client import StageRange  # noqa: E402
from vlmesh.internal.v1 import stage_pb2  # noqa: E402
from vlmesh.v1 import tensor_pb2  # noqa: E402

HIDDEN = 1536  # the 2B model's hidden size: the hidden-state messages are the size they would be
KV_HEADS, HEAD_DIM = 2, 128


class Replica:
    """Answers a Forward at once, with what a real stage would send (hidden states or a token, KV deltas)."""

    def __init__(self, address: str, start: int, end: int, last: bool):
        self.address, self.start, self.end, self.last = address, start, end, last
        self.up = True
        self.info = SimpleNamespace(
            dtype="bfloat16", kv_budget_bytes=1 << 40, lease_seconds=60.0, deepstack_layers=(), layer_start=start, layer_end=end
        )
        self._hidden = {n: tensors.to_proto(torch.zeros(n, HIDDEN, dtype=torch.bfloat16)) for n in (1,)}
        self._kv = {n: tensors.to_proto(torch.zeros(KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16)) for n in (1,)}

    spent = 0.0  # CPU seconds spent here, playing the stages (taken off the coordinator's figure)

    async def forward(self, request: stage_pb2.ForwardRequest, timeout: float) -> stage_pb2.ForwardResponse:
        t0 = time.process_time()
        resp = self._answer(request)
        Replica.spent += time.process_time() - t0
        await asyncio.sleep(0)
        return resp

    def _answer(self, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
        resp = stage_pb2.ForwardResponse(compute_us=1)
        for step in request.steps:
            out = resp.outputs.add(session_id=step.session_id)
            n = len(step.tokens.ids) or step.hidden_states.shape[0]  # the step's positions
            kv = self._kv.get(n) or tensors.to_proto(torch.zeros(KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16))
            for layer in range(self.start, self.end) if step.return_kv_delta else ():
                out.kv_deltas.add(layer=layer, start_position=step.start_position, key=kv, value=kv)
            if self.last:
                if step.HasField("sample"):
                    out.token.token_id = 7
            else:
                out.hidden_states.CopyFrom(self._hidden.get(n) or tensors.to_proto(torch.zeros(n, HIDDEN, dtype=torch.bfloat16)))
        return resp

    async def release(self, session_id: str) -> None:
        pass

    async def renew(self, ids: list[str]) -> list[str]:
        return []


class Mesh:
    def __init__(self, layers: int, ranges: int):
        bounds = [layers * i // ranges for i in range(ranges + 1)]
        self.ranges = [StageRange(a, b) for a, b in zip(bounds, bounds[1:])]
        self.replicas: dict[str, Replica] = {}
        for i, g in enumerate(self.ranges):
            rep = Replica(f"stage{i}", g.start, g.end, i == ranges - 1)
            g.replicas.append(rep)  # type: ignore[arg-type]
            self.replicas[rep.address] = rep

    def subscribe(self, fn) -> None:
        pass

    async def refresh(self, index: int) -> None:
        pass

    def pick(self, index: int, exclude=frozenset(), load=None):
        return self.ranges[index].replicas[0]


class Preparer:
    max_positions = 32768
    deepstack_layers = 0
    prompts = SimpleNamespace(placeholder_ids=set())

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens

    async def prepare(self, spec, s) -> Prepared:
        ids = tuple(range(100, 100 + self.prompt_tokens))
        return Prepared(ids, (), 0, (), torch.arange(len(ids)).expand(3, -1).clone(), 0)

    async def encode(self, inputs, deadline, ctx):
        return []


class Tokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return " a" * len(ids)


async def measure(sessions: int, tokens: int, ranges: int, kv_log_mb: int = 1024) -> dict:
    """Coordinator CPU seconds per decode micro-batch with `sessions` decoding together."""
    mesh = Mesh(28, ranges)
    cfg = EngineConfig(scheduler=SchedulerConfig(max_batch=sessions, chunk_tokens=4096, pipeline_depth=1), prefix_cache_sessions=0)
    runner = Runner(mesh, 30.0, 0.05)  # type: ignore[arg-type]
    tc = SimpleNamespace(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN, num_attention_heads=12)
    engine = Engine(cfg, mesh, Preparer(16), Tokenizer(), set(), KVLog(kv_log_mb << 20), None, runner, tc)  # type: ignore[arg-type]
    engine.start()
    params = GenerateParams(tensor_pb2.SamplingParams(), tokens, (), 0, False)
    now = time.monotonic()
    specs = [RequestSpec(f"r{i}", "", "", ({"role": "user", "content": []},), (), params, None, None, now) for i in range(sessions)]
    Replica.spent = 0.0
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    streams = [engine.add(s) for s in specs]
    for st in streams:
        while await st.items.get() is not None:
            pass
    cpu = time.process_time() - cpu0 - Replica.spent
    wall = time.perf_counter() - wall0
    await engine.stop()
    batches = tokens  # one prompt micro-batch, then tokens - 1 decode micro-batches
    return {"sessions": sessions, "micro_batches": batches, "cpu_ms_per_batch": 1e3 * cpu / batches, "wall_ms_per_batch": 1e3 * wall / batches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,8,16,32", help="sessions decoding together, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each session generates")
    ap.add_argument("--ranges", type=int, default=2, help="layer ranges (stages)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-log-mb", type=int, default=1024, help="the coordinator's KV log budget (its default; 0 = off)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: CI runs this")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sessions, args.tokens, args.repeats = "1,4", 8, 1
    setup_tracing("coordinator")  # spans are recorded as in a served coordinator (exporter "none")
    torch.set_num_threads(1)
    rows = []
    for n in [int(x) for x in args.sessions.split(",")]:
        runs = [asyncio.run(measure(n, args.tokens, args.ranges, args.kv_log_mb)) for _ in range(args.repeats)]
        cpu = [r["cpu_ms_per_batch"] for r in runs]
        goal = 1.0 + 0.02 * n
        rows.append({"sessions": n, "cpu_ms_median": statistics.median(cpu), "cpu_ms_min": min(cpu), "cpu_ms_max": max(cpu), "goal_ms": goal})
        print(f"sessions {n}: {statistics.median(cpu):.2f} ms per micro-batch", file=sys.stderr)
    print(
        f"coordinator CPU per micro-batch, {args.ranges} ranges, {args.tokens} tokens per session, KV log {f'{args.kv_log_mb} MB' if args.kv_log_mb else 'off'},"
        f" {args.repeats} runs ({platform.processor() or platform.machine()})\n"
    )
    print("| sessions | ms per micro-batch (median) | spread | goal (1 ms + 20 us/session) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['sessions']} | {r['cpu_ms_median']:.2f} | {r['cpu_ms_min']:.2f}-{r['cpu_ms_max']:.2f} | {r['goal_ms']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
