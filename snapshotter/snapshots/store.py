"""SQLite metadata for snapshots: one row per snapshot, keyed by (namespace, key).

Why SQLite: a single file under the root, transactional, crash-safe in WAL mode against a
``kill -9`` at any instant, and fast enough (indexed lookups well under a millisecond) to run
directly on the daemon's asyncio loop. Rows carry a numeric id from AUTOINCREMENT, so an id is
never reused even after a crash and the directory ``snapshots/<id>`` names exactly one record.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from snapshotter.errors import FailedPrecondition, NotFound, quoted

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote_dir TEXT,
    UNIQUE (ns, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_key ON snapshots(key);
"""

_SELECT = """
SELECT s.id, s.ns, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.created_ns,
       s.updated_ns, s.labels, s.size, s.inodes, s.remote_dir
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered as containerd's API numbers them."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        """The spelling containerd's filters use (``kind==committed``)."""
        return self.name.lower()


@dataclass
class Record:
    """One snapshot as stored; ``parent`` is the parent's key (empty for none)."""

    id: int
    ns: str
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0
    remote_dir: str | None = None


def _record(row: tuple[Any, ...]) -> Record:
    rid, ns, key, kind, parent_id, parent, created, updated, labels, size, inodes, remote = row
    return Record(
        id=int(rid),
        ns=str(ns),
        key=str(key),
        kind=Kind(kind),
        parent_id=None if parent_id is None else int(parent_id),
        parent=str(parent),
        created_ns=int(created),
        updated_ns=int(updated),
        labels=json.loads(str(labels)),
        size=int(size),
        inodes=int(inodes),
        remote_dir=None if remote is None else str(remote),
    )


class MetaStore:
    """Snapshot records in ``<root>/metadata.db``.

    ``ns`` is the containerd namespace; ``None`` means "no namespace given", which containerd's
    garbage collector uses: lookups then span every namespace (keys from containerd carry their
    namespace as a prefix, so they stay unique).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT, rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def find(self, ns: str | None, key: str) -> Record | None:
        if ns is None:
            rows = self.db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchall()
            if len(rows) > 1:
                raise FailedPrecondition(
                    f"snapshot {quoted(key)} exists in several namespaces: set containerd-namespace"
                )
        else:
            rows = self.db.execute(_SELECT + " WHERE s.ns = ? AND s.key = ?", (ns, key)).fetchall()
        return _record(rows[0]) if rows else None

    def get(self, ns: str | None, key: str) -> Record:
        record = self.find(ns, key)
        if record is None:
            raise NotFound(f"snapshot {quoted(key)} does not exist")
        return record

    def by_id(self, rid: int) -> Record:
        rows = self.db.execute(_SELECT + " WHERE s.id = ?", (rid,)).fetchall()
        if not rows:
            raise NotFound(f"snapshot id {rid} does not exist")
        return _record(rows[0])

    def all(self, ns: str | None) -> list[Record]:
        if ns is None:
            rows = self.db.execute(_SELECT + " ORDER BY s.id").fetchall()
        else:
            rows = self.db.execute(_SELECT + " WHERE s.ns = ? ORDER BY s.id", (ns,)).fetchall()
        return [_record(r) for r in rows]

    def ancestors(self, rid: int) -> list[Record]:
        """The parent chain of snapshot ``rid``, nearest first (the snapshot excluded)."""
        rows = self.db.execute(
            """
            WITH RECURSIVE chain(id, depth) AS (
                SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL
                UNION ALL
                SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id
                WHERE s.parent_id IS NOT NULL
            )
            SELECT id FROM chain ORDER BY depth
            """,
            (rid,),
        ).fetchall()
        ids = [int(r[0]) for r in rows]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        found = self.db.execute(_SELECT + f" WHERE s.id IN ({marks})", ids).fetchall()
        by_id = {int(row[0]): _record(row) for row in found}
        return [by_id[i] for i in ids]

    def has_children(self, rid: int) -> bool:
        row = self.db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (rid,))
        return row.fetchone() is not None

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self.db.execute("SELECT id FROM snapshots")}

    def insert(self, record: Record) -> int:
        cur = self.db.execute(
            "INSERT INTO snapshots (ns, key, kind, parent_id, created_ns, updated_ns, labels,"
            " size, inodes, remote_dir) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.ns,
                record.key,
                int(record.kind),
                record.parent_id,
                record.created_ns,
                record.updated_ns,
                json.dumps(record.labels, sort_keys=True),
                record.size,
                record.inodes,
                record.remote_dir,
            ),
        )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def save(self, record: Record) -> None:
        """Write back the mutable columns of an existing row."""
        self.db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, labels = ?,"
            " size = ?, inodes = ?, remote_dir = ? WHERE id = ?",
            (
                record.key,
                int(record.kind),
                record.created_ns,
                record.updated_ns,
                json.dumps(record.labels, sort_keys=True),
                record.size,
                record.inodes,
                record.remote_dir,
                record.id,
            ),
        )

    def delete(self, rid: int) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id = ?", (rid,))
