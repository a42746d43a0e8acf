"""What the service benchmarks share: a local mesh of real processes whose coordinator and stage
replicas can be killed and restarted one by one, and a client's view of a stream's token times."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

from services.launcher import LocalMesh  # noqa: E402


def index_of(mesh: LocalMesh, name: str) -> int:
    return mesh.names.index(name)


def kill(mesh: LocalMesh, name: str) -> None:
    p = mesh.procs[index_of(mesh, name)]
    p.send_signal(signal.SIGKILL)
    p.wait(30)


def _own_args(mesh: LocalMesh, name: str) -> list[str]:
    """The service's own command line: after `python -m services.cli serve`, before the --host
    and shared flags the launcher appends (its _spawn appends them again)."""
    args = list(mesh.procs[index_of(mesh, name)].args[4:])
    return args[: args.index("--host")]


def _wait_serving(mesh: LocalMesh, service: str, address: str, timeout: float) -> None:
    """A fresh channel every few seconds: one kept across a restart would sit in reconnect backoff."""
    from services.common.server import wait_healthy

    tls = None if service == "coordinator" else mesh._mesh_tls()
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_healthy(address, timeout=5, tls=tls)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def respawn(mesh: LocalMesh, name: str, extra: list[str] = (), timeout: float = 600) -> None:  # type: ignore[assignment]
    """Start a child again with its own command line (plus `extra`) and wait until it serves."""
    args = _own_args(mesh, name)
    i = index_of(mesh, name)
    old = mesh.procs[i]
    if old.poll() is None:
        old.send_signal(signal.SIGKILL)
        old.wait(30)
    mesh.procs.pop(i)
    mesh.names.pop(i)
    mesh._spawn(name, [*args, *extra])
    _wait_serving(mesh, args[0], f"{mesh.connect_host}:{args[args.index('--port') + 1]}", timeout)


def spawn_copy(mesh: LocalMesh, name: str, new_name: str, extra: list[str] = (), timeout: float = 600) -> str:  # type: ignore[assignment]
    """Start a second process with `name`'s command line on a free port (plus `extra`), wait until
    it serves and return its address: e.g. a coordinator without a KV log beside the one with it,
    over the same stages, so that the two can be measured turn about."""
    from services.launcher import free_ports

    args = _own_args(mesh, name)
    port = free_ports(mesh.connect_host, 1)[0]
    args[args.index("--port") + 1] = str(port)
    mesh._spawn(new_name, [*args, *extra])
    address = f"{mesh.connect_host}:{port}"
    _wait_serving(mesh, args[0], address, timeout)
    return address


def stream_times(client, messages, max_tokens: int, on_token=None) -> tuple[list[float], list[int], str, object]:
    """(arrival time of each token, the tokens, the text, the last event) of one Generate stream."""
    times: list[float] = []
    tokens: list[int] = []
    text, last = [], None
    for ev in client.stream_events(messages, max_tokens=max_tokens):
        if ev.token_ids:
            now = time.perf_counter()
            times += [now] * len(ev.token_ids)
            tokens += ev.token_ids
            if on_token is not None:
                on_token(len(tokens))
        text.append(ev.text)
        last = ev
    return times, tokens, "".join(text), last
