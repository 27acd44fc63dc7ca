"""One rollout's state: its strategy, its fixed batches, each target's status, and the
transitions, each recorded with its event for the engine to store (see rollouts.py)."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imageswarm.agent.kernel import POLICIES
from imageswarm.daemon.db import NewEvent, RolloutNodeRow, RolloutRow
from imageswarm.daemon.errors import NotFound
from imageswarm.daemon.jsonfields import Fields, iso_time

log = logging.getLogger(__name__)

STATES = (
    "pending",
    "prefetching",
    "applying",
    "paused",
    "done",
    "halted",
    "aborted",
    "rolling-back",
    "rolled-back",
)
ACTIVE = ("pending", "prefetching", "applying", "paused", "rolling-back")
FINISHED = ("done", "aborted", "rolled-back")
STATUSES = (
    "pending",
    "prefetching",
    "prefetched",
    "applying",
    "applied",
    "failed",
    "rolling-back",
    "rolled-back",
)
IN_FLIGHT = ("applying", "rolling-back")  # a node changing its root: it finishes, whatever we say
REBOOT = POLICIES
KIND = {"prefetching": "prefetch", "applying": "apply", "rolling-back": "rollback"}
DONE = {"prefetching": "prefetched", "applying": "applied", "rolling-back": "rolled-back"}
_PERCENT = re.compile(r"([0-9]{1,3})%")
_ID = re.compile(r"r-([0-9]{1,18})")


@dataclass(frozen=True)
class Strategy:
    prefetch: bool = True
    canary: int = 1
    batch: int | str = "25%"
    max_failures: int = 0
    reboot: str = "auto"
    health: Mapping[str, str] | None = None

    @classmethod
    def parse(cls, data: Any) -> Strategy:
        """Validate a request's strategy; left-out keys take the defaults above."""
        if data is None:
            return cls()
        f = Fields(data, "strategy")
        f.only("prefetch", "canary", "batch", "max_failures", "reboot", "health")
        batch = f.get("batch") if "batch" in f.data else cls.batch
        if isinstance(batch, str):
            match = _PERCENT.fullmatch(batch)
            if match is None or not 1 <= int(match.group(1)) <= 100:
                raise f.fail("batch", "a node count >= 1 or a percent from 1% to 100%")
        else:
            batch = f.integer("batch", minimum=1)
        reboot = f.get("reboot") if "reboot" in f.data else cls.reboot
        if reboot not in REBOOT:
            raise f.fail("reboot", f"one of {', '.join(REBOOT)}")
        health = f.sub("health")
        if health is not None:
            if len(health.data) != 1 or next(iter(health.data)) not in ("command", "url"):
                raise f.fail("health", "null, {'command': '...'} or {'url': 'http://...'}")
            if "url" in health.data:
                health.text("url", re.compile(r"https?://\S+"))
            else:
                health.text("command")
        prefetch = f.boolean("prefetch", cls.prefetch)
        assert prefetch is not None
        return cls(
            prefetch=prefetch,
            canary=f.integer("canary", cls.canary),
            batch=batch,
            max_failures=f.integer("max_failures", cls.max_failures),
            reboot=reboot,
            health=dict(health.data) if health else None,
        )

    def batch_size(self, targets: int) -> int:
        if isinstance(self.batch, int):
            return self.batch
        percent = int(self.batch.rstrip("%"))
        return max(1, math.ceil(targets * percent / 100))

    def to_json(self) -> dict[str, Any]:
        return {
            "prefetch": self.prefetch,
            "canary": self.canary,
            "batch": self.batch,
            "max_failures": self.max_failures,
            "reboot": self.reboot,
            "health": dict(self.health) if self.health else None,
        }


def plan_batches(targets: Sequence[str], strategy: Strategy) -> list[list[str]]:
    """Rule 1: batch 0 holds the first `canary` targets, then chunks of the batch size."""
    canary = min(strategy.canary, len(targets))
    batches = [list(targets[:canary])] if canary else []
    size = strategy.batch_size(len(targets))
    rest = targets[canary:]
    batches += [list(rest[i : i + size]) for i in range(0, len(rest), size)]
    return batches


@dataclass
class Target:
    name: str
    position: int
    batch: int
    status: str = "pending"
    detail: str | None = None
    attempt: int = 1
    started: float | None = None
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batch": self.batch,
            "status": self.status,
            "detail": self.detail,
            "started": iso_time(self.started),
            "finished": iso_time(self.finished),
        }


@dataclass
class Rollout:
    id: int
    image_id: str
    strategy: Strategy
    batches: int
    targets: dict[str, Target]
    state: str = "pending"
    stage: str = "prefetching"
    batch: int = 0
    failures: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    reason: str | None = None
    # Changes made since the last commit.
    changed: dict[str, Target] = field(default_factory=dict)
    events: list[NewEvent] = field(default_factory=list)
    dirty: bool = False

    @property
    def rid(self) -> str:
        return f"r-{self.id}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def action_id(self, target: Target) -> str:
        base = f"{self.rid}:{KIND[target.status]}:{self.image_id}"
        return base if target.attempt == 1 else f"{base}:{target.attempt}"

    def in_batch(self, batch: int) -> list[Target]:
        return [t for t in self.targets.values() if t.batch == batch]

    def set_state(self, state: str, reason: str | None = None) -> None:
        if state in ("prefetching", "applying", "rolling-back"):
            self.stage = state
        self.state, self.reason, self.updated, self.dirty = state, reason, time.time(), True
        data = {"id": self.rid, "state": state, "batch": self.batch, "reason": reason}
        self.events.append(("rollout.state", data))
        log.info("rollout %s: %s, batch %d (%s)", self.rid, state, self.batch, reason or "-")

    def set_status(self, target: Target, status: str, detail: str | None = None) -> None:
        if status in KIND:  # a new instruction: its times are its own
            target.started = target.finished = None
        target.status, target.detail = status, detail
        self.changed[target.name] = target
        self.updated, self.dirty = time.time(), True
        data = {"id": self.rid, "node": target.name, "status": status, "detail": detail}
        self.events.append(("rollout.node", data))

    def row(self) -> RolloutRow:
        return RolloutRow(
            self.id,
            self.image_id,
            self.strategy.to_json(),
            self.state,
            self.stage,
            self.batch,
            self.batches,
            self.failures,
            self.created,
            self.updated,
            self.reason,
        )

    def to_json(self) -> dict[str, Any]:
        counts = dict.fromkeys(STATUSES, 0)
        for target in self.targets.values():
            counts[target.status] += 1
        return {
            "id": self.rid,
            "image_id": self.image_id,
            "strategy": self.strategy.to_json(),
            "state": self.state,
            "batch": self.batch,
            "batches": self.batches,
            "created": iso_time(self.created),
            "updated": iso_time(self.updated),
            "reason": self.reason,
            "nodes": [t.to_json() for t in self.targets.values()],
            "counts": counts,
        }

    @classmethod
    def from_rows(cls, row: RolloutRow, nodes: Iterable[RolloutNodeRow]) -> Rollout:
        s = row.strategy
        strategy = Strategy(
            s["prefetch"], s["canary"], s["batch"], s["max_failures"], s["reboot"], s["health"]
        )
        targets = {
            n.node: Target(
                n.node, n.position, n.batch, n.status, n.detail, n.attempt, n.started, n.finished
            )
            for n in nodes
        }
        return cls(
            row.id,
            row.image_id,
            strategy,
            row.batches,
            targets,
            row.state,
            row.stage,
            row.batch,
            row.failures,
            row.created,
            row.updated,
            row.reason,
        )


def parse_id(text: str) -> int:
    """The number in a rollout id (r-<n>); anything else names no rollout."""
    match = _ID.fullmatch(text)
    if match is None:
        raise NotFound(f"rollout {text!r} does not exist (ids look like r-1)")
    return int(match.group(1))
