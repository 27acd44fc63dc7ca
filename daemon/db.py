"""The controller's SQLite database: the one place that knows the schema and its SQL.

One connection (WAL, synchronous=NORMAL, foreign keys) used from one dedicated thread; every
public method is async and runs its SQL there. Writes are group-committed (see sqlthread.py):
a write is queued when its method is called and the caller resumes once it is committed.

The schema evolves by appending a script to MIGRATIONS, never by editing one: `open` applies
the missing ones in order, each in its own transaction, and records it in `schema_version`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Final

from imageswarm.daemon.sqlthread import DatabaseError as DatabaseError
from imageswarm.daemon.sqlthread import SqlThread
from imageswarm.daemon.sqlthread import connect as connect

NewEvent = tuple[str, Mapping[str, Any]]

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the fleet and the event log.
    """
    CREATE TABLE nodes (
        name         TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL,           -- hex SHA-256 of the node's bearer token
        labels       TEXT NOT NULL,           -- JSON object {str: str}
        enrolled     REAL NOT NULL,           -- unix time of the last enrollment
        last_seen    REAL,                    -- unix time of the last heartbeat
        report       TEXT                     -- JSON: the last heartbeat body, as validated
    );
    CREATE TABLE events (
        seq  INTEGER PRIMARY KEY,             -- the SSE id; never reused (append-only)
        ts   REAL NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL                    -- JSON object
    );
    """,
    # 2: rollouts and each target node's progress in them.
    """
    CREATE TABLE rollouts (
        id       INTEGER PRIMARY KEY,         -- shown as r-<id>
        image_id TEXT NOT NULL,
        strategy TEXT NOT NULL,               -- JSON, normalised
        state    TEXT NOT NULL,
        stage    TEXT NOT NULL,               -- prefetching|applying|rolling-back: where it was
        batch    INTEGER NOT NULL,
        batches  INTEGER NOT NULL,
        failures INTEGER NOT NULL,            -- since creation or the last resume
        created  REAL NOT NULL,
        updated  REAL NOT NULL,
        reason   TEXT
    );
    CREATE TABLE rollout_nodes (
        rollout  INTEGER NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
        node     TEXT NOT NULL REFERENCES nodes(name),
        position INTEGER NOT NULL,            -- order of the targets as chosen
        batch    INTEGER NOT NULL,
        status   TEXT NOT NULL,
        detail   TEXT,
        attempt  INTEGER NOT NULL,            -- part of the action id: a retry is a new action
        started  REAL,
        finished REAL,
        PRIMARY KEY (rollout, node)
    );
    CREATE INDEX rollout_nodes_by_node ON rollout_nodes(node, status);
    CREATE INDEX rollouts_by_state ON rollouts(state);
    """,
)

_TERMINAL = ("done", "aborted", "rolled-back")
_IN_FLIGHT = ("applying", "rolling-back")


@dataclass(frozen=True)
class NodeRow:
    name: str
    token_sha256: str
    labels: Mapping[str, str]
    enrolled: float
    last_seen: float | None = None
    report: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    kind: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class RolloutRow:
    """A `rollouts` row: the fields are its columns, in order."""

    id: int
    image_id: str
    strategy: Mapping[str, Any]
    state: str
    stage: str
    batch: int
    batches: int
    failures: int
    created: float
    updated: float
    reason: str | None


@dataclass(frozen=True)
class RolloutNodeRow:
    """A `rollout_nodes` row: the fields are its columns, in order."""

    rollout: int
    node: str
    position: int
    batch: int
    status: str
    detail: str | None
    attempt: int
    started: float | None
    finished: float | None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def migrate(conn: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the schema up to date; returns the version. `conn` must be in autocommit mode."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied REAL)"
    )
    current: int = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[
        0
    ]
    if current > len(migrations):
        raise DatabaseError(
            f"the database has schema version {current}, newer than this imageswarm knows "
            f"({len(migrations)}); upgrade imageswarm or restore an older database"
        )
    for version in range(current + 1, len(migrations) + 1):
        script = migrations[version - 1]
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\n"
                f"INSERT INTO schema_version VALUES ({version}, {time.time()!r});\nCOMMIT;"
            )
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise DatabaseError(
                f"migrating the database to version {version} failed: {exc}"
            ) from None
    return len(migrations)


class Database:
    """The controller's tables, typed. Every method runs its SQL on the connection's thread."""

    def __init__(self, sql: SqlThread, version: int) -> None:
        self._sql, self.version = sql, version
        self.path = sql.path
        self._run, self._write = sql.run, sql.write

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating it if needed) and migrate the database at `path`."""
        sql = SqlThread(path)
        try:
            version = await sql.open(migrate)
        except BaseException:
            await sql.close()
            raise
        return cls(sql, version)

    async def close(self) -> None:
        """Finish the queued writes, then close the connection and its thread."""
        await self._sql.close()

    # Nodes

    async def load_nodes(self) -> list[NodeRow]:
        def query(conn: sqlite3.Connection) -> list[NodeRow]:
            rows = conn.execute(
                "SELECT name, token_sha256, labels, enrolled, last_seen, report FROM nodes "
                "ORDER BY name"
            )
            return [
                NodeRow(n, t, json.loads(lb), e, s, json.loads(r) if r else None)
                for n, t, lb, e, s, r in rows
            ]

        return await self._run(query)

    async def enroll_node(
        self, name: str, token_sha256: str, labels: Mapping[str, str], enrolled: float
    ) -> None:
        sql = (
            "INSERT INTO nodes (name, token_sha256, labels, enrolled) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256, "
            "labels = excluded.labels, enrolled = excluded.enrolled"
        )
        args = (name, token_sha256, _dumps(dict(labels)), enrolled)
        await self._write(lambda conn: _execute(conn, sql, args))

    async def set_labels(self, name: str, labels: Mapping[str, str]) -> None:
        args = (_dumps(dict(labels)), name)
        sql = "UPDATE nodes SET labels=? WHERE name=?"
        await self._write(lambda conn: _execute(conn, sql, args))

    async def save_heartbeats(self, states: Sequence[tuple[str, float, Mapping[str, Any]]]) -> None:
        """Store the latest heartbeat of many nodes in one statement batch."""
        args = [(seen, _dumps(report), name) for name, seen, report in states]
        sql = "UPDATE nodes SET last_seen=?, report=? WHERE name=?"
        await self._write(lambda conn: _execute(conn, sql, args, many=True))

    # Events

    async def append_events(self, events: Sequence[NewEvent]) -> list[Event]:
        now = time.time()
        rows = [(now, kind, _dumps(dict(data))) for kind, data in events]
        return await self._write(lambda conn: _append(conn, rows))

    async def events_after(self, seq: int, limit: int = 500) -> list[Event]:
        def query(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, ts, kind, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            return [Event(s, ts, k, json.loads(d)) for s, ts, k, d in rows]

        return await self._run(query)

    async def last_event_seq(self) -> int:
        return await self._run(
            lambda conn: int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
        )

    # Rollouts

    async def save_rollout(
        self, rollout: RolloutRow, nodes: Sequence[RolloutNodeRow], events: Sequence[NewEvent]
    ) -> list[Event]:
        """Store a rollout, the node rows that changed and the events saying so, atomically."""
        now = time.time()
        event_rows = [(now, kind, _dumps(dict(data))) for kind, data in events]
        rollout_args = astuple(rollout)
        rollout_args = (*rollout_args[:2], _dumps(dict(rollout.strategy)), *rollout_args[3:])
        node_args = [astuple(n) for n in nodes]

        def job(conn: sqlite3.Connection) -> list[Event]:
            conn.execute(
                "INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "state=excluded.state, stage=excluded.stage, batch=excluded.batch, "
                "failures=excluded.failures, updated=excluded.updated, reason=excluded.reason",
                rollout_args,
            )
            conn.executemany(
                "INSERT INTO rollout_nodes VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(rollout, node) DO UPDATE SET status=excluded.status, "
                "detail=excluded.detail, attempt=excluded.attempt, started=excluded.started, "
                "finished=excluded.finished",
                node_args,
            )
            return _append(conn, event_rows)

        return await self._write(job)

    async def max_rollout_id(self) -> int:
        return await self._run(
            lambda conn: int(
                conn.execute("SELECT coalesce(max(id), 0) FROM rollouts").fetchone()[0]
            )
        )

    async def load_rollouts(
        self, *, live: bool = False
    ) -> list[tuple[RolloutRow, list[RolloutNodeRow]]]:
        """Every rollout, oldest first; `live`: only those not finished or with a node that is
        still applying or rolling back."""
        where = ""
        args: tuple[str, ...] = ()
        if live:
            where = (
                f"WHERE state NOT IN ({','.join('?' * len(_TERMINAL))}) OR id IN "
                f"(SELECT rollout FROM rollout_nodes WHERE status IN "
                f"({','.join('?' * len(_IN_FLIGHT))}))"
            )
            args = _TERMINAL + _IN_FLIGHT
        return await self._run(lambda conn: _rollouts(conn, where, args))

    async def load_rollout(self, rollout_id: int) -> tuple[RolloutRow, list[RolloutNodeRow]] | None:
        found = await self._run(lambda conn: _rollouts(conn, "WHERE id = ?", (rollout_id,)))
        return found[0] if found else None

    async def rollout_states(self) -> dict[str, int]:
        def query(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, count(*) FROM rollouts GROUP BY state")
            return {state: count for state, count in rows}

        return await self._run(query)

    async def later_changes(self, rollout_id: int, nodes: Sequence[str]) -> dict[str, int]:
        """Nodes of `nodes` that a later rollout started applying or rolling back, with it."""

        def query(conn: sqlite3.Connection) -> dict[str, int]:
            found: dict[str, int] = {}
            for name in nodes:
                row = conn.execute(
                    "SELECT max(rollout) FROM rollout_nodes WHERE node = ? AND rollout > ? AND "
                    "status NOT IN ('pending', 'prefetching', 'prefetched')",
                    (name, rollout_id),
                ).fetchone()
                if row[0] is not None:
                    found[name] = int(row[0])
            return found

        return await self._run(query)


def _execute(conn: sqlite3.Connection, sql: str, args: Any, *, many: bool = False) -> None:
    if many:
        conn.executemany(sql, args)
    else:
        conn.execute(sql, args)


def _append(conn: sqlite3.Connection, rows: Sequence[tuple[float, str, str]]) -> list[Event]:
    """Insert events (data already JSON: serialised when queued, so later edits cannot leak)."""
    events = []
    for ts, kind, data in rows:
        cursor = conn.execute(
            "INSERT INTO events (ts, kind, data) VALUES (?, ?, ?)", (ts, kind, data)
        )
        assert cursor.lastrowid is not None
        events.append(Event(cursor.lastrowid, ts, kind, json.loads(data)))
    return events


def _rollouts(
    conn: sqlite3.Connection, where: str, args: tuple[Any, ...]
) -> list[tuple[RolloutRow, list[RolloutNodeRow]]]:
    found = []
    for row in conn.execute(f"SELECT * FROM rollouts {where} ORDER BY id", args).fetchall():
        rid, image, strategy, *rest = row
        rollout = RolloutRow(rid, image, json.loads(strategy), *rest)
        nodes = [
            RolloutNodeRow(*n)
            for n in conn.execute(
                "SELECT * FROM rollout_nodes WHERE rollout = ? ORDER BY position", (rid,)
            )
        ]
        found.append((rollout, nodes))
    return found
