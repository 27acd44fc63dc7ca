"""Whether the root's filesystem can hold a swap at its peak, checked before the root is touched.

The swap never frees anything while it runs: rsync writes each new or changed file beside the
old one, and the old one (like every deleted file) is moved into the backup dir, where it stays
allocated until a later swap prunes it. So at its peak the filesystem holds both versions, and
the swap needs, on top of what the root uses now:

- every added or changed regular file's size, rounded up to the filesystem's block size
  (hard links counted once), every added directory and long symlink one block;
- one inode per added or changed entry;
- one directory (a block and an inode) per directory the backup dir has to mirror;
- directory entries for the new names.

Against it stand the free blocks available to root and the free inodes, plus what pruning the
earlier swaps' backup dirs (those no process uses any more) releases before the rsync starts,
minus a margin for what the estimate cannot see (extent and directory blocks, logs the running
services write meanwhile).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from imageswarm.agent import services
from imageswarm.agent.errors import ApplyError
from imageswarm.agent.rsync import Plan

_MIB = 1 << 20
#: The margin kept free: at least this many bytes, or this share of the filesystem if more.
MARGIN_BYTES = 8 * _MIB
MARGIN_SHARE = 0.01
MARGIN_INODES = 64
#: A symlink target shorter than this lives in the inode itself (ext4's fast symlinks).
_INLINE_SYMLINK = 60


@dataclass(frozen=True)
class Need:
    """What a swap needs on the root's filesystem at its peak, and what that filesystem has."""

    bytes: int
    inodes: int
    margin_bytes: int
    margin_inodes: int
    free_bytes: int
    free_inodes: int | None  # None: the filesystem has no fixed inode count (btrfs)
    reclaimable_bytes: int

    @property
    def fits(self) -> bool:
        room = self.free_bytes + self.reclaimable_bytes
        if self.bytes + self.margin_bytes > room:
            return False
        return self.free_inodes is None or self.inodes + self.margin_inodes <= self.free_inodes

    def to_json(self) -> dict[str, int | None]:
        return {
            "bytes": self.bytes,
            "inodes": self.inodes,
            "margin_bytes": self.margin_bytes,
            "free_bytes": self.free_bytes,
            "free_inodes": self.free_inodes,
            "reclaimable_bytes": self.reclaimable_bytes,
        }


def _round_up(size: int, block: int) -> int:
    return -(-size // block) * block


def _dirent(name: str) -> int:
    """The bytes an ext4 directory entry for `name` takes (8-byte header, 4-byte aligned)."""
    return _round_up(8 + len(os.fsencode(name)), 4)


def estimate(plan: Plan, tree: Path, root: Path, backup_rel: str, keep: str) -> Need:
    """The peak need of swapping `root` to `tree` as `plan` says, the backup dir being the
    root-relative `backup_rel`; `keep` names the backup dir that pruning leaves alone."""
    fs = os.statvfs(root)
    block = fs.f_frsize or fs.f_bsize
    need = inodes = entries = 0
    seen: set[tuple[int, int]] = set()
    for rel in [*plan.added, *plan.changed]:
        try:
            st = os.lstat(tree / rel)
        except FileNotFoundError:
            continue
        entries += _dirent(os.path.basename(rel.rstrip("/")))
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            need += _round_up(st.st_size, block)
        elif stat.S_ISDIR(st.st_mode) or (
            stat.S_ISLNK(st.st_mode) and st.st_size >= _INLINE_SYMLINK
        ):
            need += block
        inodes += 1
    mirrored: set[str] = set()
    for rel in [*plan.changed, *plan.removed]:
        if rel.endswith("/"):
            continue  # directories are removed, never moved aside
        entries += _dirent(os.path.basename(rel))
        parent = os.path.dirname(rel)
        while parent and parent not in mirrored:
            mirrored.add(parent)
            parent = os.path.dirname(parent)
    backup_dirs = len(mirrored) + (backup_rel.count("/") + 1 if mirrored else 0)
    need += backup_dirs * block + _round_up(entries, block)
    inodes += backup_dirs
    total = fs.f_blocks * block
    return Need(
        bytes=need,
        inodes=inodes,
        margin_bytes=max(MARGIN_BYTES, int(total * MARGIN_SHARE)),
        margin_inodes=max(MARGIN_INODES, int(fs.f_files * MARGIN_SHARE)),
        free_bytes=fs.f_bfree * block,
        free_inodes=fs.f_ffree if fs.f_files else None,
        reclaimable_bytes=reclaimable(root / services.REPLACED_DIR, keep),
    )


def reclaimable(replaced: Path, keep: str) -> int:
    """The bytes pruning the backup dirs under `replaced` (all but `keep`) would free: files of
    dirs no process uses, each inode counted once and only if no link to it lives elsewhere."""
    if not replaced.is_dir():
        return 0
    total = 0
    for old in replaced.iterdir():
        if old.name == keep or not old.is_dir() or services.dir_in_use(old):
            continue
        links: dict[tuple[int, int], int] = {}  # inode -> its links seen under `old`
        for dirpath, dirnames, filenames in os.walk(old):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                key = (st.st_dev, st.st_ino)
                links[key] = links.get(key, 0) + 1
                if stat.S_ISDIR(st.st_mode) or links[key] == st.st_nlink:
                    total += st.st_blocks * 512
    return total


def check(plan: Plan, tree: Path, root: Path, backup_rel: str, keep: str) -> Need:
    """Refuse the swap (ApplyError) unless the root's filesystem holds it at its peak."""
    need = estimate(plan, tree, root, backup_rel, keep)
    if need.fits:
        return need
    free = _mib(need.free_bytes)
    if need.free_inodes is not None:
        free += f" and {need.free_inodes} inodes"
    if need.reclaimable_bytes:
        free += f" free (plus {_mib(need.reclaimable_bytes)} in earlier swaps' backups)"
    else:
        free += " free"
    raise ApplyError(
        f"not enough space on {root} for this swap: at its peak (new and changed files written "
        f"while the replaced ones wait in {services.REPLACED_DIR}) it needs {_mib(need.bytes)} "
        f"and {need.inodes} inodes plus a margin of {_mib(need.margin_bytes)} and "
        f"{need.margin_inodes} inodes, but the filesystem has {free}; free space on the root "
        "or apply an image that changes less"
    )


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f} MiB"
