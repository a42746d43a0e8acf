"""Durable sessions: each persistent session's history in SQLite under `--state-dir`, so a
coordinator killed and restarted loses no conversation.

Kept: token ids, the visual positions, the template messages, every image and video (its
vision input, stored once per content hash), the rope delta and the owner. Not kept: the KV
itself (the stages hold it; a restarted coordinator rebuilds a session's KV from its history on
the session's next turn) and in-flight turns (a turn is saved when it ends, before the client
hears that it did). SQLite's WAL with synchronous=NORMAL survives a killed process; a power cut
may lose the last turns."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmesh.internal.v1 import vision_pb2

from .session import Session
from .visual import Visual

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    updated REAL NOT NULL,
    token_ids BLOB NOT NULL,
    visual_positions BLOB NOT NULL,
    messages TEXT NOT NULL,
    visuals TEXT NOT NULL,
    rope_delta INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inputs (
    hash TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS session_inputs (
    session_id TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (session_id, hash)
);
"""


def _ids(values: list[int]) -> bytes:
    return array("q", values).tobytes()


def _unids(blob: bytes) -> list[int]:
    a = array("q")
    a.frombytes(blob)
    return a.tolist()


def _visual_json(v: Visual) -> dict:
    return {
        "kind": v.kind,
        "grid_thw": list(v.grid_thw),
        "hash": v.content_hash,
        "rows": v.rows,
        "fps": v.fps,
        "total_num_frames": v.total_num_frames,
        "frames_indices": list(v.frames_indices),
        "second_per_grid": v.second_per_grid,
    }


class SessionStore:
    """The SQLite file, written from one thread (the engine awaits each write)."""

    def __init__(self, state_dir: str):
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "sessions.sqlite3"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite3.Connection = self._pool.submit(self._open).result()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _save(self, row: tuple, inputs: list[tuple[str, bytes]]) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            for h, data in inputs:
                self._db.execute("INSERT OR IGNORE INTO inputs VALUES (?, ?)", (h, data))
                self._db.execute("INSERT OR IGNORE INTO session_inputs VALUES (?, ?)", (row[0], h))

    def _delete(self, session_id: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self._db.execute("DELETE FROM session_inputs WHERE session_id = ?", (session_id,))
            self._db.execute("DELETE FROM inputs WHERE hash NOT IN (SELECT hash FROM session_inputs)")

    def _load(self) -> list[Session]:
        inputs = {h: bytes(d) for h, d in self._db.execute("SELECT hash, data FROM inputs")}
        out = []
        rows = self._db.execute("SELECT id, owner, token_ids, visual_positions, messages, visuals, rope_delta FROM sessions")
        for sid, owner, ids, vpos, messages, visuals, delta in rows:
            vs = []
            for j in json.loads(visuals):
                vs.append(
                    Visual(
                        j["kind"],
                        vision_pb2.VisualInput.FromString(inputs[j["hash"]]),
                        tuple(j["grid_thw"]),
                        j["hash"],
                        j["rows"],
                        fps=j["fps"],
                        total_num_frames=j["total_num_frames"],
                        frames_indices=tuple(j["frames_indices"]),
                        second_per_grid=j["second_per_grid"],
                    )
                )
            s = Session(sid, owner, True, _unids(ids), _unids(vpos), vs, json.loads(messages), delta)
            out.append(s)
        return out

    async def save(self, s: Session) -> None:
        """Write the session as it is now (a snapshot taken here, on the caller's thread)."""
        row = (
            s.id,
            s.owner,
            time.time(),
            _ids(s.token_ids),
            _ids(s.visual_positions),
            json.dumps(s.messages),
            json.dumps([_visual_json(v) for v in s.visuals]),
            s.rope_delta,
        )
        inputs = [(v.content_hash, v.source.SerializeToString()) for v in s.visuals]
        await asyncio.wrap_future(self._pool.submit(self._save, row, inputs))

    async def delete(self, session_id: str) -> None:
        await asyncio.wrap_future(self._pool.submit(self._delete, session_id))

    def load(self) -> list[Session]:
        sessions = self._pool.submit(self._load).result()
        log.info("%d session(s) loaded from %s", len(sessions), self.path)
        return sessions

    def close(self) -> None:
        self._pool.submit(self._db.close).result()
        self._pool.shutdown()
