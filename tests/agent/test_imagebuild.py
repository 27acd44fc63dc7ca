"""Building ext4 images: byte-reproducible from scratch, the same files when built on the
previous image, small deltas when built on it, and refusals that leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageswarm.agent import keys
from imageswarm.agent.chunking import META_BLOCK
from imageswarm.agent.errors import InvalidInputError
from imageswarm.agent.imagebuild import DEFAULT_UUID, FIXED_TIME, build_ext4
from imageswarm.agent.manifest import Manifest
from imageswarm.agent.store import Store
from imageswarm.daemon.publish import publish
from tests.agent.roots import Namespace, mount_readonly
from tests.conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]

MIB = 1 << 20
SIZE = 32  # MiB
BIG = "usr/lib/libbig.so"
INSERTED = "boot/aaa-config"  # first in mkfs -d's (sorted) order


def write(path: Path, data: bytes, mode: int = 0o644, mtime: float = 1_650_000_000.25) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(int(mtime * 1e9), int(mtime * 1e9)))


def stamp(*paths: Path, mtime: float = 1_650_000_000.75) -> None:
    """Give symlinks, devices and the like a known mtime (not when the test made them)."""
    for path in paths:
        os.utime(path, ns=(int(mtime * 1e9),) * 2, follow_symlinks=False)


def posix_acl(user: int, perms: int) -> bytes:
    """A system.posix_acl_access value: owner rw, one named user, group r, mask, other none."""
    entries = [(0x01, 6, -1), (0x02, perms, user), (0x04, 4, -1), (0x10, perms | 4, -1)]
    entries.append((0x20, 0, -1))
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident & 0xFFFFFFFF) for tag, perm, ident in entries
    )


def os_tree(root: Path) -> None:
    """What an OS image must carry: owners, modes, setuid, ACLs, xattrs, hard links, symlinks,
    devices, a FIFO, a sparse file, empty directories, mtimes with nanoseconds."""
    rng = random.Random(5)
    write(root / BIG, rng.randbytes(MIB))
    for i in range(40):
        write(root / f"usr/share/data/f{i:03d}", rng.randbytes(rng.randint(2_000, 60_000)))
    write(root / "etc/app.conf", b"setting = 1\n")
    write(root / "etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640)
    os.chown(root / "etc/shadow", 0, 42)
    write(root / "usr/bin/su", rng.randbytes(30_000), 0o4755)
    write(root / "usr/bin/gzip", rng.randbytes(20_000), 0o755)
    os.link(root / "usr/bin/gzip", root / "usr/bin/gunzip")
    os.symlink("gzip", root / "usr/bin/zcat")
    os.symlink("/usr/share/data", root / "data")
    write(root / "home/user/notes", b"mine\n", 0o600)
    os.chown(root / "home/user/notes", 1234, 5678)
    os.chown(root / "home/user", 1234, 5678)
    os.setxattr(root / "usr/bin/su", "user.origin", b"v1")
    os.setxattr(root / "etc/app.conf", "system.posix_acl_access", posix_acl(1234, 4))
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(root / "dev/initctl", 0o600)
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/lastlog").touch()
    os.truncate(root / "var/log/lastlog", 8 * MIB)  # sparse: 8 MiB of nothing
    stamp(root / "usr/bin/zcat", root / "data", root / "var/log/lastlog", *root.glob("dev/*"))
    (root / "var/empty").mkdir(mode=0o700)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)


def change_big(root: Path) -> None:
    write(root / BIG, random.Random(6).randbytes(MIB), mtime=1_700_000_123.5)


def insert_first(root: Path) -> None:
    write(root / INSERTED, random.Random(7).randbytes(MIB), mtime=1_700_000_456.5)


def many_changes(root: Path) -> None:
    """v2 of the OS tree: every kind of change rsync must get right."""
    change_big(root)
    insert_first(root)
    (root / "usr/share/data/f005").unlink()
    (root / "etc/app.conf").chmod(0o600)
    os.chown(root / "usr/share/data/f010", 99, 99)
    (root / "usr/bin/zcat").unlink()
    os.symlink("gunzip", root / "usr/bin/zcat")
    (root / "usr/bin/gunzip").unlink()  # the hard link broken: its own content now
    write(root / "usr/bin/gunzip", b'#!/bin/sh\nexec gzip -d "$@"\n', 0o755)
    os.link(root / "usr/share/data/f001", root / "usr/share/data/f001.alias")
    os.setxattr(root / "usr/bin/su", "user.origin", b"v2")
    (root / "usr/share/data/f020").unlink()  # a file becomes a directory
    write(root / "usr/share/data/f020/inside", b"now a directory\n")
    os.mknod(root / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    stamp(root / "usr/bin/zcat", root / "dev/zero")


@dataclass(frozen=True)
class Built:
    tree: Path  # v2's tree
    v1: Path
    v2_scratch: Path
    v2_on_base: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("imagebuild")
    tree = work / "tree"
    os_tree(tree)
    build_ext4(tree, work / "v1.img", SIZE)
    many_changes(tree)
    build_ext4(tree, work / "v2-scratch.img", SIZE)
    build_ext4(tree, work / "v2-on-base.img", SIZE, base=work / "v1.img")
    return Built(tree, work / "v1.img", work / "v2-scratch.img", work / "v2-on-base.img")


def digest(root: Path, *, dir_mtimes: bool = True) -> dict[str, object]:
    """Every name's type, mode, owner, mtime, xattrs and content (hash, link target, device
    number), and which names are hard links of one another; lost+found left out."""
    names = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        names += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames]
    out: dict[str, object] = {}
    links: dict[int, list[str]] = {}
    for rel in names:
        path = os.path.join(root, rel)
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                detail: object = hashlib.file_digest(f, "sha256").hexdigest()
            if st.st_nlink > 1:
                links.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            detail = os.readlink(path)
        else:
            detail = st.st_rdev
        xattrs = sorted(
            (key, os.getxattr(path, key, follow_symlinks=False))
            for key in os.listxattr(path, follow_symlinks=False)
        )
        keep_mtime = dir_mtimes or not stat.S_ISDIR(st.st_mode)
        mtime = st.st_mtime_ns // 1_000_000_000 if keep_mtime else None
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, mtime, detail, xattrs)
    out["hard links"] = sorted(sorted(group) for group in links.values())
    return out


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.close()


def test_the_same_tree_gives_byte_identical_images(built: Built, tmp_path: Path) -> None:
    """Even from a copy of the tree (same content, owners and mtimes; new ctimes, atimes)."""
    copy = tmp_path / "copy"
    time.sleep(1)  # a new second: mkfs -d copies each file's ctime into its inode
    subprocess.run(["cp", "-a", str(built.tree), str(copy)], check=True)
    ctime = os.lstat(built.tree / BIG).st_ctime_ns // 1_000_000_000
    assert os.lstat(copy / BIG).st_ctime_ns // 1_000_000_000 != ctime
    again = tmp_path / "again.img"
    build_ext4(copy, again, SIZE)
    assert again.read_bytes() == built.v2_scratch.read_bytes()
    other = tmp_path / "other.img"
    fs_uuid = uuid.UUID("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
    build_ext4(built.tree, other, SIZE, fs_uuid=fs_uuid)
    assert uuid_of(other) == fs_uuid and uuid_of(again) == DEFAULT_UUID


def uuid_of(image: Path) -> uuid.UUID:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Filesystem UUID:"))
    return uuid.UUID(line.split(":", 1)[1].strip())


def test_an_image_built_on_the_base_has_the_same_files_as_one_from_scratch(
    built: Built, ns: Namespace, tmp_path: Path
) -> None:
    scratch = mount_readonly(ns, built.v2_scratch, tmp_path / "scratch")
    on_base = mount_readonly(ns, built.v2_on_base, tmp_path / "on-base")
    assert digest(on_base) == digest(scratch)
    # ... and they are the tree: owners, modes, ACLs, xattrs, links, devices, file mtimes.
    assert digest(scratch, dir_mtimes=False) == digest(built.tree, dir_mtimes=False)
    assert digest(scratch)["hard links"] == [["usr/share/data/f001", "usr/share/data/f001.alias"]]
    assert os.lstat(scratch / "var/log/lastlog").st_blocks == 0  # still sparse
    # A directory's mtime is the newest mtime beneath it; an empty one's is fixed.
    assert os.lstat(scratch / "boot").st_mtime == 1_700_000_456
    assert os.lstat(scratch).st_mtime == 1_700_000_456
    assert os.lstat(scratch / "var/empty").st_mtime == FIXED_TIME


@pytest.mark.parametrize("newline", [False, True], ids=["names debugfs can quote", "newline"])
def test_odd_file_names_get_their_times_too(tmp_path: Path, ns: Namespace, newline: bool) -> None:
    """Times are set by path (no mount) unless a name holds a newline (then by inode number,
    from a read-only mount)."""
    tree = os.fsencode(tmp_path / "tree")
    names = [b"a b", b'q"uote', b"back\\slash", b"tab\there", b"\xff\xfe", b"-dash"]
    for name in [*names, b"new\nline"] if newline else names:
        write(Path(os.fsdecode(tree + b"/dir with space/" + name)), name, mtime=1_600_000_000.5)
    image = tmp_path / "odd.img"
    build_ext4(tmp_path / "tree", image, 16)
    mounted = mount_readonly(ns, image, tmp_path / "mnt")
    assert digest(mounted, dir_mtimes=False) == digest(tmp_path / "tree", dir_mtimes=False)
    for name in names:
        st = os.lstat(os.fsencode(mounted / "dir with space") + b"/" + name)
        assert st.st_atime == st.st_ctime == st.st_mtime == 1_600_000_000, name
    assert os.lstat(mounted / "dir with space").st_mtime == 1_600_000_000


def test_every_image_passes_e2fsck(built: Built) -> None:
    for image in (built.v1, built.v2_scratch, built.v2_on_base):
        check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def new_chunk_ranges(v1: Manifest, v2: Manifest) -> list[tuple[int, int]]:
    old = {c.hash for c in v1.chunks if c.hash}
    ranges, offset = [], 0
    for chunk in v2.chunks:
        if chunk.hash and chunk.hash not in old:
            ranges.append((offset, offset + chunk.length))
        offset += chunk.length
    return ranges


def file_ranges(image: Path, path: str) -> list[tuple[int, int]]:
    """Where a file's data lies in the image (4 KiB blocks, as debugfs lists them)."""
    out = subprocess.run(
        ["debugfs", "-R", f"blocks /{path}", str(image)], capture_output=True, text=True
    ).stdout
    return [(int(b) * 4096, (int(b) + 1) * 4096) for b in out.split()]


@pytest.mark.parametrize(("change", "path"), [(change_big, BIG), (insert_first, INSERTED)])
def test_a_one_file_change_built_on_the_base_costs_the_file_and_a_few_4k_blocks(
    tmp_path: Path, change: Callable[[Path], None], path: str
) -> None:
    tree = tmp_path / "tree"
    os_tree(tree)
    v1, v2 = tmp_path / "v1.img", tmp_path / "v2.img"
    build_ext4(tree, v1, SIZE)
    change(tree)
    build_ext4(tree, v2, SIZE, base=v1)
    store = Store.open(tmp_path / "store")
    key = keys.generate(tmp_path / "key")
    first = publish(v1, "v1", store, key).manifest
    second = publish(v2, "v2", store, key)
    assert second.new_bytes <= 1.5 * MIB, second.new_bytes
    data = file_ranges(v2, path)
    assert sum(end - start for start, end in data) == MIB
    metadata = [
        (start, end)
        for start, end in new_chunk_ranges(first, second.manifest)
        if not any(start < d_end and d_start < end for d_start, d_end in data)
    ]
    # What changed with the file (its inode, its directory, bitmaps): whole 4 KiB blocks.
    assert all(end - start == META_BLOCK and start % META_BLOCK == 0 for start, end in metadata)
    assert len(metadata) <= 32, metadata


def test_content_mtimes_keep_the_bases_mtime_for_unchanged_content(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write(tree / "etc/same", b"same bytes\n", mtime=1_600_000_000)
    write(tree / "etc/changed", b"v1\n", mtime=1_600_000_000)
    v1 = tmp_path / "v1.img"
    build_ext4(tree, v1, 16)
    write(tree / "etc/same", b"same bytes\n", mtime=1_650_000_000)  # rewritten, same content
    write(tree / "etc/changed", b"v2\n", mtime=1_650_000_000)
    build_ext4(tree, tmp_path / "tree.img", 16, base=v1)
    build_ext4(tree, tmp_path / "content.img", 16, base=v1, mtimes="content")
    assert debugfs_mtime(tmp_path / "tree.img", "etc/same") == 1_650_000_000
    assert debugfs_mtime(tmp_path / "content.img", "etc/same") == 1_600_000_000
    assert debugfs_mtime(tmp_path / "content.img", "etc/changed") == 1_650_000_000
    assert debugfs_mtime(tmp_path / "content.img", "etc") == 1_650_000_000


def debugfs_mtime(image: Path, path: str) -> int:
    out = subprocess.run(
        ["debugfs", "-R", f"stat /{path}", str(image)], capture_output=True, text=True
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("mtime:"))
    seconds, extra = line.split()[1].split(":")
    assert int(extra, 16) == 0  # no nanoseconds
    return int(seconds, 16)


@dataclass(frozen=True)
class Bad:
    name: str
    match: str
    size_mib: int = 16
    tree: str = "tree"
    base: str | None = None


BAD = [
    Bad("missing tree", "is not a directory", tree="nowhere"),
    Bad("size below the minimum", "at least 8 MiB", size_mib=4),
    Bad("tree too big for the size", "does not fit in a 16 MiB", tree="big-tree"),
    Bad("tree too big for the base's size", "does not fit in a 16 MiB", tree="big-tree", base="v1"),
    Bad("base that is not ext4", "is not an ext4 filesystem image", base="notes.txt"),
    Bad("base larger than the size", "cannot be smaller", size_mib=8, base="v1"),
    Bad("base with another UUID", "keeps its UUID", base="v1-other-uuid"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_bad_input_is_refused_clearly_and_leaves_nothing_behind(
    tmp_path: Path, bad: Bad, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "tree/etc/os-release", b'NAME="test"\n')
    write(tmp_path / "big-tree/blob", random.Random(1).randbytes(20 * MIB))
    build_ext4(tmp_path / "tree", tmp_path / "v1", 16)
    other = uuid.UUID("11111111-2222-4333-8444-555555555555")
    build_ext4(tmp_path / "tree", tmp_path / "v1-other-uuid", 16, fs_uuid=other)
    (tmp_path / "notes.txt").write_text("not an image\n" * 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    scratch = tmp_path / "tmp"  # where the builder makes its mount point
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(InvalidInputError, match=bad.match):
        build_ext4(
            tmp_path / bad.tree,
            out_dir / "v2.img",
            bad.size_mib,
            base=tmp_path / bad.base if bad.base else None,
            fs_uuid=DEFAULT_UUID if bad.base else None,
        )
    assert list(out_dir.iterdir()) == []  # no image, no partial file
    assert list(scratch.iterdir()) == []  # no mount point
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):  # no mount, in any namespace
        try:
            text = mountinfo.read_bytes()
        except OSError:  # the process exited meanwhile
            continue
        assert str(tmp_path).encode() not in text, mountinfo
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True)
    assert str(tmp_path).encode() not in loops.stdout


def test_the_cli_builds_on_a_base_and_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    write(tmp_path / "tree/etc/os-release", b'NAME="test"\n')
    cli = [sys.executable, "-m", "imageswarm.daemon.cli.main", "image", "build"]
    v1 = [*cli, str(tmp_path / "tree"), str(tmp_path / "v1.img"), "--size-mib", "16"]
    done = subprocess.run(v1, capture_output=True, text=True)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr
    write(tmp_path / "tree/etc/motd", b"hello\n")
    v2 = [*cli, str(tmp_path / "tree"), str(tmp_path / "v2.img"), "--size-mib", "16"]
    done = subprocess.run([*v2, "--base", str(tmp_path / "v1.img")], capture_output=True, text=True)
    assert done.returncode == 0 and "on " in done.stdout, done.stderr
    shutil.copyfile(tmp_path / "tree/etc/motd", tmp_path / "notes")
    v3 = [*cli, str(tmp_path / "tree"), str(tmp_path / "v3.img"), "--size-mib", "16"]
    bad = subprocess.run([*v3, "--base", str(tmp_path / "notes")], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("imageswarm: error: The base image"), bad.stderr
    assert not (tmp_path / "v3.img").exists()
