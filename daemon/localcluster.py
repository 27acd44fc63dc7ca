"""A controller and N node daemons as real processes on loopback addresses.

Shared by the README demo (`imageswarm lab demo`) and the integration tests, so both exercise
exactly the same thing: separate processes, real libtorrent sessions, real HTTP. Each daemon
gets its own 127.0.0.x address, so peers, the tracker and per-source byte counts behave as on a
real network; libtorrent's rate limits stand in for link speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from imageswarm.agent import imagebuild, keys
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.errors import ControllerError

API_PORT = 7700
LAB_KERNEL = "6.1.0-demo-amd64"
SWARM_PORT = 6881


@dataclass
class Daemon:
    name: str
    role: str
    ip: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{API_PORT}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def disk(self) -> Path:
        """The node's own root filesystem (a copy of the cluster's root image)."""
        return self.workdir / "disk.img"

    @property
    def root(self) -> Path:
        """Where the node's root is mounted, inside the node's own mount namespace."""
        return self.workdir / "root"

    def root_view(self) -> Path:
        """The node's root as seen from outside its mount namespace."""
        assert self.proc is not None, f"{self.name} is not running"
        return Path(f"/proc/{self.proc.pid}/root") / self.root.relative_to("/")


@dataclass
class LocalCluster:
    """`base` is the first address's last octet; the controller takes it, nodes follow."""

    root: Path
    nodes: int = 3
    base: int = 10
    upload_rate_limit: int = 0
    web_seed_after: float = 20.0
    #: When set, every node runs in a private mount namespace of its own with a copy of this
    #: ext4 image loop-mounted read-only as its root, adopted by its agent before the daemon
    #: starts; the control plane then swaps those roots. Never the machine's own root.
    root_image: Path | None = None
    join_secret: str = "lab-join-secret"
    api_token: str | None = "lab-operator-token"
    heartbeat_interval: float = 1.0
    daemons: list[Daemon] = field(default_factory=list)
    #: The controller's and then each node's address; default 127.0.0.<base + i>. The
    #: network-namespace lab (imageswarm.daemon.lab) gives each daemon a host of its own.
    addresses: list[str] | None = None
    cluster_cidrs: list[str] = field(default_factory=lambda: ["127.0.0.0/8"])

    def __post_init__(self) -> None:
        ips = self.addresses or [f"127.0.0.{self.base + i}" for i in range(self.nodes + 1)]
        if len(ips) != self.nodes + 1:
            raise ValueError(f"{self.nodes + 1} addresses needed, got {len(ips)}")
        self.controller = Daemon("controller", "controller", ips[0], self.root / "controller")
        self.node_daemons = [
            Daemon(f"node{i}", "node", ips[i], self.root / f"node{i}")
            for i in range(1, self.nodes + 1)
        ]
        self.daemons = [self.controller, *self.node_daemons]

    def write_configs(self) -> None:
        key = keys.load_or_create(self.controller.workdir / "cache" / "signing.key")
        for d in self.daemons:
            d.workdir.mkdir(parents=True, exist_ok=True)
            cfg: dict[str, Any] = {
                "role": d.role,
                "node_name": d.name,
                "api_listen": f"{d.ip}:{API_PORT}",
                "cache_dir": str(d.workdir / "cache"),
                "cluster_cidrs": list(self.cluster_cidrs),
                "trusted_keys": [str(key.public)],
                "swarm": {
                    "listen": f"{d.ip}:{SWARM_PORT}",
                    "upload_rate_limit": self.upload_rate_limit,
                    "announce_interval": 2,
                },
            }
            cfg["join_secret"] = self.join_secret
            cfg["heartbeat_interval"] = self.heartbeat_interval
            if d.role == "controller" and self.api_token:
                cfg["api_token"] = self.api_token
            if d.role == "node":
                cfg["controller_url"] = self.controller.url
                cfg["swarm"]["web_seed_after"] = self.web_seed_after
                cfg["labels"] = {"role": "compute", "index": d.name.removeprefix("node")}
                cfg["agent"] = {
                    "root": str(d.root),
                    "state_dir": str(d.workdir / "agent"),
                    # The lab never reboots anything: it records the request instead.
                    "reboot_command": f"touch {d.workdir / 'reboot-requested'}",
                }
            d.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def _argv(self, d: Daemon) -> list[str]:
        cli = [sys.executable, "-m", "imageswarm.daemon.cli.main"]
        daemon = [*cli, "daemon", "--config", str(d.config_path)]
        if d.role != "node" or self.root_image is None:
            return daemon
        fresh = not d.disk.exists()
        if fresh:
            shutil.copyfile(self.root_image, d.disk)
        d.root.mkdir(parents=True, exist_ok=True)
        # In a mount namespace of its own: a writable loop device mounted read-only as the
        # node's root (the agent remounts it rw only while swapping), then the daemon.
        script = 'mount -o loop "$1" "$2" && mount -o remount,ro "$2" && shift 2 && '
        if fresh:
            adopt = [
                *cli,
                "agent",
                "adopt",
                "--image",
                str(self.root_image),
                "--root",
                str(d.root),
                "--state-dir",
                str(d.workdir / "agent"),
            ]
            script += shlex.join(adopt) + " >/dev/null && "
        script += 'exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            str(d.disk),
            str(d.root),
            *daemon,
        ]

    def launcher(self, d: Daemon) -> list[str]:
        """What runs a daemon's command line: nothing here (this machine's network); the lab
        enters the daemon's host's network namespace."""
        return []

    def start(self, daemons: list[Daemon] | None = None) -> None:
        # The lab's images carry this kernel; nodes act as if they run it (a real node reads
        # uname), so rollouts of images with the same kernel need no reboot.
        env = {**os.environ, "IMAGESWARM_RUNNING_KERNEL": LAB_KERNEL}
        for d in daemons or self.daemons:
            log = d.log_path.open("ab")
            d.proc = subprocess.Popen(
                [*self.launcher(d), *self._argv(d)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()

    async def wait_ready(self, seconds: float = 30.0) -> None:
        async with asyncio.timeout(seconds):
            for d in self.daemons:
                await self._wait_healthy(d)

    async def _wait_healthy(self, d: Daemon) -> None:
        if d.proc is None:
            return
        async with ApiClient(d.url, timeout=2) as api:
            while True:
                if d.proc.poll() is not None:
                    log = await asyncio.to_thread(d.log_path.read_text)
                    raise RuntimeError(f"{d.name} exited: {log[-2000:]}")
                try:
                    await api.get_json("/healthz")
                    return
                except ControllerError:
                    await asyncio.sleep(0.2)

    async def wait_nodes_online(self, seconds: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every node has enrolled, heartbeats and reports its current image."""
        async with (
            ApiClient(self.controller.url, token=self.api_token) as api,
            asyncio.timeout(seconds),
        ):
            while True:
                nodes: list[dict[str, Any]] = (await api.get_json("/api/v1/nodes"))["nodes"]
                ready = [n for n in nodes if n["online"] and n["current_image"]]
                if len(ready) >= len(self.node_daemons):
                    return sorted(nodes, key=lambda n: str(n["name"]))
                await asyncio.sleep(0.3)

    def kill(self, d: Daemon, sig: int = signal.SIGTERM) -> None:
        """Stop a daemon; for a namespaced node also every process left in its namespace (the
        agent and its rsync run in sessions of their own), so the namespace and its root mount
        are gone before a restart mounts the same disk again."""
        if d.proc is None:
            return
        ns_inode: int | None = None
        if d.role == "node" and self.root_image is not None and d.proc.poll() is None:
            with contextlib.suppress(OSError):
                ns_inode = os.stat(f"/proc/{d.proc.pid}/ns/mnt").st_ino
        if d.proc.poll() is None:
            os.killpg(d.proc.pid, sig)
            try:
                d.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
        d.proc = None
        deadline = time.monotonic() + 15
        while ns_inode is not None and (left := namespace_pids(ns_inode)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes left in {d.name}'s mount namespace: {left}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def stop(self) -> None:
        for d in self.daemons:
            self.kill(d)

    async def publish(self, image: Path, name: str) -> dict[str, Any]:
        async with ApiClient(self.controller.url, token=self.api_token, timeout=600) as api:
            data: dict[str, Any] = await api.upload(f"/api/v1/images?name={quote(name)}", image)
            return data

    async def fetch_all(self, image_id: str, seconds: float = 300.0) -> dict[str, dict[str, Any]]:
        """Ask every node to fetch `image_id`; wait for all; return each node's final state."""

        async def one(d: Daemon) -> dict[str, Any]:
            async with ApiClient(d.url) as api:
                state: dict[str, Any] = await api.post_json(f"/api/v1/images/{image_id}/fetch")
                while state["state"] not in ("done", "failed"):
                    await asyncio.sleep(0.25)
                    state = await api.get_json(f"/api/v1/images/{image_id}")
                return state

        async with asyncio.timeout(seconds):
            results = await asyncio.gather(*(one(d) for d in self.node_daemons))
        return {d.name: r for d, r in zip(self.node_daemons, results, strict=True)}


def namespace_pids(ns_inode: int) -> list[int]:
    """Every process in the mount namespace with this inode."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/mnt").st_ino == ns_inode:
                    pids.append(int(entry))
    return pids


def make_tree(root: Path, files: int = 300, seed: int = 1, big_files: int = 4) -> None:
    """A deterministic tree of random files (1-256 KiB) plus a few 1 MiB files and a kernel."""
    rng = random.Random(seed)
    if root.exists():
        shutil.rmtree(root)
    for i in range(files):
        path = root / f"usr/share/data{i % 10}/file{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(1024, 256 * 1024)))
    for i in range(big_files):
        path = root / f"usr/lib/big{i}.so"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(1024 * 1024))
    modules = root / f"lib/modules/{LAB_KERNEL}"
    modules.mkdir(parents=True, exist_ok=True)
    (modules / "modules.dep").write_text("")
    (root / "boot").mkdir(exist_ok=True)
    (root / f"boot/vmlinuz-{LAB_KERNEL}").write_bytes(rng.randbytes(64 * 1024))
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/os-release").write_text('NAME="imageswarm demo"\n')


def build_ext4(tree: Path, image: Path, size_mib: int = 64) -> None:
    """A reproducible ext4 image of `tree` (imageswarm.agent.imagebuild, from scratch): one
    tree always gives the same bytes, and images of trees that differ in place share all but
    the changed files and the metadata blocks that record them."""
    imagebuild.build_ext4(tree, image, size_mib)
