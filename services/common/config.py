"""Typed service configs built from CLI flags with environment-variable defaults.

Each service declares one dataclass; every field becomes `--field-name` with the default taken
from `VLMESH_FIELD_NAME` when set, so the same image runs from flags (local) or env (k8s)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def _env_name(field: str) -> str:
    return "VLMESH_" + field.upper()


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {s!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        origin = typing.get_origin(typ)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        conv: Any = _parse_bool if typ is bool else typ
        default = f.default if f.default is not dataclasses.MISSING else None
        env = os.environ.get(_env_name(f.name))
        if env is not None:
            default = conv(env)
        helptext = f.metadata.get("help", "")
        # A bare boolean flag means true (`--insecure`); `--insecure false` also works.
        extra: dict[str, Any] = {"nargs": "?", "const": True} if typ is bool else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=conv,
            default=default,
            required=default is None and f.default is dataclasses.MISSING,
            help=f"{helptext} [env {_env_name(f.name)}; default: %(default)s]",
            **extra,
        )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def field(default: Any = dataclasses.MISSING, help: str = "") -> Any:  # noqa: A002 - mirrors argparse
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(kw_only=True)
class ServiceConfig:
    """Flags every service has; each service's config extends it."""

    host: str = field("127.0.0.1", "address to bind (0.0.0.0 = every interface; the default keeps a service local)")
    trace_exporter: str = field("none", "none | console | otlp")
    otlp_endpoint: str = field("", "OTLP gRPC endpoint, e.g. http://jaeger:4317")
    service_name: str = field("", "service.name on traces (default: vlmesh-<service>, stages named by layer range)")
    metrics_port: int = field(0, "serve Prometheus metrics on this HTTP port (0 = off)")
    health_port: int = field(
        0, "also answer grpc.health.v1, and nothing else, in plaintext on this port (kubelet's gRPC probes speak no TLS; 0 = off)"
    )
    threads: int = field(0, "torch intra-op threads (0 = torch's default)")
    log_level: str = field("INFO", "logging level")
    log_format: str = field("text", "text | json (one JSON object per line, with trace_id)")
    mesh_ca: str = field("", "PEM file of the mesh's CA: internal calls are mutual TLS with certificates it signed")
    mesh_cert: str = field("", "PEM certificate this service presents inside the mesh (signed by --mesh-ca)")
    mesh_key: str = field("", "PEM private key of --mesh-cert")
    insecure: bool = field(False, "plaintext inside the mesh, no certificates (anyone who reaches a port can use it)")
    reflection: bool = field(True, "serve gRPC server reflection (grpcurl without proto files)")
    max_message_mb: int = field(256, "largest gRPC message accepted, in MiB")
    shutdown_grace: float = field(5.0, "on SIGTERM, seconds in-flight calls get to finish after the service reports NOT_SERVING")
