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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.certs import make_certs
from services.common.ports import ensure_free
from services.common.server import MeshTLS, wait_healthy


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


def parse_layers(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """`0:14,14:28` -> [(0, 14), (14, 28)]: contiguous, non-empty ranges covering every layer."""
    ranges = []
    for part in spec.split(","):
        try:
            a, b = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: each range must be START:END, e.g. 0:14,14:28") from None
        ranges.append((a, b))
    expected = 0
    for a, b in ranges:
        if a != expected:
            raise ValueError(
                f"--layers {spec!r}: range {a}:{b} should start at layer {expected} (ranges must be contiguous, in order, from 0)"
            )
        if b <= a:
            raise ValueError(f"--layers {spec!r}: range {a}:{b} is empty")
        expected = b
    if expected != num_layers:
        raise ValueError(f"--layers {spec!r}: the model has {num_layers} decoder layers; the ranges must end at {num_layers}")
    return ranges


def free_port() -> int:
    return free_ports("127.0.0.1", 1)[0]


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free now: every socket stays bound until all are picked, so the
    kernel cannot hand out one port twice (two children on one port, as bench_mesh.py once saw)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# Every process of a local mesh shares this machine's cores. OpenMP threads that sleep at once
# after a parallel region (PASSIVE) pay a wake-up on each of a decode step's thousands of regions;
# threads that spin without end (ACTIVE) steal the cores from whichever process computes next. A
# bounded spin keeps a stage's threads warm within its step and gives the cores back between
# turns, which pays while one process computes at a time; with micro-batches in flight at once
# (pipelining) the stages compute together and any spinning steals from the other. Measured, 2B
# bfloat16 on 2 cores, decode tok/s (TTFT of a 448x448 image): one stage 3.7 (14.5 s) passive, 4.4
# spinning without bound (vision starved: TTFT 21 s), 4.9 (12.9 s) bounded; two stages 3.3-3.9
# (13.8 s) passive, 1.7 without bound, 4.2-4.5 (13.4 s) bounded; bench_load with two stages, 1-16
# requests at once, one micro-batch at a time: 0.83-0.59x of batched generate passive, 0.92-0.64x
# bounded; pipelined: 0.35-0.27x bounded. Four stages on the two cores: 0.97x of transformers'
# decode passive, 0.73x bounded (more spinning threads than cores). The environment can still
# override it.
_OMP_ONE_AT_A_TIME = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
_OMP_TOGETHER = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class LocalMesh:
    model: str
    ranges: list[tuple[int, int]]
    port: int = 0
    extra_args: list[str] = field(default_factory=list)  # given to every service
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    host: str = "127.0.0.1"  # where every service binds
    replicas: int = 1  # stage processes per layer range
    service_args: dict[str, list[str]] = field(default_factory=dict)  # "vision" | "stage" | "coordinator" -> its own flags
    progress: Callable[[str], None] | None = None  # start-up progress lines (`vlmesh up` prints them)
    quantize: list[str] = field(default_factory=list)  # per stage: --quantize auto|int8|none (empty: the stages' default)
    procs: list[subprocess.Popen] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # [len(procs)] what each process serves
    address: str = ""
    stage_addresses: list[str] = field(default_factory=list)
    vision_address: str = ""
    certs: str | None = None  # directory of `vlmesh certs` output; None: throwaway ones
    openai_port: int | None = None  # start the OpenAI-compatible gateway too (0 = any free port)
    openai_url: str = ""
    # Micro-batches in flight at once (the coordinator's --pipeline). Off: on one machine the stages
    # share its cores and memory bandwidth, so stages computing together slow each other down
    # (measured: bench/bench_load.py --pipeline true,false); pipelining pays when stages have
    # machines of their own.
    pipeline: bool = False
    # Set (e.g. from a signal handler) to abandon start(): it raises KeyboardInterrupt at its next
    # poll and stops what it started. A handler that raises instead can be lost: Python runs it
    # wherever the main thread is, and an exception raised inside a finaliser (a gRPC channel's
    # __del__ during the health polls) is printed and dropped, so the start would go on.
    cancel: threading.Event = field(default_factory=threading.Event)

    def _tls_args(self, service: str) -> list[str]:
        d = self.certs
        return ["--mesh-ca", f"{d}/ca.crt", "--mesh-cert", f"{d}/{service}.crt", "--mesh-key", f"{d}/{service}.key"]

    def _mesh_tls(self) -> MeshTLS:
        d = self.certs
        with open(f"{d}/ca.crt", "rb") as ca, open(f"{d}/coordinator.crt", "rb") as c, open(f"{d}/coordinator.key", "rb") as k:
            return MeshTLS(ca.read(), c.read(), k.read())

    @property
    def connect_host(self) -> str:
        """Where to reach a service bound on `host` from this machine."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::", "[::]") else self.host

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def _log_path(self, name: str) -> str | None:
        return os.path.join(self.log_dir, f"{name}.log") if self.log_dir else None

    def _omp_policy(self) -> dict[str, str]:
        stages = len(self.ranges) * self.replicas
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        one_at_a_time = not self.pipeline and stages <= cores
        return _OMP_ONE_AT_A_TIME if one_at_a_time else _OMP_TOGETHER

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = None
        path = self._log_path(name)
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            out = open(path, "w")  # noqa: SIM115 - lives as long as the child
        service = args[0]
        env = {**self._omp_policy(), **os.environ, **self.env}
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", *args, "--host", self.host, *self.extra_args,
             *self.service_args.get(service, [])],
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.procs.append(proc)
        self.names.append(name)
        return proc

    def start(self, timeout: float = 300.0) -> LocalMesh:
        """Start vision and the stages, wait until all are healthy, then the coordinator.
        Raises PortInUse (before starting anything) when the coordinator's port is taken."""
        ensure_free(self.host, self.port)
        if self.certs is None:
            # Even a local mesh is never open inside: throwaway certificates, made for this run.
            import tempfile

            self.certs = tempfile.mkdtemp(prefix="vlmesh-certs-")
            make_certs(self.certs)
        try:
            stage_count = len(self.ranges) * self.replicas
            ports = free_ports(self.connect_host, 1 + stage_count + (0 if self.port else 1))
            self.vision_address = f"{self.connect_host}:{ports[0]}"
            pending = {"vision": self.vision_address}
            self._spawn("vision", ["vision", "--model", self.model, "--port", str(ports[0]), *self._tls_args("vision")])
            next_port = iter(ports[1:])
            for i, (a, b) in enumerate(self.ranges):
                quantize = ["--quantize", self.quantize[i]] if self.quantize else []
                for r in range(self.replicas):
                    port = next(next_port)
                    addr = f"{self.connect_host}:{port}"
                    self.stage_addresses.append(addr)
                    name = f"stage{i}" if self.replicas == 1 else f"stage{i}r{r}"
                    pending[f"stage {a}:{b}" + (f" replica {r}" if self.replicas > 1 else "")] = addr
                    self._spawn(
                        name, ["stage", "--model", self.model, "--layers", f"{a}:{b}", "--port", str(port), *self._tls_args("stage"), *quantize]
                    )
            total = len(pending) + 1
            self._say(f"loading {', '.join(pending)} ({len(pending)} processes)")
            self._wait(pending, timeout, total, done=0, tls=self._mesh_tls())
            port = self.port or next(next_port)
            self.address = f"{self.connect_host}:{port}"
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
                    "--pipeline",
                    "true" if self.pipeline else "false",
                    *self._tls_args("coordinator"),
                ],
            )
            self._say(f"loading coordinator on {self.address}")
            self._wait({"coordinator": self.address}, timeout, total, done=total - 1)
            if self.openai_port is not None:
                self._start_gateway(self.openai_port or free_port(), timeout)
            self._check_cancel()  # cancelled after the last poll
        except BaseException:
            self.stop()
            raise
        return self

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt

    def _wait(self, pending: dict[str, str], timeout: float, total: int, done: int, tls: MeshTLS | None = None) -> None:
        """Poll every pending service's health until all are SERVING, reporting each as it comes
        up and, every 15 s, which are still loading. A child that exits fails the start."""
        pending = dict(pending)
        t0 = time.monotonic()
        deadline, next_note = t0 + timeout, t0 + 15
        while pending:
            self._check_cancel()
            for proc, name in zip(self.procs, self.names, strict=True):
                if proc.poll() is not None:
                    log = self._log_path(name)
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up" + (f" (log: {log})" if log else ""))
            for what, address in list(pending.items()):
                try:
                    wait_healthy(address, timeout=0.2, tls=tls)
                except TimeoutError:
                    continue
                del pending[what]
                done += 1
                self._say(f"ready {done}/{total}: {what} at {address} ({time.monotonic() - t0:.1f} s)")
            now = time.monotonic()
            if pending and now > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}")
            if pending and now > next_note:
                self._say(f"still loading: {', '.join(pending)} ({now - t0:.0f} s)")
                next_note = now + 15

    def _start_gateway(self, port: int, timeout: float) -> None:
        self._spawn("gateway", ["gateway", "--coordinator", self.address, "--model", self.model, "--port", str(port)])
        self.openai_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            self._check_cancel()
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a mesh process exited with code {dead[0].returncode} (see its log)")
            try:
                with urllib.request.urlopen(f"{self.openai_url}/health", timeout=2.0):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway at {self.openai_url} not healthy after {timeout:.0f}s") from None
                time.sleep(0.1)

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

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
