"""Placement: which replica of each layer range holds a session's KV, and putting the KV there
(restored from the KV log) when the replica that held it is lost. Runs as a task of the engine's
before the session steps again; it returns a `Placement` and the engine alone pins it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import VlmeshError, short
from services.common.tracing import tracer

from .kv_log import KVLog
from .stage_client import Mesh, StageReplica

log = logging.getLogger(__name__)
_tracer = tracer("coordinator")


@dataclass(frozen=True)
class Placement:
    session_id: str
    pins: dict[int, str]  # range index -> the replica that holds the session's KV there now
    moved_from: dict[int, str]  # range index -> the replica it was moved away from (it may still hold the KV)
    replay: bool = False  # the KV is lost and the log cannot restore it: feed the history again


class Placer:
    def __init__(self, mesh: Mesh, kv_log: KVLog, load: Callable[[StageReplica], int], restore_timeout: Callable[[int], float]):
        self.mesh = mesh
        self.kv_log = kv_log
        self.load = load  # sessions pinned to a replica
        self.restore_timeout = restore_timeout  # positions -> seconds

    def unplaced(self, pins: dict[int, str]) -> list[int]:
        """The ranges where the session has no up replica pinned."""
        out = []
        for i in range(len(self.mesh.ranges)):
            rep = self.mesh.replicas.get(pins.get(i, ""))
            if rep is None or not rep.up:
                out.append(i)
        return out

    def pick_fresh(self, todo: list[int]) -> dict[int, str] | None:
        """Pins of the unplaced ranges `todo` for a session with nothing cached, without I/O; None
        when a range needs a refresh."""
        if any(not self.mesh.ranges[i].up() for i in todo):
            return None
        return {i: self.mesh.pick(i, load=self.load).address for i in todo}

    async def place(self, session_id: str, pins: dict[int, str], cached: int, avoid: frozenset[str]) -> Placement:
        """Pin every range to an up replica, restoring the KV where a pinned replica was lost."""
        new: dict[int, str] = {}
        moved: dict[int, str] = {}
        for i in self.unplaced(pins):
            old = pins.get(i, "")
            rep = self.mesh.replicas.get(old)
            if not self.mesh.ranges[i].up() or (rep is not None and not rep.up):
                await self.mesh.refresh(i)  # down a moment ago may be up again now
                rep = self.mesh.replicas.get(old)
            if rep is not None and rep.up and old not in avoid:
                new[i] = old
                continue
            if cached == 0:
                new[i] = self.mesh.pick(i, load=self.load).address
                continue
            restored = await self.restore(session_id, i, cached, exclude=avoid | {old})
            if restored is None:
                return Placement(session_id, {}, {}, replay=True)
            new[i] = restored.address
            if old:
                moved[i] = old
        return Placement(session_id, new, moved)

    async def restore(self, session_id: str, index: int, cached: int, exclude: frozenset[str]) -> StageReplica | None:
        """Put the session's KV for range `index` on an up replica from the KV log."""
        rng = self.mesh.ranges[index]
        entries = self.kv_log.entries(session_id, range(rng.start, rng.end), cached)
        if entries is None:
            return None
        candidates = [x for x in rng.up() if x.address not in exclude] or rng.up()
        for rep in sorted(candidates, key=self.load):
            try:
                with _tracer.start_as_current_span(
                    "restore",
                    attributes={"session.id": session_id, "vlmesh.layers": rng.label, "server.address": rep.address, "vlmesh.positions": cached},
                ):
                    await rep.restore(session_id, cached, entries, timeout=self.restore_timeout(cached))
            except VlmeshError as err:
                log.warning("restoring %s on %s failed: %s", short(session_id), rep.address, err)
                continue
            log.info("session %s: layers %s restored on %s (%d positions, no recompute)", short(session_id), rng.label, rep.address, cached)
            return rep
        return None
