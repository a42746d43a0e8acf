"""Server bootstrap shared by every service (grpc.aio): error interceptor, health, reflection,
TLS (mutual TLS inside the mesh, optional TLS on the public port), graceful shutdown, logging,
and the channels the mesh dials each other with.

A handler is a coroutine: a stream waiting on a slow generation holds no thread, so health
checks and new requests are answered under any load."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prometheus_client import CollectorRegistry, Counter

from .config import ServiceConfig
from .errors import STATUS_DETAILS_KEY, InvalidInput, VlmeshError
from .metrics import MetricsServer, serve_metrics

log = logging.getLogger(__name__)

TRACE_ID_KEY = "vlmesh-trace-id"
# Every mesh certificate carries this DNS name, and the mesh's clients check it instead of the
# address they dial: replicas are reached by pod IP or by any DNS name, and the trust is in the
# mesh's own CA, not in names.
MESH_SERVER_NAME = "vlmesh-mesh"


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second service on a busy port would silently share
        # it (requests split between two unrelated meshes). Without it, the bind fails loudly.
        ("grpc.so_reuseport", 0),
    ]


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


# ----------------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshTLS:
    """The mesh's CA and this service's certificate and key (PEM bytes)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_config(cls, cfg: ServiceConfig) -> MeshTLS | None:
        """None for --insecure; otherwise all three files, read now (a missing one is a clear error)."""
        files = {"--mesh-ca": cfg.mesh_ca, "--mesh-cert": cfg.mesh_cert, "--mesh-key": cfg.mesh_key}
        if cfg.insecure:
            if any(files.values()):
                raise ValueError("--insecure and mesh certificates exclude each other")
            log.warning("--insecure: the mesh's internal calls are plaintext and unauthenticated")
            return None
        missing = [flag for flag, path in files.items() if not path]
        if missing:
            raise ValueError(
                f"no mesh certificates ({', '.join(missing)} not set): make them with `vlmesh certs --out DIR`, "
                "or pass --insecure to run plaintext inside the mesh"
            )
        data = {}
        for flag, path in files.items():
            try:
                data[flag] = Path(path).read_bytes()
            except OSError as err:
                raise ValueError(f"{flag} {path}: {err.strerror}") from None
        return cls(data["--mesh-ca"], data["--mesh-cert"], data["--mesh-key"])

    def server_credentials(self) -> grpc.ServerCredentials:
        # require_client_auth: only callers holding a certificate the mesh's CA signed get in.
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


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


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def error_trailers(err: VlmeshError, trace_id: str = "") -> tuple[tuple[str, str | bytes], ...]:
    trailers: list[tuple[str, str | bytes]] = [(STATUS_DETAILS_KEY, err.to_status().SerializeToString())]
    if trace_id:
        trailers.append((TRACE_ID_KEY, trace_id))
    return tuple(trailers)


async def abort(context: grpc.aio.ServicerContext, err: VlmeshError, trace_id: str = "") -> None:
    await context.abort(err.code, str(err), trailing_metadata=error_trailers(err, trace_id))


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException, errors: Counter | None = None) -> None:
    if errors is not None:
        errors.labels(exc.code.name if isinstance(exc, VlmeshError) else "INTERNAL").inc()
    if isinstance(exc, VlmeshError):
        await abort(context, exc, getattr(exc, "trace_id", ""))
    log.error("unexpected error", exc_info=exc)
    await abort(context, VlmeshError(f"internal error: {type(exc).__name__}: {exc}"), getattr(exc, "trace_id", ""))


_UNDECODABLE = object()  # a request message the deserializer rejected


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps our exception types to gRPC statuses in one place, for every RPC shape of our own
    services (health and reflection are left as they are), and counts them by code."""

    def __init__(self, errors: Counter | None = None):
        self.errors = errors

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/vlmesh."):
            return handler

        def decoded(parse):
            # gRPC answers INTERNAL for a request its deserializer rejects; a malformed message is
            # the caller's mistake, so it is passed on as a marker and refused as INVALID_ARGUMENT.
            def safe(raw: bytes):
                try:
                    return parse(raw)
                except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
                    return _UNDECODABLE

            return safe

        async def checked(requests):
            async for r in requests:
                if r is _UNDECODABLE:
                    raise InvalidInput("a message of the request stream is not a valid protobuf message of its type")
                yield r

        def unary(fn, stream_in: bool = False):
            async def wrapper(request, context):
                try:
                    if stream_in:
                        request = checked(request)
                    elif request is _UNDECODABLE:
                        raise InvalidInput("the request is not a valid protobuf message of its type")
                    return await fn(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every error becomes a status
                    await _abort_with(context, exc, self.errors)

            return wrapper

        def streaming(fn, stream_in: bool = False):
            async def wrapper(request, context):
                try:
                    if stream_in:
                        request = checked(request)
                    elif request is _UNDECODABLE:
                        raise InvalidInput("the request is not a valid protobuf message of its type")
                    async for item in fn(request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort_with(context, exc, self.errors)

            return wrapper

        handler = handler._replace(request_deserializer=decoded(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary, stream_in=True))
        if handler.stream_stream:
            return handler._replace(stream_stream=streaming(handler.stream_stream, stream_in=True))
        return handler


# ----------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------


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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING first so load balancers drain us, then let in-flight RPCs finish."""
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.on_stop is not None:
            await self.on_stop()


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


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


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
        trace_id = getattr(record, "trace_id", None)
        ctx = trace.get_current_span().get_span_context()
        if trace_id:
            entry["trace_id"] = trace_id
        elif ctx.is_valid:
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


def prepare_process(service: str, cfg: ServiceConfig) -> None:
    """Tracing and torch threads, from a ServiceConfig."""
    from .tracing import setup_tracing

    setup_tracing(cfg.service_name or f"vlmesh-{service}", cfg.trace_exporter, cfg.otlp_endpoint)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)


StartFn = Callable[[Any], Coroutine[Any, Any, RunningServer]]


def serve_main(prog: str, description: str, config_cls: type, start: StartFn, argv: list[str] | None) -> int:
    """`vlmesh serve X`: config from flags and environment, logging, serve until SIGTERM. A
    user's mistake (a wrong path, a busy port, a bad flag value) is one line on stderr, exit 2."""
    import argparse

    from .config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, config_cls)
    cfg: ServiceConfig = config_from_args(config_cls, parser.parse_args(argv))
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        asyncio.run(_serve(cfg, start))
    except (ValueError, OSError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve(cfg: ServiceConfig, start: StartFn, grace: float = 5.0) -> None:
    from .tracing import shutdown_tracing

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(cfg)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", grace)
    await running.stop(grace)
    shutdown_tracing()  # flush the last spans


class ThreadedServer:
    """A service on its own event loop in a background thread: several services in one
    process (the tests, benchmarks) each keep their loop responsive."""

    def __init__(self, start: StartFn, cfg: ServiceConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"{type(cfg).__name__}-loop", daemon=True)
        self._thread.start()
        try:
            self.server: RunningServer = asyncio.run_coroutine_threadsafe(start(cfg), self.loop).result()  # type: ignore[arg-type]
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on the service's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]

    def stop(self, grace: float = 0.0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def wait_healthy(address: str, timeout: float = 60.0, service: str = "", tls: MeshTLS | None = None) -> None:
    """Poll grpc.health.v1 until SERVING (used by `vlmesh up` and the tests)."""
    import time

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
