"""The controller database and event log: migrations, group commit, replay then live."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from imageswarm.daemon import db as dbmod
from imageswarm.daemon import sqlthread
from imageswarm.daemon.db import MIGRATIONS, Database, DatabaseError, RolloutNodeRow, RolloutRow
from imageswarm.daemon.events import EventBus


def _rollout(rid: int = 1) -> RolloutRow:
    return RolloutRow(rid, "img", {"canary": 1}, "applying", "applying", 0, 1, 0, 1.0, 2.0, None)


def _target(node: str, rid: int = 1) -> RolloutNodeRow:
    return RolloutNodeRow(rid, node, 0, 0, "applying", None, 1, None, None)


async def test_open_migrates_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = dbmod.connect(path)
    assert dbmod.migrate(conn, MIGRATIONS[:1]) == 1
    conn.execute(
        "INSERT INTO nodes (name, token_sha256, labels, enrolled) VALUES ('n1', 'x', '{}', 1)"
    )
    conn.execute("INSERT INTO events (ts, kind, data) VALUES (1, 'node.enrolled', '{}')")
    conn.close()

    db = await Database.open(path)
    try:
        assert db.version == len(MIGRATIONS) == 2
        assert [n.name for n in await db.load_nodes()] == ["n1"]
        assert await db.last_event_seq() == 1
        events = await db.save_rollout(_rollout(), [_target("n1")], [("rollout.created", {})])
        assert [e.seq for e in events] == [2]
        [(row, nodes)] = await db.load_rollouts(live=True)
        assert row == _rollout() and nodes == [_target("n1")]
    finally:
        await db.close()
    conn = sqlite3.connect(path)
    versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [1, 2]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    conn = dbmod.connect(tmp_path / "x.db")
    dbmod.migrate(conn, MIGRATIONS[:1])
    broken = (MIGRATIONS[0], "CREATE TABLE extra (a); CREATE TABLE nodes (again);")
    with pytest.raises(DatabaseError, match="version 2"):
        dbmod.migrate(conn, broken)
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
    tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "extra" not in tables
    conn.close()


async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = dbmod.connect(path)
    dbmod.migrate(conn)
    conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    conn.close()
    with pytest.raises(DatabaseError, match="newer than this imageswarm"):
        await Database.open(path)


async def test_writes_are_group_committed_in_call_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions: list[int] = []
    real = sqlthread._transaction

    def counting(conn: sqlite3.Connection, jobs: Any) -> list[Any]:
        transactions.append(len(jobs))
        return real(conn, jobs)

    monkeypatch.setattr(sqlthread, "_transaction", counting)
    db = await Database.open(tmp_path / "c.db")
    try:
        await db.enroll_node("n1", "x", {}, 1.0)
        transactions.clear()
        writes = [db.append_events([("e", {"i": i})]) for i in range(300)]
        # A rollout naming a node that does not exist breaks a foreign key: only it fails.
        bad = db.save_rollout(_rollout(), [_target("ghost")], [("rollout.created", {})])
        more = [db.append_events([("e", {"i": i})]) for i in range(300, 310)]
        results = await asyncio.gather(*writes, bad, *more, return_exceptions=True)
    finally:
        await db.close()
    assert isinstance(results[300], sqlite3.IntegrityError)
    seqs = [r[0].seq for r in results if isinstance(r, list)]
    datas = [r[0].data["i"] for r in results if isinstance(r, list)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 310
    assert datas == list(range(310))
    assert sum(transactions) == 311 and len(transactions) < 20, transactions
    db = await Database.open(tmp_path / "c.db")
    try:
        assert await db.load_rollout(1) is None  # the failed write left nothing behind
        assert len(await db.events_after(0, limit=1000)) == 310
    finally:
        await db.close()


async def test_close_finishes_queued_writes(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "q.db")
    tasks = [asyncio.ensure_future(db.append_events([("e", {"i": i})])) for i in range(50)]
    await asyncio.sleep(0)
    await db.close()
    assert all(t.done() and not t.exception() for t in tasks)
    db = await Database.open(tmp_path / "q.db")
    try:
        assert await db.last_event_seq() == 50
    finally:
        await db.close()


async def test_subscribers_replay_the_log_then_follow_live(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "e.db")
    try:
        first = EventBus(db, window=2)
        await first.start()
        for i in range(5):
            await first.publish("tick", i=i)
        bus = EventBus(db, window=2)  # a restarted controller: nothing in memory
        await bus.start()
        assert bus.last_seq == 5
        sub = bus.subscribe(1)
        assert [e.data["i"] for e in await sub.next_batch(1) or []] == [1, 2, 3, 4]
        assert await sub.next_batch(0.05) == []  # nothing new: the timeout answers
        waiter = asyncio.ensure_future(sub.next_batch(5))
        await asyncio.sleep(0.01)
        published = await bus.publish("tick", i=5, kind="payload may use 'kind'")
        assert [e.seq for e in await waiter or []] == [published.seq] == [6]
        old = bus.subscribe(0)  # older than the window: read from the database
        assert [e.seq for e in await old.next_batch(1) or []] == [1, 2, 3, 4, 5, 6]
        seen: list[int] = []

        async def follow() -> None:
            async for event in bus.subscribe(6):
                seen.append(event.seq)

        follower = asyncio.ensure_future(follow())
        await bus.publish("tick", i=6)
        await asyncio.sleep(0.01)
        bus.close()
        await asyncio.wait_for(follower, 1)
        assert seen == [7]
        assert await sub.next_batch(1) is None
    finally:
        await db.close()
