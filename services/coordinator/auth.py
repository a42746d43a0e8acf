"""API keys and per-key quotas of the coordinator's public port.

The keys file (`--api-keys-file`, env VLMESH_API_KEYS_FILE) holds one key per line, stored as
its SHA-256, never the key itself:

    # NAME  sha256:HEX  [max_requests=N] [max_sessions=N] [max_kv_mb=N]
    alice   sha256:9f86d0...  max_requests=4 max_sessions=16 max_kv_mb=512

`vlmesh keys new --name alice --file keys.txt` makes a key, prints it once and appends its line.
Callers send `authorization: Bearer KEY`. A session belongs to the key that created it; any other
key is told it does not exist. A quota of 0 (or absent) is no limit."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import Unauthenticated

_QUOTAS = ("max_requests", "max_sessions", "max_kv_mb")


@dataclass(frozen=True)
class Quota:
    max_requests: int = 0  # requests in flight at once
    max_sessions: int = 0  # live sessions (CreateSession)
    max_kv_mb: int = 0  # KV the key's sessions hold on the stages, MiB


@dataclass(frozen=True)
class Key:
    name: str
    digest: str  # hex SHA-256 of the key
    quota: Quota = field(default_factory=Quota)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_line(line: str, where: str) -> Key | None:
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    parts = line.split()
    if len(parts) < 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 7 + 64:
        raise ValueError(f"{where}: want `NAME sha256:HEX [max_requests=N] [max_sessions=N] [max_kv_mb=N]`")
    limits: dict[str, int] = {}
    for item in parts[2:]:
        name, _, value = item.partition("=")
        if name not in _QUOTAS or not value.isdigit():
            raise ValueError(f"{where}: unknown quota {item!r} (known: {', '.join(_QUOTAS)})")
        limits[name] = int(value)
    return Key(parts[0], parts[1][7:].lower(), Quota(**limits))


class Keyring:
    def __init__(self, keys: list[Key]):
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError("two API keys share a name")
        self._by_digest = {k.digest: k for k in keys}
        self.quotas = {k.name: k.quota for k in keys}

    @classmethod
    def load(cls, path: str) -> Keyring:
        if not path:
            return cls([])
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--api-keys-file {path}: {err.strerror}") from None
        keys = [k for i, line in enumerate(lines) if (k := parse_line(line, f"{path}:{i + 1}")) is not None]
        if not keys:
            raise ValueError(f"--api-keys-file {path}: no keys in it")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def identify(self, metadata) -> str:
        """The name of the caller's key ('' when the coordinator has no keys)."""
        if not self.enabled:
            return ""
        token = ""
        for k, v in metadata or ():
            if k == "authorization" and isinstance(v, str) and v[:7].lower() == "bearer ":
                token = v[7:].strip()
        if not token:
            raise Unauthenticated("this coordinator needs an API key: send `authorization: Bearer KEY`")
        d = digest(token)
        for known, key in self._by_digest.items():
            if hmac.compare_digest(known, d):
                return key.name
        raise Unauthenticated("unknown API key")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_cmd", required=True)
    new = sub.add_parser("new", help="make a key, print it once, append its hash to the keys file")
    new.add_argument("--name", required=True, help="who the key is for (sessions belong to it)")
    new.add_argument("--file", required=True, help="the coordinator's --api-keys-file")
    for q in _QUOTAS:
        new.add_argument("--" + q.replace("_", "-"), type=int, default=0, help=f"quota {q} (0 = none)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    existing = [k for i, line in enumerate(path.read_text().splitlines() if path.exists() else []) if (k := parse_line(line, f"{path}:{i + 1}"))]
    if any(k.name == args.name for k in existing):
        print(f"vlmesh keys: {path} already has a key named {args.name!r}", file=sys.stderr)
        return 2
    key = "vlm-" + secrets.token_urlsafe(32)
    limits = " ".join(f"{q}={getattr(args, q)}" for q in _QUOTAS if getattr(args, q))
    with path.open("a") as f:
        f.write(f"{args.name} sha256:{digest(key)}{' ' + limits if limits else ''}\n")
    print(key)
    print(f"(appended {args.name!r} to {path}; the key is not stored, keep it now)", file=sys.stderr)
    return 0
