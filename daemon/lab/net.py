"""The lab's network: one bridge, and per host a network namespace joined to it by a veth pair.

Everything goes through `ip`, `tc` and `nft` (iproute2 and nftables, as an operator would type
it), one command at a time, so a failure names the exact command and the kernel's answer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from imageswarm.daemon.lab import shaping
from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.lab.plan import ANY_LAB, HostPlan, LabPlan

NETNS_DIR = Path("/run/netns")
#: Each tool and the Debian package that has it, for the error when one is missing.
TOOLS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "nft": "nftables",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "losetup": "mount",
    "mkfs.ext4": "e2fsprogs",
}


def run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        package = TOOLS.get(argv[0], "its package")
        raise LabError(f"{argv[0]} not found: install {package}") from None
    if check and proc.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def create_bridge(plan: LabPlan) -> None:
    """The lab's switch, with the machine's own address on it (STP off: ports forward at once)."""
    run(["ip", "link", "add", plan.bridge, "type", "bridge", "stp_state", "0"])
    run(["ip", "addr", "add", f"{plan.gateway}/24", "dev", plan.bridge])
    run(["ip", "link", "set", plan.bridge, "up"])


def create_host(plan: LabPlan, host: HostPlan, rate: int, loss: float) -> None:
    """A namespace with `eth0` (the host's NIC) whose peer is a port of the lab's bridge."""
    ns = ["ip", "-n", host.netns]
    run(["ip", "netns", "add", host.netns])
    veth = ["type", "veth", "peer", "name", "eth0", "netns", host.netns]
    run(["ip", "link", "add", host.link, *veth])
    run(["ip", "link", "set", host.link, "master", plan.bridge, "up"])
    run([*ns, "link", "set", "lo", "up"])
    run([*ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
    run([*ns, "link", "set", "eth0", "up"])
    if rate:
        run(shaping.tbf_argv("eth0", rate, netns=host.netns))  # what the host sends
        run(shaping.tbf_argv(host.link, rate))  # what it receives
    if loss:
        run(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input=shaping.loss_ruleset(loss))


def netns_names(prefix: str | None) -> list[str]:
    """The lab's namespaces (`prefix`), or every lab's (None), as /run/netns lists them."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    return [n for n in names if _ours(n, prefix)]


def link_names(prefix: str | None) -> list[str]:
    """The lab's links in this machine's namespace: the bridge and the veth ends on it."""
    out = run(["ip", "-j", "link", "show"]).stdout
    links: list[dict[str, object]] = json.loads(out or "[]")
    return sorted(str(link["ifname"]) for link in links if _ours(str(link["ifname"]), prefix))


def netns_id(name: str) -> tuple[int, int] | None:
    """(device, inode) of a named namespace, as /proc/<pid>/ns/net shows it for its members."""
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def delete_link(name: str) -> None:
    """Deleting one veth end deletes its peer too; a link already gone is fine."""
    proc = run(["ip", "link", "del", name], check=False)
    if proc.returncode != 0 and name in link_names(name):
        raise LabError(f"`ip link del {name}` failed: {proc.stderr.strip()}")


def delete_netns(name: str) -> None:
    proc = run(["ip", "netns", "del", name], check=False)
    path = NETNS_DIR / name
    if proc.returncode != 0 and path.exists():
        # A file left without its bind mount (e.g. `ip netns add` was killed half-way).
        run(["umount", str(path)], check=False)
        try:
            path.unlink()
        except OSError as exc:
            why = f"{proc.stderr.strip()}; {exc}"
            raise LabError(f"cannot remove namespace {name}: {why}") from None


def release_netns_dir() -> None:
    """`ip netns add` bind-mounts /run/netns on itself the first time; undo that once no
    namespace at all is left (a plain umount refuses while any other tool's namespace is)."""
    try:
        empty = not os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return
    if empty and str(NETNS_DIR) in mount_points():
        run(["umount", str(NETNS_DIR)], check=False)


def mount_points() -> list[str]:
    """Mount points in this mount namespace (os.path.ismount misses bind mounts of a
    directory of the same filesystem, such as /run/netns)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Fields: id parent major:minor root mount-point ...; octal escapes for space etc.
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
    return points


def _ours(name: str, prefix: str | None) -> bool:
    return name.startswith(prefix) if prefix else bool(ANY_LAB.match(name))
