"""Delta: what a node holding v1 downloads for v2, as a ratio to the image and to the ideal.

Each case builds a v1 tree and a v2 tree, makes an image of each (ext4 with imageswarm's
builder, `imageswarm.agent.imagebuild`: v1 from scratch, v2 on v1's image, as an image pipeline
would; tar for case c too), publishes both into one store and counts the bytes of v2's unique
chunks that v1 did not have: what a node holding v1 must download. The ideal is the bytes of v2
files whose content is new (defined exactly under the table). Then a real controller and a real
node daemon on loopback fetch v1 and v2 over the swarm, and the node's `bytes_by_source` for v2
gives the bytes it really received.

Cases (issue 5): (a) one 1 MiB file changed, (b) a package-sized change (300 files, about
30 MiB, upgraded), (c) a 1 MiB file inserted first in the build order (so every later file and
inode moves in ext4, and every later byte shifts in tar), (d) a Debian minbase rebuilt with one
more package (debootstrap through the apt mirror, cached under .lab/cache/debootstrap), (d2) the
same minbase with that package installed into a copy of v1's tree with `dpkg -i` instead (the
.deb from the same cache), as an image pipeline would: unchanged files keep their mtimes.

Where the new chunks lie is shown by kind (file content, directories, inode tables, ...), and
other ways of building and cutting the images are measured alongside: for ext4, plain
`mkfs.ext4 -d` with metadata cut by FastCDC 4/8/64 KiB (how the project built and cut images
before its builder; files segmented as `chunking.segments` does now), the builder with v2 from
scratch, v2 on v1 with `--mtimes content`, v2 on v1 with metadata cut by FastCDC instead of
4 KiB blocks, and v2 on v1 with every file a segment of its own (files under 16 KiB not merged
even with each other); for tar, GNU tar's default pax headers (with each member's atime and
ctime) against the ones the table uses (without). On both formats, the table's images cut as
before the current default (files under 16 KiB merged with adjacent file data of any size; now
they are merged only with each other) and three candidate cuts that were measured and not
adopted (docs/benchmarks.md, Delta): runs of small files in content-defined groups of whole
files, or cut by FastCDC 4/16/64 KiB instead of merged; and metadata cut into 1 KiB pieces.

    .venv/bin/python tests/bench/bench_delta.py [--mib 512] [--only a --only d2] [--no-wire]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import fcntl
import hashlib
import itertools
import math
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from pyfastcdc import FastCDC

if not __package__:  # run as a script: make the repository's `tests.bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imageswarm.agent import chunking, imagebuild
from imageswarm.agent.chunkhash import MAX_CHUNK, pieces_root
from imageswarm.agent.manifest import Manifest
from imageswarm.agent.store import Store
from imageswarm.daemon.localcluster import LocalCluster, make_tree
from imageswarm.daemon.publish import publish
from tests.bench.benchkit import (
    MIB,
    can_use_scratch_fs,
    describe_fs,
    enter_private_namespace,
    load_average,
    machine_line,
    markdown_table,
    scratch_fs,
    signing_key,
)

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
#: The package of case b: this many files of 1-200 KiB (about 30 MiB), all rewritten in v2.
PACKAGE_FILES = 300
PACKAGE_DIR = "usr/lib/pkg"
#: Case c's file: first in mkfs's (sorted) order and first in a `tar --sort=name` archive.
INSERTED = "boot/config-6.1.0-demo-amd64"
#: Loopback addresses of the wire measurement: a controller and a node from 127.0.0.150 on;
#: consecutive cases alternate between .150-.153 and .154-.157, so no case reuses the ports of
#: daemons that were stopped just before it.
WIRE_BASE = 150
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: Every case, in the order of a default run.
CASES = ("a", "b", "c", "d", "d2")

# Kinds of bytes in an image, for "where the new chunks lie".
NEW_DATA = "new file content"
OLD_DATA = "unchanged file content"
DIRS = "directories"
INODES = "inode tables"
HEADERS = "superblocks, group descriptors, bitmaps"
JOURNAL = "journal"
TAR_HEADERS = "tar headers"
OTHER = "other (free space, extent blocks)"
KINDS = (NEW_DATA, OLD_DATA, DIRS, INODES, HEADERS, JOURNAL, TAR_HEADERS, OTHER)


# --- trees -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trees:
    v1: Path
    v2: Path
    #: What v2 is, as shown in the table.
    label: str


def write_package(root: Path, seed: int) -> None:
    """PACKAGE_FILES random files of 1-200 KiB under PACKAGE_DIR (replacing any there)."""
    rng = random.Random(seed)
    pkg = root / PACKAGE_DIR
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    for i in range(PACKAGE_FILES):
        (pkg / f"part{i:03d}.bin").write_bytes(rng.randbytes(rng.randint(KIB, 200 * KIB)))


def base_tree(root: Path, mib: int, fill: float, seed: int) -> None:
    """make_tree's random files plus a package, filling about `fill` of a `mib` MiB image."""
    fixed_kib = 4 * 1024 + 64 + PACKAGE_FILES * 100.5  # big files, kernel, package
    make_tree(root, files=max(1, round((fill * mib * KIB - fixed_kib) / 128.5)), seed=seed)
    write_package(root, seed)


def copy_tree(src: Path, dst: Path) -> None:
    """v2 starts as v1: same content, owners and times (a rebuild from an unchanged checkout)."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def synthetic_trees(case: str, work: Path, mib: int, seed: int) -> Trees:
    v1, v2 = work / "v1", work / "v2"
    base_tree(v1, mib, 0.6, seed)
    copy_tree(v1, v2)
    rng = random.Random(seed + 1)
    if case == "a":
        big = v2 / "usr/lib/big0.so"
        big.write_bytes(rng.randbytes(big.stat().st_size))
        return Trees(v1, v2, "one 1 MiB file changed")
    if case == "b":
        write_package(v2, seed + 1000)
        return Trees(v1, v2, f"package upgraded: {PACKAGE_FILES} files, ~30 MiB rewritten")
    (v2 / INSERTED).write_bytes(rng.randbytes(MIB))
    return Trees(v1, v2, f"1 MiB file inserted first (/{INSERTED})")


def debian_trees(cache: Path, work: Path, suite: str, package: str) -> Trees:
    """A Debian minbase and a rebuild of it with one more package, both cached; or, when
    debootstrap cannot run, this machine's own files of its required packages (labelled)."""
    try:
        v1 = debootstrap(cache, suite, None)
        v2 = debootstrap(cache, suite, package)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        print(f"debootstrap failed, falling back to host files: {detail}", file=sys.stderr)
        return host_trees(work, package, f"debootstrap failed: {str(detail).strip()[-200:]}")
    return Trees(v1, v2, f"Debian {suite} minbase rebuilt with `{package}`")


def debootstrap(cache: Path, suite: str, package: str | None) -> Path:
    """`debootstrap --variant=minbase` (plus `--include=package`) into the cache, once.

    Both builds share one .deb cache, so the rebuild downloads only the extra package. The
    .debs left in the tree's /var/cache/apt/archives are removed, as `apt-get clean` would in
    an image build. debootstrap mounts /proc and /sys inside the tree, so it runs in a mount
    namespace of its own: those mounts disappear with it, even when it fails.
    """
    base = cache / "debootstrap"
    name = f"{suite}-minbase" + (f"+{package}" if package else "")
    tree = base / name
    if tree.is_dir():
        return tree
    if shutil.which("debootstrap") is None:
        print("installing debootstrap with apt-get", file=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "debootstrap"],
            check=True,
            capture_output=True,
            text=True,
        )
    debs = base / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    part = base / f".{name}.part"
    shutil.rmtree(part, ignore_errors=True)
    argv = ["unshare", "--mount", "--propagation", "private", "--", "debootstrap"]
    argv += ["--variant=minbase", f"--cache-dir={debs.resolve()}"]
    argv += [f"--include={package}"] if package else []
    argv += [suite, str(part), DEBIAN_MIRROR]
    print(f"building {name} (cached in {tree}): {' '.join(argv[5:])}", file=sys.stderr)
    subprocess.run(argv, check=True, capture_output=True, text=True)
    for deb in (part / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    part.rename(tree)
    return tree


def installed_trees(cache: Path, suite: str, package: str) -> Trees:
    """Case d2: the cached minbase (v1) and a copy of it with `package` installed by dpkg (v2),
    both cached. No fallback: when the trees cannot be made, the run stops with the reason."""
    try:
        v1 = debootstrap(cache, suite, None)
        v2 = install_into_copy(cache, v1, suite, package)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        why = f"case d2: cannot install {package} into a copy of the {suite} minbase: {detail}"
        raise SystemExit(why) from exc
    label = f"Debian {suite} minbase + `{package}` installed into v1's tree with dpkg"
    return Trees(v1, v2, label)


def install_into_copy(cache: Path, v1: Path, suite: str, package: str) -> Path:
    """`cp -a` of v1's tree with `package` installed by `dpkg -i` in a chroot, once.

    The .deb is the one debootstrap downloaded into the shared cache for case d (if it is not
    there, case d's rebuild is run to download it). It is copied into the tree's /tmp, installed
    in a chroot inside a mount namespace of its own (nothing is mounted there: installing `less`
    with dpkg -i needs no /proc), and removed again. The host's root is only read.
    """
    base = cache / "debootstrap"
    name = f"{suite}-minbase+{package}-installed"
    tree = base / name
    if tree.is_dir():
        return tree
    debs = base / "debs"
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        print(f"{package}'s .deb is not in {debs}: running case d's rebuild", file=sys.stderr)
        debootstrap(cache, suite, package)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if len(found) != 1:
        names = ", ".join(f.name for f in found) or "none"
        raise OSError(f"need exactly one {package}_*.deb in {debs}, found: {names}")
    deb = found[0]
    part = base / f".{name}.part"
    shutil.rmtree(part, ignore_errors=True)
    copy_tree(v1, part)
    inside = part / "tmp" / deb.name
    shutil.copyfile(deb, inside)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    argv = ["unshare", "--mount", "--propagation", "private", "--", "chroot", str(part)]
    argv += ["dpkg", "-i", f"/tmp/{deb.name}"]
    print(f"building {name} (cached in {tree}): {' '.join(argv[5:])}", file=sys.stderr)
    subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    inside.unlink()
    part.rename(tree)
    return tree


def host_trees(work: Path, package: str, why: str) -> Trees:
    """Fallback for case d: copies of this machine's files of its `required` packages (v1),
    and the same plus one more installed package (v2). Read from /, never written."""
    query = ["dpkg-query", "-W", "-f", "${Package}\t${Priority}\t${db:Status-Status}\n"]
    listing = subprocess.run(query, check=True, capture_output=True, text=True).stdout
    rows = [line.split("\t") for line in listing.splitlines()]
    installed = {r[0] for r in rows if r[2] == "installed"}
    required = sorted(r[0] for r in rows if r[1] == "required" and r[2] == "installed")
    extra = next(p for p in (package, "less", "curl", "rsync", "file") if p in installed)
    required = [p for p in required if p != extra]
    trees = []
    for name, packages in (("v1", required), ("v2", [*required, extra])):
        files = subprocess.run(
            ["dpkg-query", "-L", *packages], check=True, capture_output=True, text=True
        ).stdout
        paths = sorted({p[1:] for p in files.splitlines() if p.startswith("/") and p != "/"})
        tree = work / name
        tree.mkdir()
        pack = subprocess.Popen(
            ["tar", "-C", "/", "-cf", "-", "--no-recursion", "--ignore-failed-read", "-T", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        unpack = subprocess.Popen(["tar", "-C", str(tree), "-xf", "-"], stdin=pack.stdout)
        assert pack.stdin is not None and pack.stdout is not None
        pack.stdout.close()
        pack.stdin.write("\n".join(paths).encode())
        pack.stdin.close()
        pack.wait()
        unpack.wait()
        trees.append(tree)
    label = (
        f"FALLBACK, not Debian minbase ({why}): host files of {len(required)} packages, +{extra}"
    )
    return Trees(trees[0], trees[1], label)


# --- the ideal -------------------------------------------------------------------------------


def contents(tree: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and size of every regular file under `tree` by relative path (hard links once)."""
    out: dict[str, tuple[str, int]] = {}
    seen: set[int] = set()
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[os.path.relpath(path, tree)] = (digest, st.st_size)
    return out


def ideal_bytes(v1: dict[str, tuple[str, int]], v2: dict[str, tuple[str, int]]) -> tuple[int, int]:
    """(bytes, files): v2's regular files whose content no v1 regular file has; a content
    that several new files share counts once."""
    old = {digest for digest, _ in v1.values()}
    new = {digest: size for digest, size in v2.values() if digest not in old}
    files = sum(1 for digest, _ in v2.values() if digest not in old)
    return sum(new.values()), files


# --- images ----------------------------------------------------------------------------------


def build_image(fmt: str, tree: Path, image: Path, mib: int, base: Path | None = None) -> None:
    """The image of a tree as imageswarm builds it (ext4, on `base` if given), or as a tar."""
    if fmt == "tar":
        build_tar(tree, image, *TAR_REPRODUCIBLE)
    else:
        imagebuild.build_ext4(tree, image, mib, base=base)


#: pax (POSIX) headers, as `--xattrs` needs, without the atime and ctime that GNU tar then
#: adds to every member: they change on every build (see the "tar --xattrs" variant).
TAR_REPRODUCIBLE = ("--format=posix", "--pax-option=delete=atime,delete=ctime")


def build_tar(tree: Path, image: Path, *extra: str) -> None:
    """An uncompressed tar of the tree in name order (what publish accepts as a tar image)."""
    argv = ["tar", "--create", "--sort=name", "--numeric-owner", "--xattrs", *extra]
    subprocess.run([*argv, "--file", str(image), "-C", str(tree), "."], check=True)


def build_plain_mkfs(tree: Path, image: Path, mib: int) -> None:
    """What `build_ext4` did before the builder: `mkfs.ext4 -d`, a random UUID and hash seed,
    the tree's atimes and ctimes in the inodes, every build from scratch."""
    image.unlink(missing_ok=True)
    argv = ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree), str(image)]
    subprocess.run([*argv, f"{mib}M"], check=True, capture_output=True)


@contextlib.contextmanager
def fastcdc_metadata() -> Iterator[None]:
    """Publish with filesystem metadata cut as before: FastCDC 4/8/64 KiB, not 4 KiB blocks."""
    cdc = FastCDC(8 * KIB, min_size=4 * KIB, max_size=64 * KIB)

    def cuts(run: memoryview) -> list[tuple[int, int]]:
        return [(c.offset, c.length) for c in cdc.cut_buf(run)]

    with mock.patch.object(chunking, "_metadata_cuts", cuts):
        yield


@contextlib.contextmanager
def unmerged_small_files() -> Iterator[None]:
    """Publish with every file's data a segment of its own: runs of files under 16 KiB are no
    longer merged into one segment (more, smaller chunks). With MIN_CHUNK at 1 no segment is
    short, so `chunking.segments` merges nothing and every extent edge ends a segment."""
    merging = chunking.segments

    def segments(size: int, extents: Sequence[chunking.Span] | None) -> Segments:
        with mock.patch.object(chunking, "MIN_CHUNK", 1):  # read by segments() only
            return merging(size, extents)

    with mock.patch.object(chunking, "segments", segments):
        yield


def segments_before(size: int, extents: Sequence[chunking.Span] | None) -> Segments:
    """`chunking.segments` as it was before runs of small files were kept apart from larger
    files: file data shorter than MIN_CHUNK was merged with the adjacent file data whatever its
    size (and the segment after a short one into it), so a rewritten small file also changed
    the chunk of a large file beside it. Metadata was never merged into file data."""
    edges: dict[int, bool] = {0: False}
    for ext in extents or ():
        if ext.offset < size:
            edges[ext.offset] = True
        if 0 < ext.end < size:
            edges.setdefault(ext.end, False)
    ordered = sorted(edges.items())
    out: Segments = []
    for (start, is_file), (end, _) in itertools.pairwise([*ordered, (size, False)]):
        if end <= start:
            continue
        short = end - start < chunking.MIN_CHUNK or (
            out and out[-1][1] - out[-1][0] < chunking.MIN_CHUNK
        )
        if out and short and (is_file == out[-1][2] or extents is None):
            out[-1] = (out[-1][0], end, is_file)
        else:
            out.append((start, end, is_file))
    return out


@contextlib.contextmanager
def small_files_merged_before() -> Iterator[None]:
    """Publish with the table's images segmented as before the current default: files under
    16 KiB merged with adjacent file data of any size (`segments_before`)."""
    with mock.patch.object(chunking, "segments", segments_before):
        yield


#: How one run of an image (no holes in it) is cut: (start, length) of each piece in the run.
Cuts = Callable[[memoryview], list[tuple[int, int]]]
#: (start, end, how to cut it) of each segment of an image, in order, covering it.
Plan = list[tuple[int, int, Cuts]]
#: How a run of adjacent small files, given as its (start, end) extents, is segmented.
SmallFiles = Callable[[memoryview, list[tuple[int, int]]], Plan]
#: The group sizes of the `file_groups` candidate: a group ends at a file boundary once it
#: holds GROUP_MIN bytes, chosen by content, on average GROUP_AVG, never past GROUP_MAX.
GROUP_MIN, GROUP_AVG, GROUP_MAX = 16 * KIB, 32 * KIB, 64 * KIB


def fastcdc_cuts(min_size: int, avg_size: int, max_size: int) -> Cuts:
    cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)

    def cuts(run: memoryview) -> list[tuple[int, int]]:
        return [(c.offset, c.length) for c in cdc.cut_buf(run)]

    return cuts


def one_piece(run: memoryview) -> list[tuple[int, int]]:
    return [(0, len(run))]


def small_file_plan(
    image: memoryview, size: int, extents: Sequence[chunking.Span] | None, small: SmallFiles
) -> Plan:
    """Segments as `chunking.segments` makes them (file data of at least MIN_CHUNK cut alone by
    FastCDC 16/64/256 KiB, metadata in META_BLOCK pieces), except that each run of adjacent
    files under MIN_CHUNK is segmented by `small` instead of merged into one segment and cut by
    that FastCDC."""
    file_cuts = fastcdc_cuts(chunking.MIN_CHUNK, chunking.AVG_CHUNK, MAX_CHUNK)
    if extents is None:
        return [(0, size, file_cuts)]
    with mock.patch.object(chunking, "MIN_CHUNK", 1):  # a segment at every extent edge
        each = chunking.segments(size, extents)
    plan: Plan = []
    run: list[tuple[int, int]] = []
    for start, end, is_file in each:
        if is_file and end - start < chunking.MIN_CHUNK:
            run.append((start, end))  # segments are consecutive: adjacent to the run's last
            continue
        if run:
            plan += small(image, run)
            run = []
        plan.append((start, end, file_cuts if is_file else chunking._metadata_cuts))
    if run:
        plan += small(image, run)
    return plan


def _fraction(data: memoryview) -> float:
    """The content's SHA-256 read as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def file_groups(image: memoryview, run: list[tuple[int, int]]) -> Plan:
    """Adjacent small files in groups, each group one piece, ended only at file boundaries.

    A group ends after a file once it holds GROUP_MIN bytes and the file's own content chooses
    to (its hash, as a fraction, is below its size / (GROUP_AVG - GROUP_MIN)), or when the next
    file would take it past GROUP_MAX, or at the run's end. So a rewritten or removed file
    changes its own group, and the groups after it fall back into step at the next boundary
    chosen at least GROUP_MIN after the change."""
    plan: Plan = []
    first = run[0][0]
    for i, (start, end) in enumerate(run):
        if i + 1 < len(run) and run[i + 1][1] - first <= GROUP_MAX:
            if end - first < GROUP_MIN:
                continue
            with image[start:end] as data:
                if _fraction(data) >= (end - start) / (GROUP_AVG - GROUP_MIN):
                    continue
        plan.append((first, end, one_piece))
        first = end
    return plan


def planned_pieces(small: SmallFiles) -> Callable[..., Iterator[chunking.Piece]]:
    """`ImageReader.pieces`, with the segments and their cuts from `small_file_plan`."""

    def pieces(
        self: chunking.ImageReader, extents: Sequence[chunking.Span] | None = None
    ) -> Iterator[chunking.Piece]:
        if self._map is None:
            return
        hole: chunking.Span | None = None
        with memoryview(self._map) as whole_view:
            for seg_start, seg_end, cut in small_file_plan(whole_view, self.size, extents, small):
                self._hash_until(seg_end)
                segment = whole_view[seg_start:seg_end]
                for start, end, is_hole in chunking._zero_runs(segment, seg_start):
                    if is_hole:
                        if hole is not None and hole.end == seg_start + start:
                            hole = chunking.Span(hole.offset, hole.length + end - start)
                        else:
                            hole = chunking.Span(seg_start + start, end - start)
                        continue
                    if hole is not None:
                        yield chunking.Piece(hole.offset, hole.length, None, None)
                        hole = None
                    run = segment[start:end]
                    for offset, length in cut(run):
                        data = run[offset : offset + length]
                        name = pieces_root(data).hex()
                        yield chunking.Piece(seg_start + start + offset, length, name, data)
                        data.release()
                    run.release()
                segment.release()
        if hole is not None:
            yield chunking.Piece(hole.offset, hole.length, None, None)

    return pieces


@contextlib.contextmanager
def small_files_cut(small: SmallFiles) -> Iterator[None]:
    """Publish with files of 16 KiB or more cut alone (as by default) and runs of smaller files
    by `small`."""
    with mock.patch.object(chunking.ImageReader, "pieces", planned_pieces(small)):
        yield


@contextlib.contextmanager
def small_files_grouped() -> Iterator[None]:
    """Candidate: runs of small files in content-defined groups of whole files (16/32/64 KiB),
    one chunk each, instead of merged and cut by FastCDC 16/64/256 KiB."""
    with small_files_cut(file_groups):
        yield


@contextlib.contextmanager
def small_files_small_cdc() -> Iterator[None]:
    """Candidate: runs of small files merged and cut by a smaller FastCDC, 4/16/64 KiB, instead
    of the files' 16/64/256 KiB."""
    small = fastcdc_cuts(4 * KIB, 16 * KIB, 64 * KIB)
    with small_files_cut(lambda _image, run: [(run[0][0], run[-1][1], small)]):
        yield


@contextlib.contextmanager
def metadata_1k() -> Iterator[None]:
    """Candidate: filesystem metadata cut into 1 KiB pieces instead of 4 KiB blocks."""
    with mock.patch.object(chunking, "META_BLOCK", 1024):  # read by _metadata_cuts
        yield


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[str]:
    """The ext4 image mounted read-only (journal not replayed) on a temporary folder. Call in a
    private mount namespace."""
    mount_point = tempfile.mkdtemp(prefix="bench-delta-")
    subprocess.run(["mount", "-o", "loop,ro,noload", str(image), mount_point], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", mount_point], check=True)
        os.rmdir(mount_point)


# --- the delta in the store ------------------------------------------------------------------


def store_delta(v1: Path, v2: Path, store_dir: Path) -> tuple[Manifest, Manifest, int]:
    """Publish v1 then v2 into a fresh store: (v1's manifest, v2's, bytes of v2's new chunks)."""
    store = Store.open(store_dir)
    key = signing_key()
    first = publish(v1, "v1", store, key)
    second = publish(v2, "v2", store, key)
    return first.manifest, second.manifest, second.new_bytes


def unique_chunks(manifest: Manifest) -> int:
    return len({c.hash for c in manifest.chunks if c.hash})


def new_chunk_ranges(v1: Manifest, v2: Manifest) -> list[tuple[int, int]]:
    """(start, end) in v2 of the first copy of each v2 chunk that v1 does not have."""
    old = {c.hash for c in v1.chunks if c.hash}
    seen: set[str] = set()
    out = []
    offset = 0
    for chunk in v2.chunks:
        if chunk.hash and chunk.hash not in old and chunk.hash not in seen:
            seen.add(chunk.hash)
            out.append((offset, offset + chunk.length))
        offset += chunk.length
    return out


# --- where the new chunks lie ----------------------------------------------------------------

_FIEMAP = struct.Struct("=QQIIII")  # linux/fiemap.h: start, length, flags, mapped, count, pad
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_FS_IOC_FIEMAP = 0xC020660B
_GROUP_ITEM = re.compile(
    r"(superblock|Group descriptors|Reserved GDT blocks|Block bitmap|Inode bitmap|Inode table)"
    r" at (\d+)(?:-(\d+))?"
)
_EXTENT_MAP = re.compile(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?")

Label = tuple[int, int, str]  # [start, end) of the image, kind
Segments = list[tuple[int, int, bool]]


def fiemap(path: str) -> list[tuple[int, int]]:
    """(physical offset, length) of each extent of a file or directory."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    buf = bytearray(_FIEMAP.size + 256 * _FIEMAP_EXTENT.size)
    out: list[tuple[int, int]] = []
    try:
        start = 0
        while True:
            _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, 256, 0)
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP.unpack_from(buf)[3]
            if mapped == 0:
                return out
            for i in range(mapped):
                item = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP.size + i * _FIEMAP_EXTENT.size)
                logical, physical, length, flags = item
                out.append((physical, length))
            if flags & 1:  # FIEMAP_EXTENT_LAST
                return out
            start = logical + length
    finally:
        os.close(fd)


def ext4_labels(image: Path, files: dict[str, tuple[str, int]], old: set[str]) -> list[Label]:
    """Every known structure of an ext4 image, by kind: groups' metadata from dumpe2fs, the
    journal from debugfs, directories and files (new content or not) from FIEMAP on a
    read-only mount. Call in a private mount namespace."""
    text = subprocess.run(
        ["dumpe2fs", str(image)], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"^Block size:\s+(\d+)", text, re.MULTILINE)
    assert match is not None, "dumpe2fs printed no block size"
    bs = int(match.group(1))
    labels: list[Label] = []
    for m in _GROUP_ITEM.finditer(text):
        first, last = int(m.group(2)), int(m.group(3) or m.group(2))
        labels.append(
            (first * bs, (last + 1) * bs, INODES if m.group(1) == "Inode table" else HEADERS)
        )
    journal = subprocess.run(
        ["debugfs", "-R", "stat <8>", str(image)], check=True, capture_output=True, text=True
    ).stdout
    for m in _EXTENT_MAP.finditer(journal.split("EXTENTS:", 1)[-1]):
        first, last = int(m.group(3)), int(m.group(4) or m.group(3))
        labels.append((first * bs, (last + 1) * bs, JOURNAL))
    with mounted(image) as mount_point:
        seen: set[int] = set()
        for dirpath, _dirs, names in os.walk(mount_point):
            labels += [(p, p + n, DIRS) for p, n in fiemap(dirpath)]
            for name in names:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                known = files.get(os.path.relpath(path, mount_point))
                kind = OLD_DATA if known is not None and known[0] in old else NEW_DATA
                labels += [(p, p + n, kind) for p, n in fiemap(path)]
    return labels


def tar_labels(image: Path, files: dict[str, tuple[str, int]], old: set[str]) -> list[Label]:
    """Member data (new content or not) of a tar image, and the headers and padding before
    each member's data."""
    labels: list[Label] = []
    end = 0
    with tarfile.open(image) as archive:
        for member in archive:
            labels.append((end, member.offset_data, TAR_HEADERS))
            end = member.offset_data
            if member.isreg() and member.size:
                known = files.get(os.path.normpath(member.name))
                kind = OLD_DATA if known is not None and known[0] in old else NEW_DATA
                end += member.size
                labels.append((member.offset_data, end, kind))
    return labels


def breakdown(ranges: list[tuple[int, int]], labels: list[Label]) -> dict[str, int]:
    """Bytes of `ranges` by the kind of the labels they overlap; bytes no label covers are OTHER."""
    labels = sorted(labels)
    starts = [start for start, _, _ in labels]
    out = dict.fromkeys(KINDS, 0)
    for start, end in ranges:
        covered = 0
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(labels) and labels[i][0] < end:
            lo, hi = max(start, labels[i][0]), min(end, labels[i][1])
            if hi > lo:
                out[labels[i][2]] += hi - lo
                covered += hi - lo
            i += 1
        out[OTHER] += max(0, end - start - covered)
    return out


# --- bytes on the wire -----------------------------------------------------------------------


async def wire_bytes(root: Path, v1: Path, v2: Path, base: int) -> dict[str, int]:
    """A controller and one node on loopback; the node fetches v1, then v2 through its REST
    API; returns the v2 fetch's bytes_by_source."""
    cluster = LocalCluster(root, nodes=1, base=base)
    cluster.write_configs()
    cluster.start()
    try:
        await cluster.wait_ready()
        state: dict[str, Any] = {}
        for image in (v1, v2):
            published = await cluster.publish(image, image.stem)
            image_id = published["manifest"]["image_id"]
            state = (await cluster.fetch_all(image_id, seconds=600))["node1"]
            if state["state"] != "done":
                raise RuntimeError(f"fetch of {image.stem} {state['state']}: {state['error']}")
        return {k: int(v) for k, v in state["bytes_by_source"].items()}
    except BaseException:
        for d in cluster.daemons:
            with contextlib.suppress(OSError):
                print(f"--- {d.name} log ---\n{d.log_path.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        cluster.stop()


# --- one case --------------------------------------------------------------------------------

WIRE_SOURCES = ("controller", "peers", "web_seed", "unattributed")


@dataclass(frozen=True)
class Variant:
    """v1 and v2 built or cut another way."""

    new_bytes: int
    kinds: dict[str, int]
    chunks: int
    build_seconds: float


@dataclass
class Row:
    case: str
    change: str
    fmt: str
    image_size: int
    ideal: int
    new_files: int
    files: int
    new_bytes: int
    kinds: dict[str, int]
    chunks: int  # v2's unique chunks
    build_seconds: float  # v2's build
    wire: dict[str, int] | str | None = None
    variants: dict[str, Variant] = field(default_factory=dict)

    @property
    def wire_total(self) -> int | None:
        if not isinstance(self.wire, dict):
            return None
        return sum(self.wire.get(k, 0) for k in WIRE_SOURCES)


@dataclass(frozen=True)
class Options:
    mib: int
    seed: int
    wire: bool
    variants: bool
    cache: Path
    suite: str
    package: str


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Print how long `what` took (to stderr: the table stays clean)."""
    start = time.monotonic()
    yield
    print(f"  {what}: {time.monotonic() - start:.1f} s", file=sys.stderr)


def run_case(case: str, work: Path, opts: Options, base: int) -> list[Row]:
    with step(f"case {case}: trees"):
        if case == "d":
            trees = debian_trees(opts.cache, work, opts.suite, opts.package)
        elif case == "d2":
            trees = installed_trees(opts.cache, opts.suite, opts.package)
        else:
            trees = synthetic_trees(case, work, opts.mib, opts.seed)
    with step("content hashes (the ideal)"):
        before, after = contents(trees.v1), contents(trees.v2)
    ideal, new_files = ideal_bytes(before, after)
    old = {digest for digest, _ in before.values()}
    formats = ("ext4", "tar") if case == "c" else ("ext4",)
    rows = []
    for n, fmt in enumerate(formats):
        print(f"case {case} ({fmt}): {trees.label}", file=sys.stderr)
        v1, v2 = work / f"v1.{fmt}", work / f"v2.{fmt}"
        with step(f"build v1, then v2 on v1 ({fmt})"):
            build_image(fmt, trees.v1, v1, opts.mib)
            start = time.monotonic()
            build_image(fmt, trees.v2, v2, opts.mib, base=v1)
            build_seconds = time.monotonic() - start
        with step("publish v1 and v2 into one store"):
            first, second, new_bytes = store_delta(v1, v2, work / f"store-{fmt}")
        ranges = new_chunk_ranges(first, second)
        if sum(end - start for start, end in ranges) != new_bytes:
            print(f"note: new chunk ranges != new bytes in case {case}", file=sys.stderr)
        with step("where the new chunks lie"):
            labeller = tar_labels if fmt == "tar" else ext4_labels
            kinds = breakdown(ranges, labeller(v2, after, old))
        row = Row(
            case,
            trees.label,
            fmt,
            second.size,
            ideal,
            new_files,
            len(after),
            new_bytes,
            kinds,
            unique_chunks(second),
            build_seconds,
        )
        if opts.wire:
            with step("wire: controller + node fetch v1, then v2"):
                try:
                    lab = work / f"lab-{fmt}"
                    row.wire = asyncio.run(wire_bytes(lab, v1, v2, base + 2 * n))
                except Exception as exc:
                    row.wire = f"failed: {type(exc).__name__}: {exc}"[:300]
                    print(f"wire measurement of case {case} {row.wire}", file=sys.stderr)
                shutil.rmtree(work / f"lab-{fmt}", ignore_errors=True)
        if opts.variants:
            with step("other builds"):
                row.variants = variants(fmt, trees, (v1, v2), work, opts.mib, after, old)
        shutil.rmtree(work / f"store-{fmt}")
        rows.append(row)
    return rows


#: "(before)": how images were built and their metadata cut before the builder; their files are
#: segmented as `chunking.segments` does now.
PLAIN = "plain mkfs -d, v2 from scratch, metadata by FastCDC (before)"
SCRATCH = "imagebuild, v2 from scratch"
CONTENT = "imagebuild, v2 on v1, --mtimes content"
FASTCDC = "imagebuild, v2 on v1, metadata by FastCDC 4/8/64 KiB"
SMALL = "imagebuild, v2 on v1, small files cut at file boundaries"
TAR_XATTRS = "tar --xattrs (pax atime, ctime kept)"
Recut = Callable[[], contextlib.AbstractContextManager[None]]
#: Cuts measured on both formats (the table's own images, cut another way): the previous
#: default, then the candidates that were not adopted.
CANDIDATES: dict[str, Recut] = {
    "small files merged with neighbours of any size (before)": small_files_merged_before,
    "small files in content-defined groups of 16/32/64 KiB": small_files_grouped,
    "small files cut by FastCDC 4/16/64 KiB": small_files_small_cdc,
    "metadata cut at 1 KiB": metadata_1k,
}
#: The table's images cut another way, by variant name, and how.
RECUTS: dict[str, Recut] = {
    FASTCDC: fastcdc_metadata,
    SMALL: unmerged_small_files,
    **{f"imagebuild, v2 on v1, {cut}": recut for cut, recut in CANDIDATES.items()},
    **{f"pax, no atime/ctime, {cut}": recut for cut, recut in CANDIDATES.items()},
}
EXT4_VARIANTS = (PLAIN, SCRATCH, CONTENT, *(n for n in RECUTS if n.startswith("imagebuild")))
TAR_VARIANTS = (TAR_XATTRS, *(n for n in RECUTS if n.startswith("pax")))


def variants(
    fmt: str,
    trees: Trees,
    images: tuple[Path, Path],
    work: Path,
    mib: int,
    after: dict[str, tuple[str, int]],
    old: set[str],
) -> dict[str, Variant]:
    """New chunk bytes, where they lie and v2's chunk count when the images are built or cut
    otherwise."""
    out = {}
    for name in TAR_VARIANTS if fmt == "tar" else EXT4_VARIANTS:
        first, second = work / "v1.variant", work / "v2.variant"
        start = time.monotonic()
        if name == TAR_XATTRS:
            build_tar(trees.v1, first)
            start = time.monotonic()
            build_tar(trees.v2, second)
        elif name == PLAIN:
            build_plain_mkfs(trees.v1, first, mib)
            start = time.monotonic()
            build_plain_mkfs(trees.v2, second, mib)
        elif name == SCRATCH:
            shutil.copyfile(images[0], first)  # the builder's v1 from scratch, as in the table
            start = time.monotonic()
            imagebuild.build_ext4(trees.v2, second, mib)
        elif name == CONTENT:
            shutil.copyfile(images[0], first)
            start = time.monotonic()
            imagebuild.build_ext4(trees.v2, second, mib, base=first, mtimes="content")
        else:  # the table's images, cut another way
            shutil.copyfile(images[0], first)
            shutil.copyfile(images[1], second)
        seconds = time.monotonic() - start if name not in RECUTS else float("nan")
        with contextlib.ExitStack() as cuts:
            if name == PLAIN:
                cuts.enter_context(fastcdc_metadata())
            if name in RECUTS:
                cuts.enter_context(RECUTS[name]())
            m1, m2, new_bytes = store_delta(first, second, work / "store-variant")
        labeller = tar_labels if fmt == "tar" else ext4_labels
        kinds = breakdown(new_chunk_ranges(m1, m2), labeller(second, after, old))
        out[name] = Variant(new_bytes, kinds, unique_chunks(m2), seconds)
        first.unlink()
        second.unlink()
        shutil.rmtree(work / "store-variant")
    return out


# --- report ----------------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def ratio(n: int | None, d: int) -> str:
    return "" if n is None or d == 0 else f"{n / d:.2f}x"


def report(rows: list[Row], load_at_start: float, fs: str, seconds: float) -> str:
    main = []
    for r in rows:
        wire = r.wire_total
        wire_cell = r.wire if isinstance(r.wire, str) else "not measured"
        if wire is not None:
            wire_cell = mib(wire)
        main.append(
            [
                f"({r.case}) {r.change}",
                "ext4, v2 on v1" if r.fmt == "ext4" else r.fmt,
                f"{r.image_size / MIB:.0f}",
                f"{r.new_files} of {r.files}",
                mib(r.ideal),
                mib(r.new_bytes),
                f"{100 * r.new_bytes / r.image_size:.2f}%",
                ratio(r.new_bytes, r.ideal),
                wire_cell,
                ratio(wire, r.ideal),
                str(r.chunks),
            ]
        )
    header = [
        "case: v2 is v1 rebuilt with",
        "image",
        "image MiB",
        "files new",
        "ideal MiB",
        "new chunks MiB",
        "new / image",
        "new / ideal",
        "wire MiB",
        "wire / ideal",
        "v2 chunks",
    ]
    parts = [
        f"{machine_line(load_at_start)}; trees, images and stores on {fs}; {seconds:.0f} s",
        markdown_table(header, main),
    ]
    # Where the new chunks lie: each row's own build first, then the other builds and cuts.
    where: list[tuple[str, int, Variant]] = []
    for r in rows:
        build = "imagebuild, v2 on v1" if r.fmt == "ext4" else "pax, no atime/ctime"
        own = Variant(r.new_bytes, r.kinds, r.chunks, r.build_seconds)
        where.append((f"({r.case}) {r.fmt}, {build}", r.ideal, own))
    for r in rows:
        where += [(f"({r.case}) {r.fmt}, {name}", r.ideal, v) for name, v in r.variants.items()]
    shown = [k for k in KINDS if any(v.kinds[k] for *_, v in where)]
    cells = [
        [
            label,
            mib(v.new_bytes),
            ratio(v.new_bytes, ideal),
            str(v.chunks),
            "" if math.isnan(v.build_seconds) else f"{v.build_seconds:.1f}",
            *(mib(v.kinds[k]) for k in shown),
        ]
        for label, ideal, v in where
    ]
    header = ["case, build", "new chunks", "new / ideal", "v2 chunks", "v2 build s", *shown]
    parts.append("Where v2's new chunks lie (MiB), also when the images are built otherwise:")
    parts.append(markdown_table(header, cells))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=512, help="image size in MiB (default 512)")
    parser.add_argument("--only", action="append", choices=CASES, help="run only this case")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random trees")
    parser.add_argument("--no-wire", action="store_true", help="skip the real node fetch")
    parser.add_argument(
        "--no-variants", action="store_true", help="skip the other ways of building the images"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / ".lab/cache",
        help="where debootstrap trees and .debs are kept between runs (default .lab/cache)",
    )
    parser.add_argument("--suite", default="bookworm", help="Debian suite of cases d and d2")
    parser.add_argument("--package", default="less", help="the extra package of cases d and d2")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    parser.add_argument(
        "--fs",
        choices=("scratch", "workdir"),
        default="scratch",
        help="work on a fresh loop-mounted ext4 (default) or in the workdir's own filesystem",
    )
    args = parser.parse_args(argv)
    if not can_use_scratch_fs():
        print(
            "bench_delta needs root (mkfs -d, mounts, debootstrap, file extents)", file=sys.stderr
        )
        return 2
    enter_private_namespace()  # every mount made here (and by the daemons) stays private
    load_at_start = load_average()
    start = time.monotonic()
    opts = Options(
        args.mib,
        args.seed,
        not args.no_wire,
        not args.no_variants,
        args.cache.resolve(),
        args.suite,
        args.package,
    )
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir)))
        if args.fs == "scratch":
            work = stack.enter_context(scratch_fs(work, 16 * 1024))
        fs = describe_fs(work)
        for i, case in enumerate(args.only or CASES):
            case_dir = work / case
            case_dir.mkdir()
            rows += run_case(case, case_dir, opts, WIRE_BASE + 4 * (i % 2))
            shutil.rmtree(case_dir)
    print(report(rows, load_at_start, fs, time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
