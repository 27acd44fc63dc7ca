"""What a node does when the controller's heartbeat answer tells it to: prefetch, apply, rollback.

One action runs at a time. Its id is remembered once it is done or failed, so the same
instruction repeated in later answers is not run again; a new id that arrives while one runs is
ignored (the heartbeat keeps reporting the running one) and taken up by a later answer. The
current action is journaled in `<cache_dir>/node-action.json` before it runs, so a daemon
restarted mid-apply knows which instruction the agent's pending operation belongs to.

The agent runs as a subprocess (see agentcli.py); its state dir is the truth about the root.
A `rollback` action's `image_id`, when given, names the image to leave: a node that no longer
runs it (its own agent already rolled a failed apply back) has nothing to do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from imageswarm.agent.fsutil import atomic_write
from imageswarm.agent.kernel import POLICIES
from imageswarm.daemon.agentcli import (
    DETAIL_MAX,
    AgentCli,
    Outcome,
    judge,
    op_image,
    op_phase,
    op_started,
)
from imageswarm.daemon.config import Config
from imageswarm.daemon.fetch import FetchManager

log = logging.getLogger(__name__)

KINDS = ("none", "prefetch", "apply", "rollback")
ACTION_FILE = "node-action.json"
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FINISHED_KEPT = 100
_LOCKED = "another agent run holds"  # the agent's StateError when its lock is taken


@dataclass(frozen=True)
class Instruction:
    """The `action` of a heartbeat answer."""

    id: str
    kind: str
    image_id: str | None = None
    policy: str = "auto"
    health: dict[str, str] | None = None

    @classmethod
    def parse(cls, data: Any) -> Instruction:
        """Raise ValueError only when the answer is not an action at all; what is wrong inside
        a well-formed one is reported as that action's failure (see `problem`)."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ValueError(f"the answer's action is not an object with an id: {data!r:.200}")
        health = data.get("health")
        return cls(
            id=data["id"],
            kind=str(data.get("kind")),
            image_id=data.get("image_id") if isinstance(data.get("image_id"), str) else None,
            policy=str(data.get("policy") or "auto"),
            health=dict(health) if isinstance(health, dict) else None,
        )

    def problem(self) -> str | None:
        if self.kind not in KINDS:
            return f"this node does not know the action kind {self.kind!r}"
        if self.image_id is not None and not _IMAGE_ID.fullmatch(self.image_id):
            return f"{self.image_id!r} is not an image id"
        if self.kind in ("prefetch", "apply") and self.image_id is None:
            return f"a {self.kind} action needs an image_id"
        if self.policy not in POLICIES:
            return f"unknown reboot policy {self.policy!r}"
        if self.health is not None and (
            len(self.health) != 1
            or not all(
                k in ("command", "url") and isinstance(v, str) and v for k, v in self.health.items()
            )
        ):
            return f"a health check is {{'command': ...}} or {{'url': ...}}, not {self.health!r}"
        return None


@dataclass
class ActionRecord:
    instruction: Instruction
    status: str = "running"  # running, done, failed
    detail: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    report: Any = None  # the agent's JSON report, kept on the node (GET /api/v1/status)

    def heartbeat(self) -> dict[str, Any]:
        seconds = (self.finished or time.time()) - self.started
        return {
            "id": self.instruction.id,
            "status": self.status,
            "detail": self.detail,
            "seconds": round(seconds, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActionRecord:
        fields = {k: v for k, v in data.items() if k != "instruction"}
        return cls(Instruction(**data["instruction"]), **fields)


class ActionRunner:
    def __init__(
        self,
        config: Config,
        fetcher: FetchManager,
        agent: AgentCli,
        *,
        poll: float = 1.0,
        allow_no_rollback: bool = False,
        on_finish: Callable[[], None] = lambda: None,
    ) -> None:
        self.config, self.fetcher, self.agent = config, fetcher, agent
        self.poll, self.allow_no_rollback, self.on_finish = poll, allow_no_rollback, on_finish
        self.path = config.cache_dir / ACTION_FILE
        self.record: ActionRecord | None = None
        self.finished: deque[str] = deque(maxlen=_FINISHED_KEPT)
        self._task: asyncio.Task[None] | None = None
        self._ignored: str | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
            self.record = ActionRecord.from_json(data["record"]) if data["record"] else None
            self.finished.extend(str(i) for i in data["finished"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s); starting without an action", self.path, exc)

    async def _save(self) -> None:
        data = {"record": self.record and self.record.to_json(), "finished": list(self.finished)}
        await asyncio.to_thread(atomic_write, self.path, json.dumps(data).encode())

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def heartbeat(self) -> dict[str, Any] | None:
        return self.record.heartbeat() if self.record else None

    def offer(self, instruction: Instruction) -> None:
        """Take up the instruction of a heartbeat answer, unless it was or is being run."""
        if instruction.kind == "none" or not instruction.id or instruction.id in self.finished:
            return
        if self.record is not None and self.record.instruction.id == instruction.id:
            return
        if self.busy:
            if self._ignored != instruction.id:
                self._ignored = instruction.id
                running = self.record.instruction.id if self.record else None
                log.info("busy with action %s; %s waits", running, instruction.id)
            return
        self.record = ActionRecord(instruction)
        log.info("action %s: %s %s", instruction.id, instruction.kind, instruction.image_id or "")
        self._task = asyncio.create_task(self._run(self.record), name=f"action-{instruction.id}")

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=timeout)

    async def resume(self) -> None:
        """At start, before the first heartbeat: finish what a previous daemon left running."""
        rec, pending = self.record, self.agent.pending
        if pending is not None:
            if rec is None or rec.status != "running" or rec.instruction.kind == "prefetch":
                # The agent was run by hand, or under an action already reported: report the
                # recovery under an id of its own.
                rec = ActionRecord(
                    Instruction(f"recover:{pending.get('op_id')}", "recover", op_image(pending))
                )
                self.record = rec
            rec.detail = f"recovering the interrupted {pending.get('kind')} after a restart"
            await self._save()
            log.warning("agent has a pending %s; running agent recover", pending.get("kind"))
            await self._finish(rec, await self._recover(rec))
            return
        if rec is None or rec.status != "running":
            return
        last = self.agent.status.get("last")
        finished = isinstance(last, dict) and op_started(last) >= rec.started
        if rec.instruction.kind != "prefetch" and finished:  # the agent did, the daemon did not
            assert isinstance(last, dict)
            await self._finish(rec, (*judge(last), last))
            return
        log.info("resuming action %s after a restart", rec.instruction.id)
        self._task = asyncio.create_task(self._run(rec), name=f"action-{rec.instruction.id}")

    async def _run(self, rec: ActionRecord) -> None:
        await self._save()
        try:
            outcome = await self._execute(rec)
        except asyncio.CancelledError:
            raise  # left "running" in the journal: the next start resumes or recovers it
        except Exception as exc:
            log.exception("action %s crashed", rec.instruction.id)
            outcome = ("failed", f"internal error: {exc!r}", None)
        await self._finish(rec, outcome)

    async def _finish(self, rec: ActionRecord, outcome: Outcome) -> None:
        status = await self.agent.refresh()  # so the heartbeat that says "done" shows the image
        rec.status, detail, rec.report = outcome
        last = status.get("last")
        if rec.report is None and isinstance(last, dict) and op_started(last) >= rec.started:
            rec.report = last  # a failed agent prints its report to no one: it is in `last`
        rec.detail, rec.finished = detail[:DETAIL_MAX], time.time()
        self.finished.append(rec.instruction.id)
        await self._save()
        level = logging.INFO if rec.status == "done" else logging.WARNING
        log.log(level, "action %s %s: %s", rec.instruction.id, rec.status, rec.detail)
        self.on_finish()

    async def _execute(self, rec: ActionRecord) -> Outcome:
        ins = rec.instruction
        problem = ins.problem()
        if problem is not None:
            return "failed", problem, None
        if ins.kind == "prefetch":
            assert ins.image_id is not None
            return await self._fetch(rec, ins.image_id)
        await self.agent.refresh()
        if ins.kind == "apply":
            assert ins.image_id is not None
            fetched = await self._fetch(rec, ins.image_id)
            if fetched[0] != "done":
                return fetched
            args = ["--image-id", ins.image_id, "--config", str(self.config.path)]
            if self.allow_no_rollback and self.agent.current is None:
                args.append("--allow-no-rollback")
            return await self._agent(rec, "apply", [*args, *self.agent.options(ins)])
        if ins.kind == "rollback":
            if ins.image_id is not None and self.agent.current != ins.image_id:
                return "done", f"not running {ins.image_id}; nothing to roll back", None
            return await self._agent(rec, "rollback", self.agent.options(ins))
        return "done", "nothing to do", None

    async def _fetch(self, rec: ActionRecord, image_id: str) -> Outcome:
        self.fetcher.fetch(image_id)
        while True:
            st = self.fetcher.state(image_id)
            if st.state == "done":
                return "done", f"fetched {image_id} ({st.total_bytes} bytes)", None
            if st.state == "failed":
                return "failed", f"fetch of {image_id} failed: {st.error}", None
            rec.detail = f"fetch {st.state}: {st.done_bytes}/{st.total_bytes} bytes"
            await asyncio.sleep(self.poll)

    async def _agent(self, rec: ActionRecord, command: str, args: list[str]) -> Outcome:
        """Run the agent; meanwhile report the phase its journal names."""
        run = asyncio.ensure_future(self.agent.run(command, *args, "--json"))
        rec.detail = f"{command}: starting"
        try:
            while not run.done():
                await asyncio.wait([run], timeout=self.poll)
                if not run.done() and (pending := (await self.agent.refresh()).get("pending")):
                    rec.detail = f"{pending.get('kind')}: {op_phase(pending)}"
        finally:
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        result = run.result()
        if result.code != 0:
            return "failed", result.error, result.report
        if isinstance(result.report, dict):
            return (*judge(result.report), result.report)
        return "done", f"{command} finished without a JSON report", None

    async def _recover(self, rec: ActionRecord) -> Outcome:
        while True:
            run = await self.agent.run("recover", "--json", *self.agent.options(rec.instruction))
            if run.code == 0:
                break
            if _LOCKED not in run.error:
                return "failed", run.error, None
            rec.detail = "waiting for an agent run left over from before the restart"
            await asyncio.sleep(max(self.poll, 1.0))
        op = run.report
        if not isinstance(op, dict):  # nothing left to recover: the leftover run finished it
            op = (await self.agent.refresh()).get("last")
        if not isinstance(op, dict):
            return "failed", "the agent recovered nothing and reports no last operation", None
        return (*judge(op), op)
