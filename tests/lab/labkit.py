"""Helpers for the lab tests: run the CLI, and list whatever of a lab is left on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from imageswarm.daemon.lab import cleanup, net

CLI = [sys.executable, "-m", "imageswarm.daemon.cli.main"]


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(*args: str, timeout: float = 180) -> str:
    proc = cli(*args, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def live_pids(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie is not: it holds nothing but its pid)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            if state != "Z":
                alive.append(pid)
    return alive


def lab_processes(workdir: Path, prefix: str) -> list[int]:
    """Live processes in the lab's namespaces or running with a path inside its workdir."""
    ids = {i for name in net.netns_names(prefix) if (i := net.netns_id(name))}
    inside = f"{workdir}/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{entry}/ns/net")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if (st.st_dev, st.st_ino) in ids or inside in cmdline:
                found.append(int(entry))
    return live_pids(found)


def mounts_anywhere(workdir: Path) -> list[str]:
    """Mounts under the workdir in any process's mount namespace (a node's root lives in one
    of its own)."""
    inside = f" {workdir}/"
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{entry}/mountinfo").read_text().splitlines():
                    if inside in line:
                        found.add(line.split()[4])
    return sorted(found)


def loop_devices(workdir: Path) -> list[str]:
    out = net.run(["losetup", "--json", "--list"]).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devices if str(d.get("back-file")).startswith(f"{workdir}/")]


def nft_tables() -> list[str]:
    out = net.run(["nft", "-j", "list", "tables"]).stdout
    items = json.loads(out)["nftables"] if out.strip() else []
    return [i["table"]["name"] for i in items if "table" in i]


def leftovers(workdir: Path, prefix: str) -> dict[str, list[object]]:
    """Everything of the lab still on this machine, by kind; empty lists when it is all gone."""
    return {
        "namespaces": list(net.netns_names(prefix)),
        "links": list(net.link_names(prefix)),
        "processes": list(lab_processes(workdir, prefix)),
        "mounts": list(mounts_anywhere(workdir)),
        "loop devices": list(loop_devices(workdir)),
        "nft tables": [t for t in nft_tables() if t.startswith("isw")],
        "state file": [p for p in [workdir / "lab.json"] if p.exists()],
    }


def nothing_left(workdir: Path, prefix: str) -> None:
    left = {kind: items for kind, items in leftovers(workdir, prefix).items() if items}
    assert not left, left


def force_down(workdir: Path, subnet: int) -> None:
    """The tests' own safety net: whatever happened, remove the lab."""
    cleanup.down(workdir, subnet)
