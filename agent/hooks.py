"""os-refresh-config style hook phases.

A hook is an executable file in <hooks>/<phase>.d/. Hooks run one at a time in LANG=C order of
their names (so 10-foo before 20-bar), with a timeout, their inputs in IMAGESWARM_* environment
variables, and their output captured. The first hook that fails or times out stops the phase.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imageswarm.agent.errors import HookError, InvalidInputError

PHASES = ("pre-configure", "configure", "post-configure", "error")
_OUTPUT_LIMIT = 16 * 1024


@dataclass(frozen=True)
class HookRun:
    phase: str
    name: str
    returncode: int | None  # None: timed out
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_json(self) -> dict[str, object]:
        return {
            "phase": self.phase,
            "name": self.name,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 3),
            "output": self.output,
        }


def check_hooks_dir(hooks: Path | None) -> None:
    if hooks is not None and not hooks.is_dir():
        raise InvalidInputError(f"hook directory {hooks} does not exist")


def hooks_in(hooks: Path, phase: str) -> list[Path]:
    directory = hooks / f"{phase}.d"
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK)]
    return sorted(found, key=lambda p: p.name.encode())


def run_phase(
    hooks: Path | None,
    phase: str,
    env: Mapping[str, str],
    *,
    timeout: float,
    stop_on_failure: bool = True,
) -> list[HookRun]:
    """Run every hook of `phase`; raise HookError on the first failure (with the runs so far)."""
    if hooks is None:
        return []
    runs: list[HookRun] = []
    full_env = {**os.environ, **env, "LANG": "C", "LC_ALL": "C", "IMAGESWARM_PHASE": phase}
    for hook in hooks_in(hooks, phase):
        run = _run_one(hook, phase, full_env, timeout)
        runs.append(run)
        if not run.ok and stop_on_failure:
            why = f"exited {run.returncode}"
            if run.returncode is None:
                why = f"timed out after {timeout:g} s"
            last = run.output.strip().splitlines()[-3:]
            said = f": {' | '.join(last)}" if last else " with no output"
            raise HookError(f"{phase} hook {hook.name} {why}{said}", runs)
    return runs


def _run_one(hook: Path, phase: str, env: Mapping[str, str], timeout: float) -> HookRun:
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(hook)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    text = out.decode(errors="replace")[-_OUTPUT_LIMIT:]
    return HookRun(phase, hook.name, code, time.monotonic() - start, text)
