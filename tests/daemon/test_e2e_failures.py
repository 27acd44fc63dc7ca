"""End to end failures with real processes: a controller and three node daemons, each node in a
mount namespace of its own on a loop-mounted read-only ext4 root (see test_e2e_rollout.py).

1. A health check that fails on one node halts the rollout; that node's agent puts v1 back;
   after the fix, `resume` finishes the rollout and `rollback` puts every node back on v1.
2. The controller SIGKILLed mid-rollout and restarted carries on; nodes fetch nothing again.
3. A node SIGKILLed mid-apply (with its agent) and restarted recovers: its root is exactly v1 or
   exactly v2, never a mix, and the controller reports the image its root names.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.localcluster import Daemon, LocalCluster, namespace_pids
from tests.agent.roots import Namespace, mount_readonly, tree_digest
from tests.conftest import needs_root

pytestmark = needs_root

CLI = [sys.executable, "-m", "imageswarm.daemon.cli.main"]
Digest = dict[str, tuple[object, ...]]
#: Under a preserved runtime path: the swap leaves it alone and tree_digest skips it.
MARKER = "tmp/unhealthy"
HEALTH = f"sh -c 'test ! -e \"$IMAGESWARM_ROOT/{MARKER}\"'"


async def _cluster(root: Path, base: int, v1: Path, **kw: Any) -> LocalCluster:
    c = LocalCluster(root, nodes=3, base=base, root_image=v1, **kw)
    c.write_configs()
    c.start()
    try:
        await c.wait_ready()
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture
async def cluster50(
    tmp_path: Path, ext4_pair: tuple[Path, Path, Path]
) -> AsyncIterator[LocalCluster]:
    c = await _cluster(tmp_path / "lab", 50, ext4_pair[0])
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def cluster120(
    tmp_path: Path, ext4_pair: tuple[Path, Path, Path]
) -> AsyncIterator[LocalCluster]:
    # Slow links, so the rollout is still running when the controller dies.
    c = await _cluster(tmp_path / "lab", 120, ext4_pair[0], upload_rate_limit=4 * 1024 * 1024)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def references(tmp_path: Path, ext4_pair: tuple[Path, Path, Path]) -> dict[str, Digest]:
    """v1's and v2's trees, file by file."""
    v1, v2, _ = ext4_pair
    ns = Namespace()
    try:
        return {
            "v1": tree_digest(mount_readonly(ns, v1, tmp_path / "ref-v1")),
            "v2": tree_digest(mount_readonly(ns, v2, tmp_path / "ref-v2")),
        }
    finally:
        ns.close()


def _digest(d: Daemon, expected: Digest) -> Digest:
    got = tree_digest(d.root_view())
    # The agent keeps replaced files under var/lib/imageswarm (preserved), which may create
    # var/ and var/lib/ on a root whose image has none.
    return {k: v for k, v in got.items() if k not in ("var", "var/lib") or k in expected}


def _on(d: Daemon, refs: dict[str, Digest]) -> str | None:
    """Which reference image `d`'s root is exactly, or None for anything else (a mix)."""
    for name, expected in refs.items():
        if _digest(d, expected) == expected:
            return name
    return None


def _image_id(d: Daemon) -> str:
    return (d.root_view() / "etc/image_id").read_text().strip()


def _read_only(d: Daemon) -> bool:
    assert d.proc is not None
    argv = ["nsenter", "-t", str(d.proc.pid), "-m", "findmnt", "-n", "-o", "OPTIONS", str(d.root)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return "ro" in out.strip().split(",")


def _in_root(d: Daemon, script: str) -> None:
    """Run `script` (with $R = the node's root) writable inside the node's namespace."""
    assert d.proc is not None
    full = f'mount -o remount,rw "$R" && {script}; rc=$?; mount -o remount,ro "$R"; exit $rc'
    subprocess.run(
        ["nsenter", "-t", str(d.proc.pid), "-m", "--", "env", f"R={d.root}", "sh", "-c", full],
        check=True,
        capture_output=True,
        timeout=30,
    )


async def _cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    auth = ["--controller", cluster.controller.url, "--token", str(cluster.api_token)]
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, "rollout", *args, *auth],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _start(cluster: LocalCluster, image_id: str, *strategy: str) -> str:
    run = await _cli(cluster, "start", image_id, "--reboot", "never", *strategy)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.splitlines()[0].strip()


async def _get(cluster: LocalCluster, path: str) -> Any:
    async with ApiClient(cluster.controller.url, token=cluster.api_token, timeout=5) as api:
        return await api.get_json(path)


async def _nodes(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in (await _get(cluster, "/api/v1/nodes"))["nodes"]}


async def _wait_rollout(
    cluster: LocalCluster, rid: str, states: tuple[str, ...], seconds: float = 60
) -> dict[str, Any]:
    async with asyncio.timeout(seconds):
        while True:
            try:
                rollout: dict[str, Any] = await _get(cluster, f"/api/v1/rollouts/{rid}")
            except Exception:  # the controller is restarting
                rollout = {"state": None}
            if rollout["state"] in states:
                return rollout
            await asyncio.sleep(0.2)


async def _wait_reported(cluster: LocalCluster, seconds: float = 30) -> dict[str, dict[str, Any]]:
    """The nodes once the controller's view of each one's image matches its root."""
    async with asyncio.timeout(seconds):
        while True:
            nodes = await _nodes(cluster)
            if all(nodes[d.name]["current_image"] == _image_id(d) for d in cluster.node_daemons):
                return nodes
            await asyncio.sleep(0.3)


def _wire(fetch: dict[str, Any]) -> int:
    by = fetch["bytes_by_source"]
    return int(by["controller"] + by["peers"] + by["web_seed"] + by["unattributed"])


def _in_swap(journal: Path) -> bool:
    try:
        phases = json.loads(journal.read_text())["phases"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(phases) and phases[-1]["name"] == "swap" and phases[-1]["ended"] is None


def _running(ns_inode: int, name: str) -> bool:
    for pid in namespace_pids(ns_inode):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    return True
        except OSError:
            pass
    return False


def _wait_for_swap(journal: Path, ns_inode: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not (_in_swap(journal) and _running(ns_inode, "rsync")):
        assert time.monotonic() < deadline, "the agent never got to its swap"
        time.sleep(0.002)


async def test_failed_health_check_halts_then_resume_and_rollback(
    cluster50: LocalCluster,
    ext4_pair: tuple[Path, Path, Path],
    references: dict[str, Digest],
) -> None:
    cluster, (_, v2, _) = cluster50, ext4_pair
    node1, node2, node3 = cluster.node_daemons
    before = await cluster.wait_nodes_online()
    v1_id = before[0]["current_image"]
    image_id = (await cluster.publish(v2, "v2"))["manifest"]["image_id"]
    await asyncio.to_thread(_in_root, node2, f'mkdir -p "$R/tmp" && touch "$R/{MARKER}"')

    strategy = ("--canary", "1", "--batch", "1", "--max-failures", "0", "--health-cmd", HEALTH)
    watch = await _cli(cluster, "start", image_id, "--reboot", "never", *strategy, "--watch")
    assert watch.returncode == 2, watch.stdout + watch.stderr
    rid = watch.stdout.splitlines()[0].strip()
    rollout = await _get(cluster, f"/api/v1/rollouts/{rid}")
    assert rollout["state"] == "halted", rollout
    status = {n["name"]: n["status"] for n in rollout["nodes"]}
    assert status == {"node1": "applied", "node2": "failed", "node3": "prefetched"}, rollout
    assert "health check failed" in rollout["nodes"][1]["detail"], rollout
    assert await asyncio.to_thread(_on, node1, references) == "v2"
    assert await asyncio.to_thread(_on, node2, references) == "v1"
    assert await asyncio.to_thread(_on, node3, references) == "v1"
    assert [_image_id(d) for d in cluster.node_daemons] == [image_id, v1_id, v1_id]
    assert (node2.root_view() / MARKER).exists()  # preserved across the swap and the undo

    await asyncio.to_thread(_in_root, node2, f'rm "$R/{MARKER}"')  # the fix
    resumed = await _cli(cluster, "resume", rid, "--watch")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for d in cluster.node_daemons:
        assert await asyncio.to_thread(_on, d, references) == "v2", d.name
        assert _image_id(d) == image_id, d.name
    nodes = await _wait_reported(cluster)
    assert {n["current_image"] for n in nodes.values()} == {image_id}

    back = await _cli(cluster, "rollback", rid, "--watch")
    assert back.returncode == 0, back.stdout + back.stderr
    assert (await _get(cluster, f"/api/v1/rollouts/{rid}"))["state"] == "rolled-back"
    for d in cluster.node_daemons:
        assert await asyncio.to_thread(_on, d, references) == "v1", d.name
        assert _image_id(d) == v1_id, d.name
    nodes = await _wait_reported(cluster)
    assert {n["current_image"] for n in nodes.values()} == {v1_id}


async def test_controller_killed_mid_rollout_carries_on_without_fetching_again(
    cluster120: LocalCluster,
    ext4_pair: tuple[Path, Path, Path],
    references: dict[str, Digest],
) -> None:
    cluster, (_, v2, _) = cluster120, ext4_pair
    await cluster.wait_nodes_online()
    image_id = (await cluster.publish(v2, "v2"))["manifest"]["image_id"]
    rid = await _start(cluster, image_id, "--canary", "1", "--batch", "1")

    async with asyncio.timeout(60):
        while True:
            rollout = await _get(cluster, f"/api/v1/rollouts/{rid}")
            assert rollout["state"] != "done", "the rollout ended before the controller died"
            if rollout["counts"]["applying"] + rollout["counts"]["applied"]:
                break
            await asyncio.sleep(0.05)
    fetched = {
        name: n["fetches"][image_id]
        for name, n in (await _nodes(cluster)).items()
        if n["fetches"].get(image_id, {}).get("state") == "done"
    }
    cluster.kill(cluster.controller, signal.SIGKILL)
    await asyncio.sleep(1.0)  # heartbeats fail meanwhile
    cluster.start([cluster.controller])
    await cluster.wait_ready()

    rollout = await _wait_rollout(cluster, rid, ("done", "halted", "aborted"))
    assert rollout["state"] == "done", rollout
    assert {n["status"] for n in rollout["nodes"]} == {"applied"}, rollout
    for d in cluster.node_daemons:
        assert await asyncio.to_thread(_on, d, references) == "v2", d.name
    nodes = await _wait_reported(cluster)
    assert fetched, "no node had finished prefetching when the controller died"
    for name, was in fetched.items():
        now = nodes[name]["fetches"][image_id]
        assert (now["done_bytes"], _wire(now)) == (was["done_bytes"], _wire(was)), name
    # Applying starts once every node has prefetched, so all three had, and none fetched again.
    assert sorted(fetched) == ["node1", "node2", "node3"], fetched
    total = {n["fetches"][image_id]["total_bytes"] for n in nodes.values()}
    assert len(total) == 1
    # Wire bytes count redundant pieces too (a few percent in the swarm's endgame), so allow
    # some slack over one copy per node; a second download would be twice that.
    wire = sum(_wire(n["fetches"][image_id]) for n in nodes.values())
    assert wire <= 1.2 * total.pop() * len(nodes), {k: n["fetches"] for k, n in nodes.items()}


async def test_node_killed_mid_apply_recovers_to_one_image(
    cluster50: LocalCluster,
    ext4_pair: tuple[Path, Path, Path],
    references: dict[str, Digest],
) -> None:
    cluster, (_, v2, _) = cluster50, ext4_pair
    node1 = cluster.node_daemons[0]
    await cluster.wait_nodes_online()
    image_id = (await cluster.publish(v2, "v2"))["manifest"]["image_id"]
    rid = await _start(cluster, image_id, "--canary", "1", "--batch", "2")

    assert node1.proc is not None
    ns_inode = os.stat(f"/proc/{node1.proc.pid}/ns/mnt").st_ino
    await _wait_rollout(cluster, rid, ("applying",))
    # Mid-swap: the agent's journal names the swap and its rsync is rewriting node1's root.
    journal = node1.workdir / "agent/journal.json"
    await asyncio.to_thread(_wait_for_swap, journal, ns_inode, 30)
    await asyncio.to_thread(cluster.kill, node1, signal.SIGKILL)
    assert node1.disk.exists()
    cluster.start([node1])
    await cluster.wait_ready()

    rollout = await _wait_rollout(cluster, rid, ("done", "halted"))
    status = {n["name"]: n["status"] for n in rollout["nodes"]}
    if rollout["state"] == "done":
        assert set(status.values()) == {"applied"}, rollout
        expected = {"node1": "v2", "node2": "v2", "node3": "v2"}
    else:  # node1's agent rolled the interrupted apply back; the rollout stops there
        assert status == {"node1": "failed", "node2": "prefetched", "node3": "prefetched"}
        expected = {"node1": "v1", "node2": "v1", "node3": "v1"}
    for d in cluster.node_daemons:
        assert await asyncio.to_thread(_on, d, references) == expected[d.name], d.name
    await _wait_reported(cluster)  # the controller names the image each root holds
    assert all(_read_only(d) for d in cluster.node_daemons)
    # The restarted daemon found the agent's interrupted apply and recovered it.
    assert "running agent recover" in node1.log_path.read_text()
