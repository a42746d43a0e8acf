"""A stand-in for Jaeger's OTLP gRPC receiver: a real gRPC server on 127.0.0.1 that keeps what the
services export, so tests can check that every process's spans arrive where its flags send them."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ExportedSpan:
    resource: dict[str, str]  # resource attributes: service.name, k8s.pod.name, ...
    name: str


@dataclass
class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ExportedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: grpc.Server | None = None
    port: int = 0

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans += [ExportedSpan(resource, s.name) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> OtlpSink:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)

    def resources(self, key: str) -> set[str]:
        with self.lock:
            return {s.resource.get(key, "") for s in self.spans}

    def wait_for(self, key: str, values: set[str], timeout: float = 60.0) -> set[str]:
        """Poll until spans carrying every one of `values` for resource attribute `key` arrived
        (exporters batch for a few seconds); returns the values seen."""
        deadline = time.monotonic() + timeout
        while not values <= (seen := self.resources(key)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen
