"""End to end with real processes: a controller and four node daemons, each node in a mount
namespace of its own with a loop-mounted read-only ext4 root that its agent swaps in place.

The operator publishes v2 and runs `imageswarm rollout start ... --watch` (prefetch, canary 1,
batches of 2); every node ends on v2, compared file by file; the event stream tells the story in
order; the CLI's watch exits 0.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imageswarm.daemon.client import Event, SseParser
from imageswarm.daemon.localcluster import LocalCluster
from tests.agent.roots import Namespace, mount_readonly, tree_digest

CLI = [sys.executable, "-m", "imageswarm.daemon.cli.main"]


@pytest.fixture
async def cluster(
    tmp_path: Path, ext4_pair: tuple[Path, Path, Path]
) -> AsyncIterator[LocalCluster]:
    v1, _, _ = ext4_pair
    c = LocalCluster(
        tmp_path / "lab", nodes=4, base=40, root_image=v1, upload_rate_limit=16 * 1024 * 1024
    )
    c.write_configs()
    c.start()
    try:
        await c.wait_ready()
        yield c
    finally:
        c.stop()


async def _events(cluster: LocalCluster) -> list[dict[str, Any]]:
    """The event log replayed from the start, up to the rollout's final state."""
    parser = SseParser()
    events: list[Event] = []
    headers = {"Authorization": f"Bearer {cluster.api_token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"{cluster.controller.url}/api/v1/events?since=0") as resp,
    ):
        assert resp.status == 200
        async with asyncio.timeout(15):
            while not any(e.kind == "rollout.state" and e.data["state"] == "done" for e in events):
                events += parser.feed(await resp.content.readany())
    return [{"seq": e.id, "kind": e.kind, "data": e.data} for e in events]


def _check_roots(cluster: LocalCluster, v2: Path, image_id: str) -> None:
    """Every node's root equals v2 file by file, names it, and is read-only again."""
    ns = Namespace()
    try:
        expected = tree_digest(mount_readonly(ns, v2, cluster.root / "v2-reference"))
    finally:
        ns.close()
    for d in cluster.node_daemons:
        root = d.root_view()
        assert (root / "etc/image_id").read_text().strip() == image_id, d.name
        got = tree_digest(root)
        # The agent keeps replaced files under var/lib/imageswarm (preserved), which may create
        # var/ and var/lib/ on a root whose image has none.
        got = {k: v for k, v in got.items() if k not in ("var", "var/lib") or k in expected}
        assert got == expected, d.name
        options = subprocess.run(
            [
                "nsenter",
                "-t",
                str(d.proc.pid if d.proc else 0),
                "-m",
                "findmnt",
                "-n",
                "-o",
                "OPTIONS",
                str(d.root),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "ro" in options.strip().split(","), (d.name, options)


async def test_staged_rollout_swaps_every_node_root_to_the_new_image(
    cluster: LocalCluster, ext4_pair: tuple[Path, Path, Path]
) -> None:
    _, v2, _ = ext4_pair
    nodes = await cluster.wait_nodes_online()
    v1_ids = {n["current_image"] for n in nodes}
    assert len(v1_ids) == 1
    manifest = (await cluster.publish(v2, "v2"))["manifest"]
    watch = await asyncio.to_thread(
        subprocess.run,
        [
            *CLI,
            "rollout",
            "start",
            manifest["image_id"],
            "--canary",
            "1",
            "--batch",
            "2",
            "--reboot",
            "never",
            "--watch",
            "--controller",
            cluster.controller.url,
            "--token",
            str(cluster.api_token),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert watch.returncode == 0, watch.stdout + watch.stderr

    await asyncio.to_thread(_check_roots, cluster, v2, manifest["image_id"])

    events = await _events(cluster)
    states = [e["data"]["state"] for e in events if e["kind"] == "rollout.state"]
    assert states[0] in ("prefetching", "pending") and states[-1] == "done", states
    assert "applying" in states
    per_node: dict[str, list[str]] = {}
    for e in events:
        if e["kind"] == "rollout.node":
            per_node.setdefault(e["data"]["node"], []).append(e["data"]["status"])
    assert sorted(per_node) == [d.name for d in cluster.node_daemons]
    for name, seen in per_node.items():
        order = [s for s in seen if s in ("prefetching", "prefetched", "applying", "applied")]
        assert order == ["prefetching", "prefetched", "applying", "applied"], (name, seen)
    seqs = [int(e["seq"]) for e in events]
    assert seqs == sorted(seqs)
    # Prefetch first: no node started applying before every node had prefetched.
    first_apply = next(
        i
        for i, e in enumerate(events)
        if e["kind"] == "rollout.node" and e["data"]["status"] == "applying"
    )
    prefetched = [
        i
        for i, e in enumerate(events)
        if e["kind"] == "rollout.node" and e["data"]["status"] == "prefetched"
    ]
    assert len(prefetched) == 4 and max(prefetched) < first_apply
