"""The controller's node and event API over real HTTP: enrollment, heartbeats, labels, online
state, the SSE stream, /metrics, image deletion, and the operator token on every change."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from imageswarm.daemon.api import events as events_api
from imageswarm.daemon.app import create_app
from imageswarm.daemon.appkeys import CATALOG, DATABASE, EVENTS
from tests.daemon.controlkit import (
    SECRET,
    Client,
    ClientFactory,
    EventReader,
    ServerFactory,
    SimNode,
    app_of,
    auth,
    controller_config,
    get,
    problem,
    publish,
    rollout,
    tiny_image,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("tiny")
    return tiny_image(work, 1), tiny_image(work, 2)


async def _controller(
    tmp_path: Path, ip: str, server: ServerFactory, client: ClientFactory, **extra: Any
) -> Client:
    app = create_app(controller_config(tmp_path, ip, **extra))
    return await client(await server(app, host=ip, port=0))


async def test_enrollment_checks_the_secret_and_rotates_hashed_tokens(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(tmp_path, "127.0.0.70", aiohttp_server, aiohttp_client)
    enroll = "/api/v1/nodes/enroll"
    body = await problem(await ctl.post(enroll, json={"name": "n1", "join_secret": "no"}), 401)
    assert "join secret" in body["detail"]
    for bad, field in (
        ({"join_secret": SECRET}, "name"),
        ({"name": "bad name!", "join_secret": SECRET}, "name"),
        ({"name": "n1"}, "join_secret"),
        ({"name": "n1", "join_secret": SECRET, "labels": {"a": 1}}, "labels"),
        ({"name": "n1", "join_secret": SECRET, "colour": "red"}, "colour"),
    ):
        assert field in (await problem(await ctl.post(enroll, json=bad), 400))["detail"]
    await problem(await ctl.post(enroll, data=b"{not json"), 400)
    assert (await get(ctl, "/api/v1/nodes"))["nodes"] == []

    node = await SimNode.enroll(ctl, "n1", role="compute")
    first = node.token
    assert (await node.beat())["kind"] == "none"
    again = await SimNode.enroll(ctl, "n1", zone="a")
    assert again.token != first
    beat = "/api/v1/nodes/n1/heartbeat"
    await problem(await ctl.post(beat, json=node.body(), headers=auth(first)), 401)
    await problem(await ctl.post(beat, json=node.body()), 401)
    await problem(await ctl.post("/api/v1/nodes/n2/heartbeat", json={}, headers=auth(first)), 401)
    node.token = again.token
    await node.beat()
    shown = await get(ctl, "/api/v1/nodes/n1")
    assert shown["labels"] == {"role": "compute", "zone": "a"}  # the node's labels merge

    db_file = app_of(ctl)[DATABASE].path
    conn = sqlite3.connect(db_file)  # a second reader: enrollment commits before answering
    (stored,) = conn.execute("SELECT token_sha256 FROM nodes WHERE name='n1'").fetchone()
    conn.close()
    assert stored == hashlib.sha256(again.token.encode()).hexdigest()
    for path in db_file.parent.glob(db_file.name + "*"):  # the database and its WAL
        assert again.token.encode() not in path.read_bytes()


async def test_enrollment_is_off_without_a_join_secret(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(
        tmp_path, "127.0.0.71", aiohttp_server, aiohttp_client, join_secret=None
    )
    body = {"name": "n1", "join_secret": SECRET}
    detail = (await problem(await ctl.post("/api/v1/nodes/enroll", json=body), 401))["detail"]
    assert "join_secret" in detail


async def test_heartbeats_are_validated_field_by_field(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(tmp_path, "127.0.0.72", aiohttp_server, aiohttp_client)
    node = await SimNode.enroll(ctl, "n1")
    good = node.body()
    fetch = {"state": "downloading", "done_bytes": 1, "total_bytes": 2, "duration": 1.5}
    cases: list[tuple[Any, str]] = [
        ({k: v for k, v in good.items() if k != "kernel"}, "'kernel'"),
        ({**good, "current_image": 5}, "'current_image'"),
        ({**good, "previous_image": "../etc"}, "'previous_image'"),
        ({**good, "kernel": ""}, "'kernel'"),
        ({**good, "fetches": {"abc": {**fetch, "done_bytes": -1}}}, "'fetches.abc.done_bytes'"),
        ({**good, "fetches": {"abc": {**fetch, "duration": "x"}}}, "'fetches.abc.duration'"),
        ({**good, "fetches": {"a b": fetch}}, "'fetches'"),
        ({**good, "fetches": {"abc": {**fetch, "bytes_by_source": {"peers": 1.5}}}}, "peers"),
        ({**good, "action": {"id": "x", "status": "maybe"}}, "'action.status'"),
        ({**good, "action": "done"}, "'action'"),
        ({**good, "agent": {"last": {"phases": [{"seconds": "1"}]}}}, "phases[0].seconds"),
        ({**good, "agent": {"drift": {"clean": "yes"}}}, "'agent.drift.clean'"),
        ([good], "JSON object"),
    ]
    url = "/api/v1/nodes/n1/heartbeat"
    for body, field in cases:
        resp = await ctl.post(url, json=body, headers=auth(node.token))
        assert field in (await problem(resp, 400))["detail"], body
    await problem(await ctl.post(url, data=b"[", headers=auth(node.token)), 400)
    shown = await get(ctl, "/api/v1/nodes/n1")
    assert shown["last_seen"] is None and shown["online"] is False
    # Unknown fields are ignored: a newer node may send more.
    resp = await ctl.post(url, json={**good, "future": 1}, headers=auth(node.token))
    assert resp.status == 200


async def test_nodes_go_online_offline_and_report_progress(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(
        tmp_path, "127.0.0.73", aiohttp_server, aiohttp_client, heartbeat_interval=0.2
    )
    events = await EventReader.open(ctl)
    node = await SimNode.enroll(ctl, "n1", role="compute")
    node.fetches = {
        "abc": {"state": "downloading", "done_bytes": 1, "total_bytes": 4, "duration": 1.0}
    }
    resp = await ctl.post("/api/v1/nodes/n1/heartbeat", json=node.body(), headers=auth(node.token))
    assert (await resp.json())["interval"] == 0.2
    node.fetches["abc"]["done_bytes"] = 2
    await node.beat()  # within a second of the last progress event: not published
    shown = await get(ctl, "/api/v1/nodes/n1")
    assert shown["online"] is True and shown["fetches"]["abc"]["done_bytes"] == 2
    assert shown["kernel"] == "6.1.0-test-amd64" and shown["rollout"] is None
    progress_at = time.monotonic()
    await events.wait_for("node.offline", node="n1", within=5)
    assert events.kinds() == ["node.enrolled", "node.online", "node.progress", "node.offline"]
    assert events.events[2].data["fetches"]["abc"]["done_bytes"] == 1
    assert (await get(ctl, "/api/v1/nodes/n1"))["online"] is False
    await asyncio.sleep(max(0.0, progress_at + 1.05 - time.monotonic()))
    await node.beat()
    await events.until(lambda e: len(e) == 6)
    assert events.kinds()[-2:] == ["node.online", "node.progress"]  # a second on: the news
    assert events.events[-1].data["fetches"]["abc"]["done_bytes"] == 2

    labels = "/api/v1/nodes/n1/labels"
    await problem(await ctl.put(labels, json={"labels": {"a": "b"}}), 401)
    await problem(await ctl.put(labels, json={"labels": ["a"]}, headers=auth()), 400)
    await problem(await ctl.put(labels, json={}, headers=auth()), 400)
    await problem(
        await ctl.put("/api/v1/nodes/nx/labels", json={"labels": {}}, headers=auth()), 404
    )
    await problem(await ctl.get("/api/v1/nodes/nx"), 404)
    resp = await ctl.put(labels, json={"labels": {"zone": "b"}}, headers=auth())
    assert resp.status == 200 and (await resp.json())["labels"] == {"zone": "b"}
    assert (await get(ctl, "/api/v1/nodes"))["nodes"][0]["labels"] == {"zone": "b"}


async def test_event_stream_replays_keeps_alive_and_needs_the_token(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events_api, "KEEPALIVE", 0.05)
    ctl = await _controller(tmp_path, "127.0.0.74", aiohttp_server, aiohttp_client)
    for name in ("n1", "n2", "n3"):
        await SimNode.enroll(ctl, name)
    await problem(await ctl.get("/api/v1/events"), 401)
    await problem(await ctl.get("/api/v1/events", headers=auth("wrong")), 401)
    await problem(await ctl.get("/api/v1/events?since=-1", headers=auth()), 400)
    await problem(await ctl.get("/api/v1/events", headers={**auth(), "Last-Event-ID": "x"}), 400)

    replay = await EventReader.open(ctl, since=1)
    await replay.until(lambda e: len(e) == 2)
    assert [(e.id, e.data["node"]) for e in replay.events] == [(2, "n2"), (3, "n3")]
    resp = await ctl.get("/api/v1/events", headers={**auth(), "Last-Event-ID": "2"})
    header = EventReader(resp)
    await header.until(lambda e: len(e) == 1)
    assert header.events[0].id == 3

    live = await EventReader.open(ctl, since=None)
    await live.until(lambda e: live.comments >= 2)  # keepalives while nothing happens
    await SimNode.enroll(ctl, "n4")
    await live.until(lambda e: len(e) == 1)
    assert (live.events[0].id, live.events[0].kind) == (4, "node.enrolled")
    await replay.until(lambda e: len(e) == 3)
    for reader in (replay, header, live):
        reader.close()


async def test_shutdown_ends_open_event_streams_at_once(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(tmp_path, "127.0.0.75", aiohttp_server, aiohttp_client)
    readers = [await EventReader.open(ctl) for _ in range(3)]
    started = time.monotonic()
    await ctl.server.close()
    assert time.monotonic() - started < 3
    for reader in readers:
        async with asyncio.timeout(2):
            assert await reader.resp.content.read() == b""


async def test_metrics_sum_the_fleet_and_count_requests(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(tmp_path, "127.0.0.76", aiohttp_server, aiohttp_client)
    sources = {"local": 0, "controller": 10, "peers": 30, "web_seed": 0, "unattributed": 0}
    for name in ("n1", "n2"):
        node = await SimNode.enroll(ctl, name)
        node.fetches = {
            "abc": {"state": "downloading", "done_bytes": 40, "total_bytes": 80, "duration": 4.0}
        }
        node.fetches["abc"]["bytes_by_source"] = sources
        await node.beat()
        node.fetches["abc"].update(state="done", done_bytes=80, duration=7.0)
        await node.beat()
        await node.beat()  # still done: the fetch is not counted twice
    await problem(await ctl.post("/api/v1/rollouts", json={}), 401)
    resp = await ctl.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    lines = set(text.splitlines())
    for line in (
        "# TYPE imageswarm_nodes gauge",
        'imageswarm_nodes{state="online"} 2',
        'imageswarm_nodes{state="offline"} 0',
        'imageswarm_node_bytes_total{source="peers"} 60',
        'imageswarm_node_bytes_total{source="controller"} 20',
        'imageswarm_rollouts{state="done"} 0',
        "imageswarm_heartbeats_total 6",
        'imageswarm_http_requests_total{method="POST",status="201"} 2',
        'imageswarm_http_requests_total{method="POST",status="200"} 6',
        'imageswarm_http_requests_total{method="POST",status="401"} 1',
        "# TYPE imageswarm_fetch_seconds histogram",
        'imageswarm_fetch_seconds_bucket{le="5"} 0',
        'imageswarm_fetch_seconds_bucket{le="10"} 2',
        'imageswarm_fetch_seconds_bucket{le="+Inf"} 2',
        "imageswarm_fetch_seconds_sum 14",
        "imageswarm_fetch_seconds_count 2",
        "imageswarm_apply_seconds_count 0",
    ):
        assert line in lines, f"{line!r} not in:\n{text}"


async def test_delete_image_refuses_images_in_use(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl = await _controller(tmp_path, "127.0.0.77", aiohttp_server, aiohttp_client)
    events = await EventReader.open(ctl)
    one, two = await publish(ctl, images[0], "one"), await publish(ctl, images[1], "two")
    node = await SimNode.enroll(ctl, "n1")
    node.current = one
    await node.beat()
    await SimNode.enroll(ctl, "n2")
    store = app_of(ctl)[CATALOG].store
    await problem(await ctl.delete(f"/api/v1/images/{two}"), 401)
    await problem(await ctl.delete(f"/api/v1/images/{two}", headers=auth("x")), 401)
    await problem(await ctl.delete("/api/v1/images/ffff", headers=auth()), 404)
    await problem(await ctl.delete("/api/v1/images/bad%20id", headers=auth()), 400)
    body = await problem(await ctl.delete(f"/api/v1/images/{one}", headers=auth()), 409)
    assert "node n1 runs" in body["detail"]
    started = await rollout(ctl, {"image_id": two, "nodes": ["n2"]})
    body = await problem(await ctl.delete(f"/api/v1/images/{two}", headers=auth()), 409)
    assert started["id"] in body["detail"]
    assert store.image_ids() == sorted([one, two])
    resp = await ctl.post(f"/api/v1/rollouts/{started['id']}/abort", headers=auth())
    assert resp.status == 200
    chunks_before = {p.name for p in (store.root / "chunks").rglob("*") if p.is_file()}
    resp = await ctl.delete(f"/api/v1/images/{two}", headers=auth())
    assert resp.status == 204, await resp.text()
    await problem(await ctl.get(f"/api/v1/images/{two}"), 404)
    assert store.image_ids() == [one] and store.bad_chunks(store.load_manifest(one)) == []
    chunks_after = {p.name for p in (store.root / "chunks").rglob("*") if p.is_file()}
    assert chunks_after < chunks_before
    assert set(store.load_manifest(one).unique_chunks()) == chunks_after
    await events.wait_for("image.deleted", image_id=two)
    published = [e.data["image_id"] for e in events.events if e.kind == "image.published"]
    assert published == [one, two]


async def test_every_mutating_endpoint_needs_the_operator_token(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl = await _controller(tmp_path, "127.0.0.78", aiohttp_server, aiohttp_client)
    await SimNode.enroll(ctl, "n1")
    bus = app_of(ctl)[EVENTS]
    before = bus.last_seq
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/api/v1/images?name=x", None),
        ("DELETE", "/api/v1/images/abc", None),
        ("PUT", "/api/v1/nodes/n1/labels", {"labels": {"a": "b"}}),
        ("POST", "/api/v1/rollouts", {"image_id": "abc", "nodes": "all"}),
        ("GET", "/api/v1/events", None),
    ]
    calls += [("POST", f"/api/v1/rollouts/r-1/{verb}", None) for verb in ("pause", "resume")]
    calls += [("POST", f"/api/v1/rollouts/r-1/{verb}", None) for verb in ("abort", "rollback")]
    for method, path, body in calls:
        for headers in ({}, auth("wrong"), {"Authorization": "Basic x"}):
            resp = await ctl.request(method, path, json=body, headers=headers)
            await problem(resp, 401)
    assert bus.last_seq == before
    assert (await get(ctl, "/api/v1/nodes/n1"))["labels"] == {}
    assert (await get(ctl, "/api/v1/rollouts"))["rollouts"] == []
