"""A pool of one service's replicas (stages, vision): addresses, health, the probe policy, and the
watch that keeps them current.

`--stages` and `--vision` take comma-separated entries. `host:port` is one replica;
`dns:///name:port` is every address `name` resolves to (a Kubernetes headless Service gives one
per pod), resolved again on every watch round, so replicas that come and go are picked up.

The probe policy decides when a replica is down. A replica that refuses the connection, or whose
stream breaks, is down at once: it is gone. A replica that is connected but does not answer is
only down after `ProbePolicy.failures` probes in a row went unanswered: a GC pause or a long
prefill chunk on a busy replica must not move its sessions away (a failover storm), while a
replica that is really stalled (SIGSTOP, a hung host) still fails over in a few seconds. Each
probe waits `ProbePolicy.timeout`, or longer for a replica whose measured steps are slow.

What a pool saw is told to its subscribers as small events: `ReplicaRestarted` (a new process at
the address: the KV it held is gone) and `ReplicaRecovered` (down or stalled, answering again, the
same process: the KV it held is still there)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import grpc.aio

from services.common.errors import StageDown

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


# ---------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class ProbePolicy:
    """When a replica counts as down. Rounds of probes start every `interval` seconds (a round
    whose probes wait for an answer ends when they give up). A replica that does not answer
    within its probe deadline `failures` rounds in a row is down; one that refuses the connection
    is down at once.

    With the defaults a stall of up to 3 s (a GC pause, a long prefill chunk) moves nothing, and
    a replica stalled for good is down 3 to 4 s after it stopped answering (see `tolerated_stall`
    and `detected_within`)."""

    interval: float = 1.0  # seconds between probe rounds (the coordinator's --health-interval)
    failures: int = 3  # unanswered probes in a row before a connected replica is down (1 = the first)
    timeout: float = 1.0  # the least a probe waits for its answer, in seconds
    step_factor: float = 2.0  # a probe waits at least this many times the replica's slowest recent step (0 = never longer than `timeout`)

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("the probe interval and timeout must be positive")
        if self.failures < 1:
            raise ValueError("a replica is down after at least 1 failed probe")
        if self.step_factor < 0:
            raise ValueError("the probe's step factor cannot be negative")

    def deadline(self, step_seconds: float = 0.0) -> float:
        """How long one probe waits for a replica whose slowest recent step took `step_seconds`:
        a replica busy with long steps answers its probes late too (CPU and GIL contention)."""
        return max(self.timeout, self.step_factor * step_seconds)

    def tolerated_stall(self, step_seconds: float = 0.0) -> float:
        """The longest stall that never marks a replica down: while it is stalled, a probe is
        started every max(interval, deadline) seconds, and the `failures`-th one must give up."""
        d = self.deadline(step_seconds)
        return (self.failures - 1) * max(self.interval, d) + d

    def detected_within(self, step_seconds: float = 0.0) -> float:
        """A replica stalled for good is down at most this long after it stopped answering (the
        stall may begin just after a round started)."""
        return self.interval + self.tolerated_stall(step_seconds)


class Outcome(enum.Enum):
    ANSWERED = "answered"  # it answered and serves
    NO_ANSWER = "no answer"  # connected (or connecting) but silent until the deadline: maybe stalled, maybe only busy
    GONE = "gone"  # connection refused or broken, or it answered that it does not serve


@dataclass(frozen=True)
class Probe:
    """What one probe of a replica found."""

    outcome: Outcome
    instance: str = ""  # ANSWERED: the process's instance id ('' for a service that reports none)
    detail: str = ""  # why it failed, for the log


class Change(enum.Enum):
    JOINED = "joined"  # up for the first time
    DOWN = "down"
    RECOVERED = "recovered"  # up again, the same process
    RESTARTED = "restarted"  # answering as a new process


@dataclass
class Health:
    """What the pool's probes (and the replica's own calls) last saw of one replica. Written only
    by `record` and `gone`."""

    up: bool = False
    missed: int = 0  # probes in a row that got no answer; the policy reads it
    instance: str | None = None  # instance id of the last answer; None = never answered
    answered_sent: float = float("-inf")  # when the newest answered probe was sent (the pool's clock)

    @property
    def suspect(self) -> bool:
        """Up, but its last probe went unanswered: not the first choice for a new session."""
        return self.up and self.missed > 0

    def record(self, probe: Probe, policy: ProbePolicy, sent: float) -> Change | None:
        """Apply the outcome of a probe sent at `sent`; returns how the replica's state changed,
        if it did. A failed probe sent before one that was answered is stale (two probes overlap:
        a round's and one made on demand) and changes nothing."""
        if probe.outcome is Outcome.ANSWERED:
            self.answered_sent = max(self.answered_sent, sent)
            was_up, seen = self.up, self.instance is not None
            restarted = bool(seen and self.instance and probe.instance and probe.instance != self.instance)
            self.up, self.missed, self.instance = True, 0, probe.instance
            if restarted:
                return Change.RESTARTED
            if was_up:
                return None
            return Change.RECOVERED if seen else Change.JOINED
        if sent < self.answered_sent:
            return None
        self.missed += 1
        if not self.up or (probe.outcome is Outcome.NO_ANSWER and self.missed < policy.failures):
            return None
        self.up = False
        return Change.DOWN

    def gone(self) -> bool:
        """A call found the replica gone: down at once. True when it was up."""
        was_up, self.up = self.up, False
        return was_up


# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ReplicaRestarted:
    """The replica at `address` answers as a new process: the KV (or cache) it held is gone."""

    address: str


@dataclass(frozen=True)
class ReplicaRecovered:
    """The replica at `address` was down or stalled and answers again as the same process: what
    it held is still there (sessions moved away from it can be released there now)."""

    address: str


ReplicaEvent = ReplicaRestarted | ReplicaRecovered
Subscriber = Callable[[ReplicaEvent], None]


# ---------------------------------------------------------------------------------------------- replicas


def classify(err: grpc.RpcError, channel: grpc.aio.Channel) -> Probe:
    """A failed probe RPC as the policy sees it. Probes wait for the channel to be ready, so a
    deadline also ends a probe of a replica that refuses connections: the channel's state tells
    that (TRANSIENT_FAILURE) from a connected replica that is silent."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = code.name if isinstance(code, grpc.StatusCode) else str(code)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        state = channel.get_state(try_to_connect=False)
        if state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return Probe(Outcome.NO_ANSWER, detail=f"no answer ({state.name.lower()})")
    return Probe(Outcome.GONE, detail=detail)


class Replica:
    """One replica of a pool. A subclass asks the service (`check`) and may drop what it holds
    when the replica is lost (`lost`)."""

    kind = "replica"  # the noun in log lines

    def __init__(self, address: str):
        self.address = address
        self.health = Health()

    @property
    def up(self) -> bool:
        return self.health.up

    def probe_deadline(self, policy: ProbePolicy) -> float:
        return policy.deadline()

    async def check(self, timeout: float) -> Probe:
        raise NotImplementedError

    def lost(self, why: str) -> None:
        """The replica went down or restarted: whatever in flight on it cannot be answered."""

    def mark_down(self, why: str) -> None:
        """A call on the replica found it gone (broken stream, refused connection, a step past
        its deadline): down at once, whatever the probes say."""
        if self.health.gone():
            log.warning("%s %s is down: %s", self.kind, self.address, why)
        self.lost(why)

    async def close(self) -> None:
        self.lost(f"{self.kind} {self.address} closed")


R = TypeVar("R", bound=Replica)


class ReplicaPool(Generic[R]):
    """Every replica the entries name: found at connect, kept current by a watch task, probed
    under one policy. Subclasses make the replicas (`_make`), say what connect waits for
    (`_missing`) and may act on each probed replica (`_probed`)."""

    kind = "replica"

    def __init__(
        self,
        spec: str,
        policy: ProbePolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.entries = split_entries(spec)
        self.policy = policy
        self.replicas: dict[str, R] = {}
        self._subscribers: list[Subscriber] = []
        self._clock = clock
        self._sleep = sleep
        self._watch: asyncio.Task | None = None

    # -------------------------------------------------------------- for subclasses

    def _make(self, address: str) -> R:
        raise NotImplementedError

    def _missing(self) -> str:
        """'' when connect may return; else what it still waits for."""
        return "" if any(r.up for r in self.replicas.values()) else f"no {self.kind} replica of {', '.join(self.entries)} is up"

    def _connected(self) -> None:
        """Called once, when connect's wait is over."""

    def _probed(self, rep: R, change: Change | None) -> None:
        """Called after every probe of `rep`."""

    # -------------------------------------------------------------- events

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call fn with every ReplicaRestarted / ReplicaRecovered; returns the unsubscribe."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def _emit(self, event: ReplicaEvent) -> None:
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - one subscriber's bug must not stop the watch or the others
                log.exception("a subscriber of %s failed on %s", self.kind, event)

    # -------------------------------------------------------------- probing

    async def sync(self, addresses: Iterable[str]) -> None:
        """Add the replicas not known yet (one that disappears from DNS stays, down, until it is back)."""
        for a in addresses:
            if a not in self.replicas:
                self.replicas[a] = self._make(a)
                log.info("%s replica %s added", self.kind, a)

    async def probe(self, reps: Iterable[R], count_misses: bool = True) -> None:
        """Probe these replicas now, all at once, and apply what each probe found. Only the
        watch's rounds count unanswered probes (`count_misses`): a probe made on demand between
        rounds overlaps the round's and must not double a stall's misses; it can only find a
        replica up, or gone."""
        reps = list(reps)
        sent = self._clock()
        probes = await asyncio.gather(*(r.check(r.probe_deadline(self.policy)) for r in reps))
        for r, p in zip(reps, probes):
            if count_misses or p.outcome is not Outcome.NO_ANSWER:
                self._apply(r, p, sent)

    def _apply(self, rep: R, probe: Probe, sent: float) -> None:
        change = rep.health.record(probe, self.policy, sent)
        if probe.outcome is Outcome.NO_ANSWER and rep.up:
            log.info(
                "%s %s missed a probe (%d of %d before it counts as down): %s",
                self.kind,
                rep.address,
                rep.health.missed,
                self.policy.failures,
                probe.detail,
            )
        if change is Change.DOWN:
            log.warning("%s %s is down: %s", self.kind, rep.address, probe.detail)
            rep.lost(f"{self.kind} {rep.address} is down ({probe.detail})")
        elif change is Change.RESTARTED:
            log.warning("%s %s restarted: what it held is gone", self.kind, rep.address)
            rep.lost(f"{self.kind} {rep.address} restarted")
        elif change in (Change.JOINED, Change.RECOVERED):
            log.info("%s %s is up%s", self.kind, rep.address, " again" if change is Change.RECOVERED else "")
        self._probed(rep, change)
        if change is Change.RESTARTED:
            self._emit(ReplicaRestarted(rep.address))
        elif change is Change.RECOVERED:
            self._emit(ReplicaRecovered(rep.address))

    async def probe_all(self) -> None:
        await self.probe(self.replicas.values())

    async def round(self) -> None:
        """One watch round: resolve the entries, add new replicas, probe them all."""
        await self.sync(await resolve(self.entries))
        await self.probe_all()

    async def watch(self) -> None:
        """Forever: a round every `policy.interval` seconds (connect starts it as a task)."""
        while True:
            began = self._clock()
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must outlive anything one round does
                log.exception("%s watch round failed", self.kind)
            # Rounds start every interval; one whose probes waited for their deadline starts the next at once.
            await self._sleep(max(0.0, self.policy.interval - (self._clock() - began)))

    # -------------------------------------------------------------- life

    async def connect(self, wait: float = 120.0) -> None:
        """Probe until `_missing()` says the pool can serve (StageDown after `wait` seconds), then
        keep watching."""
        deadline = self._clock() + wait
        last_note = ""
        while True:
            await self.round()
            note = self._missing()
            if not note:
                break
            if note != last_note:
                log.info("waiting: %s", note)
                last_note = note
            if self._clock() > deadline:
                raise StageDown(f"{note} after {wait:.0f}s")
            await self._sleep(0.2)
        self._connected()
        self._watch = asyncio.get_running_loop().create_task(self.watch())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await asyncio.gather(*(r.close() for r in self.replicas.values()))
