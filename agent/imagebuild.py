"""ext4 images of a root tree, built so that the next version is a small delta.

`mkfs.ext4 -d` alone makes every build differ everywhere: a random UUID seeds the checksum of
every inode and directory block, inodes carry the build's ctime, and one inserted file
renumbers every later inode and moves every later file. Here an image is built either

- from scratch: `mkfs.ext4 -d` with a fixed UUID (the hash seed derived from it) and a fixed
  clock, so one tree always gives the same bytes (no mount, no root needed); or
- on a base, the previous version's image: a sparse copy of it, without its journal,
  loop-mounted in a private mount namespace (never the host's) and brought to the tree with
  `rsync --checksum --delete`, so only what changed is written and the rest keeps its place;
  freed blocks are trimmed (holes) and the journal is made again, empty.

Both end with one `debugfs -w` pass over every inode: atime = ctime = mtime in whole seconds,
crtime fixed, i_version 0, the root's owner and mode from the tree's root; then `e2fsck -fn`
must pass, and only then does the image appear at `out`.

Mtimes. A file's mtime is the tree's (whole seconds, as mkfs -d keeps them): package
managers and caches compare them (Python's .pyc records its source's mtime). A directory's
mtime is the newest mtime of anything beneath it: what a build tree records there is only when
the build made the directory, new on every rebuild, and keeping it would rewrite every
directory's inode each time (docs/benchmarks.md, "Delta", has the measurements). With
`mtimes="content"` and a base, a file whose content the base already has keeps the base's
mtime: smaller deltas when a rebuild re-creates identical files, but a file's mtime can then
disagree with what a cache built in the tree recorded for it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imageswarm.agent import imagefile
from imageswarm.agent.errors import InvalidInputError, ToolError

Mtimes = Literal["tree", "content"]

#: Every image built without a UUID of its own has this one, so its versions share checksums.
DEFAULT_UUID = uuid.UUID("5f0c8a4e-6e1b-4c2a-9a57-3d2f9b1c7e40")
#: The clock of mke2fs, tune2fs and debugfs: superblock times, every crtime, empty directories.
FIXED_TIME = 1_700_000_000
MIN_MIB = 8

_MIB = 1 << 20
_TIMEOUT = 3600.0
_CLOCK = {"E2FSPROGS_FAKE_TIME": str(FIXED_TIME)}
#: 4 KiB blocks at every size (mke2fs picks 1 KiB under 512 MiB), 256-byte inodes (they hold
#: crtime and nanoseconds), inode tables zeroed now so that no kernel thread writes them later.
_MKFS = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256"]
_MKFS_OPTIONS = "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0"
#: -a without -t, plus hard links, ACLs, xattrs and zero runs as holes; content compared by
#: checksum (the image's mtimes have no nanoseconds, so size+mtime would match nothing).
_RSYNC = ["rsync", "-rlpgoDHAXS", "--numeric-ids", "--checksum", "--delete"]
_RSYNC += ["--exclude=/lost+found"]  # the image keeps its own
#: Files' mtimes; directories get theirs from _normalize.
_RSYNC_TIMES = ["--times", "--omit-dir-times"]

# Run by `unshare --mount --propagation private`: the mount exists in that namespace only and
# goes with it. rsync writes only into a directory that is verifiably the image's mount.
_IN_NAMESPACE = r"""
set -eu
image=$1 mnt=$2 tree=$3
shift 3
if [ -n "$tree" ]; then options=loop,noatime,noinit_itable; else options=loop,ro,noload; fi
mount -t ext4 -o "$options" "$image" "$mnt"
trap 'umount "$mnt"' EXIT
mountpoint -q "$mnt"
if [ -n "$tree" ]; then
    "$@" "$tree/" "$mnt/"
    fstrim "$mnt"
fi
find "$mnt" -xdev -printf '%i %y %T@ %P\0'
"""


@dataclass(frozen=True)
class Entry:
    """One name in the image."""

    ref: str  # how debugfs names its inode: "<number>", or the path in double quotes
    is_dir: bool
    mtime: int  # whole seconds
    path: str  # relative to the image's root ("" for the root)


def build_ext4(
    tree: Path,
    out: Path,
    size_mib: int,
    *,
    base: Path | None = None,
    fs_uuid: uuid.UUID | None = None,
    mtimes: Mtimes = "tree",
) -> None:
    """Build `out`, a `size_mib` MiB ext4 image of `tree`, on the image `base` if given.

    Without `base`, `fs_uuid` (default DEFAULT_UUID) is the filesystem's UUID and seeds its
    checksums: give every version of one image the same. With `base`, the base's UUID is kept
    and `fs_uuid`, if given, must be it; building on a base needs root. Raises
    InvalidInputError for unusable input and ToolError when a tool fails; `out` is then
    untouched and nothing stays mounted.
    """
    if mtimes not in ("tree", "content"):
        raise InvalidInputError(f"mtimes must be 'tree' or 'content', not {mtimes!r}.")
    tree, out = tree.absolute(), out.absolute()  # never an argument that starts with "-"
    base = base.absolute() if base is not None else None
    _check_inputs(tree, out, size_mib, base)
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        if base is None:
            _mkfs(tree, part, size_mib, fs_uuid or DEFAULT_UUID)
            entries = _tree_entries(tree) or _in_namespace(part, None, [])
        else:
            _copy_base(base, part, size_mib, fs_uuid)
            started = int(time.time())
            rsync = _RSYNC if mtimes == "content" else [*_RSYNC, *_RSYNC_TIMES]
            entries = _in_namespace(part, tree, rsync)
            if mtimes == "content":  # what rsync wrote has the mtime "now": the tree's instead
                entries = [_tree_mtime(e, tree) if e.mtime >= started else e for e in entries]
        _normalize(part, tree, entries, mounted=base is not None)
        if base is not None:
            _tool(["tune2fs", "-O", "has_journal", str(part)], "Making the journal", _CLOCK)
        _tool(["e2fsck", "-fn", str(part)], f"Checking the image of {tree}")
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _check_inputs(tree: Path, out: Path, size_mib: int, base: Path | None) -> None:
    if not tree.is_dir():
        raise InvalidInputError(f"The tree {tree} is not a directory.")
    if size_mib < MIN_MIB:
        raise InvalidInputError(f"An image must be at least {MIN_MIB} MiB, not {size_mib} MiB.")
    if out.is_dir() or not out.parent.is_dir():
        raise InvalidInputError(f"{out} is a directory or in a directory that does not exist.")
    if out.resolve().is_relative_to(tree.resolve()):
        raise InvalidInputError(f"The image {out} must not be inside the tree {tree}.")
    if base is None:
        return
    if os.geteuid() != 0:
        raise InvalidInputError("Building on a base image needs root (it loop-mounts the copy).")
    if not base.is_file():
        raise InvalidInputError(f"The base image {base} is not a file.")
    if base.resolve() == out.resolve():
        raise InvalidInputError(f"The image {out} must not be its own base.")
    if imagefile.filesystem_kind(base) != "ext":
        raise InvalidInputError(f"The base image {base} is not an ext4 filesystem image.")
    if base.stat().st_size > size_mib * _MIB:
        raise InvalidInputError(
            f"The base image {base} is {base.stat().st_size / _MIB:.0f} MiB; an image built "
            f"on it cannot be smaller ({size_mib} MiB asked)."
        )


def _mkfs(tree: Path, image: Path, size_mib: int, fs_uuid: uuid.UUID) -> None:
    options = f"{_MKFS_OPTIONS},hash_seed={uuid.uuid5(fs_uuid, 'hash_seed')}"
    argv = [*_MKFS, "-U", str(fs_uuid), "-E", options, "-d", str(tree), str(image)]
    proc = _run([*argv, f"{size_mib}M"], _CLOCK)
    if proc.returncode == 0:
        return
    if "Could not allocate" in proc.stderr or "No space left" in proc.stderr:
        raise InvalidInputError(_too_small(tree, size_mib))
    raise ToolError(f"mkfs.ext4 could not build an image of {tree}: {_tail(proc.stderr)}.")


def _copy_base(base: Path, image: Path, size_mib: int, fs_uuid: uuid.UUID | None) -> None:
    """`image`: a sparse copy of `base`, grown to `size_mib`, without its journal."""
    header = _tool(["dumpe2fs", "-h", str(base)], f"Reading the base image {base}").stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    try:
        base_uuid = uuid.UUID(fields.get("Filesystem UUID", "").strip())
    except ValueError:
        raise InvalidInputError(f"The base image {base} has no filesystem UUID.") from None
    if fs_uuid is not None and fs_uuid != base_uuid:
        raise InvalidInputError(
            f"The base image {base} has the UUID {base_uuid}, not {fs_uuid}: an image built "
            "on a base keeps its UUID (another one would change every checksum)."
        )
    if "needs_recovery" in fields.get("Filesystem features", ""):
        raise InvalidInputError(f"The base image {base} was not unmounted cleanly.")
    _tool(["cp", "--sparse=always", str(base), str(image)], f"Copying {base}")
    if image.stat().st_size < size_mib * _MIB:
        os.truncate(image, size_mib * _MIB)
        _tool(["resize2fs", "-f", str(image)], f"Growing the copy of {base} to {size_mib} MiB")
    _tool(["tune2fs", "-O", "^has_journal", str(image)], f"Removing the journal of {base}'s copy")


def _in_namespace(image: Path, tree: Path | None, rsync: Sequence[str]) -> list[Entry]:
    """With `tree`, sync it onto the image; either way list every name in the image."""
    with _mount_point() as mnt:
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
        proc = _run([*argv, _IN_NAMESPACE, "sh", str(image), str(mnt), str(tree or ""), *rsync])
    if proc.returncode != 0:
        if tree is not None and "No space left" in proc.stderr:
            raise InvalidInputError(_too_small(tree, image.stat().st_size // _MIB))
        what = f"Syncing {tree} onto the image" if tree else "Listing the image's files"
        raise ToolError(f"{what} failed: {_tail(proc.stderr)}.")
    return [_entry(record) for record in proc.stdout.split("\0") if record]


@contextlib.contextmanager
def _mount_point() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="imageswarm-build-"))
    try:
        yield path
    finally:
        path.rmdir()  # never rmtree: only the namespace ever mounted anything on it


def _entry(record: str) -> Entry:
    inode, kind, mtime, path = record.split(" ", 3)
    whole, _, fraction = mtime.partition(".")  # exact: a float would round up at .9999999999
    seconds = int(whole) - (whole.startswith("-") and fraction.strip("0") != "")
    return Entry(f"<{inode}>", kind == "d", seconds, path)


def _tree_entries(tree: Path) -> list[Entry] | None:
    """Every name `mkfs -d` copied from `tree`, read from the tree (no mount, no root), with
    debugfs refs by path; None when a name holds a newline, which a debugfs script cannot."""
    entries = [Entry("<2>", True, FIXED_TIME, "")]

    def fail(error: OSError) -> None:
        raise InvalidInputError(f"The tree {tree} cannot be read: {error}.")

    for dirpath, dirnames, filenames in os.walk(tree, onerror=fail):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, tree)
            if "\n" in rel:
                return None
            st = os.lstat(path)
            ref = '"/' + rel.replace('"', '""') + '"'
            entries.append(Entry(ref, stat.S_ISDIR(st.st_mode), st.st_mtime_ns // 10**9, rel))
    return entries


def _tree_mtime(entry: Entry, tree: Path) -> Entry:
    if entry.is_dir:
        return entry
    mtime = os.lstat(tree / entry.path).st_mtime_ns // 10**9
    return Entry(entry.ref, entry.is_dir, mtime, entry.path)


def inode_mtimes(entries: Sequence[Entry]) -> dict[str, int]:
    """The mtime each inode gets: its own for files, symlinks and devices; for a directory,
    the newest mtime of anything beneath it (FIXED_TIME when there is nothing)."""
    newest: dict[str, int] = {}
    for e in entries:
        parent = "" if e.is_dir else e.path
        while parent:
            parent = posixpath.dirname(parent)
            newest[parent] = max(newest.get(parent, e.mtime), e.mtime)
    return {e.ref: newest.get(e.path, FIXED_TIME) if e.is_dir else e.mtime for e in entries}


def _normalize(image: Path, tree: Path, entries: Sequence[Entry], *, mounted: bool) -> None:
    root = tree.stat()
    lines = [f"sif <2> mode 0{root.st_mode:o}", f"sif <2> uid {root.st_uid}"]
    lines.append(f"sif <2> gid {root.st_gid}")
    for ref, mtime in inode_mtimes(entries).items():
        if mounted:  # the kernel wrote nanoseconds, crtime and i_version; mkfs -d does not
            # An _extra word holds nanoseconds and epoch bits: zero it, then set the time.
            lines += [f"sif {ref} {field}_extra 0" for field in ("mtime", "atime", "ctime")]
            lines += [f"sif {ref} crtime_extra 0", f"sif {ref} crtime @{FIXED_TIME}"]
            lines.append(f"sif {ref} version 0")
        lines += [f"sif {ref} {field} @{mtime}" for field in ("mtime", "atime", "ctime")]
    if mounted:  # undo what mounting wrote into the superblock
        lines += ["ssv mtime 0", "ssv mnt_count 0", 'ssv last_mounted ""', "ssv kbytes_written 0"]
    with tempfile.NamedTemporaryFile("wb", prefix="imageswarm-debugfs-") as script:
        script.write(os.fsencode("\n".join(lines) + "\n"))  # file names are bytes
        script.flush()
        argv = ["debugfs", "-w", "-f", script.name, str(image)]
        proc = _tool(argv, "Setting inode times", _CLOCK)
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if errors:
        raise ToolError(f"debugfs could not set inode times: {'; '.join(errors[:3])}.")


def _too_small(tree: Path, size_mib: int) -> str:
    used = sum(
        os.lstat(os.path.join(d, name)).st_blocks * 512
        for d, dirs, files in os.walk(tree)
        for name in dirs + files
    )
    return (
        f"The tree {tree} ({used / _MIB:.0f} MiB of files) does not fit in a {size_mib} MiB "
        "ext4 image; give a larger size."
    )


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="surrogateescape",  # file names are bytes
            env={**os.environ, **(env or {})},
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as e:
        raise ToolError(f"{argv[0]} is not installed; building images needs it.") from e
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{argv[0]} did not finish within {_TIMEOUT:.0f} s.") from e


def _tool(
    argv: list[str], what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = _run(argv, env)
    if proc.returncode != 0:
        raise ToolError(f"{what} failed: {argv[0]}: {_tail(proc.stderr or proc.stdout)}.")
    return proc


def _tail(output: str, count: int = 3) -> str:
    text = output.encode(errors="surrogateescape").decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-count:]).rstrip(".") or "no output"
