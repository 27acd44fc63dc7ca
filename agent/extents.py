"""Byte ranges of an image file, and the privileged scanner that finds where file data lies.

`imagefile.file_extents` runs this module as a child process inside a private mount namespace
(`unshare --mount --propagation private python -m imageswarm.agent.extents --fs ext IMAGE`).
The child loop-mounts the image read-only, reads every regular file's extents with FIEMAP and
prints them as JSON. The mount is never visible on the host, and it disappears with the
namespace even if the child is killed. Nothing here imports the rest of the agent, so the
child starts fast and runs as little code as possible as root in the namespace.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Exit codes of the child; 1 is left to unshare's own failures and to Python tracebacks.
EXIT_NOT_MOUNTABLE = 3
EXIT_NO_FIEMAP = 4
EXIT_NOT_PRIVATE = 5

# linux/fiemap.h
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_MAX_OFFSET = (1 << 64) - 1
_FIEMAP = struct.Struct("=QQIIII")  # start, length, flags, mapped_extents, extent_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_FIEMAP_EXTENT_LAST = 0x1
# Extents whose bytes in the image are not the file's bytes as they are: location unknown or
# not yet allocated, encoded (compressed or encrypted), stored inline with metadata or packed
# with other files' tails, or allocated but unwritten (they read back as zeros).
_FIEMAP_EXTENT_SKIP = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x800
_BATCH = 256  # extents fetched per ioctl


@dataclass(frozen=True, slots=True)
class Extent:
    """The byte range [offset, offset + length) of an image file."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge_extents(pairs: list[tuple[int, int]], size: int) -> list[Extent]:
    """Sort (offset, length) pairs, clip them to [0, size) and merge overlapping ones.

    Adjacent ranges stay separate: two files stored back to back must keep the boundary
    between them, since chunk cuts at file boundaries are the point of knowing extents."""
    merged: list[Extent] = []
    for offset, length in sorted(pairs):
        start, end = max(offset, 0), min(offset + length, size)
        if end <= start:
            continue
        if merged and start < merged[-1].end:
            last = merged.pop()
            start, end = last.offset, max(end, last.end)
        merged.append(Extent(start, end - start))
    return merged


class _NoFiemapError(Exception):
    pass


def _scan(root: str) -> tuple[list[tuple[int, int]], int]:
    """(physical, length) of every data extent of every regular file under root, and how
    many entries could not be read. Symlinks are not followed, other filesystems not entered,
    hard-linked files read once."""
    root_dev = os.lstat(root).st_dev
    buf = bytearray(_FIEMAP.size + _BATCH * _FIEMAP_EXTENT.size)
    seen: set[int] = set()
    extents: list[tuple[int, int]] = []
    skipped = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                found = [(e.path, e.stat(follow_symlinks=False)) for e in entries]
        except OSError:
            skipped += 1
            continue
        for path, st in found:
            if st.st_dev != root_dev:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_ino not in seen:
                seen.add(st.st_ino)
                try:
                    extents += _fiemap(path, buf)
                except OSError:
                    skipped += 1
    return extents, skipped


def _fiemap(path: str, buf: bytearray) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        start = 0
        while True:
            _FIEMAP.pack_into(buf, 0, start, _FIEMAP_MAX_OFFSET - start, 0, 0, _BATCH, 0)
            try:
                fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise _NoFiemapError(f"the filesystem does not support FIEMAP ({e})") from e
                raise
            mapped = _FIEMAP.unpack_from(buf)[3]
            if mapped == 0:
                return extents
            for i in range(mapped):
                offset = _FIEMAP.size + i * _FIEMAP_EXTENT.size
                logical, physical, length, flags = _FIEMAP_EXTENT.unpack_from(buf, offset)
                if not flags & _FIEMAP_EXTENT_SKIP:
                    extents.append((physical, length))
            if flags & _FIEMAP_EXTENT_LAST:
                return extents
            start = logical + length
    finally:
        os.close(fd)


def _in_private_namespace() -> bool:
    """True when this process has its own mount namespace with no shared mounts in it."""
    if os.stat("/proc/self/ns/mnt").st_ino == os.stat(f"/proc/{os.getppid()}/ns/mnt").st_ino:
        return False
    with open("/proc/self/mountinfo") as mountinfo:
        return not any("shared:" in line.split(" - ")[0] for line in mountinfo)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: mount IMAGE read-only, print {"extents", "skipped"} as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m imageswarm.agent.extents",
        description="Print the data extents of the regular files in a filesystem image. "
        "Run only under `unshare --mount --propagation private`; it refuses otherwise.",
    )
    parser.add_argument("--fs", choices=["ext", "xfs"], required=True)
    parser.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    if not _in_private_namespace():
        print("refusing to mount outside a private mount namespace", file=sys.stderr)
        return EXIT_NOT_PRIVATE
    # noload/norecovery: never replay a journal; the loop device is read-only anyway.
    options, fstype = {"ext": ("noload", "ext4"), "xfs": ("norecovery", "xfs")}[args.fs]
    # mkdtemp + rmdir, not TemporaryDirectory: never rmtree a directory that may be mounted.
    mnt = tempfile.mkdtemp(prefix="imageswarm-extents-")
    try:
        mount = ["mount", "-t", fstype, "-o", f"loop,ro,nodev,nosuid,noexec,{options}"]
        proc = subprocess.run(
            [*mount, str(args.image), mnt], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            print(f"mount failed: {proc.stderr.strip()}", file=sys.stderr)
            return EXIT_NOT_MOUNTABLE
        try:
            extents, skipped = _scan(mnt)
        except _NoFiemapError as e:
            print(str(e), file=sys.stderr)
            return EXIT_NO_FIEMAP
        finally:
            subprocess.run(["umount", mnt], check=False)
    finally:
        os.rmdir(mnt)
    json.dump({"extents": extents, "skipped": skipped}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
