"""`lab down`: remove everything a lab made, from its state file or, without one, by prefix.

Order matters: first every process (the daemons, their agents, anything `lab exec` left),
which also ends each node's mount namespace and so unmounts its root and frees its loop
device; then the veth links and the bridge, then the namespaces; then whatever is still left
(loop devices, mounts, nftables tables) is removed explicitly. Each step tolerates what is
already gone, so `lab down` after a crash, after `kill -9`, or twice in a row, is the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from imageswarm.daemon.lab import net, state
from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.lab.plan import prefix_of

GRACE_S = 5.0  # SIGTERM first: a daemon stops its libtorrent session cleanly within this
KILL_WAIT_S = 15.0
LOOP_WAIT_S = 10.0


@dataclass
class Removed:
    processes: list[int] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    loop_devices: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{len(self.processes)} processes",
            f"{len(self.namespaces)} namespaces",
            f"{len(self.links)} links",
        ]
        parts += [f"loop devices {', '.join(self.loop_devices)}"] if self.loop_devices else []
        parts += [f"mounts {', '.join(self.mounts)}"] if self.mounts else []
        parts += [f"nftables tables {', '.join(self.tables)}"] if self.tables else []
        return ", ".join(parts)


def down(workdir: Path, subnet: int = 0, *, every_lab: bool = False) -> Removed:
    """Remove the lab recorded in `workdir` (or, with no record, the one on `subnet`); with
    `every_lab`, every `isw<n>-` object on this machine."""
    workdir = workdir.resolve()
    try:
        recorded = state.load(workdir)
    except LabError:
        recorded = None  # unreadable: the prefix and the workdir still find everything
    prefix = None if every_lab else prefix_of(recorded.subnet if recorded else subnet)
    removed = Removed()
    spare = _ancestors()  # never this process or its parents, whatever namespace they are in
    pids = set(_namespace_members(prefix)) | set(_daemons_of(workdir))
    removed.processes = sorted(pids - spare)
    _stop(removed.processes)
    for link in net.link_names(prefix):
        net.delete_link(link)
        removed.links.append(link)
    for name in net.netns_names(prefix):
        net.delete_netns(name)
        removed.namespaces.append(name)
    removed.loop_devices = _free_loop_devices(workdir)
    removed.mounts = _unmount_under(workdir)
    removed.tables = _drop_tables()
    net.release_netns_dir()
    for disk in workdir.glob("node*/disk.img"):
        disk.unlink(missing_ok=True)
    state.forget(workdir)
    return removed


def _namespace_members(prefix: str | None) -> list[int]:
    """Every process in one of the lab's network namespaces."""
    ids = {i for name in net.netns_names(prefix) if (i := net.netns_id(name))}
    members = []
    for pid in _pids():
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/ns/net")
            if (st.st_dev, st.st_ino) in ids:
                members.append(pid)
    return members


def _daemons_of(workdir: Path) -> list[int]:
    """The lab's daemons and agents even outside its namespaces (e.g. one was deleted by hand)."""
    return [pid for pid in _pids() if _is_daemon_of(pid, workdir)]


def _is_daemon_of(pid: int, workdir: Path) -> bool:
    """An `imageswarm daemon --config <workdir>/...` or `imageswarm agent ... --state-dir
    <workdir>/...` process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    inside = f"{workdir}/"
    for flag, verb in (("--config", "daemon"), ("--state-dir", "agent")):
        if verb in argv and flag in argv:
            value = argv[argv.index(flag) + 1] if argv.index(flag) + 1 < len(argv) else ""
            if value.startswith(inside):
                return True
    return False


def _stop(pids: Iterable[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL; returns when all are gone (zombies count as
    gone: they hold no namespace, mount or socket, only a pid until their parent reaps them)."""
    left = set(pids)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, KILL_WAIT_S)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (left := {p for p in left if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not left:
            return
    raise LabError(f"processes that survived SIGKILL (stuck in the kernel?): {sorted(left)}")


def _free_loop_devices(workdir: Path) -> list[str]:
    """Loop devices backed by the lab's disks. A node's root is mounted with autoclear, so its
    device goes once the node's mount namespace is gone; wait for that, then detach the rest."""
    deadline = time.monotonic() + LOOP_WAIT_S
    while (devices := _loop_devices(workdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for device in devices:
        net.run(["losetup", "-d", device], check=False)
    if still := _loop_devices(workdir):
        raise LabError(f"loop devices still attached to the lab's disks: {', '.join(still)}")
    return devices


def _loop_devices(workdir: Path) -> list[str]:
    out = net.run(["losetup", "--json", "--list"]).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    inside = f"{workdir}/"
    return [str(d["name"]) for d in devices if str(d.get("back-file") or "").startswith(inside)]


def _unmount_under(workdir: Path) -> list[str]:
    """Mounts under the workdir in this mount namespace (the lab makes none here; a hand-made
    one would keep a disk busy)."""
    found = [p for p in net.mount_points() if p.startswith(f"{workdir}/")]
    for point in sorted(found, reverse=True):
        net.run(["umount", "--lazy", point], check=False)
    return found


def _drop_tables() -> list[str]:
    """nftables tables named `isw...` in this namespace (the lab's live inside its hosts'
    namespaces and go with them; this catches one created here by mistake or by hand)."""
    if shutil.which("nft") is None:
        return []
    out = net.run(["nft", "-j", "list", "tables"]).stdout
    items = json.loads(out)["nftables"] if out.strip() else []
    tables = [i["table"] for i in items if str(i.get("table", {}).get("name")).startswith("isw")]
    for t in tables:
        net.run(["nft", "delete", "table", str(t["family"]), str(t["name"])])
    return [f"{t['family']} {t['name']}" for t in tables]


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _ancestors() -> set[int]:
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found
