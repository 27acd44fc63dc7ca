"""`lab up` builds a real cluster of namespaces; `lab down` removes every trace of it, also
after the lab's processes were killed with SIGKILL and its state file was lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageswarm.daemon.lab.plan import prefix_of
from tests.conftest import needs_root
from tests.lab.labkit import CLI, cli, force_down, leftovers, nothing_left, ok

pytestmark = needs_root

NODES = 8


def _lab_fixture(tmp_path: Path, subnet: int) -> Iterator[tuple[Path, int]]:
    workdir = tmp_path / "lab"
    try:
        yield workdir, subnet
    finally:
        force_down(workdir, subnet)


@pytest.fixture
def lab201(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    yield from _lab_fixture(tmp_path, 201)


@pytest.fixture
def lab202(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    yield from _lab_fixture(tmp_path, 202)


def _up(workdir: Path, subnet: int) -> str:
    return ok(
        "lab", "up", "--nodes", str(NODES), "--workdir", str(workdir), "--subnet", str(subnet),
        "--rate", "1gbit", "--loss", "1%", "--image-mib", "32",
    )  # fmt: skip


def _assert_up(workdir: Path, subnet: int, out: str) -> None:
    """Everything a lab is made of exists while it is up, and the hosts are separate."""
    prefix = prefix_of(subnet)
    assert f"http://198.18.{subnet}.1:7700/" in out and "token" in out, out
    there = leftovers(workdir, prefix)
    assert len(there["namespaces"]) == NODES + 1, there
    assert len(there["links"]) == NODES + 2, there  # a veth end per host, and the bridge
    assert len(there["loop devices"]) == NODES, there
    assert len(there["mounts"]) == NODES, there  # each node's root, in its own namespace
    status = ok("lab", "status", "--workdir", str(workdir))
    assert status.count(" yes ") == NODES, status
    # A node's root is its own read-only ext4 on a loop device; its network is its own, with
    # its link shaped and its packet-loss rule.
    script = (
        'findmnt -n -o FSTYPE,OPTIONS "$IMAGESWARM_LAB_ROOT"; ip -4 -o addr show eth0; '
        "tc qdisc show dev eth0; nft list ruleset"
    )
    node3 = ok("lab", "exec", "node3", "--workdir", str(workdir), "--", "sh", "-c", script)
    assert node3.split()[:2] == ["ext4", "ro,relatime"], node3
    assert f"inet 198.18.{subnet}.13/24" in node3, node3
    assert "tbf" in node3 and "rate 1Gbit" in node3, node3
    assert "numgen random mod 10000 < 100" in node3, node3


def test_lab_up_then_down_leaves_nothing_behind(lab201: tuple[Path, int]) -> None:
    workdir, subnet = lab201
    _assert_up(workdir, subnet, _up(workdir, subnet))

    out = ok("lab", "down", "--workdir", str(workdir))
    assert f"{NODES + 1} namespaces" in out, out
    nothing_left(workdir, prefix_of(subnet))
    again = ok("lab", "down", "--workdir", str(workdir))  # idempotent
    assert "0 processes, 0 namespaces, 0 links" in again, again
    nothing_left(workdir, prefix_of(subnet))


def test_lab_down_after_its_processes_were_killed_and_its_state_lost(
    lab202: tuple[Path, int],
) -> None:
    workdir, subnet = lab202
    _up(workdir, subnet)
    prefix = prefix_of(subnet)
    state = json.loads((workdir / "lab.json").read_text())
    daemons = [h["pid"] for h in state["hosts"]]
    pids = leftovers(workdir, prefix)["processes"]
    assert set(daemons) <= set(pids), (daemons, pids)
    for pid in pids:
        os.kill(int(str(pid)), signal.SIGKILL)
    (workdir / "lab.json").unlink()
    deadline = time.monotonic() + 10
    while leftovers(workdir, prefix)["processes"] and time.monotonic() < deadline:
        time.sleep(0.1)
    crashed = leftovers(workdir, prefix)
    assert not crashed["processes"], crashed
    assert crashed["namespaces"] and crashed["links"], crashed  # a crash leaves these behind

    refused = cli("lab", "up", "--nodes", "1", "--workdir", str(workdir / "other"),
                  "--subnet", str(subnet))  # fmt: skip
    assert refused.returncode == 1 and f"{prefix}* objects already exist" in refused.stderr

    out = ok("lab", "down", "--workdir", str(workdir), "--subnet", str(subnet))
    assert f"{NODES + 1} namespaces" in out, out
    nothing_left(workdir, prefix)


def test_lab_up_as_a_normal_user_says_it_needs_root(tmp_path: Path) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run(
        [*nobody, *CLI, "lab", "up", "--nodes", "2", "--workdir", str(tmp_path / "lab")],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "lab up needs root: it creates network namespaces" in proc.stderr, proc.stderr
    assert not (tmp_path / "lab").exists()
