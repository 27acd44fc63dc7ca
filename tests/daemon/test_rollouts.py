"""The rollout engine over real HTTP, driven by simulated nodes' heartbeats: batches, prefetch,
halting and retrying, pause/abort, rollback, conflicts, and a controller restarted mid-rollout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imageswarm.daemon.app import create_app
from imageswarm.daemon.appkeys import EVENTS
from imageswarm.daemon.errors import BadRequest
from imageswarm.daemon.rolloutstate import Strategy, plan_batches
from tests.daemon.controlkit import (
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
    wait_state,
)

#: The controllers bind port 0, so these tests can share one address (test_heartbeat has .80-.97).
IP = "127.0.0.79"
NO_PREFETCH = {"prefetch": False, "canary": 1, "batch": 1, "max_failures": 0}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("tiny")
    return tiny_image(work, 3), tiny_image(work, 4)


async def _setup(
    tmp_path: Path,
    ip: str,
    server: ServerFactory,
    client: ClientFactory,
    image: Path,
    nodes: int,
) -> tuple[Client, str, list[SimNode]]:
    ctl = await client(await server(create_app(controller_config(tmp_path, ip)), host=ip, port=0))
    image_id = await publish(ctl, image)
    sims = [await SimNode.enroll(ctl, f"n{i}", role="compute") for i in range(1, nodes + 1)]
    return ctl, image_id, sims


async def _post(ctl: Client, rollout_id: str, verb: str) -> Any:
    return await ctl.post(f"/api/v1/rollouts/{rollout_id}/{verb}", headers=auth())


def test_batches_are_fixed_by_canary_and_batch_size() -> None:
    names = [f"n{i}" for i in range(10)]
    assert plan_batches(names, Strategy(canary=1, batch=4)) == [
        ["n0"],
        ["n1", "n2", "n3", "n4"],
        ["n5", "n6", "n7", "n8"],
        ["n9"],
    ]
    assert plan_batches(names, Strategy(canary=0, batch="25%")) == [
        names[0:3],
        names[3:6],
        names[6:9],
        names[9:],
    ]
    assert plan_batches(names[:1], Strategy(canary=1, batch="1%")) == [["n0"]]
    assert plan_batches(names[:3], Strategy(canary=3, batch=1)) == [names[:3]]
    assert Strategy.parse(None) == Strategy()
    assert Strategy.parse({"batch": "100%", "health": {"url": "http://h/x"}}).batch == "100%"
    for bad, field in (
        ({"batch": 0}, "strategy.batch"),
        ({"batch": "0%"}, "strategy.batch"),
        ({"batch": "101%"}, "strategy.batch"),
        ({"batch": True}, "strategy.batch"),
        ({"max_failures": -1}, "strategy.max_failures"),
        ({"canary": "1"}, "strategy.canary"),
        ({"reboot": "sometimes"}, "strategy.reboot"),
        ({"prefetch": "yes"}, "strategy.prefetch"),
        ({"health": {"command": "x", "url": "http://x"}}, "strategy.health"),
        ({"health": {"url": "ftp://x"}}, "strategy.health.url"),
        ({"canaries": 1}, "strategy.canaries"),
    ):
        with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
            Strategy.parse(bad)


async def test_prefetch_then_canary_then_batches_of_two_reach_done(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl, image_id, (n1, n2, n3, n4) = await _setup(
        tmp_path, IP, aiohttp_server, aiohttp_client, images[0], 4
    )
    events = await EventReader.open(ctl, since=None)
    strategy = {"prefetch": True, "canary": 1, "batch": 2, "max_failures": 0, "reboot": "never"}
    r = await rollout(ctl, {"image_id": image_id, "nodes": "all", "strategy": strategy})
    rid = r["id"]
    assert (r["state"], r["batches"], r["counts"]["prefetching"]) == ("prefetching", 3, 4)
    assert [(n["name"], n["batch"]) for n in r["nodes"]] == [
        ("n1", 0),
        ("n2", 1),
        ("n3", 1),
        ("n4", 2),
    ]
    assert (await get(ctl, "/api/v1/nodes/n1"))["rollout"] == rid

    prefetch = await n1.beat()
    assert prefetch == {
        "id": f"{rid}:prefetch:{image_id}",
        "kind": "prefetch",
        "image_id": image_id,
        "policy": "never",
        "health": None,
    }
    n1.report = {"id": prefetch["id"], "status": "running", "detail": "fetching", "seconds": 1}
    assert await n1.beat() == prefetch  # the same instruction until it is reported finished
    assert (await n1.finish(prefetch))["kind"] == "none"  # the others are still prefetching
    for node in (n2, n3, n4):
        assert (await node.run())["kind"] == "prefetch"
    assert (await get(ctl, f"/api/v1/rollouts/{rid}"))["state"] == "applying"
    assert (await n2.beat())["kind"] == "none"  # prefetched, but batch 1 waits for the canary

    apply = await n1.run()
    assert (apply["kind"], apply["id"]) == ("apply", f"{rid}:apply:{image_id}")
    assert (await n4.beat())["kind"] == "none"
    assert [(await n.run())["kind"] for n in (n2, n3)] == ["apply", "apply"]
    assert (await n4.run())["kind"] == "apply"
    done = await get(ctl, f"/api/v1/rollouts/{rid}")
    assert done["state"] == "done" and done["counts"]["applied"] == 4
    assert all(n["started"] and n["finished"] for n in done["nodes"])
    assert (await n1.beat())["kind"] == "none"  # a repeated report changes nothing
    assert (await get(ctl, "/api/v1/nodes/n1"))["current_image"] == image_id

    await events.wait_for("rollout.state", id=rid, state="done")
    seen = [
        (e.kind, e.data.get("state", e.data.get("status")), e.data.get("node", e.data.get("batch")))
        for e in events.events
        if e.kind.startswith("rollout.")
    ]
    assert seen == [
        ("rollout.created", None, None),
        ("rollout.state", "prefetching", 0),
        *[("rollout.node", "prefetching", n) for n in ("n1", "n2", "n3", "n4")],
        *[("rollout.node", "prefetched", n) for n in ("n1", "n2", "n3", "n4")],
        ("rollout.state", "applying", 0),
        ("rollout.node", "applying", "n1"),
        ("rollout.node", "applied", "n1"),
        ("rollout.state", "applying", 1),
        ("rollout.node", "applying", "n2"),
        ("rollout.node", "applying", "n3"),
        ("rollout.node", "applied", "n2"),
        ("rollout.node", "applied", "n3"),
        ("rollout.state", "applying", 2),
        ("rollout.node", "applying", "n4"),
        ("rollout.node", "applied", "n4"),
        ("rollout.state", "done", 2),
    ]
    metrics = await (await ctl.get("/metrics")).text()
    assert "imageswarm_apply_seconds_count 4" in metrics
    assert f'imageswarm_rollout_nodes{{rollout="{rid}",status="applied"}} 4' in metrics
    assert 'imageswarm_rollouts{state="done"} 1' in metrics


async def test_failures_beyond_max_halt_and_resume_retries_them(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl, image_id, (n1, n2, n3) = await _setup(
        tmp_path, IP, aiohttp_server, aiohttp_client, images[0], 3
    )
    strategy = {**NO_PREFETCH, "batch": 2}
    r = await rollout(ctl, {"image_id": image_id, "nodes": "all", "strategy": strategy})
    rid = r["id"]
    await problem(await _post(ctl, rid, "resume"), 409)  # running: nothing to resume
    first = await n1.run("failed")
    halted = await get(ctl, f"/api/v1/rollouts/{rid}")
    assert halted["state"] == "halted" and "max_failures 0" in halted["reason"]
    assert halted["nodes"][0]["status"] == "failed"
    assert "apply failed" in halted["nodes"][0]["detail"]
    assert (await n2.beat())["kind"] == "none"  # halted: no new node is told anything
    assert (await get(ctl, "/api/v1/nodes/n2"))["rollout"] is None  # halted is not active
    await problem(await _post(ctl, rid, "pause"), 409)

    resp = await _post(ctl, rid, "resume")
    assert resp.status == 200 and (await resp.json())["state"] == "applying"
    retry = await n1.beat()
    assert retry["kind"] == "apply" and retry["id"] == f"{first['id']}:2"
    await n1.finish(retry)
    assert [(await n.run())["kind"] for n in (n2, n3)] == ["apply", "apply"]
    assert (await get(ctl, f"/api/v1/rollouts/{rid}"))["state"] == "done"

    # A failed prefetch counts too; within max_failures the rollout goes on without the node.
    r2 = await rollout(
        ctl,
        {
            "image_id": image_id,
            "nodes": ["n1", "n2"],
            "strategy": {"prefetch": True, "canary": 0, "batch": 2, "max_failures": 1},
        },
    )
    await n1.run("failed")
    await n2.run()
    assert (await n2.run())["kind"] == "apply"
    final = await wait_state(ctl, r2["id"], "done")
    assert [n["status"] for n in final["nodes"]] == ["failed", "applied"]


async def test_pause_holds_batches_and_abort_lets_running_nodes_finish(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl, image_id, (n1, n2, n3) = await _setup(
        tmp_path, IP, aiohttp_server, aiohttp_client, images[0], 3
    )
    r = await rollout(ctl, {"image_id": image_id, "nodes": "all", "strategy": NO_PREFETCH})
    rid = r["id"]
    apply1 = await n1.beat()
    resp = await _post(ctl, rid, "pause")
    assert resp.status == 200 and (await resp.json())["state"] == "paused"
    await problem(await _post(ctl, rid, "pause"), 409)
    assert await n1.beat() == apply1  # mid-apply: it finishes
    await n1.finish(apply1)
    assert (await n2.beat())["kind"] == "none"  # paused: no new batch
    assert (await get(ctl, f"/api/v1/rollouts/{rid}"))["batch"] == 0
    assert (await (await _post(ctl, rid, "resume")).json())["batch"] == 1
    apply2 = await n2.beat()
    assert apply2["kind"] == "apply"
    aborted = await (await _post(ctl, rid, "abort")).json()
    assert aborted["state"] == "aborted" and aborted["reason"]
    for verb in ("abort", "pause", "resume"):
        await problem(await _post(ctl, rid, verb), 409)
    assert await n2.beat() == apply2 and (await n3.beat())["kind"] == "none"
    await n2.finish(apply2)
    shown = await get(ctl, f"/api/v1/rollouts/{rid}")
    assert [n["status"] for n in shown["nodes"]] == ["applied", "applied", "pending"]
    assert shown["state"] == "aborted"
    r2 = await rollout(ctl, {"image_id": image_id, "nodes": ["n2", "n3"], "strategy": NO_PREFETCH})
    assert r2["id"] != rid


async def test_rollback_restores_every_touched_node_once(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl, one, (n1, n2, n3) = await _setup(
        tmp_path, IP, aiohttp_server, aiohttp_client, images[0], 3
    )
    two = await publish(ctl, images[1], "two")
    strategy = {"prefetch": False, "canary": 0, "batch": 3, "max_failures": 1}
    r = await rollout(ctl, {"image_id": one, "nodes": "all", "strategy": strategy})
    rid = r["id"]
    await n1.run()
    await n2.run("failed")
    apply3 = await n3.beat()  # n3 is mid-apply when the rollback begins
    back = await (await _post(ctl, rid, "rollback")).json()
    assert back["state"] == "rolling-back"
    assert [n["status"] for n in back["nodes"]] == ["rolling-back", "rolling-back", "applying"]
    undo = await n1.beat()
    assert undo == {**undo, "kind": "rollback", "image_id": one, "id": f"{rid}:rollback:{one}"}
    await n1.finish(undo)
    assert n1.current is None
    await n2.run()
    assert (await n3.finish(apply3))["kind"] == "rollback"  # it finished: now undo it too
    assert (await get(ctl, f"/api/v1/rollouts/{rid}"))["state"] == "rolling-back"
    await n3.run()
    final = await get(ctl, f"/api/v1/rollouts/{rid}")
    assert final["state"] == "rolled-back" and final["counts"]["rolled-back"] == 3
    await problem(await _post(ctl, rid, "rollback"), 409)

    # Only the latest change to a node can be rolled back.
    r2 = await rollout(ctl, {"image_id": one, "nodes": ["n1"], "strategy": NO_PREFETCH})
    await n1.run()
    r3 = await rollout(ctl, {"image_id": two, "nodes": ["n1"], "strategy": NO_PREFETCH})
    await n1.run()
    body = await problem(await _post(ctl, r2["id"], "rollback"), 409)
    assert "n1" in body["detail"] and r3["id"] in body["detail"]
    assert (await (await _post(ctl, r3["id"], "rollback")).json())["state"] == "rolling-back"


async def test_refused_rollouts_store_nothing(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl, image_id, _ = await _setup(tmp_path, IP, aiohttp_server, aiohttp_client, images[0], 3)
    first = await rollout(ctl, {"image_id": image_id, "nodes": ["n1", "n2"]})
    bus = app_of(ctl)[EVENTS]
    before = bus.last_seq
    url = "/api/v1/rollouts"
    ok: dict[str, Any] = {"image_id": image_id, "nodes": ["n3"]}
    cases: list[tuple[Any, int, str]] = [
        (
            {"image_id": image_id, "nodes": ["n3", "n2"]},
            409,
            f"n2 is already in active rollout {first['id']}",
        ),
        ({**ok, "image_id": "f" * 64}, 404, "does not exist"),
        ({**ok, "image_id": "../x"}, 400, "'image_id'"),
        ({**ok, "nodes": ["n3", "n9", "n8"]}, 404, "n9, n8"),
        ({**ok, "nodes": ["n3", "n3"]}, 400, "more than once"),
        ({**ok, "nodes": []}, 400, "'nodes'"),
        ({**ok, "nodes": "some"}, 400, "'nodes'"),
        ({**ok, "nodes": {"labels": {"role": "storage"}}}, 400, "no enrolled node"),
        ({**ok, "nodes": {"labels": {}}}, 400, "nodes.labels"),
        ({**ok, "nodes": {"label": {"role": "compute"}}}, 400, "nodes.label"),
        ({"image_id": image_id}, 400, "'nodes'"),
        ({**ok, "strategy": {"canary": 2}}, 400, "strategy.canary"),
        ({**ok, "strategy": {"batch": 0}}, 400, "strategy.batch"),
        ({**ok, "strategy": {"batch": "150%"}}, 400, "strategy.batch"),
        ({**ok, "strategy": {"max_failures": -1}}, 400, "strategy.max_failures"),
        ({**ok, "strategy": {"reboot": "later"}}, 400, "strategy.reboot"),
        ({**ok, "strategy": []}, 400, "'strategy'"),
        ({**ok, "extra": 1}, 400, "'extra'"),
    ]
    for body, status, text in cases:
        detail = (await problem(await ctl.post(url, json=body, headers=auth()), status))["detail"]
        assert text in detail, (body, detail)
    await problem(await ctl.post(url, data=b"{", headers=auth()), 400)
    await problem(await ctl.post(url, headers=auth()), 400)
    for path in ("/api/v1/rollouts/r-99", "/api/v1/rollouts/x", "/api/v1/rollouts/r-1x"):
        await problem(await ctl.get(path), 404)
        await problem(await ctl.post(f"{path}/abort", headers=auth()), 404)
    assert bus.last_seq == before
    assert [r["id"] for r in (await get(ctl, url))["rollouts"]] == [first["id"]]
    # Labels select: n3 is free, and n1/n2 are taken.
    labels = {"image_id": image_id, "nodes": {"labels": {"role": "compute"}}}
    await problem(await ctl.post(url, json=labels, headers=auth()), 409)


async def test_a_restarted_controller_carries_on_mid_rollout(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ip = IP
    ctl, image_id, (n1, n2, n3) = await _setup(
        tmp_path, ip, aiohttp_server, aiohttp_client, images[0], 3
    )
    r = await rollout(ctl, {"image_id": image_id, "nodes": "all", "strategy": NO_PREFETCH})
    rid = r["id"]
    await n1.run()
    apply2 = await n2.beat()
    n2.report = {"id": apply2["id"], "status": "running", "detail": "swap", "seconds": 1}
    await n2.beat()
    last_seq = app_of(ctl)[EVENTS].last_seq
    await ctl.close()  # the controller stops (its heartbeat batch is written on the way out)
    assert ctl.server.closed

    again = await aiohttp_client(
        await aiohttp_server(create_app(controller_config(tmp_path, ip)), host=ip, port=0)
    )
    assert app_of(again)[EVENTS].last_seq == last_seq
    for node in (n1, n2, n3):
        node.client = again  # same tokens: they were stored (hashed)
    shown = await get(again, "/api/v1/nodes/n1")
    assert shown["current_image"] == image_id and shown["rollout"] == rid
    assert (await get(again, "/api/v1/nodes/n2"))["action"]["status"] == "running"
    events = await EventReader.open(again, since=last_seq)
    assert await n2.beat() == apply2  # the same instruction: it is not run twice
    await n2.finish(apply2)
    assert (await n3.run())["kind"] == "apply"
    done = await get(again, f"/api/v1/rollouts/{rid}")
    assert done["state"] == "done" and done["counts"]["applied"] == 3
    await events.wait_for("rollout.state", id=rid, state="done")
    assert events.events[0].id == last_seq + 1
