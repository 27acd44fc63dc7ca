"""Mount facts and mount operations the agent needs: loop-mount an image read-only, find the
mount a root lives on, and flip a read-only root to read-write and back.

The agent runs in the mount namespace of the root it swaps (the host's for `/`; a test's own
private namespace for a test root), so every mount it makes lives and dies in that namespace.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imageswarm.agent.errors import ToolError


@dataclass(frozen=True)
class MountEntry:
    mount_point: Path
    fstype: str
    source: str
    options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[MountEntry]:
    entries = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source = right.split()[:2]
        entries.append(
            MountEntry(Path(_unescape(fields[4])), fstype, source, frozenset(fields[5].split(",")))
        )
    return entries


def mount_of(path: Path) -> MountEntry:
    """The mount that holds `path` (the last-mounted one of the longest matching mount point)."""
    target = path.resolve()
    best: MountEntry | None = None
    for entry in mounts():
        mp = entry.mount_point
        if (target == mp or mp in target.parents) and (
            best is None or len(mp.parts) >= len(best.mount_point.parts)
        ):
            best = entry
    if best is None:  # pragma: no cover - "/" is always mounted
        raise ToolError(f"no mount holds {path}")
    return best


def is_mount_point(path: Path) -> bool:
    return mount_of(path).mount_point == path.resolve()


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ToolError(f"{what} failed: {' | '.join(ln.strip() for ln in lines)}")


def remount(root: Path, *, writable: bool) -> None:
    """Remount the mount holding `root` read-write or read-only."""
    mp = mount_of(root).mount_point
    _run(["mount", "-o", f"remount,{'rw' if writable else 'ro'}", str(mp)], f"remount of {mp}")


def unmount(path: Path, attempts: int = 10) -> None:
    """Unmount `path`, retrying while it is busy; lazily detach as a last resort."""
    for _ in range(attempts):
        if not is_mount_point(path):
            return
        proc = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        time.sleep(0.2)
    _run(["umount", "-l", str(path)], f"unmount of {path}")


@contextlib.contextmanager
def mounted_image(image: Path, mount_point: Path, fstype: str | None = None) -> Iterator[Path]:
    """Loop-mount a filesystem image read-only (journal never replayed) for the block."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if is_mount_point(mount_point):
        unmount(mount_point)  # left over from a crashed run
    options = "loop,ro,nodev,nosuid"
    argv = ["mount", "-o", options + (",noload" if fstype == "ext4" else "")]
    if fstype:
        argv += ["-t", fstype]
    _run([*argv, str(image), str(mount_point)], f"mounting {image}")
    try:
        yield mount_point
    finally:
        unmount(mount_point)
        with contextlib.suppress(OSError):
            os.rmdir(mount_point)
