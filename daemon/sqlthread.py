"""One SQLite connection confined to one thread, with group commit, for asyncio callers.

Reads run on the thread as they come. Writes queue up: while one transaction runs, every write
queued meanwhile waits for the next, which runs them all, each inside its own savepoint, so a
thousand concurrent writers cost one commit and one writer's error never undoes another's. A
write is queued the moment `write` is called, so writes the event loop issues in one order
commit in that order, and a caller resumes only once its write is committed.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imageswarm.agent.errors import ImageSwarmError

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]


class DatabaseError(ImageSwarmError):
    """Raised when the database cannot be opened or migrated, or is used after closing."""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with the pragmas we rely on."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


@dataclass(frozen=True)
class _Failed:
    error: Exception


class SqlThread:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imageswarm-db")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Job, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self, setup: Callable[[sqlite3.Connection], T]) -> T:
        """Connect on the thread and run `setup` (the migrations) there first."""

        def opening() -> T:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = connect(self.path)
            except (OSError, sqlite3.Error) as exc:
                raise DatabaseError(f"cannot open the database {self.path}: {exc}") from None
            try:
                return setup(self._conn)
            except ImageSwarmError as exc:
                raise DatabaseError(f"{self.path}: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, opening)

    async def close(self) -> None:
        """Finish the queued writes, then close the connection and stop the thread."""
        if self._closed:
            return
        self._closed = True
        while self._writer is not None:
            await asyncio.shield(self._writer)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the connection's thread now (reads)."""
        conn = self._conn
        if conn is None:
            raise DatabaseError(f"the database {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    def write(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `job` for the next group commit; the future resolves once it is committed."""
        if self._closed:
            raise DatabaseError(f"the database {self.path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((job, future))
        if self._writer is None:
            self._writer = loop.create_task(self._drain(), name="imageswarm-db-writer")
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                jobs = [job for job, _ in batch]
                try:
                    outcomes = await self.run(functools.partial(_transaction, jobs=jobs))
                except Exception as exc:  # the commit itself failed: every write with it
                    outcomes = [_Failed(exc)] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, _Failed):
                        future.set_exception(outcome.error)
                    else:
                        future.set_result(outcome)
        finally:
            self._writer = None


def _transaction(conn: sqlite3.Connection, jobs: Sequence[Job]) -> list[Any]:
    outcomes: list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for job in jobs:
            conn.execute("SAVEPOINT job")
            try:
                outcomes.append(job(conn))
            except Exception as exc:
                conn.execute("ROLLBACK TO job")
                outcomes.append(_Failed(exc))
            conn.execute("RELEASE job")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes
