"""`vlmesh status`: the running mesh as its coordinator sees it, one line per service replica.

vlmesh status [--coordinator 127.0.0.1:50051] [--api-key KEY] [--tls --ca-cert FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import coordinator_pb2_grpc as pb_grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", "--coordinator", dest="coordinator", default="127.0.0.1:50051", help="coordinator address")
    p.add_argument("--api-key", default=os.environ.get("VLMESH_API_KEY", ""), help="API key [env VLMESH_API_KEY]")
    p.add_argument("--tls", action="store_true", help="the coordinator's port speaks TLS")
    p.add_argument("--ca-cert", help="CA certificate to check the coordinator's (with --tls)")
    p.add_argument("--json", action="store_true", help="print the raw GetMeshStatus response as JSON")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(s: pb.GetMeshStatusResponse) -> str:
    state = {pb.REPLICA_STATE_UP: "up", pb.REPLICA_STATE_DOWN: "DOWN"}
    rows = [("service", "address", "layers", "health", "KV used/budget MiB", "sessions (pinned)", "dtype")]
    for r in s.stages:
        quant = f" {r.quantization}" if r.quantization not in ("", "none") else ""
        layers = f"{r.layers.start}:{r.layers.end}" if r.HasField("layers") else "?"
        rows.append(
            (
                "stage",
                r.address,
                layers,
                state.get(r.state, "?"),
                f"{_mib(r.kv_used_bytes)}/{_mib(r.kv_budget_bytes)}",
                f"{r.num_sessions} ({r.pinned_sessions})",
                r.dtype + quant,
            )
        )
    for v in s.vision:
        cache = f"cache {v.cache_entries} entries, {_mib(v.cache_bytes)} MiB, {v.cache_hits} hits / {v.cache_misses} misses"
        rows.append(("vision", v.address, "", state.get(v.state, "?"), cache, "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(
        f"model {s.model_type}: {s.num_sessions} sessions, {s.requests_running} requests running, {s.requests_waiting} waiting; "
        f"KV log {_mib(s.kv_log_bytes)}/{_mib(s.kv_log_budget_bytes)} MiB"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.tls:
        ca = open(args.ca_cert, "rb").read() if args.ca_cert else None
        channel = grpc.secure_channel(args.coordinator, grpc.ssl_channel_credentials(root_certificates=ca))
    else:
        channel = grpc.insecure_channel(args.coordinator)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    try:
        with channel:
            status = pb_grpc.CoordinatorServiceStub(channel).GetMeshStatus(pb.GetMeshStatusRequest(), timeout=10, metadata=metadata)
    except grpc.RpcError as err:
        print(f"vlmesh status: {args.coordinator}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(status, always_print_fields_with_no_presence=True), indent=2))
    else:
        print(table(status))
    return 0
