"""A real controller and three real node daemons (separate processes) on loopback addresses.

libtorrent's own rate limits (applied to loopback peers too) make the swarm behave as on a
network, so the controller's share of the upload is meaningful.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imageswarm.daemon.localcluster import LocalCluster

RATE = 6 * 1024 * 1024


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(tmp_path / "lab", nodes=3, base=30, upload_rate_limit=RATE)
    c.write_configs()
    c.start()
    try:
        await c.wait_ready()
        yield c
    finally:
        c.stop()


async def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, list(argv), capture_output=True, text=True, check=False
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.mark.slow
async def test_image_spreads_over_the_swarm_and_v2_moves_only_the_delta(
    cluster: LocalCluster, ext4_pair: tuple[Path, Path, Path]
) -> None:
    v1, v2, _ = ext4_pair
    published = await cluster.publish(v1, "v1")
    manifest = published["manifest"]
    states = await cluster.fetch_all(manifest["image_id"])
    size = manifest["size"]
    stored = sum({c["hash"]: c["length"] for c in manifest["chunks"] if c["hash"]}.values())
    for name, st in states.items():
        assert st["state"] == "done", (name, st)
        assert st["torrent"] == "image", (name, st)  # nothing held: the whole-image torrent
        # Sources account for every byte libtorrent received, each exactly once (a peer that
        # reconnected used to be counted twice), and little is received twice.
        src = st["bytes_by_source"]
        wire = src["controller"] + src["peers"] + src["web_seed"] + src["unattributed"]
        assert wire == st["received_bytes"], (name, st)
        assert st["total_bytes"] <= st["received_bytes"] <= 1.1 * st["total_bytes"], (name, st)
        node = next(d for d in cluster.node_daemons if d.name == name)
        image = node.workdir / "cache/store/images" / f"{manifest['image_id']}.img"
        assert _sha256(image) == _sha256(v1)
    from_controller = sum(
        st["bytes_by_source"]["controller"] + st["bytes_by_source"]["web_seed"]
        for st in states.values()
    )
    from_peers = sum(st["bytes_by_source"]["peers"] for st in states.values())
    received = from_controller + from_peers
    assert received >= 3 * stored * 0.98, (received, stored)
    assert from_controller <= 2 * size, (from_controller, size)
    assert from_peers > 0.2 * stored, (from_peers, stored)

    # v2 goes through the CLI, as an operator would do it.
    cli = [sys.executable, "-m", "imageswarm.daemon.cli.main", "image"]
    pub = await _run(
        *cli,
        "publish",
        str(v2),
        "--name",
        "v2",
        "--json",
        "--controller",
        cluster.controller.url,
        "--token",
        str(cluster.api_token),
    )
    assert pub.returncode == 0, pub.stderr
    manifest2 = json.loads(pub.stdout)
    node1 = cluster.node_daemons[0]
    fetched = await _run(*cli, "fetch", manifest2["image_id"], "--node", node1.url, "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["state"] == "done"
    assert "fetching" in fetched.stderr  # plain progress lines when not on a terminal
    states2 = await cluster.fetch_all(manifest2["image_id"])
    for name, st in states2.items():
        assert st["state"] == "done", (name, st)
        assert st["torrent"] == "chunks", (name, st)  # v1's chunks are held: a delta
        src = st["bytes_by_source"]
        wire = src["controller"] + src["peers"] + src["web_seed"]
        assert wire < 0.1 * manifest2["size"], (name, src)
        assert src["local"] > 0.9 * st["total_bytes"]
