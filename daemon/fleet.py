"""The fleet: enrollment, heartbeat intake, labels, online/offline.

The latest heartbeat of every node lives in memory and reaches SQLite in one batch at most once
a second (and at shutdown), so 10,000 nodes heartbeating every 10 s cost one transaction a
second, not a thousand. Losing the last second of heartbeats in a crash loses nothing: every
node says it all again in its next one. Tokens are stored only as SHA-256 digests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import Any

from imageswarm.agent.errors import ImageSwarmError
from imageswarm.daemon.db import Database
from imageswarm.daemon.errors import NotFound, Unauthorized
from imageswarm.daemon.events import EventBus
from imageswarm.daemon.jsonfields import iso_time
from imageswarm.daemon.metrics import Metrics, Sample
from imageswarm.daemon.nodereport import Heartbeat

log = logging.getLogger(__name__)

OFFLINE_AFTER = 3  # missed heartbeat intervals
FLUSH_EVERY = 1.0
PROGRESS_EVERY = 1.0
_TICK = 0.5
_DUMMY = hashlib.sha256(b"no such node").hexdigest()


@dataclass
class Node:
    name: str
    labels: dict[str, str]
    token_sha256: str
    enrolled: float
    last_seen: float | None = None  # unix time of the last heartbeat
    seen: float | None = None  # the same on the monotonic clock
    heartbeat: Heartbeat | None = None
    online: bool = False
    progress_at: float = -math.inf
    progress_key: str = field(default="", repr=False)

    def to_json(self, rollout: str | None) -> dict[str, Any]:
        hb = self.heartbeat
        return {
            "name": self.name,
            "labels": dict(self.labels),
            "last_seen": iso_time(self.last_seen),
            "online": self.online,
            "current_image": hb.current_image if hb else None,
            "previous_image": hb.previous_image if hb else None,
            "kernel": hb.kernel if hb else None,
            "agent": hb.raw.get("agent") if hb else None,
            "fetches": hb.raw.get("fetches") or {} if hb else {},
            "action": hb.raw.get("action") if hb else None,
            "rollout": rollout,
        }


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Fleet:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        metrics: Metrics,
        *,
        join_secret: str | None,
        interval: float,
    ) -> None:
        self._db, self._bus, self._metrics = db, bus, metrics
        self.join_secret = join_secret
        self.interval = interval
        self._nodes: dict[str, Node] = {}
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        wall, mono = time.time(), time.monotonic()
        for row in await self._db.load_nodes():
            node = Node(row.name, dict(row.labels), row.token_sha256, row.enrolled, row.last_seen)
            if row.report is not None and row.last_seen is not None:
                try:
                    node.heartbeat = Heartbeat.parse(dict(row.report))
                except ImageSwarmError as exc:  # stored by another version: its next one will do
                    log.warning("node %s: ignoring its stored heartbeat (%s)", row.name, exc)
                node.seen = mono - max(0.0, wall - row.last_seen)
                node.online = mono - node.seen <= self.offline_after
            self._nodes[row.name] = node
        self._task = asyncio.create_task(self._run(), name="fleet")
        self._metrics.gauge("imageswarm_nodes", "Enrolled nodes by state.", self._node_samples)
        self._metrics.gauge(
            "imageswarm_node_bytes_total",
            "Image bytes nodes fetched, by source (summed from the latest heartbeats).",
            self._byte_samples,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    @property
    def offline_after(self) -> float:
        return OFFLINE_AFTER * self.interval

    # Queries

    def nodes(self) -> list[Node]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    def find(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def get(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            raise NotFound(f"node {name!r} is not enrolled")
        return node

    def image_user(self, image_id: str) -> str | None:
        """Why `image_id` must stay (a node runs it or keeps it to roll back to), or None."""
        for node in self.nodes():
            hb = node.heartbeat
            if hb is not None and image_id == hb.current_image:
                return f"node {node.name} runs image {image_id}"
            if hb is not None and image_id == hb.previous_image:
                return f"node {node.name} keeps image {image_id} to roll back to"
        return None

    # Enrollment, authentication, labels

    async def enroll(self, name: str, secret: str, labels: Mapping[str, str]) -> str:
        """Enroll `name` (or re-enroll it, rotating its token); returns the new token.

        Labels the node sends override those of the same name; others set by an operator stay.
        """
        if self.join_secret is None:
            raise Unauthorized("node enrollment is disabled: the controller has no join_secret")
        if not compare_digest(secret.encode(), self.join_secret.encode()):
            raise Unauthorized("wrong join secret")
        token = secrets.token_urlsafe(32)
        old = self._nodes.get(name)
        merged = {**(old.labels if old else {}), **labels}
        now = time.time()
        await self._db.enroll_node(name, _digest(token), merged, now)
        if old is None:
            self._nodes[name] = Node(name, merged, _digest(token), now)
        else:
            old.labels, old.token_sha256, old.enrolled = merged, _digest(token), now
        log.info("node %s enrolled", name)
        await self._bus.publish("node.enrolled", node=name, labels=merged)
        return token

    def authenticate(self, name: str, authorization: str) -> Node:
        scheme, _, token = authorization.partition(" ")
        node = self._nodes.get(name)
        digest = _digest(token.strip())
        ok = compare_digest(digest, node.token_sha256 if node else _DUMMY)
        if node is None or scheme.lower() != "bearer" or not ok:
            raise Unauthorized(
                f"node {name!r} needs 'Authorization: Bearer <its token>'; enroll to get one"
            )
        return node

    async def set_labels(self, name: str, labels: Mapping[str, str]) -> Node:
        node = self.get(name)
        await self._db.set_labels(name, labels)
        node.labels = dict(labels)
        return node

    # Heartbeats

    async def heartbeat(self, node: Node, hb: Heartbeat) -> None:
        """Take a node's heartbeat: keep it, count it, say what changed."""
        previous, node.heartbeat = node.heartbeat, hb
        node.last_seen, node.seen = time.time(), time.monotonic()
        self._dirty.add(node.name)
        self._metrics.heartbeats.inc()
        for image_id, fetch in hb.fetches.items():
            before = previous.fetches.get(image_id) if previous else None
            done_before = before is not None and before.state == "done"
            if fetch.state == "done" and not done_before and fetch.duration is not None:
                self._metrics.fetch_seconds.observe(fetch.duration)
        if not node.online:
            node.online = True
            await self._bus.publish("node.online", node=node.name)
        await self._progress(node, hb)

    async def _progress(self, node: Node, hb: Heartbeat) -> None:
        pending = (hb.agent or {}).get("pending")
        action = hb.action
        key = json.dumps(
            [
                {i: (f.state, f.done_bytes, f.total_bytes, f.error) for i, f in hb.fetches.items()},
                pending,
                (action.id, action.status, action.detail) if action else None,
            ],
            sort_keys=True,
        )
        now = time.monotonic()
        if key == node.progress_key or now - node.progress_at < PROGRESS_EVERY:
            return
        node.progress_key, node.progress_at = key, now
        await self._bus.publish(
            "node.progress",
            node=node.name,
            fetches=hb.raw.get("fetches") or {},
            agent={"pending": pending},
            action=hb.raw.get("action"),
        )

    async def flush(self) -> None:
        """Write the heartbeats received since the last flush, in one transaction."""
        if not self._dirty:
            return
        names, self._dirty = self._dirty, set()
        states = []
        for name in sorted(names):
            node = self._nodes[name]
            if node.heartbeat is not None and node.last_seen is not None:
                states.append((name, node.last_seen, node.heartbeat.raw))
        try:
            await self._db.save_heartbeats(states)
        except BaseException:
            self._dirty |= names  # the next flush writes them (with whatever came since)
            raise

    async def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for node in self.nodes():
                if node.online and (node.seen is None or now - node.seen > self.offline_after):
                    node.online = False
                    log.info("node %s is offline", node.name)
                    await self._bus.publish(
                        "node.offline", node=node.name, last_seen=iso_time(node.last_seen)
                    )
            if now - last_flush >= FLUSH_EVERY:
                last_flush = now
                try:
                    await self.flush()
                except Exception:
                    log.exception("storing heartbeats failed; retrying in %gs", FLUSH_EVERY)

    # Metrics

    async def _node_samples(self) -> Iterable[Sample]:
        online = sum(1 for n in self._nodes.values() if n.online)
        return [({"state": "online"}, online), ({"state": "offline"}, len(self._nodes) - online)]

    async def _byte_samples(self) -> Iterable[Sample]:
        totals: dict[str, int] = {}
        for node in self._nodes.values():
            for fetch in node.heartbeat.fetches.values() if node.heartbeat else ():
                for source, n in fetch.bytes_by_source.items():
                    totals[source] = totals.get(source, 0) + n
        return [({"source": s}, float(n)) for s, n in sorted(totals.items())]
