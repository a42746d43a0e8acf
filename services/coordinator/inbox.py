"""The engine's inbox: every message that may change the engine's state, as small frozen values.
Handlers, the mesh's watch and the engine's own tasks post them (`Engine.post`); the engine's loop
alone applies them. Also what the engine publishes of itself (`Counts`, `Snapshot`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common.errors import VlmeshError
from vlmesh.internal.v1 import vision_pb2

from .batch import BatchOutcome
from .placement import Placement
from .prepare import Prepared
from .replicas import ReplicaRecovered, ReplicaRestarted
from .request import RequestSpec, Stream


@dataclass(frozen=True)
class Counts:
    sessions: int  # persistent sessions plus requests in progress
    running: int
    waiting: int


@dataclass(frozen=True)
class Snapshot:
    counts: Counts
    pinned: dict[str, int]  # replica address -> sessions pinned there


@dataclass(frozen=True)
class AddRequest:
    spec: RequestSpec
    stream: Stream


@dataclass(frozen=True)
class CancelRequest:
    request_id: str
    why: VlmeshError


@dataclass(frozen=True)
class CreateSession:
    owner: str
    reply: asyncio.Future[str]


@dataclass(frozen=True)
class CloseSession:
    session_id: str
    owner: str | None  # None: the engine's own decision (expiry)
    reply: asyncio.Future[bool] | None


@dataclass(frozen=True)
class LookupSession:
    session_id: str
    owner: str
    reply: asyncio.Future[str]


@dataclass(frozen=True)
class SnapshotAsked:
    reply: asyncio.Future[Snapshot]


@dataclass(frozen=True)
class PrepareDone:
    request_id: str
    result: Prepared | VlmeshError


@dataclass(frozen=True)
class PlaceDone:
    request_id: str
    result: Placement | VlmeshError


@dataclass(frozen=True)
class RowsFetched:
    request_id: str
    result: list[vision_pb2.VisualEmbedding] | VlmeshError


@dataclass(frozen=True)
class TaskDone:
    request_id: str  # an evict-then-resume finished: the request may step again


@dataclass(frozen=True)
class StepDone:
    outcome: BatchOutcome


@dataclass(frozen=True)
class LeasesRenewed:
    address: str
    unknown: frozenset[str]  # session ids the replica no longer holds


@dataclass(frozen=True)
class Tick:
    pass


Message = (
    AddRequest
    | CancelRequest
    | CreateSession
    | CloseSession
    | LookupSession
    | SnapshotAsked
    | PrepareDone
    | PlaceDone
    | RowsFetched
    | TaskDone
    | StepDone
    | LeasesRenewed
    | Tick
    | ReplicaRestarted
    | ReplicaRecovered
)
