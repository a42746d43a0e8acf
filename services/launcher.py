"""`vlmesh up`: the whole mesh as local child processes on 127.0.0.1.

Children are started with PDEATHSIG so they die with this process even on SIGKILL, and are
stopped with SIGTERM (graceful) then SIGKILL on Ctrl-C / SIGTERM: no orphans."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from services.common.server import wait_healthy


def split_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges as even as possible; earlier stages take the remainder."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for i in range(stages):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class LocalMesh:
    model: str
    ranges: list[tuple[int, int]]
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    quantize: list[str] = field(default_factory=list)  # per stage: --quantize auto|int8|none (empty: the stages' default)
    procs: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""
    stage_addresses: list[str] = field(default_factory=list)
    vision_address: str = ""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{name}.log"), "w")  # noqa: SIM115 - lives as long as the child
        # Several torch processes share the cores here; OpenMP threads that spin-wait after their
        # stage's turn steal CPU from the stage that computes next (measured: bfloat16 2B, 2
        # stages, 3.38 -> 3.74 tok/s on 2 cores). The environment can still override it.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **self.env}
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", *args, "--host", "127.0.0.1", *self.extra_args],
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 300.0) -> "LocalMesh":
        try:
            self.vision_address = f"127.0.0.1:{free_port()}"
            self._spawn("vision", ["vision", "--model", self.model, "--port", self.vision_address.rsplit(":", 1)[1]])
            for i, (a, b) in enumerate(self.ranges):
                addr = f"127.0.0.1:{free_port()}"
                self.stage_addresses.append(addr)
                quantize = ["--quantize", self.quantize[i]] if self.quantize else []
                stage_port = addr.rsplit(":", 1)[1]
                self._spawn(f"stage{i}", ["stage", "--model", self.model, "--layers", f"{a}:{b}", "--port", stage_port, *quantize])
            for addr in [self.vision_address, *self.stage_addresses]:
                self._wait(addr, timeout)
            port = self.port or free_port()
            self.address = f"127.0.0.1:{port}"
            self._spawn(
                "coordinator",
                [
                    "coordinator",
                    "--model",
                    self.model,
                    "--stages",
                    ",".join(self.stage_addresses),
                    "--vision",
                    self.vision_address,
                    "--port",
                    str(port),
                ],
            )
            self._wait(self.address, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a mesh process exited with code {dead[0].returncode} (args: {' '.join(dead[0].args[3:6])})")
            try:
                wait_healthy(address, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def stop(self, grace: float = 10.0) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
