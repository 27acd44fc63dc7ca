"""Which running processes still use files the swap replaced, and the services to restart.

Like needrestart. rsync replaces a file by renaming a new one over it, so a process that mapped
the old file keeps running old code: the kernel marks that mapping "(deleted)". Where it does
not, the inode now at the path differs from the mapped one. Each stale process is traced to its
systemd service through its cgroup, and only those services are restarted.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_MAPS_LINE = re.compile(
    r"[0-9a-f]+-[0-9a-f]+\s+\S+\s+[0-9a-f]+\s+[0-9a-f]+:[0-9a-f]+\s+(\d+)\s+(/.*)"
)
_DELETED = " (deleted)"

IGNORED_PREFIXES: tuple[str, ...] = (
    # Names the kernel gives to memory that is no file of the root: memfd, SysV shared memory,
    # shared anonymous maps (shown as /dev/zero), AIO rings, hugepages, GPU buffers.
    "/memfd:",
    "/SYSV",
    "/[aio]",
    "/anon_hugepage",
    "/dmabuf:",
    "/drm mm object",
    "/i915",
    # Trees on their own filesystems or scratch space, never what an image swap replaces.
    "/dev/",
    "/proc/",
    "/sys/",
    "/run/",
    "/tmp/",
    "/var/tmp/",
)
"""Root-relative path prefixes never reported as stale (the default of `find_stale`)."""


@dataclass(frozen=True)
class StaleProcess:
    """A process that still maps or executes a file under the root that was replaced or deleted.

    `files` are the paths as the process sees them, without the kernel's " (deleted)" mark.
    `unit` is its systemd service, or None (kernel-side scopes, user sessions, PID 1).
    """

    pid: int
    comm: str
    unit: str | None
    files: tuple[str, ...]


#: Where the agent's rsync moves the files it replaces (root-relative), so the old inodes stay
#: linked: a process still running them does not pin an orphan inode, and the root can be
#: remounted read-only again. A file mapped from there is stale under its original path.
REPLACED_DIR = "var/lib/imageswarm/replaced"


def find_stale(
    root: Path, *, proc: Path = Path("/proc"), ignore: Sequence[str] = IGNORED_PREFIXES
) -> list[StaleProcess]:
    """Every process, sorted by pid, running a file under `root` that is no longer at its path.

    Processes whose root directory is not ours (containers, chroots) run files from elsewhere
    and are skipped, as are kernel threads, this process, and processes that exit mid-scan.
    """
    prefix = _prefix(root)
    own_root = os.stat("/")
    found = []
    for pid in _pids(proc):
        if pid == os.getpid():
            continue
        where = proc / str(pid)
        try:
            if not _same_root(where, own_root):
                continue
            files = _stale_files(where, prefix, tuple(ignore))
            if not files:
                continue
            comm = _comm(where)
            unit = _unit(where)
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if where.exists():  # a file missing under a vanished /proc/<pid>/root is no evidence
            found.append(StaleProcess(pid, comm, unit, tuple(sorted(files))))
    return found


def units_to_restart(stale: Sequence[StaleProcess]) -> list[str]:
    """The systemd services of the stale processes, sorted, each once."""
    return sorted({p.unit for p in stale if p.unit is not None})


def restart_units(
    units: Iterable[str], *, systemctl: str = "systemctl", timeout: float = 120
) -> list[tuple[str, bool, str]]:
    """Restart each unit in turn: (unit, ok, output). A failed unit never stops the others.

    A failure's output starts with the exit status or why systemctl did not finish.
    """
    results = []
    for unit in units:
        argv = [systemctl, "restart", unit]
        try:
            run = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            text = _text(e.output)
            why = f"did not finish within {timeout:g} s"
            results.append((unit, False, f"{why}: {text}" if text else why))
        except OSError as e:
            results.append((unit, False, f"{systemctl} could not be run: {e.strerror}"))
        else:
            text = _text(run.stdout)
            if run.returncode == 0:
                results.append((unit, True, text))
            else:
                why = f"exit status {run.returncode}"
                results.append((unit, False, f"{why}: {text}" if text else why))
    return results


def _prefix(root: Path) -> str:
    """The resolved root with a trailing slash, so /srv/root never matches /srv/root2."""
    resolved = os.path.realpath(root)
    return resolved if resolved.endswith("/") else resolved + "/"


def _relative(path: str, prefix: str) -> str | None:
    """`path` as seen from the root ("/usr/bin/x"), or None when it lies outside."""
    if path.startswith(prefix):
        return "/" + path[len(prefix) :]
    return "/" if path == prefix[:-1] else None


def _pids(proc: Path) -> list[int]:
    return sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())


def _same_root(where: Path, own_root: os.stat_result) -> bool:
    link = where / "root"
    if not os.path.lexists(link):  # a /proc without root links (tests): assume ours
        return True
    st = os.stat(link)
    return (st.st_dev, st.st_ino) == (own_root.st_dev, own_root.st_ino)


def _stale_files(where: Path, prefix: str, ignore: tuple[str, ...]) -> set[str]:
    """The files under the root this process maps or executes that were replaced or deleted."""
    view = str(where / "root") if os.path.lexists(where / "root") else ""
    try:
        exe = os.readlink(where / "exe")
    except FileNotFoundError:
        if not where.exists():
            raise
        return set()  # kernel threads and zombies have no executable
    stale = set()
    path, deleted = _split_deleted(exe)
    if (original := _replaced(path, prefix)) is not None:
        stale.add(original)
    elif _counts(path, prefix, ignore):
        if deleted:
            stale.add(path)
        else:
            mapped = os.stat(where / "exe")  # follows the link to the running inode itself
            now = _identity(view + path)
            if now != (mapped.st_dev, mapped.st_ino):
                stale.add(path)
    checked: set[tuple[str, bool, int]] = set()
    maps = (where / "maps").read_bytes().decode(errors="surrogateescape")
    for line in maps.splitlines():
        match = _MAPS_LINE.fullmatch(line)
        if match is None or match[1] == "0":
            continue
        path, deleted = _split_deleted(match[2].replace("\\012", "\n"))
        key = (path, deleted, int(match[1]))
        if key in checked:
            continue
        checked.add(key)
        if (original := _replaced(path, prefix)) is not None:
            stale.add(original)
            continue
        if not _counts(path, prefix, ignore):
            continue
        # Only the inode is compared: maps shows the superblock's device, which differs from
        # what stat reports on btrfs subvolumes. The old inode is still alive (it is mapped),
        # so a file renamed over it on the same filesystem always has another number.
        now = _identity(view + path)
        if deleted or now is None or now[1] != key[2]:
            stale.add(path)
    return stale


def _replaced(path: str, prefix: str) -> str | None:
    """The original path of a file the agent moved aside (<replaced>/<op>/usr/bin/x -> the
    root's /usr/bin/x), or None when `path` is not under the replaced-files directory."""
    relative = _relative(path, prefix)
    marker = f"/{REPLACED_DIR}/"
    if relative is None or not relative.startswith(marker):
        return None
    _op, _, rest = relative[len(marker) :].partition("/")
    return prefix + rest if rest else None


def _split_deleted(path: str) -> tuple[str, bool]:
    if path.endswith(_DELETED):
        return path[: -len(_DELETED)], True
    return path, False


def _counts(path: str, prefix: str, ignore: tuple[str, ...]) -> bool:
    relative = _relative(path, prefix)
    return relative is not None and not relative.startswith(ignore)


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what is at `path` now, or None when nothing is."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _comm(where: Path) -> str:
    try:
        return (where / "comm").read_text(errors="replace").strip()
    except FileNotFoundError:
        return os.path.basename(_split_deleted(os.readlink(where / "exe"))[0])


def _unit(where: Path) -> str | None:
    """The systemd service the process runs in, from its cgroup (v2, or v1 name=systemd)."""
    try:
        text = (where / "cgroup").read_text(errors="replace")
    except FileNotFoundError:
        return None
    unified = legacy = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[0] == "0" and fields[1] == "":
            unified = fields[2]
        elif fields[1] == "name=systemd":
            legacy = fields[2]
    for path in (unified, legacy):
        parts = (path or "").strip("/").split("/")
        if "user.slice" in parts:
            return None
        # The first service on the path is the unit; deeper ones are a delegated subtree.
        unit = next((p for p in parts if p.endswith(".service")), None)
        if unit is not None:
            return unit
    return None


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    return (output or "").strip()


def dir_in_use(directory: Path, *, proc: Path = Path("/proc")) -> bool:
    """True when any process executes or maps a file under `directory`."""
    prefix = _prefix(directory)
    for pid in _pids(proc):
        where = proc / str(pid)
        try:
            exe, _ = _split_deleted(os.readlink(where / "exe"))
            if exe.startswith(prefix):
                return True
            for line in (where / "maps").read_bytes().decode(errors="surrogateescape").splitlines():
                match = _MAPS_LINE.fullmatch(line)
                if match is not None and _split_deleted(match[2])[0].startswith(prefix):
                    return True
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return False
