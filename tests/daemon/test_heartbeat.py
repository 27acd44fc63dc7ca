"""A real node daemon against a fake controller: enrollment, heartbeats, backoff, and actions.

The fake implements enroll and heartbeat per docs/control-plane.md, checks every body it gets
against the contract and records it; for actions that need images it forwards everything else
to a real controller app. Applies run the real agent CLI against a plain directory root, each
run wrapped in `unshare --mount --propagation private` so the image mounts it makes never
reach this machine's mount namespace.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import random
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from imageswarm.agent import keys
from imageswarm.agent.kernel import running_release
from imageswarm.daemon import config as cfgmod
from imageswarm.daemon.app import create_app
from imageswarm.daemon.appkeys import FETCHER, HEARTBEAT, HEARTBEAT_SETTINGS
from imageswarm.daemon.heartbeat import (
    SOURCES,
    TOKEN_FILE,
    HeartbeatSettings,
    backoff_cap,
    backoff_delay,
)
from tests.agent.roots import RELEASE_V1, base_tree, build_image, image_id_of, v2_changes
from tests.conftest import needs_root

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]
Node = TestClient[Any, Any]

SECRET = "join-me"
TOKEN = "operator-token"
UNSHARE = ("unshare", "--mount", "--propagation", "private")
CLI = (sys.executable, "-m", "imageswarm.daemon.cli.main")
FAST = HeartbeatSettings(
    first_delay=0, backoff_initial=0.05, backoff_max=0.4, poll=0.1, request_timeout=5
)
NONE_ACTION: dict[str, Any] = {
    "id": "",
    "kind": "none",
    "image_id": None,
    "policy": "auto",
    "health": None,
}


# --- the contract, checked on every heartbeat the fake receives -------------------------------
def _keys(where: str, data: Any, want: set[str]) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where} is not an object: {data!r}"]
    return [] if set(data) == want else [f"{where} has keys {sorted(data)}, not {sorted(want)}"]


def contract_problems(body: Any) -> list[str]:
    top = {"current_image", "previous_image", "kernel", "agent", "fetches", "action"}
    problems = _keys("body", body, top)
    if problems:
        return problems
    for key in ("current_image", "previous_image"):
        if body[key] is not None and not isinstance(body[key], str):
            problems.append(f"{key} is {body[key]!r}")
    if not isinstance(body["kernel"], str) or not body["kernel"]:
        problems.append(f"kernel is {body['kernel']!r}")
    agent = body["agent"]
    problems += _keys("agent", agent, {"pending", "last", "drift"})
    if not problems:
        if agent["pending"] is not None:
            problems += _keys("agent.pending", agent["pending"], {"kind", "image_id", "phase"})
        last = agent["last"]
        if last is not None:
            want = {"kind", "image_id", "result", "error", "phases", "services", "reboot"}
            problems += _keys("agent.last", last, want)
            for phase in last.get("phases", []):
                problems += _keys("agent.last.phases[]", phase, {"name", "seconds", "ok"})
        if agent["drift"] is not None and "clean" not in agent["drift"]:
            problems.append(f"agent.drift is {agent['drift']!r}")
    fetch_keys = {
        "state",
        "done_bytes",
        "total_bytes",
        "bytes_by_source",
        "duration",
        "error",
        "torrent",
    }
    for image_id, fetch in body["fetches"].items():
        problems += _keys(f"fetches[{image_id}]", fetch, fetch_keys)
        if not problems:
            by_source = fetch["bytes_by_source"]
            problems += _keys(f"fetches[{image_id}].bytes_by_source", by_source, set(SOURCES))
            if not all(isinstance(v, int) for v in by_source.values()):
                problems.append(f"bytes_by_source has non-integers: {by_source}")
    action = body["action"]
    if action is not None:
        problems += _keys("action", action, {"id", "status", "detail", "seconds"})
        if not problems and (
            action["status"] not in ("running", "done", "failed")
            or not isinstance(action["detail"], str)
            or not isinstance(action["seconds"], int | float)
        ):
            problems.append(f"action is {action!r}")
    return problems


@dataclass
class Beat:
    at: float
    authorization: str
    body: dict[str, Any]


class FakeController:
    """Enroll and heartbeat per the contract; everything else goes to `upstream` if given."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.enrolls: list[tuple[float, dict[str, Any]]] = []
        self.beats: list[Beat] = []
        self.attempts: list[tuple[float, int]] = []  # every heartbeat request and its status
        self.problems: list[str] = []
        self.tokens: dict[str, str] = {}
        self.errors = 0  # answer this many coming heartbeats with 500
        self.reject_all = False  # answer every heartbeat with 401
        self.interval = 0.2
        self.action: dict[str, Any] = NONE_ACTION

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/nodes/enroll", self.enroll)
        app.router.add_post("/api/v1/nodes/{name}/heartbeat", self.heartbeat)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        return app

    async def enroll(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.enrolls.append((time.monotonic(), body))
        if body.get("join_secret") != SECRET:
            return web.json_response({"status": 401, "detail": "wrong join secret"}, status=401)
        token = secrets.token_hex(8)
        self.tokens[body["name"]] = token
        return web.json_response({"name": body["name"], "token": token}, status=201)

    async def heartbeat(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        auth = request.headers.get("Authorization", "")
        if self.reject_all or auth != f"Bearer {self.tokens.get(name)}":
            self.attempts.append((time.monotonic(), 401))
            return web.json_response({"status": 401, "detail": "unknown token"}, status=401)
        if self.errors:
            self.errors -= 1
            self.attempts.append((time.monotonic(), 500))
            return web.json_response({"status": 500, "detail": "database on fire"}, status=500)
        body = await request.json()
        self.problems += contract_problems(body)
        self.attempts.append((time.monotonic(), 200))
        self.beats.append(Beat(time.monotonic(), auth, body))
        return web.json_response({"interval": self.interval, "action": self.action})

    async def proxy(self, request: web.Request) -> web.Response:
        if self.upstream is None:
            raise web.HTTPNotFound()
        headers = {k: v for k, v in request.headers.items() if k in ("Range", "Authorization")}
        url = URL(self.upstream + str(request.rel_url), encoded=True)
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, url, headers=headers, data=await request.read()
            ) as resp,
        ):
            body = await resp.read()
            keep = ("Content-Type", "Content-Range")
            out = {k: v for k, v in resp.headers.items() if k in keep}
            return web.Response(status=resp.status, body=body, headers=out)

    async def wait(
        self, what: str, test: Callable[[Beat], bool], *, since: int = 0, within: float = 60
    ) -> Beat:
        """The first heartbeat from index `since` on that passes `test`."""
        deadline = time.monotonic() + within
        while True:
            assert not self.problems, self.problems
            for beat in self.beats[since:]:
                if test(beat):
                    return beat
            if time.monotonic() > deadline:
                last = self.beats[-1].body if self.beats else None
                raise AssertionError(f"no heartbeat {what} within {within}s; last: {last}")
            await asyncio.sleep(0.02)


async def until(what: str, test: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


def action_of(beat: Beat, action_id: str) -> dict[str, Any] | None:
    action: dict[str, Any] | None = beat.body["action"]
    return action if action is not None and action["id"] == action_id else None


def finished(action_id: str) -> Callable[[Beat], bool]:
    def test(beat: Beat) -> bool:
        action = action_of(beat, action_id)
        return action is not None and action["status"] in ("done", "failed")

    return test


# --- nodes ------------------------------------------------------------------------------------
def node_config(
    tmp: Path, ip: str, controller: str, trusted: list[str], **extra: Any
) -> cfgmod.Config:
    """A node config written to disk (the agent CLI reads it with --config)."""
    data: dict[str, Any] = {
        "role": "node",
        "node_name": f"node-{ip.rsplit('.', 1)[1]}",
        "api_listen": f"{ip}:7700",
        "cache_dir": str(tmp / f"node-{ip}"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "api_token": TOKEN,
        "controller_url": controller,
        "trusted_keys": trusted,
        "join_secret": SECRET,
        "labels": {"role": "compute"},
        "heartbeat_interval": 0.2,
        "swarm": {"listen": f"{ip}:0", "web_seed_after": 30},
        "agent": {"root": str(tmp / "root")},
        **extra,
    }
    (tmp / "root").mkdir(exist_ok=True)
    path = tmp / f"node-{ip}.yaml"
    path.write_text(yaml.safe_dump(data))
    return cfgmod.load(path)


async def start_node(
    aiohttp_client: ClientFactory, config: cfgmod.Config, settings: HeartbeatSettings = FAST
) -> Node:
    app = create_app(config)
    app[HEARTBEAT_SETTINGS] = settings
    return await aiohttp_client(app)


@pytest.fixture(scope="module")
def stranger_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(keys.generate(tmp_path_factory.mktemp("keys") / "k.key").public)


# --- enrollment -------------------------------------------------------------------------------
async def test_enrolls_once_keeps_its_token_private_and_reuses_it_after_a_restart(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    stranger_key: str,
) -> None:
    fake = FakeController()
    await aiohttp_server(fake.app(), host="127.0.0.80", port=7700)
    config = node_config(tmp_path, "127.0.0.81", "http://127.0.0.80:7700", [stranger_key])
    node = await start_node(aiohttp_client, config)
    await fake.wait("twice", lambda b: len(fake.beats) >= 2)
    assert [body for _, body in fake.enrolls] == [
        {"name": "node-81", "join_secret": SECRET, "labels": {"role": "compute"}}
    ]
    token_file = config.cache_dir / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token == fake.tokens["node-81"]
    assert {b.authorization for b in fake.beats} == {f"Bearer {token}"}
    await node.close()

    seen = len(fake.beats)
    await start_node(aiohttp_client, config)
    await fake.wait("after the restart", lambda b: True, since=seen)
    assert len(fake.enrolls) == 1
    assert fake.beats[-1].authorization == f"Bearer {token}"


async def test_a_lost_token_re_enrolls_once_per_attempt(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    stranger_key: str,
) -> None:
    fake = FakeController()
    await aiohttp_server(fake.app(), host="127.0.0.82", port=7700)
    config = node_config(tmp_path, "127.0.0.83", "http://127.0.0.82:7700", [stranger_key])
    node = await start_node(aiohttp_client, config)
    await fake.wait("first", lambda b: True)
    fake.tokens.clear()  # the controller lost its nodes table
    seen = len(fake.beats)
    await fake.wait("after re-enrolling", lambda b: True, since=seen)
    assert len(fake.enrolls) == 2
    new = fake.tokens["node-83"]
    assert fake.beats[-1].authorization == f"Bearer {new}"
    assert (config.cache_dir / TOKEN_FILE).read_text().strip() == new

    # A controller that refuses even a fresh token: one enrollment per attempt, then backoff.
    fake.reject_all = True
    start = len(fake.attempts)
    await asyncio.sleep(1.0)
    refused = len(fake.attempts) - start
    enrolled = len(fake.enrolls) - 2
    assert refused >= 4
    assert abs(refused - 2 * enrolled) <= 2, (refused, enrolled)
    assert node.app[HEARTBEAT].failures >= 2


# --- the heartbeat body and a prefetch that fails ---------------------------------------------
async def test_heartbeats_follow_the_contract_and_a_finished_action_is_not_run_again(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    stranger_key: str,
) -> None:
    fake = FakeController()
    await aiohttp_server(fake.app(), host="127.0.0.84", port=7700)
    config = node_config(tmp_path, "127.0.0.85", "http://127.0.0.84:7700", [stranger_key])
    node = await start_node(aiohttp_client, config)
    beat = await fake.wait("first", lambda b: True)
    assert beat.body == {
        "current_image": None,
        "previous_image": None,
        "kernel": running_release(),
        "agent": {"pending": None, "last": None, "drift": None},
        "fetches": {},
        "action": None,
    }
    # The controller's interval governs the pace.
    await fake.wait("five", lambda b: len(fake.beats) >= 5)
    gaps = [b.at - a.at for a, b in itertools.pairwise(fake.beats[:5])]
    assert all(0.15 < g < 1.0 for g in gaps), gaps

    # A prefetch of an image the controller does not have fails, with the fetch's reason.
    fake.action = {**NONE_ACTION, "id": "p-1", "kind": "prefetch", "image_id": "0123456789abcdef"}
    beat = await fake.wait("with p-1 finished", finished("p-1"))
    action = action_of(beat, "p-1")
    assert action is not None and action["status"] == "failed"
    assert "0123456789abcdef" in action["detail"] and "no image" in action["detail"]
    fetch = beat.body["fetches"]["0123456789abcdef"]
    assert fetch["state"] == "failed" and "no image" in fetch["error"]
    started = node.app[FETCHER].states["0123456789abcdef"].started
    seen = len(fake.beats)
    await fake.wait("three more", lambda b: len(fake.beats) >= seen + 3)
    assert node.app[FETCHER].states["0123456789abcdef"].started == started  # not run again
    for later in fake.beats[seen:]:
        assert later.body["action"] == action  # still reported, finished, not restarted

    # A malformed instruction is that action's failure, not the node's.
    fake.action = {**NONE_ACTION, "id": "x-1", "kind": "reimage", "image_id": None}
    beat = await fake.wait("with x-1 finished", finished("x-1"))
    assert beat.body["action"]["status"] == "failed"
    assert "reimage" in beat.body["action"]["detail"]

    status = await (await node.get("/api/v1/status")).json()
    assert status["enrolled"] is True and status["failures"] == 0
    assert status["action"]["instruction"]["id"] == "x-1"
    assert contract_problems(status["heartbeat"]) == []


async def test_first_heartbeat_waits_a_jittered_part_of_the_interval(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    stranger_key: str,
) -> None:
    fake = FakeController()
    await aiohttp_server(fake.app(), host="127.0.0.86", port=7700)
    config = node_config(
        tmp_path, "127.0.0.87", "http://127.0.0.86:7700", [stranger_key], heartbeat_interval=2
    )
    settings = HeartbeatSettings(first_delay=None, seed=7, poll=0.1)
    expected = random.Random(7).uniform(0, 2)
    await start_node(aiohttp_client, config, settings)
    beat = await fake.wait("first", lambda b: True)
    waited = beat.at - fake.enrolls[0][0]
    assert expected - 0.05 < waited < expected + 0.5, (waited, expected)


# --- backoff ----------------------------------------------------------------------------------
def test_backoff_doubles_from_one_second_to_a_minute_with_full_jitter() -> None:
    defaults = HeartbeatSettings()
    caps = [backoff_cap(n, defaults.backoff_initial, defaults.backoff_max) for n in range(1, 10)]
    assert caps == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff_cap(10_000, 1, 60) == 60
    rng = random.Random(1)
    samples = [backoff_delay(3, 1, 60, rng) for _ in range(2000)]
    assert 0 <= min(samples) < 0.1 and 3.9 < max(samples) <= 4
    assert 1.8 < sum(samples) / len(samples) < 2.2


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "imageswarm.daemon.heartbeat" and r.levelno == logging.WARNING
    ]


async def test_backs_off_while_the_controller_answers_500_and_warns_once(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    stranger_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeController()
    await aiohttp_server(fake.app(), host="127.0.0.88", port=7700)
    config = node_config(tmp_path, "127.0.0.89", "http://127.0.0.88:7700", [stranger_key])
    node = await start_node(aiohttp_client, config)
    await fake.wait("first", lambda b: True)
    fake.errors = 6
    seen = len(fake.beats)
    await fake.wait("after the errors", lambda b: True, since=seen)
    await until("the streak ends", lambda: node.app[HEARTBEAT].failures == 0)
    codes = [code for _, code in fake.attempts]
    first_error = codes.index(500)
    assert codes[first_error : first_error + 7] == [500] * 6 + [200]
    times = [t for t, _ in fake.attempts[first_error : first_error + 7]]
    for n, (a, b) in enumerate(itertools.pairwise(times), start=1):
        assert b - a <= backoff_cap(n, FAST.backoff_initial, FAST.backoff_max) + 0.2, (n, b - a)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "database on fire" in warned[0], warned
    assert any("reachable again after 6" in r.getMessage() for r in caplog.records)


async def test_backs_off_while_the_controller_is_down_then_enrolls(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    stranger_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = node_config(tmp_path, "127.0.0.91", "http://127.0.0.90:7700", [stranger_key])
    node = await start_node(aiohttp_client, config)
    loop = node.app[HEARTBEAT]
    await until("four failures", lambda: loop.failures >= 4)
    assert loop.token is None and "cannot reach" in (loop.last_error or "")
    fake = FakeController()
    await aiohttp_server(fake.app(), host="127.0.0.90", port=7700)
    await fake.wait("once up", lambda b: True)
    await until("the streak ends", lambda: loop.failures == 0)
    assert len(fake.enrolls) == 1
    warned = _warnings(caplog)
    assert len(warned) == 1 and "cannot reach" in warned[0], warned


# --- actions that use a real controller -------------------------------------------------------
async def _real_controller(
    tmp_path: Path, aiohttp_server: ServerFactory, ip: str
) -> tuple[TestServer, str]:
    data = {
        "role": "controller",
        "node_name": "controller",
        "api_listen": f"{ip}:7700",
        "cache_dir": str(tmp_path / "controller"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "api_token": TOKEN,
        "swarm": {"listen": f"{ip}:0"},
    }
    server = await aiohttp_server(
        create_app(cfgmod.parse(tmp_path / "controller.yaml", data)), host=ip, port=7700
    )
    key = keys.load(tmp_path / "controller" / "signing.key")
    return server, str(key.public)


async def _publish(server: TestServer, image: Path, name: str) -> str:
    url = f"http://{server.host}:{server.port}/api/v1/images?name={name}"
    data = await asyncio.to_thread(image.read_bytes)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=io.BytesIO(data), headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp,
    ):
        assert resp.status in (200, 201), await resp.text()
        image_id: str = (await resp.json())["manifest"]["image_id"]
        return image_id


async def test_prefetch_action_fetches_from_a_real_controller_and_reports_done(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    controller, key = await _real_controller(tmp_path, aiohttp_server, "127.0.0.92")
    v1, _, _ = ext4_pair
    image_id = await _publish(controller, v1, "v1")
    fake = FakeController(upstream="http://127.0.0.92:7700")
    await aiohttp_server(fake.app(), host="127.0.0.93", port=7700)
    config = node_config(tmp_path, "127.0.0.94", "http://127.0.0.93:7700", [key])
    node = await start_node(aiohttp_client, config)
    action_id = f"r-1:prefetch:{image_id}"
    fake.action = {**NONE_ACTION, "id": action_id, "kind": "prefetch", "image_id": image_id}
    beat = await fake.wait("with the prefetch finished", finished(action_id))
    assert beat.body["action"]["status"] == "done", beat.body
    fetch = beat.body["fetches"][image_id]
    assert fetch["state"] == "done" and fetch["error"] is None
    assert fetch["done_bytes"] == fetch["total_bytes"] > 0
    assert sum(fetch["bytes_by_source"].values()) > 0
    stored = config.store_dir / "images" / f"{image_id}.img"
    assert stored.read_bytes() == v1.read_bytes()
    assert node.app[HEARTBEAT].actions.finished[-1] == action_id


# --- apply through the real agent CLI, in private mount namespaces ----------------------------
@dataclass(frozen=True)
class Trees:
    v1_tree: Path
    v1: Path
    v2: Path


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trees]:
    work = tmp_path_factory.mktemp("heartbeat-trees")
    base_tree(work / "v1-tree")
    shutil.copytree(work / "v1-tree", work / "v2-tree", symlinks=True)
    v2_changes(work / "v2-tree")
    yield Trees(
        work / "v1-tree",
        build_image(work / "v1-tree", work / "v1.img", 32),
        build_image(work / "v2-tree", work / "v2.img", 32),
    )


@dataclass
class ApplyLab:
    fake: FakeController
    config: cfgmod.Config
    root: Path
    v1: Path
    v1_id: str
    v2_id: str

    async def agent(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *UNSHARE,
            *CLI,
            "agent",
            *args,
            "--root",
            str(self.root),
            "--state-dir",
            str(self.config.agent_state_dir),
            "--reboot-command",
            self.config.agent.reboot_command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def adopt(self) -> None:
        """Record v1 as what the root runs. Not with `agent adopt`: it remounts the filesystem
        holding the root, and a directory root's filesystem is this machine's own. Applying v1
        (the root already holds it) records it the same way and remounts nothing on a
        writable root."""
        code, _, err = await self.agent(
            "apply", "--image", str(self.v1), "--allow-no-rollback", "--json"
        )
        assert code == 0, err

    def image_id(self) -> str:
        return (self.root / "etc/image_id").read_text().strip()

    def apply(self, action_id: str, **extra: Any) -> None:
        self.fake.action = {
            **NONE_ACTION,
            "id": action_id,
            "kind": "apply",
            "image_id": self.v2_id,
            **extra,
        }


@pytest.fixture
async def lab(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    trees: Trees,
    monkeypatch: pytest.MonkeyPatch,
) -> ApplyLab:
    """A real controller holding v2, the fake in front of it, a directory root holding v1."""
    monkeypatch.setenv("IMAGESWARM_RUNNING_KERNEL", RELEASE_V1)  # the images' kernel: no reboot
    controller, key = await _real_controller(tmp_path, aiohttp_server, "127.0.0.95")
    v2_id = await _publish(controller, trees.v2, "v2")
    fake = FakeController(upstream="http://127.0.0.95:7700")
    await aiohttp_server(fake.app(), host="127.0.0.96", port=7700)
    root = tmp_path / "root"
    shutil.copytree(trees.v1_tree, root, symlinks=True)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    agent = {"root": str(root), "hooks": str(hooks), "reboot_command": f"touch {tmp_path}/rebooted"}
    config = node_config(tmp_path, "127.0.0.97", "http://127.0.0.96:7700", [key], agent=agent)
    return ApplyLab(fake, config, root, trees.v1, image_id_of(trees.v1), v2_id)


AGENT_IN_NAMESPACE = HeartbeatSettings(
    agent_argv=(*UNSHARE, *CLI),
    first_delay=0,
    backoff_initial=0.05,
    backoff_max=0.4,
    poll=0.1,
)


@needs_root
async def test_apply_is_refused_without_a_way_back_then_swaps_the_root_once_adopted(
    lab: ApplyLab, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    node = await start_node(aiohttp_client, lab.config, AGENT_IN_NAMESPACE)
    lab.apply("r-1:apply")
    beat = await lab.fake.wait("with r-1 finished", finished("r-1:apply"))
    action = beat.body["action"]
    assert action["status"] == "failed", action
    assert "no previous image is known" in action["detail"] and "adopt" in action["detail"]
    assert not (lab.root / "etc/image_id").exists()
    assert beat.body["fetches"][lab.v2_id]["state"] == "done"  # fetched before the agent ran

    await lab.adopt()
    assert lab.image_id() == lab.v1_id
    lab.apply("r-2:apply")
    beat = await lab.fake.wait("with r-2 finished", finished("r-2:apply"))
    action = beat.body["action"]
    assert action["status"] == "done", action
    assert action["detail"].startswith(f"applied {lab.v2_id}")
    assert lab.image_id() == lab.v2_id
    assert (lab.root / "usr/share/doc/new-file").read_text() == "added in v2\n"
    assert (lab.root / "etc/app.conf").read_text() == "setting = 2\n"
    assert not (lab.root / "usr/share/data/f000").exists()
    assert not (tmp_path / "rebooted").exists()
    assert beat.body["current_image"] == lab.v2_id
    assert beat.body["previous_image"] == lab.v1_id
    last = beat.body["agent"]["last"]
    assert last["kind"] == "apply" and last["result"] == "applied"
    assert last["image_id"] == lab.v2_id and last["error"] is None
    assert [p["name"] for p in last["phases"]][-1] == "commit"
    assert beat.body["agent"]["pending"] is None
    running = [action_of(b, "r-2:apply") for b in lab.fake.beats]
    assert any(a is not None and a["status"] == "running" for a in running)
    status = await (await node.get("/api/v1/status")).json()
    report = status["action"]["report"]
    assert report["result"] == "applied" and report["image"]["image_id"] == lab.v2_id


@needs_root
async def test_apply_whose_health_check_fails_is_reported_failed_and_rolled_back(
    lab: ApplyLab, aiohttp_client: ClientFactory
) -> None:
    await lab.adopt()
    node = await start_node(aiohttp_client, lab.config, AGENT_IN_NAMESPACE)
    lab.apply("r-1:apply", health={"command": "false"})
    beat = await lab.fake.wait("with r-1 finished", finished("r-1:apply"))
    action = beat.body["action"]
    assert action["status"] == "failed", action
    assert (
        "health check failed" in action["detail"]
        and f"rolled back to {lab.v1_id}" in (action["detail"])
    )
    assert lab.image_id() == lab.v1_id
    assert (lab.root / "etc/app.conf").read_text() == "setting = 1\n"
    assert beat.body["current_image"] == lab.v1_id
    last = beat.body["agent"]["last"]
    assert last["kind"] == "restore" and last["result"] == "rolled-back", last
    status = await (await node.get("/api/v1/status")).json()
    report = status["action"]["report"]
    assert report["kind"] == "restore" and report["error"].startswith("restoring after: health")


@needs_root
async def test_a_daemon_restarted_mid_apply_recovers_before_its_first_heartbeat(
    lab: ApplyLab, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """The daemon stops while the agent runs a configure hook (root already swapped); the
    next daemon runs `agent recover` and reports the instruction's outcome in its first beat."""
    hook = Path(str(lab.config.agent.hooks)) / "configure.d" / "10-wait"
    hook.parent.mkdir()
    hook.write_text(
        "#!/bin/sh\n"
        f"touch {tmp_path}/in-configure\n"
        f"while [ ! -e {tmp_path}/release ]; do sleep 0.05; done\n"
    )
    hook.chmod(0o755)
    await lab.adopt()
    node = await start_node(aiohttp_client, lab.config, AGENT_IN_NAMESPACE)
    lab.apply("r-1:apply")

    def in_configure(beat: Beat) -> bool:
        action = action_of(beat, "r-1:apply")
        return action is not None and action["detail"] == "apply: configure"

    await lab.fake.wait("in configure", in_configure)
    assert (tmp_path / "in-configure").exists()
    beat = lab.fake.beats[-1]
    assert beat.body["agent"]["pending"] == {
        "kind": "apply",
        "image_id": lab.v2_id,
        "phase": "configure",
    }
    await node.close()  # kills the agent mid-operation
    seen = len(lab.fake.beats)
    journal = json.loads((lab.config.agent_state_dir / "journal.json").read_text())
    assert journal["phases"][-1]["name"] == "configure"
    (tmp_path / "release").touch()

    await start_node(aiohttp_client, lab.config, AGENT_IN_NAMESPACE)
    beat = await lab.fake.wait("after the restart", lambda b: True, since=seen)
    assert beat.body["action"]["id"] == "r-1:apply"
    assert beat.body["action"]["status"] == "done", beat.body["action"]
    assert beat.body["current_image"] == lab.v2_id
    assert beat.body["agent"]["pending"] is None
    assert beat.body["agent"]["last"]["result"] == "applied"
    assert lab.image_id() == lab.v2_id
    assert not (lab.config.agent_state_dir / "journal.json").exists()
