"""End to end on the network-namespace lab: a controller host and eight node hosts, each node
on its own loop-mounted read-only ext4 root. The operator, on this machine, publishes v2 and
runs `imageswarm rollout start ... --watch` (prefetch, canary 1, batches of 4) against the
controller across the bridge; every node ends on v2, compared file by file, and the bytes
crossed the lab's shaped links."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imageswarm.daemon.client import ApiClient, Event, SseParser
from imageswarm.daemon.lab import net
from imageswarm.daemon.lab.hosts import Lab, LabSpec, NetnsCluster, exec_argv
from tests.agent.roots import Namespace, mount_readonly, tree_digest
from tests.conftest import needs_root
from tests.lab.labkit import CLI

pytestmark = needs_root

SUBNET = 203
NODES = 8


@pytest.fixture
async def lab(tmp_path: Path, ext4_pair: tuple[Path, Path, Path]) -> AsyncIterator[Lab]:
    v1, _, _ = ext4_pair
    spec = LabSpec(tmp_path / "lab", NODES, SUBNET, rate=500 * 10**6, root_image=v1)
    lab = Lab(spec)
    try:
        await lab.up()
        yield lab
    finally:
        await asyncio.to_thread(lab.down)


def _sent_bytes(netns: str) -> int:
    """Bytes the host sent through its link's tbf qdisc."""
    out = net.run(["tc", "-n", netns, "-s", "qdisc", "show", "dev", "eth0"]).stdout
    match = re.search(r"Sent (\d+) bytes", out)
    assert match and "tbf" in out, out
    return int(match[1])


async def _events(url: str, token: str) -> list[Event]:
    """The controller's event log from the start, up to the rollout's end."""
    parser, events = SseParser(), list[Event]()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
        http.get(f"{url}/api/v1/events?since=0") as resp,
        asyncio.timeout(15),
    ):
        while not any(e.kind == "rollout.state" and e.data["state"] == "done" for e in events):
            events += parser.feed(await resp.content.readany())
    return events


def _check_roots(lab: Lab, cluster: NetnsCluster, v2: Path, image_id: str) -> None:
    """Every node's root equals v2 file by file, names it, and is read-only again."""
    ns = Namespace()
    try:
        expected = tree_digest(mount_readonly(ns, v2, lab.workdir / "v2-reference"))
    finally:
        ns.close()
    assert lab.state is not None
    for d in cluster.node_daemons:
        root = d.root_view()
        assert (root / "etc/image_id").read_text().strip() == image_id, d.name
        got = tree_digest(root)
        # The agent keeps replaced files under var/lib/imageswarm (preserved), which may create
        # var/ and var/lib/ on a root whose image has none.
        got = {k: v for k, v in got.items() if k not in ("var", "var/lib") or k in expected}
        assert got == expected, d.name
        argv = ["findmnt", "-n", "-o", "OPTIONS", str(d.root)]
        options = net.run(exec_argv(lab.state, d.name, argv)).stdout
        assert "ro" in options.strip().split(","), (d.name, options)


async def test_staged_rollout_on_the_lab_swaps_every_node_root_to_the_new_image(
    lab: Lab, ext4_pair: tuple[Path, Path, Path]
) -> None:
    _, v2, _ = ext4_pair
    cluster = lab.cluster
    assert cluster is not None and lab.state is not None
    controller = lab.plan.controller
    assert cluster.controller.url == f"http://198.18.{SUBNET}.1:7700"
    sent_before = _sent_bytes(controller.netns)
    published = await cluster.publish(v2, "v2")
    manifest = published["manifest"]
    stored = sum({c["hash"]: c["length"] for c in manifest["chunks"] if c["hash"]}.values())
    watch = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "rollout", "start", manifest["image_id"], "--canary", "1", "--batch", "4",
         "--reboot", "never", "--watch", "--controller", cluster.controller.url,
         "--token", lab.state.token],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert watch.returncode == 0, watch.stdout + watch.stderr

    await asyncio.to_thread(_check_roots, lab, cluster, v2, manifest["image_id"])

    async with ApiClient(cluster.controller.url, token=lab.state.token) as api:
        nodes: list[dict[str, Any]] = (await api.get_json("/api/v1/nodes"))["nodes"]
        rollout = (await api.get_json("/api/v1/rollouts"))["rollouts"][0]
    assert rollout["state"] == "done", rollout
    assert {t["status"] for t in rollout["nodes"]} == {"applied"}, rollout
    assert sorted(Counter(t["batch"] for t in rollout["nodes"]).items()) == [(0, 1), (1, 4), (2, 3)]
    # Prefetch first: every node held the image before the canary started applying.
    steps = [
        e.data["status"]
        for e in await _events(cluster.controller.url, lab.state.token)
        if e.kind == "rollout.node" and e.data["status"] in ("prefetched", "applying")
    ]
    assert steps == ["prefetched"] * NODES + ["applying"] * NODES, steps
    assert {n["name"]: n["current_image"] for n in nodes} == {
        d.name: manifest["image_id"] for d in cluster.node_daemons
    }
    # Every node got the whole image over the network (their stores started empty), partly
    # from each other; the controller's link carried at least one copy and less than eight.
    by_source = [n["fetches"][manifest["image_id"]]["bytes_by_source"] for n in nodes]
    wire = ("controller", "peers", "web_seed", "unattributed")
    assert all(sum(s.get(k, 0) for k in wire) >= stored for s in by_source), by_source
    assert sum(s["peers"] for s in by_source) > 0, by_source
    sent = _sent_bytes(controller.netns) - sent_before
    assert stored <= sent < NODES * stored, (sent, stored)
