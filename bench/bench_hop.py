"""Benchmark: what one hop costs, without any model. Echo servers in their own processes stand in
for stages; a client plays the coordinator and sends decode-sized steps (one ForwardRequest with a
[1, hidden] bfloat16 hidden state) over one long-lived bidirectional stream, as the mesh does.

    python bench/bench_hop.py [--hidden 1536] [--steps 2000]

Compared, round trip p50/mean in µs:
- the server: grpc.aio vs the thread-pool (sync) server;
- the channel: plaintext vs mutual TLS (the mesh's default inside);
- the topology for 2 stages: relayed (client -> s0 -> client -> s1 -> client, the coordinator sees
  every hop) vs chained (client -> s0 -> s1 -> client, half the client hops).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

METHOD = "/bench.Echo/Forward"


def _ident(b: bytes) -> bytes:
    return b


def serve(kind: str, port: int, certs: str, next_hop: str) -> None:
    """An echo server: returns each message; with next_hop, forwards it there first (the chain)."""
    import grpc
    import grpc.aio

    from services.common.channels import mesh_channel
    from services.common.server import grpc_options
    from services.common.tls import MeshTLS

    tls = None
    if certs:
        d = certs
        tls = MeshTLS(Path(f"{d}/ca.crt").read_bytes(), Path(f"{d}/stage.crt").read_bytes(), Path(f"{d}/stage.key").read_bytes())
    creds = tls.server_credentials() if tls else None
    if kind == "sync":
        from concurrent import futures

        def forward(it, ctx):
            yield from it

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Forward": grpc.stream_stream_rpc_method_handler(forward, request_deserializer=_ident, response_serializer=_ident)}
        )
        server = grpc.server(futures.ThreadPoolExecutor(8), options=grpc_options(64 << 20))
        server.add_generic_rpc_handlers((handler,))
        (server.add_secure_port(f"127.0.0.1:{port}", creds) if creds else server.add_insecure_port(f"127.0.0.1:{port}"))
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        nxt = None
        if next_hop:
            ch = mesh_channel(next_hop, tls)
            nxt = ch.stream_stream(METHOD, request_serializer=_ident, response_deserializer=_ident)()

        async def forward(it, ctx):
            async for m in it:
                if nxt is not None:
                    await nxt.write(m)
                    m = await nxt.read()
                yield m

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Forward": grpc.stream_stream_rpc_method_handler(forward, request_deserializer=_ident, response_serializer=_ident)}
        )
        server = grpc.aio.server(options=grpc_options(64 << 20))
        server.add_generic_rpc_handlers((handler,))
        (server.add_secure_port(f"127.0.0.1:{port}", creds) if creds else server.add_insecure_port(f"127.0.0.1:{port}"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def payload(hidden: int) -> bytes:
    import torch

    from services.common import tensors
    from vlmesh.internal.v1 import stage_pb2

    req = stage_pb2.ForwardRequest()
    s = req.steps.add(session_id="bench-session-0123456789abcdef", start_position=123, return_kv_delta=True)
    s.position_ids.CopyFrom(tensors.to_proto(torch.full((3, 1), 123, dtype=torch.long)))
    s.hidden_states.CopyFrom(tensors.to_proto(torch.randn(1, hidden).to(torch.bfloat16)))
    return req.SerializeToString()


async def measure(addresses: list[str], certs: str, msg: bytes, steps: int) -> dict:
    from services.common.channels import mesh_channel
    from services.common.tls import MeshTLS
    from vlmesh.internal.v1 import stage_pb2

    tls = None
    if certs:
        d = certs
        tls = MeshTLS(Path(f"{d}/ca.crt").read_bytes(), Path(f"{d}/coordinator.crt").read_bytes(), Path(f"{d}/coordinator.key").read_bytes())
    calls = []
    for a in addresses:
        ch = mesh_channel(a, tls)
        calls.append(ch.stream_stream(METHOD, request_serializer=_ident, response_deserializer=_ident)())
    times = []
    for i in range(steps + 100):
        t0 = time.perf_counter_ns()
        m = msg
        for c in calls:  # relayed: parse and rebuild at every hop, as the runner does
            req = stage_pb2.ForwardRequest.FromString(m)
            await c.write(req.SerializeToString())
            m = await c.read()
        if i >= 100:
            times.append((time.perf_counter_ns() - t0) / 1000)
    for c in calls:
        c.cancel()
    times.sort()
    return {"p50_us": times[len(times) // 2], "mean_us": statistics.fmean(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--serve", nargs=4, metavar=("KIND", "PORT", "CERTS", "NEXT"), help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="a small payload and a few steps, to check the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.steps = 64, 20
    if args.serve:
        kind, port, certs, nxt = args.serve
        serve(kind, int(port), "" if certs == "-" else certs, "" if nxt == "-" else nxt)
        return 0
    from services.common.certs import make_certs
    from services.launcher import free_port

    certs = tempfile.mkdtemp(prefix="bench-hop-")
    make_certs(certs)
    msg = payload(args.hidden)
    rows = []
    procs: list[subprocess.Popen] = []

    def start(kind: str, tls: bool, nxt: str = "-") -> str:
        port = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, str(port), certs if tls else "-", nxt], env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
        )
        addr = f"127.0.0.1:{port}"
        time.sleep(2.5)  # the child imports torch-free gRPC code only; it listens within this
        return addr

    try:
        for kind in ("aio", "sync"):
            for tls in (False, True):
                one = start(kind, tls)
                r = asyncio.run(measure([one], certs if tls else "", msg, args.steps))
                rows.append((f"1 hop, {kind} server, {'mTLS' if tls else 'plaintext'}", r))
                print(f"{rows[-1][0]}: p50 {r['p50_us']:.0f} µs, mean {r['mean_us']:.0f} µs", file=sys.stderr)
        for tls in (False, True):
            s1 = start("aio", tls)
            s0 = start("aio", tls)
            relayed = asyncio.run(measure([s0, s1], certs if tls else "", msg, args.steps))
            rows.append((f"2 stages relayed, {'mTLS' if tls else 'plaintext'}", relayed))
            s1b = start("aio", tls)
            s0b = start("aio", tls, s1b)
            chained = asyncio.run(measure([s0b], certs if tls else "", msg, args.steps))
            rows.append((f"2 stages chained, {'mTLS' if tls else 'plaintext'}", chained))
            for name, r in rows[-2:]:
                print(f"{name}: p50 {r['p50_us']:.0f} µs, mean {r['mean_us']:.0f} µs", file=sys.stderr)
    finally:
        for pr in procs:
            pr.kill()
    print("| path | round trip p50 µs | mean µs |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['p50_us']:.0f} | {r['mean_us']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
