"""A service's gRPC server (grpc.aio): start-up with the error interceptor, health, reflection,
the optional plaintext health port and metrics; and shutdown, drained and bounded.

A handler is a coroutine: a stream waiting on a slow generation holds no thread, so health
checks and new requests are answered under any load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter

from .config import ServiceConfig
from .interceptor import ErrorInterceptor
from .metrics import MetricsServer, serve_metrics
from .tls import MeshTLS

log = logging.getLogger(__name__)


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second service on a busy port would silently share
        # it (requests split between two unrelated meshes). Without it, the bind fails loudly.
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    on_stop: Callable[[], Awaitable[None]] | None = None
    health_server: grpc.aio.Server | None = None  # the plaintext --health-port, when asked for
    health_port: int = 0
    metrics_server: MetricsServer | None = None  # Prometheus /metrics on --metrics-port
    # Seconds each part of the shutdown after the drain (and the drain beyond its grace) may take:
    # a hook that hangs costs this, never the process's exit.
    close_timeout: float = 10.0
    _stopping: asyncio.Task[None] | None = field(default=None, init=False, repr=False)  # written by the first stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING first so load balancers drain us, then let in-flight RPCs finish
        for at most `grace` seconds and close the rest. Idempotent: a later call (a second
        SIGTERM, a test's cleanup) starts nothing and returns when the first stop has ended.
        The stop runs as its own task, so a caller cancelled mid-drain leaves it to finish."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace), name="server-stop")
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # grpc cancels what is still running at the end of the grace; the bound on top covers a
        # shutdown that would wait on something the cancel cannot reach.
        await self._bounded(self.server.stop(grace), "the drain", grace + self.close_timeout)
        if self.health_server is not None:
            await self._bounded(self.health_server.stop(0), "the health port", self.close_timeout)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.on_stop is not None:
            await self._bounded(self.on_stop(), "the service's own shutdown", self.close_timeout)

    @staticmethod
    async def _bounded(step: Awaitable[None], what: str, timeout: float) -> None:
        """One part of the shutdown: an error or a hang is logged, and the next part runs."""
        try:
            await asyncio.wait_for(step, timeout)
        except TimeoutError:
            log.error("%s did not end within %.1fs; stopping without it", what, timeout)
        except Exception:
            log.exception("%s failed; stopping anyway", what)


Register = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]


async def start_server(
    register: Iterable[Register],
    cfg: ServiceConfig,
    port: int,
    *,
    internal: bool,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    on_stop: Callable[[], Awaitable[None]] | None = None,
    metrics: CollectorRegistry | None = None,
    errors: Counter | None = None,
) -> RunningServer:
    """`register` holds (add_XServicer_to_server, servicer, full service name) triples. An
    internal service (stage, vision) takes only mesh clients (mutual TLS unless --insecure);
    a public one (the coordinator) takes `credentials` (TLS) or plaintext. `metrics` is served
    on --metrics-port; `errors` counts the statuses our handlers end with."""
    server = grpc.aio.server(
        interceptors=[*interceptors, ErrorInterceptor(errors)],
        options=grpc_options(cfg.max_message_mb << 20),
    )
    names = []
    for add, servicer, name in register:
        add(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if cfg.reflection:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if internal:
        tls = MeshTLS.from_config(cfg)
        credentials = tls.server_credentials() if tls is not None else None
    address = f"{cfg.host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {address}: the port is in use (or the address is not this host's)")
    health_server, health_bound = None, 0
    if cfg.health_port:
        # The same health state on a second, plaintext port that serves nothing else: probes
        # that speak no TLS (kubelet's) see exactly what the service reports, drain included.
        health_server = grpc.aio.server(options=grpc_options(1 << 20))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_bound = health_server.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
        except RuntimeError:
            health_bound = 0
        if health_bound == 0:
            raise OSError(f"cannot bind the health port {cfg.host}:{cfg.health_port}: the port is in use")
        await health_server.start()
    metrics_server = serve_metrics(metrics, cfg.metrics_port, cfg.host) if metrics is not None else None
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (%s)", ", ".join(names), cfg.host, bound, "TLS" if credentials else "plaintext")
    return RunningServer(server, bound, health_servicer, names, on_stop, health_server, health_bound, metrics_server)
