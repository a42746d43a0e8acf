"""A plaintext port that answers grpc.health.v1 and nothing else.

Kubernetes' native gRPC probes cannot speak TLS, so once a service's port requires the mesh's
client certificate the kubelet can no longer probe it there. The probes go to this port instead
(`--health-port`, 8081 in k8s/): it serves no model call, so leaving it plaintext exposes only
SERVING / NOT_SERVING. The service sets it NOT_SERVING together with its own health when it
drains, so readiness fails at once on SIGTERM."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .ports import PortInUse


@dataclass
class HealthPort:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    services: list[str]  # full gRPC service names answered besides "" (the whole server)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            self.health.set(name, status)

    def stop(self) -> None:
        self.set_serving(False)
        self.server.stop(0)


def start_health_port(host: str, port: int, services: list[str], serving: bool = False) -> HealthPort | None:
    """Serve grpc.health.v1 for `services` on host:port; port 0 = off (None). Starts NOT_SERVING
    unless `serving`: call set_serving(True) when the service is ready, as its own health does."""
    if port == 0:
        return None
    # No SO_REUSEPORT: a port already in use fails here instead of being shared.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortInUse(f"health port {port} on {host} cannot be bound (in use?)")
    server.start()
    hp = HealthPort(server, servicer, bound, list(services))
    hp.set_serving(serving)
    return hp
