"""`lab up` and `lab exec`: the network, the roots and the real daemons inside the hosts.

The daemons are a LocalCluster (same configs, same per-node disk copy of the v1 image, same
adopt-then-run script in a private mount namespace) whose every command line is started with
`ip netns exec <host>`: so a node daemon's process is at once in its host's network namespace
and the holder of its mount namespace, and its root lives exactly as long as the daemon.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imageswarm.daemon.lab import cleanup, net, state
from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.lab.plan import LabPlan
from imageswarm.daemon.localcluster import Daemon, LocalCluster, build_ext4, make_tree

DEFAULT_RATE = 200 * 10**6
MIN_IMAGE_MIB = 16


def tree_files(image_mib: int) -> int:
    """make_tree's 300 files (about 38 MiB, beside its 4 MiB of big files) fill a 64 MiB image
    as the demo's; smaller images get proportionally fewer, leaving ext4 and the agent room."""
    return max(10, round((image_mib - 8) * 300 / 56))


@dataclass
class NetnsCluster(LocalCluster):
    """A LocalCluster whose daemons each run in the network namespace named for them."""

    netns: dict[str, str] = field(default_factory=dict)
    #: Merged into every daemon's `swarm:` config section (e.g. libtorrent `settings`), so a
    #: benchmark can try settings per lab without code changes.
    swarm: Mapping[str, Any] = field(default_factory=dict)

    def launcher(self, d: Daemon) -> list[str]:
        return ["ip", "netns", "exec", self.netns[d.name]]

    def write_configs(self) -> None:
        super().write_configs()
        for d in self.daemons if self.swarm else ():
            cfg = yaml.safe_load(d.config_path.read_text())
            cfg["swarm"].update(self.swarm)
            d.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@dataclass(frozen=True)
class LabSpec:
    workdir: Path
    nodes: int
    subnet: int = 0
    rate: int = DEFAULT_RATE  # bits per second on each host's link, each way; 0 = unshaped
    loss: float = 0.0  # percent of packets each host drops on arrival
    image_mib: int = 64
    #: The ext4 image every node's root starts as; None builds one of `image_mib`.
    root_image: Path | None = None
    heartbeat_interval: float = 1.0
    web_seed_after: float = 20.0
    #: Merged into every daemon's `swarm:` config section (see NetnsCluster.swarm).
    swarm: Mapping[str, Any] = field(default_factory=dict, hash=False)


class Lab:
    """One lab. `up()` builds and starts it (and removes it again if that fails); `down()`
    removes it; between the two, `cluster` is the running LocalCluster."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.workdir = spec.workdir.resolve()
        self.plan = LabPlan(spec.subnet, spec.nodes)
        self.cluster: NetnsCluster | None = None
        self.state: state.LabState | None = None

    async def up(self, wait_s: float | None = None) -> NetnsCluster:
        """Build the network, the roots and the daemons; return once every node is enrolled,
        online and reports its image (within `wait_s`, default 30 s + 3 s per node)."""
        seconds = wait_s or 30.0 + 3.0 * self.plan.nodes
        await asyncio.to_thread(preflight, self.plan, self.spec, self.workdir)
        build = asyncio.ensure_future(asyncio.to_thread(self._build))
        try:  # from here on, a failure (or Ctrl-C) removes whatever was created
            cluster = await asyncio.shield(build)
            try:
                await cluster.wait_ready(seconds)
                await cluster.wait_nodes_online(seconds)
            except (RuntimeError, TimeoutError) as exc:
                raise LabError(f"the lab did not come up: {_why(cluster, exc)}") from None
        except BaseException:
            # A thread cannot be stopped half-way: let the build finish, then undo all of it.
            await asyncio.wait([build])
            if not build.cancelled():
                build.exception()  # seen here, so asyncio does not log it as never retrieved
            await asyncio.to_thread(self.down)
            raise
        assert self.state is not None
        self.state.phase = "up"
        self.state.save()
        return cluster

    def down(self) -> cleanup.Removed:
        removed = cleanup.down(self.workdir, self.plan.subnet)
        if self.cluster is not None:
            for d in self.cluster.daemons:
                if d.proc is not None:  # already killed: only reap it
                    d.proc.wait()
                    d.proc = None
        return removed

    def _build(self) -> NetnsCluster:
        self._clear_workdir()
        token = secrets.token_hex(16)  # hex: never starts with "-", safe in a shell line
        hosts = [
            state.HostState(h.name, h.role, h.ip, h.netns, h.link, str(self.workdir / h.name))
            for h in self.plan.hosts
        ]
        self.state = state.LabState(
            self.workdir, self.plan.subnet, self.spec.rate, self.spec.loss, token, hosts
        )
        self.state.save()  # before anything exists: `lab down` must find whatever comes next
        net.create_bridge(self.plan)
        for host in self.plan.hosts:
            net.create_host(self.plan, host, self.spec.rate, self.spec.loss)
        image = self.spec.root_image or self._root_image()
        cluster = NetnsCluster(
            self.workdir,
            nodes=self.plan.nodes,
            root_image=image,
            api_token=token,
            join_secret=secrets.token_urlsafe(12),
            heartbeat_interval=self.spec.heartbeat_interval,
            web_seed_after=self.spec.web_seed_after,
            addresses=[h.ip for h in self.plan.hosts],
            cluster_cidrs=[self.plan.cidr],
            netns={h.name: h.netns for h in self.plan.hosts},
            swarm=dict(self.spec.swarm),
        )
        cluster.write_configs()
        self.cluster = cluster
        cluster.start()
        for d, h in zip(cluster.daemons, self.state.hosts, strict=True):
            h.pid = d.proc.pid if d.proc else None
            if d.role == "node":
                h.root, h.disk = str(d.root), str(d.disk)
        self.state.save()
        return cluster

    def _clear_workdir(self) -> None:
        """Remove what an earlier lab in this workdir left (never anything else there)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for entry in self.workdir.iterdir():
            if entry.is_dir() and re.fullmatch(r"controller|node\d+|tree", entry.name):
                shutil.rmtree(entry)
        (self.workdir / "v1.img").unlink(missing_ok=True)

    def _root_image(self) -> Path:
        tree, image = self.workdir / "tree", self.workdir / "v1.img"
        make_tree(tree, files=tree_files(self.spec.image_mib), seed=1)
        build_ext4(tree, image, self.spec.image_mib)
        return image


def unsupported(spec: LabSpec) -> str | None:
    """Why this machine cannot run the lab at all (None: it can)."""
    if os.geteuid() != 0:
        return (
            "lab up needs root: it creates network namespaces, a bridge, veth links, tc qdiscs,"
            " nftables rules and loop-mounted roots (run it with sudo)"
        )
    tools = ["ip", "unshare", "nsenter", "losetup", "mkfs.ext4"]
    tools += ["tc"] if spec.rate else []
    tools += ["nft"] if spec.loss else []
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not found: install {net.TOOLS[tool]}"
    return None


def preflight(plan: LabPlan, spec: LabSpec, workdir: Path) -> None:
    """Everything that can be checked before anything is created."""
    if reason := unsupported(spec):
        raise LabError(reason)
    if spec.image_mib < MIN_IMAGE_MIB:
        raise LabError(f"--image-mib must be at least {MIN_IMAGE_MIB}")
    if (workdir / state.STATE_FILE).exists():
        raise LabError(
            f"a lab is already recorded in {workdir}; remove it first: "
            f"imageswarm lab down --workdir {workdir}"
        )
    if found := net.netns_names(plan.prefix) + net.link_names(plan.prefix):
        raise LabError(
            f"{plan.prefix}* objects already exist ({', '.join(found)}): another lab uses "
            f"{plan.cidr}; remove it (imageswarm lab down --subnet {plan.subnet}) or pick "
            "another --subnet"
        )
    network = ipaddress.ip_network(plan.cidr)
    for link in json.loads(net.run(["ip", "-j", "addr", "show"]).stdout or "[]"):
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet" and ipaddress.ip_address(addr["local"]) in network:
                raise LabError(
                    f"{link['ifname']} already has {addr['local']}, inside the lab's {plan.cidr};"
                    " pick another --subnet"
                )


def exec_argv(st: state.LabState, host: str, argv: list[str]) -> list[str]:
    """The command line that runs `argv` on `host`: in its network namespace and, for a node,
    in its mount namespace too (where its root is mounted)."""
    h = st.host(host)
    if not argv:
        raise LabError("nothing to run: lab exec HOST -- COMMAND [ARG...]")
    if net.netns_id(h.netns) is None:
        raise LabError(f"{h.name}'s namespace {h.netns} is gone; run `lab down`, then `lab up`")
    if h.role == "controller":
        return ["ip", "netns", "exec", h.netns, *argv]
    if not daemon_running(h):
        raise LabError(
            f"{h.name}'s daemon (pid {h.pid}) is gone, and its mount namespace and root with it;"
            f" its network is still there: ip netns exec {h.netns} COMMAND"
        )
    # Entering a mount namespace moves the working directory to its /; --wd keeps ours.
    where = [f"--net=/run/netns/{h.netns}", f"--mount=/proc/{h.pid}/ns/mnt", f"--wd={os.getcwd()}"]
    return ["nsenter", *where, "--", *argv]


def daemon_running(h: state.HostState) -> bool:
    """Whether the recorded pid is still a live process in the host's namespace (not a zombie,
    not a later process that reused the pid)."""
    if h.pid is None:
        return False
    try:
        st = os.stat(f"/proc/{h.pid}/ns/net")  # a zombie has no namespaces left to stat
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == net.netns_id(h.netns)


def _why(cluster: LocalCluster, exc: BaseException) -> str:
    if isinstance(exc, RuntimeError):
        return str(exc)  # a daemon exited; the message ends with its log
    for d in cluster.daemons:
        if d.proc is not None and d.proc.poll() is not None:
            return f"{d.name} exited: {d.log_path.read_text()[-2000:]}"
    return "timed out waiting for every daemon to answer and every node to enroll"
