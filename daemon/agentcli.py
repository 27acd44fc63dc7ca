"""Running the agent CLI from the node daemon, and reading its reports.

The agent runs as a subprocess (`imageswarm agent ... --json`) in the daemon's own mount
namespace, so a crash of either never takes the other down; its state dir is the truth about
the root, read in-process the way `agent status --json` reads it. This module knows the agent's
command line and the shape of its JSON reports; nodeagent.py decides when to run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imageswarm.agent.errors import ImageSwarmError
from imageswarm.agent.journal import StateDir
from imageswarm.daemon.config import Config

if TYPE_CHECKING:
    from imageswarm.daemon.nodeagent import Instruction

log = logging.getLogger(__name__)

DEFAULT_AGENT_ARGV = (sys.executable, "-m", "imageswarm.daemon.cli.main")
DETAIL_MAX = 2000
_DONE_RESULTS = ("applied", "already-applied")
_KILL_WAIT = 5.0


@dataclass(frozen=True)
class AgentRun:
    code: int
    report: Any  # its stdout, parsed as JSON (None when it printed none)
    error: str  # the last line it wrote to stderr


class AgentCli:
    """Runs `imageswarm agent` for this node's root and keeps the last agent status it read."""

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
        return AgentRun(code, report, error[:DETAIL_MAX])

    async def refresh(self) -> dict[str, Any]:
        """Read the agent's state dir (what `agent status --json` prints) in-process: polled
        every second during an apply, a subprocess each time cost about 0.6 s of a core. On
        failure keep what was known and say so in the log."""
        try:
            self.status = await asyncio.to_thread(StateDir(self.config.agent_state_dir).report)
        except (ImageSwarmError, OSError) as exc:
            log.warning("reading the agent's state failed: %s", exc)
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
                    "image_id": op_image(pending),
                    "phase": op_phase(pending),
                },
                "last": None
                if not isinstance(last, dict)
                else {
                    "kind": last.get("kind"),
                    "image_id": op_image(last),
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


def op_image(op: dict[str, Any]) -> str | None:
    return _image_id(op.get("image"))


def op_phase(op: dict[str, Any]) -> str | None:
    phases = op.get("phases") or []
    return phases[-1].get("name") if phases else None


def op_started(op: dict[str, Any]) -> float:
    phases = op.get("phases") or []
    return float(phases[0].get("started") or 0) if phases else 0.0


def judge(op: dict[str, Any]) -> tuple[str, str]:
    """(status, detail) of an agent operation report."""
    result, image = op.get("result"), op_image(op)
    if result in _DONE_RESULTS and op.get("kind") != "restore":
        reboot = (op.get("reboot") or {}).get("summary")
        return "done", f"{result} {image}" + (f"; {reboot}" if reboot else "")
    return "failed", f"{op.get('kind')} of {image}: {result}: {op.get('error') or ''}".rstrip(": ")


Outcome = tuple[str, str, Any]  # status, detail, report
