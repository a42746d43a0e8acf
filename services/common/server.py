"""Server bootstrap shared by every service: error interceptor, health, reflection, graceful
shutdown, logging, and the channel options the mesh uses everywhere."""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import VlmeshError

log = logging.getLogger(__name__)

# Prefill KV deltas and visual embeddings of large images exceed gRPC's 4 MB default.
MESSAGE_LIMIT = 1 << 30
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
]


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the active trace id so logs join their trace."""

    def format(self, record: logging.LogRecord) -> str:
        from opentelemetry import trace

        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


def prepare_process(service: str, cfg) -> None:
    """Tracing and torch threads, from a ServiceConfig."""
    from .tracing import setup_tracing

    setup_tracing(service, cfg.trace_exporter, cfg.otlp_endpoint)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)


def serve_main(prog: str, description: str, config_cls: type, start: Callable, argv: list[str] | None) -> int:
    """`vlmesh serve X`: config from flags and environment, logging, serve until SIGTERM."""
    import argparse

    from .config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, config_cls)
    cfg = config_from_args(config_cls, parser.parse_args(argv))
    setup_logging(cfg.log_level, cfg.log_format)
    start(cfg).wait_for_signal()
    return 0


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, VlmeshError):
        context.abort(exc.code, str(exc))
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps our exception types to gRPC statuses in one place, for every RPC shape."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def unary(fn):
            @functools.wraps(fn)
            def wrapper(request, context):
                try:
                    return fn(request, context)
                except Exception as exc:  # noqa: BLE001 - every error becomes a status
                    if isinstance(exc, grpc.RpcError) and context.code() is not None:
                        raise
                    _abort(context, exc)

            return wrapper

        def streaming(fn):
            @functools.wraps(fn)
            def wrapper(request, context):
                try:
                    yield from fn(request, context)
                except Exception as exc:  # noqa: BLE001
                    if isinstance(exc, grpc.RpcError) and (context.code() is not None or not context.is_active()):
                        return  # already aborted, or the caller went away (a closed stream)
                    _abort(context, exc)

            return wrapper

        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=streaming(handler.stream_stream))
        return handler


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    on_stop: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING first so load balancers drain us, then let in-flight RPCs finish."""
        for name in ["", *self.service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        if self.on_stop is not None:
            self.on_stop()

    def wait_for_signal(self, grace: float = 5.0) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully (the k8s pod lifecycle)."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        log.info("shutting down (grace %.1fs)", grace)
        self.stop(grace)


def start_server(
    register: Iterable[tuple[Callable[[object, grpc.Server], None], object, str]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 16,
    on_stop: Callable[[], None] | None = None,
) -> RunningServer:
    """`register` holds (add_XServicer_to_server, servicer, full service name) triples."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorInterceptor()],
        options=GRPC_OPTIONS,
    )
    names = []
    for add, servicer, name in register:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", ", ".join(names), host, bound)
    return RunningServer(server, bound, health_servicer, names, on_stop)


def wait_healthy(address: str, timeout: float = 60.0, service: str = "") -> None:
    """Poll grpc.health.v1 until SERVING (used by `vlmesh up` and the tests)."""
    import time

    deadline = time.monotonic() + timeout
    with channel(address) as ch:
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
