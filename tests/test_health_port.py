"""--health-port: the plaintext grpc.health.v1 port kubelet's gRPC probes use (they speak no TLS,
and the service's own port takes only mesh clients)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshutil import mesh_tls_kw
from threaded_server import ThreadedServer

from services.launcher import free_port
from services.vision.server import VisionConfig
from services.vision.server import start as start_vision

VISION = "vlmesh.internal.v1.VisionService"


def check(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def ready(port: int) -> bool:
    try:
        return check(port, VISION) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as err:
        # Closed (UNAVAILABLE), or closing under a probe in flight (CANCELLED): kubelet's probe
        # fails either way.
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
        return False


def test_health_port_follows_the_service_and_serves_nothing_else(tiny_models):
    port = free_port()
    server = ThreadedServer(start_vision, VisionConfig(model=str(tiny_models["a"]), port=0, health_port=port, **mesh_tls_kw("vision")))
    try:
        assert check(port) == check(port, VISION) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            check(port, "vlmesh.internal.v1.StageService")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # no model RPC answers here
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(f"/{VISION}/GetStats")(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Draining on SIGTERM: from then on the probe port says NOT_SERVING (or is closed), never
        # SERVING, so readiness fails at once.
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 3.0})
        stopper.start()
        deadline = time.monotonic() + 5
        while ready(port):
            assert time.monotonic() < deadline, "the health port never reported the drain"
            time.sleep(0.05)
        stopper.join(10)
    finally:
        server.stop()  # returns at once after the drain's own stop, or waits for one in progress


def test_health_port_in_use_is_an_error_naming_it(tiny_models):
    port = free_port()
    first = ThreadedServer(start_vision, VisionConfig(model=str(tiny_models["a"]), port=0, health_port=port, **mesh_tls_kw("vision")))
    try:
        with pytest.raises(OSError, match=f"health port 127.0.0.1:{port}"):
            ThreadedServer(start_vision, VisionConfig(model=str(tiny_models["a"]), port=0, health_port=port, **mesh_tls_kw("vision")))
    finally:
        first.stop()
