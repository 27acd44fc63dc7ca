"""Helpers for the control-plane tests: a real controller app, simulated nodes over HTTP, and
an SSE reader. A simulated node is just a bearer token and the heartbeats it posts."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imageswarm.daemon import config as cfgmod
from imageswarm.daemon.client import Event, SseParser
from imageswarm.daemon.localcluster import build_ext4, make_tree

TOKEN = "operator-s3cret"
SECRET = "join-s3cret"
KERNEL = "6.1.0-test-amd64"
Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[TestServer]]


def app_of(client: Client) -> web.Application:
    """The controller app behind a test client."""
    server = client.server
    assert isinstance(server, TestServer)
    return server.app


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def controller_config(tmp: Path, ip: str, **extra: Any) -> cfgmod.Config:
    data: dict[str, Any] = {
        "role": "controller",
        "node_name": "undercloud",
        "api_listen": f"{ip}:7700",
        "cache_dir": str(tmp / f"controller-{ip}"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "api_token": TOKEN,
        "join_secret": SECRET,
        "heartbeat_interval": 10,
        "swarm": {"listen": f"{ip}:0"},
        **extra,
    }
    return cfgmod.parse(tmp / f"controller-{ip}.yaml", data)


def tiny_image(directory: Path, seed: int) -> Path:
    """A small real ext4 image (publishing it takes well under a second)."""
    tree = directory / f"tree-{seed}"
    make_tree(tree, files=6, seed=seed, big_files=0)
    image = directory / f"tiny-{seed}.img"
    build_ext4(tree, image, 8)
    return image


async def publish(client: Client, image: Path, name: str = "tiny") -> str:
    data = await asyncio.to_thread(image.read_bytes)
    resp = await client.post(f"/api/v1/images?name={name}", data=io.BytesIO(data), headers=auth())
    assert resp.status in (200, 201), await resp.text()
    image_id: str = (await resp.json())["manifest"]["image_id"]
    return image_id


async def problem(resp: Any, status: int) -> dict[str, Any]:
    """Assert `resp` is a problem document with this status; return it."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = json.loads(await resp.text())
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in body["detail"]
    return body


class SimNode:
    """A node as the controller sees it: enrollment, then heartbeats with action reports."""

    def __init__(self, client: Client, name: str, token: str) -> None:
        self.client, self.name, self.token = client, name, token
        self.current: str | None = None
        self.previous: str | None = None
        self.report: dict[str, Any] | None = None
        self.fetches: dict[str, Any] = {}

    @classmethod
    async def enroll(cls, client: Client, name: str, **labels: str) -> SimNode:
        body = {"name": name, "join_secret": SECRET, "labels": labels}
        resp = await client.post("/api/v1/nodes/enroll", json=body)
        assert resp.status == 201, await resp.text()
        return cls(client, name, (await resp.json())["token"])

    def body(self) -> dict[str, Any]:
        return {
            "current_image": self.current,
            "previous_image": self.previous,
            "kernel": KERNEL,
            "agent": {"pending": None, "last": None, "drift": None},
            "fetches": self.fetches,
            "action": self.report,
        }

    async def beat(self) -> dict[str, Any]:
        """One heartbeat; returns the instruction (the answer's `action`)."""
        resp = await self.client.post(
            f"/api/v1/nodes/{self.name}/heartbeat", json=self.body(), headers=auth(self.token)
        )
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        action: dict[str, Any] = answer["action"]
        return action

    async def finish(self, action: dict[str, Any], status: str = "done") -> dict[str, Any]:
        """Report `action` as finished (its effect applied when done); returns the next one."""
        assert action["kind"] != "none", action
        if status == "done" and action["kind"] == "apply":
            self.previous, self.current = self.current, action["image_id"]
        elif (
            status == "done" and action["kind"] == "rollback" and self.current == action["image_id"]
        ):
            self.current, self.previous = self.previous, None
        detail = f"{action['kind']} {status}"
        self.report = {"id": action["id"], "status": status, "detail": detail, "seconds": 2.5}
        return await self.beat()

    async def run(self, status: str = "done") -> dict[str, Any]:
        """Ask for an instruction, carry it out with `status`; returns the instruction run."""
        action = await self.beat()
        await self.finish(action, status)
        return action


class EventReader:
    """Reads the controller's SSE stream through a test client."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.parser = SseParser()
        self.events: list[Event] = []
        self.comments = 0

    @classmethod
    async def open(cls, client: Client, since: int | None = 0) -> EventReader:
        query = "" if since is None else f"?since={since}"
        resp = await client.get(f"/api/v1/events{query}", headers=auth())
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        return cls(resp)

    async def _more(self) -> bool:
        block = await self.resp.content.readany()
        if not block:
            return False
        self.comments += block.count(b": keepalive")
        self.events += self.parser.feed(block)
        return True

    async def until(
        self, predicate: Callable[[list[Event]], bool], within: float = 10.0
    ) -> list[Event]:
        async with asyncio.timeout(within):
            while not predicate(self.events):
                if not await self._more():
                    raise AssertionError(f"the stream ended; got {self.kinds()}")
        return self.events

    async def wait_for(self, kind: str, within: float = 10.0, **data: Any) -> Event:
        def match(e: Event) -> bool:
            return e.kind == kind and all(e.data.get(k) == v for k, v in data.items())

        await self.until(lambda events: any(match(e) for e in events), within)
        return next(e for e in self.events if match(e))

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def close(self) -> None:
        self.resp.close()


async def rollout(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/api/v1/rollouts", json=body, headers=auth())
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def get(client: Client, path: str) -> Any:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def wait_state(client: Client, rollout_id: str, state: str, within: float = 5.0) -> Any:
    """Poll until the rollout reaches `state` (the engine's tick makes some transitions)."""
    async with asyncio.timeout(within):
        while True:
            data = await get(client, f"/api/v1/rollouts/{rollout_id}")
            if data["state"] == state:
                return data
            await asyncio.sleep(0.05)
