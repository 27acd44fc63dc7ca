"""The node's side of the control plane: enrollment and the heartbeat loop (docs/control-plane.md).

The node always calls the controller, never the other way round: each heartbeat reports the
node's images, fetches and current action, and the answer is its next instruction. A fleet
restarted at once must not stampede, so the first heartbeat waits a random part of an interval
and failures back off exponentially with full jitter (a uniform delay up to 1, 2, 4 ... 60 s).
A failure streak is logged once at WARNING; nothing the controller says or fails to say ends
the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from imageswarm.agent import kernel
from imageswarm.agent.fsutil import atomic_write
from imageswarm.daemon.agentcli import DEFAULT_AGENT_ARGV, AgentCli
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.config import Config
from imageswarm.daemon.errors import ControllerError
from imageswarm.daemon.fetch import FetchManager
from imageswarm.daemon.nodeagent import ActionRunner, Instruction

log = logging.getLogger(__name__)

TOKEN_FILE = "node-token"
SOURCES = ("local", "controller", "peers", "web_seed", "unattributed")
_MIN_INTERVAL = 0.05


@dataclass(frozen=True)
class HeartbeatSettings:
    """How a node talks to its controller. The defaults are the contract's; tests shorten them."""

    #: argv that runs `imageswarm` (the agent runs as `<argv> agent ...`).
    agent_argv: tuple[str, ...] = DEFAULT_AGENT_ARGV
    #: Seconds before the first heartbeat; None: uniform over one configured interval.
    first_delay: float | None = None
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    #: Seconds between progress checks of a running fetch or agent.
    poll: float = 1.0
    request_timeout: float = 10.0
    #: Let the first apply on a node without a recorded image go ahead without a way back.
    #: None: the node config's `agent.allow_no_rollback`.
    allow_no_rollback: bool | None = None
    #: Seed for the jitter (tests); None: seeded from the OS.
    seed: int | None = None


def backoff_cap(failures: int, initial: float, maximum: float) -> float:
    """The longest wait after `failures` consecutive failures: initial, doubling, capped."""
    return min(maximum, initial * 2.0 ** min(failures - 1, 60))


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    return rng.uniform(0.0, backoff_cap(failures, initial, maximum))


class HeartbeatLoop:
    def __init__(
        self,
        config: Config,
        fetcher: FetchManager,
        settings: HeartbeatSettings | None = None,
    ) -> None:
        assert config.controller_url is not None
        self.config, self.fetcher = config, fetcher
        self.settings = settings or HeartbeatSettings()
        self.rng = random.Random(self.settings.seed)
        self.interval = config.heartbeat_interval
        self.token_path = config.cache_dir / TOKEN_FILE
        self.token = self._read_token()
        self.failures = 0
        self.last_error: str | None = None
        self.last_heartbeat: float | None = None
        self.heartbeats = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.agent = AgentCli(config, self.settings.agent_argv)
        allow = self.settings.allow_no_rollback
        if allow is None:
            allow = config.agent.allow_no_rollback
        self.actions = ActionRunner(
            config,
            fetcher,
            self.agent,
            poll=self.settings.poll,
            allow_no_rollback=allow,
            on_finish=self._wake.set,  # tell the controller at once
        )

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=timeout)
        await self.actions.close(timeout)

    # --- what the node reports ---------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        """The heartbeat body, exactly the contract's keys."""
        agent = self.agent.summary()
        return {
            "current_image": agent["current_image"],
            "previous_image": agent["previous_image"],
            "kernel": kernel.running_release(),
            "agent": agent["agent"],
            "fetches": {i: self._fetch_json(i) for i in sorted(self.fetcher.states)},
            "action": self.actions.heartbeat(),
        }

    def _fetch_json(self, image_id: str) -> dict[str, Any]:
        st = self.fetcher.state(image_id)
        data = st.to_json()
        return {
            "state": st.state,
            "done_bytes": st.done_bytes,
            "total_bytes": st.total_bytes,
            "bytes_by_source": {s: st.bytes_by_source.get(s, 0) for s in SOURCES},
            "duration": round(data["duration"], 3),
            "error": st.error,
            "torrent": st.torrent,
        }

    def status_json(self) -> dict[str, Any]:
        """The node's own view, for `GET /api/v1/status`: the next heartbeat and how they go."""
        record = self.actions.record
        return {
            "node": self.config.node_name,
            "controller_url": self.config.controller_url,
            "enrolled": self.token is not None,
            "interval": self.interval,
            "heartbeats": self.heartbeats,
            "last_heartbeat": self.last_heartbeat,
            "failures": self.failures,
            "last_error": self.last_error,
            "action": record.to_json() if record else None,
            "heartbeat": self.body(),
        }

    # --- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self.agent.refresh()
            await self.actions.resume()  # a restart mid-apply: recover before reporting
        except Exception:
            log.exception("could not finish the operation left by the previous daemon")
        assert self.config.controller_url is not None
        async with ApiClient(
            self.config.controller_url,
            timeout=self.settings.request_timeout,
            ca=self.config.controller_ca,
        ) as api:
            while self.token is None:
                if not await self._attempt(self._enroll, api):
                    await asyncio.sleep(self._backoff())
            first = self.settings.first_delay
            await self._sleep(self.rng.uniform(0, self.interval) if first is None else first)
            while True:
                ok = await self._attempt(self._beat, api)
                await self._sleep(self.interval if ok else self._backoff())

    async def _attempt(self, step: Callable[[ApiClient], Awaitable[None]], api: ApiClient) -> bool:
        try:
            await step(api)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self.last_error = str(exc) or repr(exc)
            if self.failures == 1:
                expected = isinstance(exc, ControllerError | ValueError | OSError | TimeoutError)
                log.warning(
                    "controller %s: %s; retrying with backoff (up to %g s)",
                    self.config.controller_url,
                    self.last_error,
                    self.settings.backoff_max,
                    exc_info=not expected,
                )
            else:
                log.debug("controller still failing (%d): %s", self.failures, self.last_error)
            return False
        if self.failures:
            log.info("controller reachable again after %d failed attempts", self.failures)
        self.failures, self.last_error = 0, None
        return True

    def _backoff(self) -> float:
        s = self.settings
        return backoff_delay(self.failures, s.backoff_initial, s.backoff_max, self.rng)

    async def _sleep(self, delay: float) -> None:
        """Sleep `delay`; a finished action cuts it short (but never a backoff)."""
        if self.failures:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    # --- enrollment --------------------------------------------------------------------------
    def _read_token(self) -> str | None:
        try:
            token = self.token_path.read_text().strip()
        except FileNotFoundError:
            return None
        return token or None

    async def _enroll(self, api: ApiClient) -> None:
        if self.config.join_secret is None:
            raise ValueError(f"{self.config.path}: no join_secret, so this node cannot enroll")
        body = {
            "name": self.config.node_name,
            "join_secret": self.config.join_secret,
            "labels": dict(self.config.labels),
        }
        answer = await api.post_json("/api/v1/nodes/enroll", body)
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise ValueError(f"the enrollment answer has no token: {answer!r:.200}")
        await asyncio.to_thread(atomic_write, self.token_path, token.encode() + b"\n", 0o600)
        self.token = token
        log.info("enrolled with %s as %s", self.config.controller_url, self.config.node_name)

    # --- one heartbeat -----------------------------------------------------------------------
    async def _beat(self, api: ApiClient) -> None:
        self._wake.clear()
        try:
            answer = await self._post(api)
        except ControllerError as exc:
            if exc.status != 401:
                raise
            level = logging.DEBUG if self.failures else logging.WARNING
            log.log(level, "the controller does not know this node's token; enrolling again")
            await self._enroll(api)
            answer = await self._post(api)
        self.heartbeats += 1
        self.last_heartbeat = time.time()
        if not isinstance(answer, dict):
            raise ValueError(f"the heartbeat answer is not a JSON object: {answer!r:.200}")
        interval = answer.get("interval")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            self.interval = max(_MIN_INTERVAL, float(interval))
        action = answer.get("action")
        if action is not None:
            self.actions.offer(Instruction.parse(action))

    async def _post(self, api: ApiClient) -> Any:
        path = f"/api/v1/nodes/{quote(self.config.node_name, safe='')}/heartbeat"
        headers = {"Authorization": f"Bearer {self.token}"}
        return await api.request("POST", path, json=self.body(), headers=headers)
