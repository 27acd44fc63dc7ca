"""The append-only event log and its live fan-out to subscribers (the SSE stream).

Every event is committed to the `events` table before anyone hears of it, so a subscriber that
reconnects with the last id it saw misses nothing and sees nothing twice. Subscribers read the
recent past from a small in-memory window and anything older from the database.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from imageswarm.daemon.db import Database, Event

__all__ = ["Event", "EventBus", "Subscription"]


class EventBus:
    def __init__(self, db: Database, window: int = 1024) -> None:
        self._db = db
        self._window = window
        self._recent: list[Event] = []
        self._last = 0
        self._closed = False
        self._wakeup: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        self._last = await self._db.last_event_seq()

    @property
    def last_seq(self) -> int:
        return self._last

    @property
    def closed(self) -> bool:
        return self._closed

    async def publish(self, kind: str, /, **data: Any) -> Event:
        """Append one event to the log, then wake every subscriber."""
        (event,) = await self._db.append_events([(kind, data)])
        self.announce([event])
        return event

    def announce(self, events: Sequence[Event]) -> None:
        """Hand out events a database transaction has already committed (see Database)."""
        for event in events:
            if self._recent and event.seq <= self._recent[-1].seq:
                at = bisect.bisect_left(self._recent, event.seq, key=lambda e: e.seq)
                if at < len(self._recent) and self._recent[at].seq == event.seq:
                    continue
                self._recent.insert(at, event)
            else:
                self._recent.append(event)
            self._last = max(self._last, event.seq)
        del self._recent[: -self._window]
        if events:
            self._wake()

    def subscribe(self, since: int) -> Subscription:
        """Events with seq > `since`: the log's backlog first, then live ones as they come."""
        return Subscription(self, since)

    def close(self) -> None:
        """End every subscription (at shutdown): their iterators stop, waiters return None."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._wakeup
        self._wakeup = asyncio.get_running_loop().create_future()
        waiter.set_result(None)

    async def _after(self, seq: int, limit: int = 500) -> list[Event]:
        if seq >= self._last:
            return []
        recent = self._recent
        if recent and recent[0].seq <= seq + 1:
            at = bisect.bisect_right(recent, seq, key=lambda e: e.seq)
            found: list[Event] = []
            for event in recent[at : at + limit]:
                if event.seq != (found[-1].seq if found else seq) + 1:
                    break  # a gap: an event committed but not yet announced; the log has it
                found.append(event)
            if found:
                return found
        return await self._db.events_after(seq, limit)


class Subscription:
    """One subscriber's cursor into the log; iterate it, or call `next_batch` with a timeout."""

    def __init__(self, bus: EventBus, since: int) -> None:
        self._bus = bus
        self.cursor = since

    async def next_batch(self, timeout: float | None = None) -> list[Event] | None:  # noqa: ASYNC109
        """The next events after the cursor; [] when `timeout` passed first, None once the bus
        is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._bus.closed:
            waiter = self._bus._wakeup  # taken first, so an event announced meanwhile wakes us
            batch = await self._bus._after(self.cursor)
            if batch:
                self.cursor = batch[-1].seq
                return batch
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            await asyncio.wait([waiter], timeout=left)
        return None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while (batch := await self.next_batch()) is not None:
            for event in batch:
                yield event
