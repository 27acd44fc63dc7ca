"""Undoing a failed swap without new blocks: put the replaced files back, free the new ones.

A swap that failed part-way (the disk filled up, say) left the root a mix of two images, and
every file it had replaced or deleted in its backup dir. Restoring with rsync alone would
write a fresh copy of each old file while the new one moved into yet another backup dir:
exactly the space the failed swap lacked. So before the restore's rsync:

1. `put_back` exchanges each file in the failed swap's backup dir that is still the previous
   image's version with what now stands at its path (renameat2 RENAME_EXCHANGE: no new blocks
   and no new directory entries; the new file keeps a linked inode in the backup dir);
2. `free_unused` unlinks the new files that ended up in the backup dir and the files only the
   failed image added, unless a process maps, executes or holds one open (an open unlinked
   inode would make the kernel refuse to remount the root read-only).

rsync then finds the root nearly restored, compares every file by checksum, and has the freed
space for whatever is left. Each step is best effort and idempotent: what it cannot do, rsync
does, and a restore resumed after a crash repeats it safely.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from imageswarm.agent import rsync

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    _renameat2.restype = ctypes.c_int
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """Swap the entries at `a` and `b` (same filesystem) in one step where the kernel can."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(a), None, str(b))
    # No RENAME_EXCHANGE here: three renames, one more directory entry for a moment.
    tmp = a.with_name(f".{a.name}.imageswarm-exchange")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _entries(top: Path, rel: str = "") -> Iterator[str]:
    """Every non-directory under `top`, as a path relative to it."""
    with os.scandir(top / rel if rel else top) as it:
        for entry in it:
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from _entries(top, path)
            else:
                yield path


def _same(a: os.stat_result, b: os.stat_result, a_path: Path, b_path: Path) -> bool:
    """rsync's quick check plus owner and mode: is `a` the same file as `b`?"""
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(a_path) == os.readlink(b_path)
    if stat.S_ISREG(a.st_mode):
        return (a.st_size, int(a.st_mtime)) == (b.st_size, int(b.st_mtime))
    return a.st_rdev == b.st_rdev


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def put_back(backup: Path, tree: Path, root: Path) -> int:
    """Put each file in `backup` that `tree` (the previous image) has as is back into `root`,
    exchanged with the file standing there; returns how many files were put back."""
    if not backup.is_dir():
        return 0
    count = 0
    for rel in _entries(backup):
        saved, image, live = backup / rel, tree / rel, root / rel
        st_saved, st_image, st_live = _lstat(saved), _lstat(image), _lstat(live)
        if st_saved is None or st_image is None or not _same(st_saved, st_image, saved, image):
            continue  # not the previous image's version: rsync copies that file
        if st_live is not None and (
            stat.S_ISDIR(st_live.st_mode) or _same(st_live, st_image, live, image)
        ):
            continue  # a directory now (rsync sorts that out), or already back
        try:
            if st_live is None:
                live.parent.mkdir(parents=True, exist_ok=True)
                os.rename(saved, live)
            else:
                exchange(saved, live)
        except OSError:
            continue  # out of space for a directory, a file where a directory was: rsync's job
        count += 1
    return count


def inodes_in_use(dev: int, proc: Path = Path("/proc")) -> set[int]:
    """Inodes of the filesystem `dev` that some process executes, maps, holds open or stands
    in (cwd, root)."""
    used: set[int] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        where = proc / pid
        links = [where / "exe", where / "cwd", where / "root"]
        try:
            links += [where / "fd" / fd for fd in os.listdir(where / "fd")]
            maps = (where / "maps").read_bytes()
        except OSError:
            continue  # gone, or a kernel thread
        for link in links:
            try:
                st = os.stat(link)
            except OSError:
                continue
            if st.st_dev == dev:
                used.add(st.st_ino)
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) < 6:
                continue
            major, _, minor = fields[3].partition(b":")
            if os.makedev(int(major, 16), int(minor, 16)) == dev:
                used.add(int(fields[4]))
    return used


def free_unused(paths: Iterable[Path], dev: int) -> int:
    """Unlink the files (not directories) among `paths` on the filesystem `dev` that no process
    uses; returns the bytes freed."""
    used = inodes_in_use(dev)
    freed = 0
    for path in paths:
        st = _lstat(path)
        if st is None or stat.S_ISDIR(st.st_mode) or st.st_dev != dev or st.st_ino in used:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        if st.st_nlink == 1:
            freed += st.st_blocks * 512
    return freed


def free_backup(backup: Path, dev: int) -> int:
    """`free_unused` over a backup dir, then its emptied directories; returns the bytes freed."""
    if not backup.is_dir():
        return 0
    freed = free_unused((backup / rel for rel in list(_entries(backup))), dev)
    for dirpath, _dirnames, _files in os.walk(backup, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            continue  # still holds a file in use
    return freed


def undo_swap(backup: Path, tree: Path, root: Path, filter_file: Path) -> None:
    """Take `root` back to `tree` as far as renames and unlinks go, `backup` being the failed
    swap's backup dir: the failed swap may have run out of space, and this needs none."""
    put_back(backup, tree, root)
    dev = os.lstat(root).st_dev
    free_backup(backup, dev)
    added = rsync.run(tree, root, filter_file, dry_run=True, checksum=False).removed
    free_unused((root / rel for rel in added), dev)
