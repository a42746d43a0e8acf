"""Benchmark: what failures cost. A 2-stage mesh with 2 replicas per layer range.

    python bench/bench_failover.py --model 2b --dtype bfloat16 [--kills 5] [--tokens 48]

1. Recovery after kill -9: a greedy generation streams; at token 8 the replica holding its
   session is killed (found with GetMeshStatus); recovery = from the kill to the next token at the
   client (the coordinator restores the session's KV on the other replica from its KV log and
   continues the step). The killed replica is restarted before the next round. The completion is
   checked against the undisturbed one.
2. The KV log's cost: decode tok/s with the log on and off, measured turn about (on, off, on,
   ...) through two coordinators over the same stages, the second started with --kv-log-mb 0, so
   that the machine's drift over the run falls on both alike.
3. Coordinator memory per 1k tokens of session state: RSS before and after sessions holding N
   tokens in all (KV log on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mesh import RESULTS, SMOKE_HELP, log, prepare_model, stream_times  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a cat and a dog who live in a small house by the river."}]


def main(argv: list[str] | None = None) -> int:
    import psutil

    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, split_layers
    from vlmesh import Client
    from vlmesh.v1 import coordinator_pb2 as cpb
    from vlmesh.v1 import coordinator_pb2_grpc as cgrpc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--state-tokens", type=int, default=4000, help="session tokens held for the memory measurement")
    p.add_argument("--rate-rounds", type=int, default=5, help="decode-rate runs with the KV log on, and as many off")
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.kills, args.tokens, args.state_tokens, args.rate_rounds = "tiny", 1, 16, 200, 1
    args.model_dir = args.model if Path(args.model).is_dir() else None
    model_dir = prepare_model(args)
    layers = open_checkpoint(model_dir).text_config.num_hidden_layers
    mesh = LocalMesh(
        str(model_dir),
        split_layers(layers, 2),
        replicas=2,
        log_dir=str(RESULTS / "logs-failover"),
        env={"VLMESH_PREFIX_CACHE_SESSIONS": "0", "VLMESH_HEALTH_INTERVAL": "0.5", "VLMESH_DEFAULT_MAX_TOKENS": "8192"},
    )
    log("starting vision + 2 ranges x 2 replicas + coordinator")
    mesh.start(timeout=1800)
    report: dict = {"model": str(model_dir), "dtype": args.dtype}
    try:
        import grpc

        ch = grpc.insecure_channel(mesh.address)
        status = cgrpc.CoordinatorServiceStub(ch)
        with Client(mesh.address, timeout=3600) as client:
            times, expected, _, _ = stream_times(client, PROMPT, args.tokens)
            log(f"undisturbed: {len(expected)} tokens")
            recoveries, equal = [], []
            for k in range(args.kills):
                killed: dict = {}

                def strike(n: int) -> None:
                    if n == 8 and not killed:
                        holding = [r for r in status.GetMeshStatus(cpb.GetMeshStatusRequest(), timeout=10).stages if r.pinned_sessions > 0]
                        name = mesh.child_at(holding[k % len(holding)].address).name
                        killed.update(name=name, at=time.perf_counter())
                        mesh.kill(name)

                times, got, _, _ = stream_times(client, PROMPT, args.tokens, strike)
                after = [t for t in times if t > killed["at"]]
                recoveries.append(after[0] - killed["at"])
                equal.append(got == expected)
                log(f"kill {k + 1}: {killed['name']} at token 8; next token {recoveries[-1] * 1000:.0f} ms later; equal: {equal[-1]}")
                mesh.respawn(killed["name"])
            report["recovery_s"] = recoveries
            report["recovery_p50_s"] = statistics.median(recoveries)
            report["recovery_max_s"] = max(recoveries)
            report["completions_equal"] = sum(equal)
            itl = [b - a for a, b in zip(times, times[1:])]
            report["itl_p50_s"] = statistics.median(itl)

            def decode_rate(c: Client) -> float:
                ts, _, _, _ = stream_times(c, PROMPT, args.tokens)
                return (len(ts) - 1) / (ts[-1] - ts[0])

            log("starting a second coordinator with --kv-log-mb 0 over the same stages")
            without_log = mesh.spawn_copy("coordinator", "coordinator-nolog", ["--kv-log-mb", "0"])
            on, off = [], []
            with Client(without_log, timeout=3600) as client_off:
                for r in range(args.rate_rounds):
                    on.append(decode_rate(client))
                    off.append(decode_rate(client_off))
                    log(f"decode round {r + 1}/{args.rate_rounds}: KV log on {on[-1]:.3f} tok/s, off {off[-1]:.3f} tok/s")
            mesh.kill("coordinator-nolog")
            report["decode_tok_s_kv_log_on_runs"] = on
            report["decode_tok_s_kv_log_off_runs"] = off
            report["decode_tok_s_kv_log_on"] = statistics.median(on)
            report["decode_tok_s_kv_log_off"] = statistics.median(off)
            report["kv_log_cost"] = 1 - report["decode_tok_s_kv_log_on"] / report["decode_tok_s_kv_log_off"]
            log(f"decode tok/s: KV log on {report['decode_tok_s_kv_log_on']:.3f}, off {report['decode_tok_s_kv_log_off']:.3f}")
            coord = psutil.Process(mesh.children["coordinator"].proc.pid)
            before = coord.memory_info().rss
            held = 0
            sids = []
            while held < args.state_tokens:
                sid = client.create_session()
                sids.append(sid)
                r = client.session(sid).chat([{"role": "user", "content": "Tell me everything about rivers. " * 60}], max_tokens=8)
                held += r.usage.prompt_tokens + r.usage.completion_tokens
            grown = coord.memory_info().rss - before
            log_bytes = status.GetMeshStatus(cpb.GetMeshStatusRequest(), timeout=10).kv_log_bytes
            report["coordinator_mb_per_1k_tokens"] = grown / 2**20 / (held / 1000)
            report["kv_log_mb_per_1k_tokens"] = log_bytes / 2**20 / (held / 1000)
            report["state_tokens"] = held
            log(f"coordinator: +{grown / 2**20:.0f} MiB for {held} tokens of session state (KV log entries: {log_bytes / 2**20:.0f} MiB)")
    finally:
        mesh.stop()
    out = RESULTS / f"failover-{Path(model_dir).name}.json"
    out.write_text(json.dumps(report, indent=2))
    print(
        f"| recovery after kill -9, p50 / max | completions equal | ITL p50 | decode tok/s KV log on / off | coordinator MiB per 1k tokens (KV log entries) |\n"
        f"|---|---|---|---|---|\n"
        f"| {report['recovery_p50_s'] * 1000:.0f} / {report['recovery_max_s'] * 1000:.0f} ms | {report['completions_equal']}/{args.kills} "
        f"| {report['itl_p50_s'] * 1000:.0f} ms | {report['decode_tok_s_kv_log_on']:.2f} / {report['decode_tok_s_kv_log_off']:.2f} "
        f"({report['kv_log_cost']:+.1%}) | {report['coordinator_mb_per_1k_tokens']:.1f} ({report['kv_log_mb_per_1k_tokens']:.1f}) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
