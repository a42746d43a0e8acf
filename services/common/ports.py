"""Is a TCP port free to listen on? A plain bind answers it.

gRPC sets SO_REUSEPORT on its listeners, so a second server on a port already in use binds
without error and the kernel splits connections between two unrelated processes. A socket bound
without SO_REUSEPORT cannot share a port with a listener, so binding one here (and closing it)
finds the conflict before a service spends minutes loading a model. SO_REUSEADDR is set as gRPC
does, so a port left in TIME_WAIT by a server that just stopped counts as free."""

from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """The port has a listener (or cannot be bound for another reason the message says)."""


def ensure_free(host: str, port: int) -> None:
    """Raise PortInUse unless `host:port` can be bound now. Port 0 (any free port) always can."""
    if port == 0:
        return
    bind_host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} is already in use on {bind_host} (another process listens on it)") from None
            raise PortInUse(f"cannot bind port {port} on {bind_host}: {e.strerror}") from None
