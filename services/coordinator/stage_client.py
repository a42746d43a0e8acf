"""The coordinator's only way to the stages: one long-lived Forward stream per stage, a request
and its response in lockstep, reopened after an error; UNAVAILABLE is retried."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from services.common.errors import StageDown, VlmeshError, from_rpc_error
from services.common.server import channel
from vlmesh.v1 import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)
_CLOSE = object()


class _Stream:
    def __init__(self, stub: stage_pb2_grpc.StageServiceStub):
        self.requests: queue.Queue = queue.Queue()
        self.responses = stub.Forward(iter(self.requests.get, _CLOSE))

    def call(self, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
        self.requests.put(request)
        return next(self.responses)

    def close(self) -> None:
        self.requests.put(_CLOSE)
        self.responses.cancel()


class StageClient:
    def __init__(self, address: str, retries: int = 3):
        self.address = address
        self.retries = retries
        self.channel = channel(address)
        self.stub = stage_pb2_grpc.StageServiceStub(self.channel)
        self._stream: _Stream | None = None
        self._lock = threading.Lock()
        self.info: stage_pb2.GetInfoResponse | None = None

    def get_info(self, timeout: float = 10.0) -> stage_pb2.GetInfoResponse:
        try:
            self.info = self.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"stage {self.address}") from None
        return self.info

    def forward(self, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
        with self._lock:
            for attempt in range(self.retries + 1):
                if self._stream is None:
                    self._stream = _Stream(self.stub)
                try:
                    return self._stream.call(request)
                except (grpc.RpcError, StopIteration) as err:
                    self._stream.close()
                    self._stream = None
                    if isinstance(err, grpc.RpcError) and err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise from_rpc_error(err, f"stage {self.address}") from None
                    if attempt == self.retries:
                        raise StageDown(f"stage {self.address} unavailable after {self.retries + 1} attempts") from None
                    time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def release(self, session_id: str) -> None:
        try:
            self.stub.ReleaseSession(stage_pb2.ReleaseSessionRequest(session_id=session_id), timeout=10.0)
        except grpc.RpcError as err:
            log.warning("release of %s on %s failed: %s", session_id, self.address, err.code())

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self.channel.close()


@dataclass
class Mesh:
    """The stages in layer order, checked to cover the model exactly once."""

    stages: list[StageClient]

    @classmethod
    def connect(cls, addresses: list[str], num_layers: int, wait: float = 60.0) -> "Mesh":
        clients = [StageClient(a) for a in addresses]
        deadline = time.monotonic() + wait
        infos = []
        for c in clients:
            while True:
                try:
                    infos.append(c.get_info())
                    break
                except VlmeshError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        infos_sorted = sorted(zip(infos, clients), key=lambda ic: ic[0].layer_start)
        expect = 0
        for info, c in infos_sorted:
            if info.layer_start != expect:
                raise ValueError(f"stages leave a gap or overlap at layer {expect}: {c.address} starts at {info.layer_start}")
            expect = info.layer_end
        if expect != num_layers:
            raise ValueError(f"stages cover layers 0:{expect} but the model has {num_layers}")
        return cls([c for _, c in infos_sorted])

    def release(self, session_id: str) -> None:
        for s in self.stages:
            s.release(session_id)

    def close(self) -> None:
        for s in self.stages:
            s.close()
