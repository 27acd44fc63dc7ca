"""What an in-place swap must leave alone, and the accounts files it merges.

Paths are relative to the root being swapped. A path ending in "/" is a whole tree. Preserved
paths are excluded from rsync in both directions: the image's copy is not installed and the
node's copy is not deleted. The package manager's database (var/lib/dpkg, var/lib/rpm) is
deliberately NOT preserved: it must always describe the files the image installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from imageswarm.agent.fsutil import atomic_write

RUNTIME = ("proc/", "sys/", "dev/", "run/", "tmp/", "var/tmp/", "mnt/", "media/", "lost+found/")
IDENTITY = (
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "etc/ssh/ssh_host_*",
    "etc/hostname",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/adjtime",
)
SERVICE_DATA = (
    "var/lib/mysql/",
    "var/lib/postgresql/",
    "var/lib/rabbitmq/",
    "var/lib/redis/",
    "var/lib/etcd/",
    "var/lib/libvirt/",
    "var/lib/nova/",
    "var/lib/docker/",
    "var/lib/containers/",
)
PEOPLE_AND_LOGS = ("var/log/", "home/", "root/")
OWN_STATE = ("var/lib/imageswarm/", "var/cache/imageswarm/", "etc/imageswarm/", "etc/image_id")
ACCOUNTS = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")

DEFAULTS: tuple[str, ...] = RUNTIME + IDENTITY + SERVICE_DATA + PEOPLE_AND_LOGS + OWN_STATE


def normalize(path: str) -> str:
    """'/var/lib/foo' -> 'var/lib/foo'; refuse '..' and empty paths."""
    clean = path.strip().lstrip("/")
    if not clean or any(part == ".." for part in clean.split("/")):
        raise ValueError(f"preserved path {path!r} must be a path inside the root")
    return clean


def rsync_filters(preserve: Iterable[str], extra_excludes: Iterable[str] = ()) -> list[str]:
    """rsync filter rules (one per line) that protect `preserve` and the accounts files."""
    rules = []
    for raw in [*preserve, *extra_excludes, *ACCOUNTS]:
        path = normalize(raw)
        rules.append(f"- /{path.rstrip('/')}/***" if path.endswith("/") else f"- /{path}")
    return rules


def under_root(path: Path, root: Path) -> str | None:
    """`path` relative to `root` when it lies inside it (e.g. the state dir), else None."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return None


def _entries(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def merge_accounts_file(image_file: Path, live_file: Path) -> tuple[int, int]:
    """Replace `live_file` with the image's entries plus entries only the node has.

    Entries are keyed by their first field (user or group name); for names in both, the
    image's entry wins, so system accounts always match the image. Returns (from image,
    kept from node). A missing image file leaves the live file untouched.
    """
    image_lines = [ln for ln in _entries(image_file) if ln.strip()]
    if not image_lines and not image_file.exists():
        return (0, 0)
    names = {ln.split(":", 1)[0] for ln in image_lines}
    kept = [ln for ln in _entries(live_file) if ln.strip() and ln.split(":", 1)[0] not in names]
    st = os.stat(live_file if live_file.exists() else image_file)
    atomic_write(
        live_file, ("\n".join(image_lines + kept) + "\n").encode(), mode=st.st_mode & 0o7777
    )
    os.chown(live_file, st.st_uid, st.st_gid)
    os.chmod(live_file, st.st_mode & 0o7777)
    return (len(image_lines), len(kept))


def merge_accounts(
    image_root: Path, live_root: Path, files: Sequence[str] = ACCOUNTS
) -> dict[str, tuple[int, int]]:
    return {f: merge_accounts_file(image_root / f, live_root / f) for f in files}
