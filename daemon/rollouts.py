"""The rollout engine: batches, the state machine, and each node's instruction.

Driven from two sides: every heartbeat feeds in the node's report on its action and takes out
its instruction, and a tick every half second makes the transitions no heartbeat triggers.
Every decision is made synchronously in memory, then stored with its events in one database
write queued at once, so decisions commit in the order they were made. A controller restarted
mid-rollout loads the unfinished rollouts and carries on: nodes repeat their reports, and an
action id names one instruction, so a report counts once however often it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from imageswarm.daemon.db import Database, RolloutNodeRow
from imageswarm.daemon.errors import BadRequest, Conflict, NotFound
from imageswarm.daemon.events import EventBus
from imageswarm.daemon.fleet import Fleet
from imageswarm.daemon.metrics import Metrics, Sample
from imageswarm.daemon.nodereport import ActionReport
from imageswarm.daemon.rolloutstate import (
    DONE,
    FINISHED,
    IN_FLIGHT,
    KIND,
    STATES,
    STATUSES,
    Rollout,
    Strategy,
    Target,
    parse_id,
    plan_batches,
)

__all__ = ["NONE_ACTION", "Rollout", "RolloutEngine", "Strategy", "Target", "plan_batches"]
log = logging.getLogger(__name__)

TICK = 0.5
NONE_ACTION: Mapping[str, Any] = {
    "id": "",
    "kind": "none",
    "image_id": None,
    "policy": "auto",
    "health": None,
}


class RolloutEngine:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        fleet: Fleet,
        metrics: Metrics,
        has_image: Callable[[str], bool],
    ) -> None:
        self._db, self._bus, self._fleet, self._metrics = db, bus, fleet, metrics
        self._has_image = has_image
        self._live: dict[int, Rollout] = {}
        self._next_id = 1
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for row, nodes in await self._db.load_rollouts(live=True):
            self._live[row.id] = Rollout.from_rows(row, nodes)
        self._next_id = await self._db.max_rollout_id() + 1
        if self._live:
            log.info("carrying on with rollouts %s", ", ".join(r.rid for r in self._live.values()))
        self._metrics.gauge(
            "imageswarm_rollout_nodes",
            "Target nodes of unfinished rollouts by status.",
            self._node_samples,
        )
        self._metrics.gauge("imageswarm_rollouts", "Rollouts by state.", self._state_samples)
        self._task = asyncio.create_task(self._run(), name="rollout-engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # Queries

    def _claimant(self, node: str) -> tuple[Rollout, Target] | None:
        """The rollout that speaks for `node`: where it is mid-apply or mid-rollback, else the
        active one, else a halted one (whose prefetches may still finish)."""
        best: tuple[int, Rollout, Target] | None = None
        for r in self._live.values():
            t = r.targets.get(node)
            if t is None:
                continue
            if t.status in IN_FLIGHT:
                rank = 0
            elif r.active:
                rank = 1
            elif r.state == "halted":
                rank = 2
            else:
                continue
            if best is None or rank < best[0]:
                best = (rank, r, t)
        return None if best is None else (best[1], best[2])

    def _holder(self, node: str, but: Rollout | None = None) -> Rollout | None:
        """An active rollout other than `but` that holds `node`, or one it is still changing."""
        for r in self._live.values():
            t = r.targets.get(node)
            if r is not but and t is not None and (r.active or t.status in IN_FLIGHT):
                return r
        return None

    def rollout_of(self, node: str) -> str | None:
        holder = self._holder(node)
        return holder.rid if holder else None

    def image_user(self, image_id: str) -> str | None:
        for r in self._live.values():
            if r.image_id == image_id and (r.active or r.state == "halted"):
                return f"rollout {r.rid} ({r.state}) targets image {image_id}"
        return None

    async def get(self, rollout_id: str) -> Rollout:
        number = parse_id(rollout_id)
        live = self._live.get(number)
        if live is not None:
            return live
        found = await self._db.load_rollout(number)
        if found is None:
            raise NotFound(f"rollout {rollout_id} does not exist")
        return self._live.get(number) or Rollout.from_rows(*found)

    async def rollouts(self) -> list[Rollout]:
        rows = await self._db.load_rollouts()
        return [self._live.get(row.id) or Rollout.from_rows(row, nodes) for row, nodes in rows]

    # Commands

    async def create(self, image_id: str, targets: Sequence[str], strategy: Strategy) -> Rollout:
        """Validate everything first: a refused rollout stores nothing."""
        if not self._has_image(image_id):
            raise NotFound(f"image {image_id} does not exist")
        if not targets:
            raise BadRequest("the rollout has no target nodes")
        if strategy.canary > len(targets):
            raise BadRequest(
                f"field 'strategy.canary': {strategy.canary} is more than the "
                f"{len(targets)} target nodes"
            )
        for name in targets:
            holder = self._holder(name)
            if holder is not None:
                raise Conflict(f"node {name} is already in active rollout {holder.rid}")
        plan = plan_batches(targets, strategy)
        where = {name: k for k, names in enumerate(plan) for name in names}
        ordered = {n: Target(n, i, where[n]) for i, n in enumerate(targets)}
        r = Rollout(self._next_id, image_id, strategy, len(plan), ordered)
        self._next_id += 1
        self._live[r.id] = r
        r.changed.update(ordered)
        r.dirty = True
        r.events.append(
            (
                "rollout.created",
                {
                    "id": r.rid,
                    "image_id": image_id,
                    "strategy": strategy.to_json(),
                    "targets": len(targets),
                    "batches": r.batches,
                },
            )
        )
        self._advance(r)
        await self._commit(r)
        return r

    async def pause(self, rollout_id: str) -> Rollout:
        r = await self.get(rollout_id)
        if r.state not in ("prefetching", "applying"):
            raise Conflict(f"rollout {r.rid} is {r.state}; only a running rollout can be paused")
        r.set_state("paused", "paused by the operator")
        await self._commit(r)
        return r

    async def resume(self, rollout_id: str) -> Rollout:
        r = await self.get(rollout_id)
        if r.state not in ("paused", "halted"):
            raise Conflict(f"rollout {r.rid} is {r.state}; only a paused or halted one resumes")
        if r.state == "halted":
            self._check_free(r, r.targets)
            retry = [t for t in r.targets.values() if t.status == "failed"]
            if r.stage == "applying":
                retry = [t for t in retry if t.batch == r.batch]
            for t in retry:  # rule 4: retry the failed nodes of the current batch
                t.attempt += 1
                r.set_status(t, r.stage, f"retry {t.attempt - 1}")
            for t in r.targets.values():
                if t.status == "prefetching" and t not in retry:
                    # Re-sent under a new id: a node that heard from another rollout meanwhile
                    # may never report the old one; one that is still at it finishes it first.
                    t.attempt += 1
                    r.set_status(t, "prefetching", "prefetch re-sent on resume")
            r.failures = 0
        self._live[r.id] = r
        r.set_state(r.stage)
        self._advance(r)
        await self._commit(r)
        return r

    async def abort(self, rollout_id: str) -> Rollout:
        r = await self.get(rollout_id)
        if r.state in FINISHED:
            raise Conflict(f"rollout {r.rid} is already {r.state}")
        r.set_state("aborted", "aborted by the operator")
        await self._commit(r)
        self._forget_finished()
        return r

    async def rollback(self, rollout_id: str) -> Rollout:
        r = await self.get(rollout_id)
        if r.state in ("rolling-back", "rolled-back"):
            raise Conflict(f"rollout {r.rid} is already {r.state}")
        touched = [t.name for t in r.targets.values() if t.status in ("applied", "failed")]
        later = await self._db.later_changes(r.id, touched)
        if later:
            name, other = min(later.items())
            raise Conflict(
                f"node {name} was changed by the later rollout r-{other}; roll that back instead"
            )
        r = self._live.get(r.id, r)  # the await above may have let it change
        if r.state in ("rolling-back", "rolled-back"):
            raise Conflict(f"rollout {r.rid} is already {r.state}")
        self._check_free(r, r.targets)
        self._live[r.id] = r
        r.set_state("rolling-back", "rollback requested by the operator")
        for t in r.targets.values():
            if t.status in ("applied", "failed"):
                r.set_status(t, "rolling-back")
        self._advance(r)
        await self._commit(r)
        return r

    def _check_free(self, r: Rollout, names: Iterable[str]) -> None:
        for name in names:
            holder = self._holder(name, but=r)
            if holder is not None:
                raise Conflict(f"node {name} is in active rollout {holder.rid}")

    # Heartbeats

    async def on_heartbeat(self, node: str, report: ActionReport | None) -> Mapping[str, Any]:
        """Take a node's report on its action; return its instruction (contract's `action`)."""
        claim = self._claimant(node)
        if claim is None:
            return NONE_ACTION
        r, t = claim
        if report is not None and t.status in KIND and report.id == r.action_id(t):
            self._report(r, t, report)
            self._advance(r)
        if r.dirty or r.changed:
            await self._commit(r)
        if t.status not in KIND or (t.status == "prefetching" and r.state in FINISHED):
            return NONE_ACTION
        return {
            "id": r.action_id(t),
            "kind": KIND[t.status],
            "image_id": r.image_id,
            "policy": r.strategy.reboot,
            "health": dict(r.strategy.health) if r.strategy.health else None,
        }

    def _report(self, r: Rollout, t: Target, report: ActionReport) -> None:
        now = time.time()
        if t.started is None:
            t.started = now - (report.seconds or 0.0)
            r.changed[t.name] = t
        if report.status == "running":
            return
        t.finished = now
        step = t.status
        if step == "applying" and report.seconds is not None:
            self._metrics.apply_seconds.observe(report.seconds)
        if report.status == "done":
            r.set_status(t, DONE[step], report.detail)
        else:
            if step in ("prefetching", "applying"):
                r.failures += 1
            what = {"prefetching": "prefetch", "applying": "apply", "rolling-back": "rollback"}
            r.set_status(t, "failed", f"{what[step]} failed: {report.detail or 'no detail'}")
        if step == "applying" and r.state == "rolling-back":
            r.set_status(t, "rolling-back")  # it finished after the rollback began: undo it too

    # The state machine

    def _advance(self, r: Rollout) -> None:
        """Make every transition the rollout's current state allows (engine rules 1-5)."""
        limit = r.strategy.max_failures
        if r.state == "pending":
            if r.strategy.prefetch:
                r.set_state("prefetching")
                for t in r.targets.values():
                    r.set_status(t, "prefetching")
            else:
                r.set_state("applying")
        if r.state == "prefetching":
            if r.failures > limit:
                self._halt(r)
                return
            if any(t.status not in ("prefetched", "failed") for t in r.targets.values()):
                return
            r.batch = 0
            r.set_state("applying")
        if r.state == "applying":
            while True:
                if r.failures > limit:
                    self._halt(r)
                    return
                batch = r.in_batch(r.batch)
                for t in batch:
                    if t.status in ("pending", "prefetched"):
                        r.set_status(t, "applying")
                if any(t.status not in ("applied", "failed") for t in batch):
                    return
                if r.batch + 1 >= r.batches:
                    r.set_state("done")
                    return
                r.batch += 1
                r.set_state("applying")
        if r.state == "rolling-back" and not any(t.status in IN_FLIGHT for t in r.targets.values()):
            r.set_state("rolled-back")

    def _halt(self, r: Rollout) -> None:
        limit = r.strategy.max_failures
        r.set_state("halted", f"{r.failures} failed nodes exceed max_failures {limit}")

    async def _commit(self, r: Rollout) -> None:
        if not (r.dirty or r.changed or r.events):
            return
        rows = [
            RolloutNodeRow(
                r.id,
                t.name,
                t.position,
                t.batch,
                t.status,
                t.detail,
                t.attempt,
                t.started,
                t.finished,
            )
            for t in r.changed.values()
        ]
        events, changed = r.events, r.changed
        r.events, r.changed, r.dirty = [], {}, False
        try:
            stored = await self._db.save_rollout(r.row(), rows, events)
        except BaseException:
            # Not stored: keep it for the next commit (the tick retries), newer changes win.
            r.events, r.changed, r.dirty = events + r.events, changed | r.changed, True
            raise
        self._bus.announce(stored)

    def _forget_finished(self) -> None:
        for r in list(self._live.values()):
            idle = not (r.dirty or r.changed or r.events)
            if (
                r.state in FINISHED
                and idle
                and not any(t.status in IN_FLIGHT for t in r.targets.values())
            ):
                del self._live[r.id]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for r in list(self._live.values()):
                try:
                    self._advance(r)
                    await self._commit(r)
                except Exception:
                    log.exception("rollout %s: storing a transition failed", r.rid)
            self._forget_finished()

    # Metrics

    async def _node_samples(self) -> list[Sample]:
        samples: list[Sample] = []
        for r in self._live.values():
            counts = dict.fromkeys(STATUSES, 0)
            for t in r.targets.values():
                counts[t.status] += 1
            samples += [({"rollout": r.rid, "status": s}, float(n)) for s, n in counts.items()]
        return samples

    async def _state_samples(self) -> list[Sample]:
        counts = dict.fromkeys(STATES, 0) | await self._db.rollout_states()
        return [({"state": s}, float(n)) for s, n in counts.items()]
