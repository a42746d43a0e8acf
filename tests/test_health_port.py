"""services.common.health_port: the plaintext grpc.health.v1 port kubelet's gRPC probes use."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.health_port import start_health_port
from services.common.ports import PortInUse
from services.launcher import free_port

STAGE = "vlmesh.v1.StageService"


def check(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_port_follows_the_service_and_serves_nothing_else():
    hp = start_health_port("127.0.0.1", free_port(), [STAGE])
    try:
        assert check(hp.port, STAGE) == health_pb2.HealthCheckResponse.NOT_SERVING  # loading
        hp.set_serving(True)
        assert check(hp.port) == check(hp.port, STAGE) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            check(hp.port, "vlmesh.v1.VisionService")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(f"127.0.0.1:{hp.port}") as ch:  # no model RPC answers here
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(f"/{STAGE}/GetInfo")(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        hp.set_serving(False)  # draining on SIGTERM
        assert check(hp.port, STAGE) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        hp.stop()


def test_health_port_off_and_in_use():
    assert start_health_port("127.0.0.1", 0, [STAGE]) is None
    hp = start_health_port("127.0.0.1", free_port(), [STAGE], serving=True)
    try:
        with pytest.raises(PortInUse, match=f"health port {hp.port}"):
            start_health_port("127.0.0.1", hp.port, [STAGE])
    finally:
        hp.stop()
