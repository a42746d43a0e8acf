"""Session state owned by the coordinator's engine: token history, rope delta, the images and
videos seen, the messages for the chat template, which replica of each layer range holds the
session's KV, and how many leading positions those replicas hold."""

from __future__ import annotations

import bisect
import time
import uuid
from dataclasses import dataclass, field

from .visual import Visual


@dataclass
class Session:
    id: str
    owner: str  # id of the API key that created it ("" when the coordinator has no keys)
    persistent: bool  # False: a one-shot request's session, gone (or parked for its prefix) when it ends
    token_ids: list[int] = field(default_factory=list)  # the whole conversation so far
    # Absolute positions of the visual rows (image and video placeholders of the prompts), in the
    # order of the visuals' embedding rows. Generated tokens are never among them, whatever their id.
    visual_positions: list[int] = field(default_factory=list)
    visuals: list[Visual] = field(default_factory=list)  # every image and video so far, in prompt order
    messages: list[dict] = field(default_factory=list)  # for the chat template (no image bytes)
    rope_delta: int = 0
    cached: int = 0  # leading positions whose KV the pinned replicas hold
    # The pinned replicas may hold positions beyond `cached` (a failed turn, a reused prefix):
    # the next step tells them to drop those first.
    rewind: bool = False
    replicas: dict[int, str] = field(default_factory=dict)  # range index -> replica address holding the KV
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @classmethod
    def new(cls, owner: str, persistent: bool, now: float) -> Session:
        return cls(uuid.uuid4().hex, owner, persistent, last_used=now)

    def visual_rows_from(self, position: int) -> int:
        """Index of the first visual row at or after `position`."""
        return bisect.bisect_left(self.visual_positions, position)

    def visual_index_of_row(self, row: int) -> int:
        """Which visual a session-wide row belongs to (rows are the visuals' rows in order)."""
        at = 0
        for i, v in enumerate(self.visuals):
            at += v.rows
            if row < at:
                return i
        return len(self.visuals)

    def forget_kv(self) -> None:
        """The stages hold nothing of this session any more (or nothing we can trust)."""
        self.cached = 0
        self.rewind = False
        self.replicas.clear()
