"""What a node does when the controller's heartbeat answer tells it to: prefetch, apply, rollback.

One action runs at a time. Its id is remembered once it is done or failed, so the same
instruction repeated in later answers is not run again; a new id that arrives while one runs is
ignored (the heartbeat keeps reporting the running one) and taken up by a later answer. The
current action is journaled in `<cache_dir>/node-action.json` before it runs, so a daemon
restarted mid-apply knows which instruction the agent's pending operation belongs to.

The agent runs as a subprocess (`imageswarm agent ... --json`) in the daemon's own mount
namespace; its state dir is the truth about the root, read with `agent status --json`.
A `rollback` action's `image_id`, when given, names the image to leave: a node that no longer
runs it (its own agent already rolled a failed apply back) has nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imageswarm.agent.fsutil import atomic_write
from imageswarm.daemon.config import Config
from imageswarm.daemon.fetch import FetchManager

log = logging.getLogger(__name__)

DEFAULT_AGENT_ARGV = (sys.executable, "-m", "imageswarm.daemon.cli.main")
KINDS = ("none", "prefetch", "apply", "rollback")
POLICIES = ("auto", "never", "always", "hold")
ACTION_FILE = "node-action.json"
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DONE_RESULTS = ("applied", "already-applied")
_FINISHED_KEPT = 100
_DETAIL_MAX = 2000
_KILL_WAIT = 5.0
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


@dataclass(frozen=True)
class AgentRun:
    code: int
    report: Any  # its stdout, parsed as JSON (None when it printed none)
    error: str  # the last line it wrote to stderr


class AgentCli:
    """Runs `imageswarm agent` for this node's root and keeps the last `agent status` it saw."""

    def __init__(self, config: Config, argv: Sequence[str] = DEFAULT_AGENT_ARGV) -> None:
        self.config, self.argv = config, tuple(argv)
        self.status: dict[str, Any] = {}

    def options(self, instruction: Instruction) -> list[str]:
        """The apply/rollback/recover options: the node's agent config plus the instruction's."""
        agent = self.config.agent
        args = ["--policy", instruction.policy, "--reboot-command", agent.reboot_command]
        if agent.hooks is not None:
            args += ["--hooks", str(agent.hooks)]
        for path in agent.preserve:
            args += ["--preserve", path]
        if agent.restart_services:
            args.append("--restart-services")
        health = instruction.health or {}
        if "command" in health:
            args += ["--health-cmd", health["command"]]
        elif "url" in health:
            args += ["--health-url", health["url"]]
        return args

    async def run(self, command: str, *args: str) -> AgentRun:
        argv = [
            *self.argv,
            "agent",
            command,
            "--root",
            str(self.config.agent.root),
            "--state-dir",
            str(self.config.agent_state_dir),
            *args,
        ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # one process group: a cancelled run is killed whole
            )
        except OSError as exc:
            return AgentRun(127, None, f"cannot run {argv[0]}: {exc}")
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        code = proc.returncode if proc.returncode is not None else -1
        error = lines[-1].strip() if lines else ""
        if code < 0:
            error = f"the agent was killed by signal {-code}" + (f" ({error})" if error else "")
        elif code and not error:
            error = f"the agent exited {code}"
        try:
            report = json.loads(out) if out.strip() else None
        except ValueError:
            report = None
        return AgentRun(code, report, error[:_DETAIL_MAX])

    async def refresh(self) -> dict[str, Any]:
        """Run `agent status --json`; on failure keep what was known and say so in the log."""
        run = await self.run("status", "--json")
        if run.code == 0 and isinstance(run.report, dict):
            self.status = run.report
        else:
            log.warning("agent status failed: %s", run.error or "no JSON report")
        return self.status

    @property
    def current(self) -> str | None:
        return _image_id(self.status.get("current"))

    @property
    def pending(self) -> dict[str, Any] | None:
        op = self.status.get("pending")
        return op if isinstance(op, dict) else None

    def summary(self) -> dict[str, Any]:
        """The agent's part of a heartbeat, in the contract's shape."""
        pending, last = self.pending, self.status.get("last")
        return {
            "current_image": self.current,
            "previous_image": _image_id(self.status.get("previous")),
            "agent": {
                "pending": None
                if pending is None
                else {
                    "kind": pending.get("kind"),
                    "image_id": _op_image(pending),
                    "phase": _op_phase(pending),
                },
                "last": None
                if not isinstance(last, dict)
                else {
                    "kind": last.get("kind"),
                    "image_id": _op_image(last),
                    "result": last.get("result"),
                    "error": last.get("error"),
                    "phases": [
                        {"name": p.get("name"), "seconds": p.get("seconds"), "ok": p.get("ok")}
                        for p in last.get("phases") or []
                    ],
                    "services": last.get("services") or [],
                    "reboot": last.get("reboot"),
                },
                "drift": None,
            },
        }


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Stop an agent run and its children; its journal lets `agent recover` finish the work."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), _KILL_WAIT)
            return
        except TimeoutError:
            continue


def _image_id(ref: Any) -> str | None:
    return ref.get("image_id") if isinstance(ref, dict) else None


def _op_image(op: dict[str, Any]) -> str | None:
    return _image_id(op.get("image"))


def _op_phase(op: dict[str, Any]) -> str | None:
    phases = op.get("phases") or []
    return phases[-1].get("name") if phases else None


def _op_started(op: dict[str, Any]) -> float:
    phases = op.get("phases") or []
    return float(phases[0].get("started") or 0) if phases else 0.0


def judge(op: dict[str, Any]) -> tuple[str, str]:
    """(status, detail) of an agent operation report."""
    result, image = op.get("result"), _op_image(op)
    if result in _DONE_RESULTS and op.get("kind") != "restore":
        reboot = (op.get("reboot") or {}).get("summary")
        return "done", f"{result} {image}" + (f"; {reboot}" if reboot else "")
    return "failed", f"{op.get('kind')} of {image}: {result}: {op.get('error') or ''}".rstrip(": ")


Outcome = tuple[str, str, Any]  # status, detail, report


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
                    Instruction(f"recover:{pending.get('op_id')}", "recover", _op_image(pending))
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
        finished = isinstance(last, dict) and _op_started(last) >= rec.started
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
        if rec.report is None and isinstance(last, dict) and _op_started(last) >= rec.started:
            rec.report = last  # a failed agent prints its report to no one: it is in `last`
        rec.detail, rec.finished = detail[:_DETAIL_MAX], time.time()
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
                    rec.detail = f"{pending.get('kind')}: {_op_phase(pending)}"
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
