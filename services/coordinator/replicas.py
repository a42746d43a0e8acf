"""Addresses of a service's replicas, and the watch that keeps each one's health current.

`--stages` and `--vision` take comma-separated entries. `host:port` is one replica;
`dns:///name:port` is every address `name` resolves to (a Kubernetes headless Service gives one
per pod), resolved again on every watch round, so replicas that come and go are picked up."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DNS = "dns:///"


def split_entries(spec: str) -> list[str]:
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("no addresses given")
    for e in entries:
        host, sep, port = e.removeprefix(DNS).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {e!r} is not host:port or dns:///name:port")
    return entries


def _join(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


async def resolve(entries: list[str]) -> list[str]:
    """Every replica address the entries name now (dns:/// entries expanded; a name that does
    not resolve right now contributes nothing)."""
    out: list[str] = []
    loop = asyncio.get_running_loop()
    for e in entries:
        if not e.startswith(DNS):
            out.append(e)
            continue
        host, _, port = e.removeprefix(DNS).rpartition(":")
        try:
            infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as err:
            log.warning("cannot resolve %s: %s", e, err)
            continue
        out.extend(_join(str(info[4][0]), int(port)) for info in infos)
    return list(dict.fromkeys(out))


@dataclass
class Health:
    """What the watcher last saw of one replica."""

    up: bool = False
    since: float = field(default_factory=time.monotonic)  # of the last change
    failures: int = 0

    def mark(self, up: bool) -> bool:
        """Record a probe; True when the state changed."""
        self.failures = 0 if up else self.failures + 1
        if up == self.up:
            return False
        self.up, self.since = up, time.monotonic()
        return True


async def watch(
    interval: float,
    entries: list[str],
    sync: Callable[[list[str]], Awaitable[None]],
    probe_all: Callable[[], Awaitable[None]],
) -> None:
    """Forever: resolve the entries, let the pool add or retire replicas, probe them all."""
    while True:
        try:
            await sync(await resolve(entries))
            await probe_all()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the watch must outlive anything one round does
            log.exception("replica watch round failed")
        await asyncio.sleep(interval)
