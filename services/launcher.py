"""The one local-mesh launcher: every service of a mesh as a child process on this machine.

`vlmesh up`, `vlmesh demo`, the shapes eval, the process-level tests (tests/procmesh.py) and the
benchmarks all start meshes through `LocalMesh`'s public API: `start`, `stop`, `children` and the
per-child controls (`kill`, `pause`, `resume`, `respawn`, `spawn_copy`, `wait_serving`), and
`supervise`, which `vlmesh up` calls in its loop to restart what exits.

Children are started with PDEATHSIG so they die with this process even on SIGKILL, and are
stopped with SIGTERM (graceful) then SIGKILL: no orphans. What a run makes for itself (throwaway
certificates, the coordinator's state directory when no log directory is given) is removed at
stop; certificate directories of runs whose process is gone are removed at the next start."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.certs import make_certs
from services.common.channels import sync_mesh_channel, wait_healthy
from services.common.ports import PortInUse, ensure_free
from services.common.tls import MeshTLS

# Fixed default ports of `vlmesh up`, the ones the README's grpcurl lines name (0 = any free port).
COORDINATOR_PORT = 50051
STAGE_PORT = 50061  # the first stage replica; the others take the ports after it
VISION_PORT = 50071
# What each service's drain takes at most on SIGTERM (services/common/server.py `_serve`); a
# child still running after it is killed, so a stop takes no longer than the drain.
STOP_GRACE_S = 5.0
_PROBE_S = 0.5  # one health probe of a child, at most
CERTS_PREFIX = "vlmesh-certs-"
OWNER_FILE = "owner.pid"  # in a throwaway certificate directory: the pid of the run that made it


def max_stages(num_layers: int) -> int:
    """The one stages-limit rule: a stage holds at least one decoder layer."""
    return num_layers


def stages_error(num_layers: int, stages: int) -> str | None:
    """The message every command gives for a stage count the model cannot take, else None."""
    if 1 <= stages <= max_stages(num_layers):
        return None
    return f"cannot split {num_layers} layers into {stages} stages (1 to {max_stages(num_layers)}: a stage holds at least one layer)"


def split_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges as even as possible; earlier stages take the remainder."""
    error = stages_error(num_layers, stages)
    if error:
        raise ValueError(error)
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
            raise ValueError(f"--layers {spec!r}: range {a}:{b} should start at layer {expected} (ranges must be contiguous, in order, from 0)")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_certs(tmp: str | None = None) -> list[str]:
    """Remove throwaway certificate directories whose owning run is gone (killed before its stop
    could remove them). A directory without an owner file is not ours to judge and stays."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(CERTS_PREFIX + "*"):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def make_run_certs() -> str:
    """A CA and service certificates for one run, in a 0700 temp directory naming its owner."""
    d = tempfile.mkdtemp(prefix=CERTS_PREFIX)
    Path(d, OWNER_FILE).write_text(f"{os.getpid()}\n")
    make_certs(d)
    return d


def status_path(port: int) -> Path:
    """Where `vlmesh up` with its coordinator on `port` keeps its supervisor's status for
    `vlmesh status` (removed at stop)."""
    return Path(tempfile.gettempdir()) / f"vlmesh-up-{port}.json"


def read_status(port: int) -> dict | None:
    """The supervisor status of a running `vlmesh up` on this machine, or None."""
    try:
        data = json.loads(status_path(port).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and _pid_alive(int(data.get("pid", 0))) else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # A process group of its own: a terminal's Ctrl-C reaches `vlmesh up` alone, which stops its
    # children in one way (SIGTERM, then SIGKILL after the grace) instead of racing them.
    os.setpgid(0, 0)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# Every process of a local mesh shares this machine's cores. OpenMP threads that sleep at once
# after a parallel region (PASSIVE) pay a wake-up on each of a decode step's thousands of regions;
# threads that spin without end (ACTIVE) steal the cores from whichever process computes next. A
# bounded spin keeps a stage's threads warm within its step and gives the cores back between
# turns, which pays while one process computes at a time; with micro-batches in flight at once
# (pipelining) the stages compute together and any spinning steals from the other, as do more
# spinning threads than cores (README, Benchmarks). The environment can still override it.
_OMP_ONE_AT_A_TIME = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
_OMP_TOGETHER = {"OMP_WAIT_POLICY": "PASSIVE"}

Service = Literal["vision", "stage", "coordinator", "gateway"]
ChildState = Literal["starting", "up", "backoff", "gave up"]


@dataclass(frozen=True)
class RestartPolicy:
    """How `supervise` restarts a child that exited: after `first_delay_s`, doubling with each
    exit in a row that came within `quick_exit_s` of its start, up to `max_delay_s`; the
    `give_up_after`-th such exit in a row gives up on that child (a crash loop). An exit after a
    longer run starts the count again."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    quick_exit_s: float = 30.0
    give_up_after: int = 5


@dataclass
class Child:
    """One process of the mesh. Written only by its LocalMesh (start, the controls, supervise),
    which one thread drives."""

    name: str  # "vision", "stage0r1", "coordinator", "gateway", ...: its log is NAME.log
    service: Service
    address: str  # host:port it serves (the gateway: its HTTP host:port)
    args: list[str]  # its whole command line after `python -m services.cli serve`
    log: str | None  # its log file; None: the terminal
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # time.monotonic() of the last spawn
    state: ChildState = "starting"
    restarts: int = 0
    quick_exits: int = 0  # exits in a row within RestartPolicy.quick_exit_s of starting
    restart_at: float = 0.0  # in "backoff": when to start it again


@dataclass
class LocalMesh:
    model: str
    ranges: list[tuple[int, int]]
    port: int = 0  # the coordinator's (0 = any free port)
    extra_args: list[str] = field(default_factory=list)  # given to every service
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    host: str = "127.0.0.1"  # where every service binds
    replicas: int = 1  # stage processes per layer range
    visions: int = 1  # vision processes
    stage_port: int = 0  # the first stage replica's port, the others after it (0 = any free ports)
    vision_port: int = 0  # the first vision process's port (0 = any free port)
    metrics_port: int | None = None  # the coordinator's Prometheus port (None: off)
    state_dir: str | None = None  # the coordinator's --state-dir (None: LOG_DIR/state, or a temp dir removed at stop)
    service_args: dict[str, list[str]] = field(default_factory=dict)  # "vision" | "stage" | "coordinator" | "gateway" -> its own flags
    progress: Callable[[str], None] | None = None  # start-up progress lines (`vlmesh up` prints them)
    quantize: list[str] = field(default_factory=list)  # per stage: --quantize auto|int8|none (empty: the stages' default)
    certs: str | None = None  # directory of `vlmesh certs` output; None: throwaway ones
    openai_port: int | None = None  # start the OpenAI-compatible gateway too (0 = any free port)
    # Micro-batches in flight at once (the coordinator's --pipeline). Off: on one machine the stages
    # share its cores and memory bandwidth, so stages computing together slow each other down
    # (measured: bench/bench_load.py --pipeline true,false); pipelining pays when stages have
    # machines of their own.
    pipeline: bool = False
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    status_file: str | None = None  # where supervise() keeps its JSON status (`vlmesh up`: status_path(port))
    # Set (e.g. from a signal handler) to abandon start(): it raises KeyboardInterrupt at its next
    # poll and stops what it started. A handler that raises instead can be lost: Python runs it
    # wherever the main thread is, and an exception raised inside a finaliser (a gRPC channel's
    # __del__ during the health polls) is printed and dropped, so the start would go on.
    cancel: threading.Event = field(default_factory=threading.Event)
    children: dict[str, Child] = field(default_factory=dict)  # in start order
    events: deque[str] = field(default_factory=lambda: deque(maxlen=100))  # supervise()'s lines, newest last
    _made: list[str] = field(default_factory=list)  # directories this run made and removes at stop
    _start_timeout: float = 300.0

    # --- addresses ---------------------------------------------------------------------------

    @property
    def connect_host(self) -> str:
        """Where to reach a service bound on `host` from this machine."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::", "[::]") else self.host

    def _of(self, service: Service) -> list[Child]:
        return [c for c in self.children.values() if c.service == service]

    @property
    def address(self) -> str:
        c = self.children.get("coordinator")
        return c.address if c else ""

    @property
    def stage_addresses(self) -> list[str]:
        return [c.address for c in self._of("stage")]

    @property
    def vision_address(self) -> str:
        """Every vision process's address, comma-separated (as the coordinator's --vision takes them)."""
        return ",".join(c.address for c in self._of("vision"))

    @property
    def openai_url(self) -> str:
        c = self.children.get("gateway")
        return f"http://{c.address}" if c else ""

    @property
    def procs(self) -> list[subprocess.Popen]:
        """The running processes, in start order (for tools that measure them, e.g. with psutil)."""
        return [c.proc for c in self.children.values() if c.proc is not None]

    def child_at(self, address: str) -> Child:
        return next(c for c in self.children.values() if c.address == address)

    # --- ports ---------------------------------------------------------------------------------

    def _fixed_ports(self) -> dict[str, int]:
        """What each fixed (non-zero) port is for, e.g. {"--port": 50051, "stage 0:2 replica 1": 50062}."""
        fixed: dict[str, int] = {}
        if self.port:
            fixed["the coordinator (--port)"] = self.port
        if self.vision_port:
            for v in range(self.visions):
                fixed[f"vision {v} (--vision-port)" if self.visions > 1 else "vision (--vision-port)"] = self.vision_port + v
        if self.stage_port:
            for k in range(len(self.ranges) * self.replicas):
                fixed[f"stage process {k} (--stage-port {self.stage_port} + {k})"] = self.stage_port + k
        if self.openai_port:
            fixed["the gateway (--openai-port)"] = self.openai_port
        if self.metrics_port:
            fixed["metrics (--metrics-port)"] = self.metrics_port
        return fixed

    def check_ports(self) -> None:
        """Raise PortInUse, before anything starts, when a port the mesh will bind is taken or
        two of its services would share one."""
        seen: dict[int, str] = {}
        for what, port in self._fixed_ports().items():
            if port in seen:
                raise PortInUse(f"port {port} would serve both {seen[port]} and {what}: choose other ports")
            seen[port] = what
            try:
                ensure_free(self.host, port)
            except PortInUse as e:
                raise PortInUse(f"{what}: {e}") from None

    # --- processes -----------------------------------------------------------------------------

    def _tls_args(self, service: str) -> list[str]:
        d = self.certs
        return ["--mesh-ca", f"{d}/ca.crt", "--mesh-cert", f"{d}/{service}.crt", "--mesh-key", f"{d}/{service}.key"]

    def mesh_tls(self) -> MeshTLS:
        """What the coordinator presents inside the mesh: a caller of a stage or vision needs it."""
        d = self.certs
        with open(f"{d}/ca.crt", "rb") as ca, open(f"{d}/coordinator.crt", "rb") as c, open(f"{d}/coordinator.key", "rb") as k:
            return MeshTLS(ca.read(), c.read(), k.read())

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

    def _add(self, name: str, service: Service, port: int, args: list[str]) -> Child:
        """A child's whole command line, fixed once: a restart runs it again as it was."""
        host_args = [] if service == "gateway" else ["--host", self.host, *self.extra_args]
        full = [service, *args, "--port", str(port), *host_args, *self.service_args.get(service, [])]
        child = Child(name, service, f"{self.connect_host}:{port}", full, self._log_path(name))
        self.children[name] = child
        return child

    def _spawn(self, child: Child) -> None:
        out = None
        if child.log:
            os.makedirs(os.path.dirname(child.log), exist_ok=True)
            # A restart appends to the log its first start began afresh.
            out = open(child.log, "a" if child.started_at else "w")  # noqa: SIM115 - the child holds it; closed here after the fork
        try:
            child.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", *child.args],
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                env={**self._omp_policy(), **os.environ, **self.env},
                preexec_fn=_die_with_parent,
            )
        finally:
            if out is not None:
                out.close()
        child.started_at = time.monotonic()
        child.state = "starting"

    def _healthy(self, child: Child, timeout: float) -> bool:
        if child.service == "gateway":
            try:
                with urllib.request.urlopen(f"http://{child.address}/health", timeout=min(2.0, max(timeout, 0.2))):
                    return True
            except (urllib.error.URLError, OSError):
                return False
        tls = None if child.service == "coordinator" else self.mesh_tls()
        if timeout > _PROBE_S:
            try:
                wait_healthy(child.address, timeout=timeout, tls=tls)
                return True
            except TimeoutError:
                return False
        # One probe, bounded: supervise() polls every child in turn and must not stall on one that hangs.
        with sync_mesh_channel(child.address, tls) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=_PROBE_S)
            except grpc.RpcError:
                return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, name: str, timeout: float = 600.0) -> None:
        """Block until the child serves; raise RuntimeError if it exits first, TimeoutError after
        `timeout`. A fresh channel every few seconds: one kept across a restart would sit in
        gRPC's reconnect backoff."""
        child = self.children[name]
        deadline = time.monotonic() + timeout
        while True:
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {child.proc.returncode}" + (f" (log: {child.log})" if child.log else ""))
            if self._healthy(child, timeout=2.0):
                child.state = "up"
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} at {child.address} not serving after {timeout:.0f} s")

    def kill(self, name: str) -> None:
        """kill -9 the child and reap it (it is not restarted unless supervise() runs)."""
        proc = self.children[name].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)

    def pause(self, name: str) -> None:
        proc = self.children[name].proc
        if proc is not None:
            proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        proc = self.children[name].proc
        if proc is not None:
            proc.send_signal(signal.SIGCONT)

    def respawn(self, name: str, extra: list[str] | tuple[str, ...] = (), wait: bool = True, timeout: float = 600.0) -> None:
        """Start the child again (killing it first if it runs) with its own command line plus
        `extra`, at the same address; wait until it serves unless `wait` is False."""
        child = self.children[name]
        self.kill(name)
        if extra:
            child.args = [*child.args, *extra]
        self._spawn(child)
        if wait:
            self.wait_serving(name, timeout)

    def spawn_copy(self, name: str, new_name: str, extra: list[str] | tuple[str, ...] = (), timeout: float = 600.0) -> str:
        """Start a second process with `name`'s command line on a free port (plus `extra`), wait
        until it serves and return its address: e.g. a coordinator without a KV log beside the
        one with it, over the same stages, so that the two can be measured turn about."""
        src = self.children[name]
        args = list(src.args)
        port = free_ports(self.connect_host, 1)[0]
        args[args.index("--port") + 1] = str(port)
        child = Child(new_name, src.service, f"{self.connect_host}:{port}", [*args, *extra], self._log_path(new_name))
        self.children[new_name] = child
        self._spawn(child)
        self.wait_serving(new_name, timeout)
        return child.address

    # --- start and stop ------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        if self.certs is None:
            # Even a local mesh is never open inside: throwaway certificates, made for this run.
            remove_stale_certs()
            self.certs = make_run_certs()
            self._made.append(self.certs)
        if self.state_dir is None:
            if self.log_dir:
                self.state_dir = os.path.join(self.log_dir, "state")
            else:
                self.state_dir = tempfile.mkdtemp(prefix="vlmesh-state-")
                self._made.append(self.state_dir)

    def _plan_children(self) -> None:
        """Every child's name, address and command line (the coordinator's and gateway's too)."""
        stage_count = len(self.ranges) * self.replicas
        wanted = (0 if self.vision_port else self.visions) + (0 if self.stage_port else stage_count)
        wanted += (0 if self.port else 1) + (1 if self.openai_port == 0 else 0)
        free = iter(free_ports(self.connect_host, wanted))
        for v in range(self.visions):
            port = self.vision_port + v if self.vision_port else next(free)
            name = "vision" if self.visions == 1 else f"vision{v}"
            self._add(name, "vision", port, ["--model", self.model, *self._tls_args("vision")])
        k = 0
        for i, (a, b) in enumerate(self.ranges):
            quantize = ["--quantize", self.quantize[i]] if self.quantize else []
            for r in range(self.replicas):
                port = self.stage_port + k if self.stage_port else next(free)
                k += 1
                name = f"stage{i}" if self.replicas == 1 else f"stage{i}r{r}"
                self._add(name, "stage", port, ["--model", self.model, "--layers", f"{a}:{b}", *self._tls_args("stage"), *quantize])
        metrics = ["--metrics-port", str(self.metrics_port)] if self.metrics_port else []
        coordinator = self._add(
            "coordinator",
            "coordinator",
            self.port or next(free),
            [
                "--model",
                self.model,
                "--stages",
                ",".join(self.stage_addresses),
                "--vision",
                self.vision_address,
                "--pipeline",
                "true" if self.pipeline else "false",
                "--state-dir",
                str(self.state_dir),
                *metrics,
                *self._tls_args("coordinator"),
            ],
        )
        if self.openai_port is not None:
            self._add("gateway", "gateway", self.openai_port or next(free), ["--coordinator", coordinator.address, "--model", self.model])

    def start(self, timeout: float = 300.0) -> LocalMesh:
        """Start vision and the stages, wait until all serve, then the coordinator, then the
        gateway when asked for. Raises PortInUse (before starting anything) when a port it
        would bind is taken."""
        self.check_ports()
        self._start_timeout = timeout
        try:
            self._prepare_dirs()
            self._plan_children()
            first = [c for c in self.children.values() if c.service in ("vision", "stage")]
            for c in first:
                self._spawn(c)
            total = len(self.children)
            pending = {self._what(c): c for c in first}
            self._say(f"loading {', '.join(pending)} ({len(pending)} processes)")
            done = self._wait(pending, timeout, total, done=0)
            for c in self.children.values():
                if c.service in ("coordinator", "gateway"):
                    self._spawn(c)
                    self._say(f"loading {c.service} on {c.address}")
                    done = self._wait({c.service: c}, timeout, total, done)
            self._check_cancel()  # cancelled after the last poll
        except BaseException:
            self.stop()
            raise
        self.write_status()
        return self

    def _what(self, c: Child) -> str:
        if c.service != "stage":
            return c.name
        arg = c.args[c.args.index("--layers") + 1]
        return f"stage {arg}" + (f" replica {c.name.rsplit('r', 1)[1]}" if self.replicas > 1 else "")

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt

    def _wait(self, pending: dict[str, Child], timeout: float, total: int, done: int) -> int:
        """Poll every pending child's health until all serve, reporting each as it comes up and,
        every 15 s, which are still loading. A child that exits fails the start."""
        pending = dict(pending)
        t0 = time.monotonic()
        deadline, next_note = t0 + timeout, t0 + 15
        while pending:
            self._check_cancel()
            for c in self.children.values():
                if c.proc is not None and c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with code {c.proc.returncode} during start-up" + (f" (log: {c.log})" if c.log else ""))
            for what, c in list(pending.items()):
                if not self._healthy(c, timeout=_PROBE_S):
                    continue
                c.state = "up"
                del pending[what]
                done += 1
                self._say(f"ready {done}/{total}: {what} at {c.address} ({time.monotonic() - t0:.1f} s)")
            now = time.monotonic()
            if pending and now > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}")
            if pending and now > next_note:
                self._say(f"still loading: {', '.join(pending)} ({now - t0:.0f} s)")
                next_note = now + 15
            if pending:
                time.sleep(0.1)
        return done

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every child at once (each drains), SIGKILL what still runs after `grace`;
        then remove what this run made for itself."""
        running = [c.proc for c in reversed(self.children.values()) if c.proc is not None and c.proc.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)  # a paused child cannot drain
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.children.values():
            c.proc = None
        for d in self._made:
            shutil.rmtree(d, ignore_errors=True)
        self._made.clear()
        if self.status_file:
            with contextlib.suppress(OSError):
                os.unlink(self.status_file)

    def remove_at_stop(self, path: str) -> None:
        """Remove `path` (e.g. a log directory made for this run) with what the run made itself."""
        self._made.append(path)

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- supervision ---------------------------------------------------------------------------

    def supervise(self) -> list[str]:
        """One pass over the children (`vlmesh up` calls it twice a second): an exited child is
        restarted after its backoff at the same address and flags, or given up on after a crash
        loop; a restarted one is reported back once it serves. Returns the event lines of this
        pass (also kept in `events` and the status file)."""
        now = time.monotonic()
        lines: list[str] = []
        for c in self.children.values():
            if c.state in ("up", "starting") and c.proc is not None and c.proc.poll() is not None:
                lines.append(self._exited(c, c.proc.returncode, now))
            elif c.state == "starting" and c.proc is not None and now - c.started_at > self._start_timeout:
                self.kill(c.name)  # hung while loading: counts as an exit
                lines.append(self._exited(c, None, now))
            elif c.state == "starting" and self._healthy(c, timeout=_PROBE_S):
                c.state = "up"
                lines.append(f"{c.name} back at {c.address} (restart {c.restarts})")
            elif c.state == "backoff" and now >= c.restart_at:
                c.restarts += 1
                self._spawn(c)
        for line in lines:
            self.events.append(f"{time.strftime('%H:%M:%S')} {line}")
        if lines:
            self.write_status()
        return lines

    def _exited(self, c: Child, rc: int | None, now: float) -> str:
        policy = self.restart_policy
        ran = now - c.started_at
        c.quick_exits = c.quick_exits + 1 if ran < policy.quick_exit_s else 1
        how = f"exited with code {rc}" if rc is not None else f"did not serve within {self._start_timeout:.0f} s"
        log = f" (log: {c.log})" if c.log else ""
        if c.quick_exits >= policy.give_up_after:
            c.state = "gave up"
            return (
                f"{c.name} at {c.address} {how} after {ran:.1f} s, its {c.quick_exits}th exit in a row within "
                f"{policy.quick_exit_s:.0f} s of starting: gave up on it{log}; the rest of the mesh keeps running"
            )
        delay = min(policy.max_delay_s, policy.first_delay_s * 2 ** (c.quick_exits - 1))
        c.state = "backoff"
        c.restart_at = now + delay
        return f"{c.name} at {c.address} {how} after {ran:.1f} s; restarting in {delay:.1f} s"

    def status(self) -> dict:
        """What `vlmesh status` shows of this run beside the coordinator's view."""
        return {
            "pid": os.getpid(),
            "coordinator": self.address,
            "log_dir": self.log_dir,
            "state_dir": self.state_dir,
            "children": [
                {
                    "name": c.name,
                    "address": c.address,
                    "state": c.state,
                    "restarts": c.restarts,
                    "pid": c.proc.pid if c.proc is not None and c.state != "gave up" else None,
                }
                for c in self.children.values()
            ],
            "events": list(self.events),
        }

    def write_status(self) -> None:
        if not self.status_file:
            return
        tmp = f"{self.status_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.status(), f, indent=1)
        os.replace(tmp, self.status_file)  # a reader never sees half a file
