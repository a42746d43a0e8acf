"""The channels the mesh dials each other with (mutual TLS unless --insecure), and the health
poll that waits for a service to serve."""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .tls import MESH_SERVER_NAME, MeshTLS


def channel_options(max_message_bytes: int = 256 << 20, tls: bool = False) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A restarted replica must serve the very next request: retry the connection quickly
        # instead of gRPC's default backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if tls:
        opts.append(("grpc.ssl_target_name_override", MESH_SERVER_NAME))
    return opts


def mesh_channel(address: str, tls: MeshTLS | None, max_message_bytes: int = 256 << 20) -> grpc.aio.Channel:
    """An asyncio channel to another service of the mesh (mutual TLS unless --insecure)."""
    opts = channel_options(max_message_bytes, tls is not None)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=opts)


def sync_mesh_channel(address: str, tls: MeshTLS | None) -> grpc.Channel:
    """The same as a blocking channel (tools, tests, `vlmesh up`)."""
    opts = channel_options(tls=tls is not None)
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, tls.channel_credentials(), options=opts)


def wait_healthy(address: str, timeout: float = 60.0, service: str = "", tls: MeshTLS | None = None) -> None:
    """Poll grpc.health.v1 until SERVING (used by `vlmesh up` and the tests)."""
    deadline = time.monotonic() + timeout
    with sync_mesh_channel(address, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout:.0f}s")
            time.sleep(0.1)
