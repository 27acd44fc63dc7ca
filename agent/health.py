"""Is the node healthy after a swap: a command that exits 0, or a URL that answers 2xx.

Each attempt is bounded by the check's timeout. A command runs in its own process group, and
on timeout the whole group is killed, so a hung check leaves nothing running behind it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from imageswarm.agent.errors import InvalidInputError

_TAIL_LINES = 5
_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class HealthCheck:
    """One health check: exactly one of `command` (argv) or `url` (http or https)."""

    command: tuple[str, ...] | None = None
    url: str | None = None
    timeout: float = 10.0
    retries: int = 3
    interval: float = 1.0

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise InvalidInputError("A health check needs exactly one of a command or a URL.")
        if self.command is not None and (
            not self.command or not all(isinstance(a, str) and a for a in self.command)
        ):
            raise InvalidInputError(
                f"A health check command must be a non-empty list of words, not {self.command!r}."
            )
        if self.url is not None:
            parts = urllib.parse.urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidInputError(
                    f"A health check URL must be http:// or https:// with a host, not {self.url!r}."
                )
        if not self.timeout > 0:
            raise InvalidInputError(f"A health check timeout must be positive, not {self.timeout}.")
        if self.retries < 1:
            raise InvalidInputError(f"A health check needs at least 1 attempt, not {self.retries}.")
        if not self.interval >= 0:
            raise InvalidInputError(
                f"A health check interval cannot be negative, not {self.interval}."
            )


@dataclass(frozen=True)
class HealthResult:
    """How a health check ended: `detail` says what the last attempt saw."""

    ok: bool
    attempts: int
    detail: str


def run_health_check(check: HealthCheck, env: Mapping[str, str] | None = None) -> HealthResult:
    """Attempt the check up to `retries` times, `interval` seconds apart; stop at the first pass.

    `env` adds to (and overrides) this process's environment for a command; a URL ignores it.
    """
    detail = ""
    for attempt in range(1, check.retries + 1):
        if attempt > 1:
            time.sleep(check.interval)
        if check.command is not None:
            ok, detail = _run_command(check.command, check.timeout, env)
        else:
            assert check.url is not None  # __post_init__ guarantees one of the two
            ok, detail = _fetch(check.url, check.timeout)
        if ok:
            return HealthResult(True, attempt, detail)
    return HealthResult(False, check.retries, detail)


def _run_command(
    argv: tuple[str, ...], timeout: float, env: Mapping[str, str] | None
) -> tuple[bool, str]:
    full_env = {**os.environ, **env} if env is not None else None
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # its own process group, killed whole on timeout
        )
    except OSError as e:
        return False, f"{argv[0]} could not be run: {e.strerror}"
    with proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The group's id stays reserved until the leader is reaped, which has not happened.
            _kill_group(proc.pid)
            try:
                output, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipe
                proc.wait()
                output = b""
            if proc.returncode < 0:
                return False, f"timed out after {timeout:g} s and was killed{_tail(output)}"
            # The command itself exited; something it left behind kept its output open.
    if proc.returncode == 0:
        return True, "exit status 0"
    if proc.returncode < 0:
        return False, f"killed by {_signal_name(-proc.returncode)}{_tail(output)}"
    return False, f"exit status {proc.returncode}{_tail(output)}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals other than SIGRTMIN/SIGRTMAX have no name
        return f"signal {number}"


def _tail(output: bytes) -> str:
    lines = [ln.strip() for ln in output.decode(errors="replace").splitlines() if ln.strip()]
    return ": " + " | ".join(lines[-_TAIL_LINES:]) if lines else ""


def _fetch(url: str, timeout: float) -> tuple[bool, str]:
    # No proxies: the check is about this node, and a proxy from the environment would lie.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    start = time.monotonic()
    try:
        with opener.open(urllib.request.Request(url), timeout=timeout) as response:
            status: int = response.status
            response.read(_BODY_LIMIT)
    except urllib.error.HTTPError as e:
        with e:
            return False, f"HTTP {e.code} {e.reason}{_tail(e.read(_BODY_LIMIT))}"
    except urllib.error.URLError as e:
        return False, _network_failure(e.reason, timeout)
    except (OSError, http.client.HTTPException) as e:
        return False, _network_failure(e, timeout)
    elapsed = time.monotonic() - start
    if elapsed > timeout:  # urllib's timeout is per socket operation, not for the whole request
        return False, f"HTTP {status} came after {elapsed:.1f} s, over the {timeout:g} s timeout"
    if 200 <= status < 300:
        return True, f"HTTP {status}"
    return False, f"HTTP {status}"


def _network_failure(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__
