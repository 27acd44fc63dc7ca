"""Image formats, completeness, conversion, kernels and file extents, on real images.

Images are built with mkfs.ext4 -d, qemu-img and tarfile; the extent tests loop-mount them
inside a private mount namespace (through file_extents) and so need root.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import struct
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageswarm.agent.errors import ImageFormatError, ToolError
from imageswarm.agent.extents import Extent, merge_extents
from imageswarm.agent.imagefile import (
    ImageFormat,
    boot_files,
    check_complete,
    convert_to_raw,
    detect_format,
    file_extents,
    kernel_releases,
    tar_member_extents,
)

RELEASE = "6.1.0-test-amd64"
FORMATS: list[tuple[str, ImageFormat]] = [("ext4", "raw"), ("qcow2", "qcow2"), ("tar", "tar")]
READABLE = [f for f in FORMATS if f[1] != "qcow2"]  # kernels are read from raw and tar
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="loop-mounting an image in a mount namespace needs root"
)


@dataclass(frozen=True)
class Images:
    files: dict[str, bytes]  # path relative to tree -> content, for every regular file
    sparse_data: bytes  # the data blocks of var/sparse.bin, without its holes
    ext4: Path
    qcow2: Path
    tar: Path


def _write(tree: Path, rel: str, data: bytes, files: dict[str, bytes]) -> None:
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    files[rel] = data


def _mkfs(tree: Path, image: Path, size: str = "64M") -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), size], check=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    base = tmp_path_factory.mktemp("images")
    tree, rng = base / "tree", random.Random(1)
    files: dict[str, bytes] = {}
    _write(tree, f"lib/modules/{RELEASE}/modules.dep", b"kernel/fs/ext4.ko:\n", files)
    _write(tree, f"boot/vmlinuz-{RELEASE}", rng.randbytes(100_000), files)
    _write(tree, f"boot/initrd.img-{RELEASE}", rng.randbytes(50_000), files)
    _write(tree, "boot/config-6.1.0-test-amd64", b"CONFIG_EXT4_FS=y\n", files)
    (tree / "boot/vmlinuz").symlink_to(f"vmlinuz-{RELEASE}")
    for i in range(30):
        _write(tree, f"usr/share/data/f{i:02}", rng.randbytes(rng.randint(1024, 256 * 1024)), files)
    _write(tree, "var/big.bin", rng.randbytes(2 * 1024 * 1024), files)
    # 600 data blocks between holes: more extents than one FIEMAP call returns (256).
    pieces = [rng.randbytes(1024) for _ in range(600)]
    with (tree / "var/sparse.bin").open("wb") as f:
        for i, piece in enumerate(pieces):
            os.pwrite(f.fileno(), piece, i * 2048)
        f.truncate(600 * 2048)
    files["var/sparse.bin"] = b"".join(piece + bytes(1024) for piece in pieces)
    ext4 = base / "root.img"
    _mkfs(tree, ext4)
    qcow2 = base / "root.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(ext4), str(qcow2)], check=True
    )
    tar = base / "root.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(tree, arcname=".")
    return Images(files, b"".join(pieces), ext4, qcow2, tar)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _truncated(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def _mbr_disk(path: Path, partitions: list[tuple[int, int, int]], size: int) -> Path:
    """A disk image with an MBR holding (type, first sector, sectors) entries."""
    head = bytearray(512)
    for i, (ptype, start, sectors) in enumerate(partitions):
        struct.pack_into("<B3xBxxxII", head, 446 + 16 * i, 0, ptype, start, sectors)
    head[510:512] = b"\x55\xaa"
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


# detect_format


@pytest.mark.parametrize(("name", "expected"), FORMATS)
def test_detect_format_recognises_each_format_by_content(
    images: Images, name: str, expected: ImageFormat
) -> None:
    assert detect_format(getattr(images, name)) == expected


def test_detect_format_recognises_a_partitioned_disk(tmp_path: Path) -> None:
    disk = _mbr_disk(tmp_path / "disk.img", [(0x83, 2048, 2048)], 2 * 1024 * 1024)
    assert detect_format(disk) == "raw"
    check_complete(disk, "raw")


def test_detect_format_recognises_a_tar_without_ustar_magic(images: Images, tmp_path: Path) -> None:
    data = bytearray(images.tar.read_bytes())
    data[257:265] = bytes(8)  # what a pre-POSIX (v7) tar has there
    data[148:156] = b"        "  # the checksum is summed with its own field as spaces
    data[148:156] = b"%06o\0 " % sum(data[:512])
    old = tmp_path / "v7.tar"
    old.write_bytes(data)
    assert detect_format(old) == "tar"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.bin", random.Random(2).randbytes(64 * 1024)),
        ("empty.img", b""),
        ("notes.txt", b"These are not the bytes you are looking for.\n" * 100),
        ("zeros.img", bytes(8192)),
    ],
)
def test_detect_format_refuses_what_is_not_an_image(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageFormatError, match=name):
        detect_format(path)


def test_detect_format_refuses_an_mbr_without_partitions(tmp_path: Path) -> None:
    disk = _mbr_disk(tmp_path / "blank.img", [], 1024 * 1024)
    with pytest.raises(ImageFormatError, match="no partition table"):
        detect_format(disk)


# check_complete


@pytest.mark.parametrize(("name", "fmt"), FORMATS)
def test_check_complete_accepts_whole_images(images: Images, name: str, fmt: ImageFormat) -> None:
    check_complete(getattr(images, name), fmt)


@pytest.mark.parametrize(("name", "fmt"), FORMATS)
def test_check_complete_refuses_an_image_cut_in_half(
    images: Images, tmp_path: Path, name: str, fmt: ImageFormat
) -> None:
    whole: Path = getattr(images, name)
    half = _truncated(whole, tmp_path / whole.name, whole.stat().st_size // 2)
    assert detect_format(half) == fmt
    with pytest.raises(ImageFormatError, match="truncated"):
        check_complete(half, fmt)


def test_check_complete_refuses_a_tar_cut_between_members(images: Images, tmp_path: Path) -> None:
    with tarfile.open(images.tar) as archive:
        members = archive.getmembers()
    cut = members[len(members) // 2].offset  # a header boundary: tarfile alone reads "the end"
    with pytest.raises(ImageFormatError, match="end-of-archive"):
        check_complete(_truncated(images.tar, tmp_path / "cut.tar", cut), "tar")


def test_check_complete_refuses_a_partitioned_disk_shorter_than_its_partitions(
    tmp_path: Path,
) -> None:
    disk = _mbr_disk(tmp_path / "short.img", [(0x83, 2048, 4096)], 2 * 1024 * 1024)
    with pytest.raises(ImageFormatError, match="MBR partition table needs 3145728 bytes"):
        check_complete(disk, "raw")


def _raw_header(tmp_path: Path, name: str, fields: list[tuple[int, bytes]], size: int) -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in fields:
            f.seek(offset)
            f.write(data)
    return path


@pytest.mark.parametrize(
    ("name", "fields", "problem"),
    [
        ("zero-blocks.img", [(1080, b"\x53\xef")], "ext4 superblock .* is corrupt"),
        ("xfs.img", [(0, b"XFSB" + struct.pack(">IQ", 4096, 1024))], "xfs filesystem needs"),
        (
            "gpt.img",
            [(510, b"\x55\xaa"), (512, b"EFI PART"), (544, struct.pack("<Q", 8191))],
            "GPT partition table needs 4194304 bytes",
        ),
    ],
)
def test_check_complete_reads_the_size_from_each_raw_header(
    tmp_path: Path, name: str, fields: list[tuple[int, bytes]], problem: str
) -> None:
    image = _raw_header(tmp_path, name, fields, 2 * 1024 * 1024)
    assert detect_format(image) == "raw"
    with pytest.raises(ImageFormatError, match=problem):
        check_complete(image, "raw")


def test_check_complete_refuses_a_qcow2_with_a_backing_file(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
        check=True,
    )
    with pytest.raises(ImageFormatError, match="backing"):
        check_complete(overlay, "qcow2")
    with pytest.raises(ImageFormatError, match="backing"):
        convert_to_raw(overlay, tmp_path / "out.raw")


# convert_to_raw


def test_convert_to_raw_reproduces_the_original_raw_image(images: Images, tmp_path: Path) -> None:
    raw = tmp_path / "converted.img"
    convert_to_raw(images.qcow2, raw)
    assert _sha256(raw) == _sha256(images.ext4)
    assert os.stat(raw).st_blocks * 512 < raw.stat().st_size  # holes stayed holes
    assert list(tmp_path.iterdir()) == [raw]


def test_convert_to_raw_reports_qemu_img_failure(images: Images, tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="qemu-img could not convert"):
        convert_to_raw(images.qcow2, tmp_path / "missing-dir" / "out.img")


# kernel_releases and boot_files


@pytest.mark.parametrize(("name", "fmt"), READABLE)
def test_kernel_releases_lists_modules_and_vmlinuz_releases(
    images: Images, name: str, fmt: ImageFormat
) -> None:
    assert kernel_releases(getattr(images, name), fmt) == [RELEASE]


def test_kernel_releases_follows_a_merged_usr_lib_symlink(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/lib/modules/6.5.0-merged/kernel").mkdir(parents=True)
    (tree / "usr/lib/modules/6.5.0-stray-file").write_bytes(b"not a directory")
    (tree / "lib").symlink_to("usr/lib")
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz-6.6.0-bootonly").write_bytes(b"kernel")
    image = tmp_path / "merged.img"
    _mkfs(tree, image, "8M")
    assert kernel_releases(image, "raw") == ["6.5.0-merged", "6.6.0-bootonly"]
    tar = tmp_path / "merged.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(tree, arcname="")
    assert kernel_releases(tar, "tar") == ["6.5.0-merged", "6.6.0-bootonly"]


def test_kernel_releases_of_a_non_ext_raw_image_is_empty_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = _mbr_disk(tmp_path / "disk.img", [(0x83, 2048, 2048)], 2 * 1024 * 1024)
    with caplog.at_level(logging.INFO):
        assert kernel_releases(disk, "raw") == []
    assert "only ext2/3/4" in caplog.text


@pytest.mark.parametrize(("name", "fmt"), READABLE)
def test_boot_files_hashes_vmlinuz_and_initrd(images: Images, name: str, fmt: ImageFormat) -> None:
    expected = {
        Path(rel).name: hashlib.sha256(data).hexdigest()
        for rel, data in images.files.items()
        if rel.startswith(("boot/vmlinuz-", "boot/initrd.img-"))
    }
    assert boot_files(getattr(images, name), fmt) == expected
    assert len(expected) == 2


# extents


def test_merge_extents_sorts_clips_merges_overlaps_and_keeps_file_boundaries() -> None:
    pairs = [(100, 50), (0, 10), (10, 5), (140, 20), (990, 100), (2000, 5), (30, 0)]
    assert merge_extents(pairs, 1000) == [
        Extent(0, 10),  # adjacent to the next one, but another file: the boundary stays
        Extent(10, 5),
        Extent(100, 60),
        Extent(990, 10),
    ]


def test_tar_member_extents_point_at_member_data(images: Images) -> None:
    data = images.tar.read_bytes()
    found = {data[e.offset : e.end] for e in tar_member_extents(images.tar)}
    assert found == {content for content in images.files.values() if content}


@pytest.mark.root
@needs_root
def test_file_extents_cover_every_regular_file(images: Images) -> None:
    extents = file_extents(images.ext4)
    assert extents is not None
    size = images.ext4.stat().st_size
    assert all(e.offset >= 0 and e.length > 0 and e.end <= size for e in extents)
    assert all(a.end <= b.offset for a, b in itertools.pairwise(extents))
    with images.ext4.open("rb") as f:
        covered = b"".join(os.pread(f.fileno(), e.length, e.offset) for e in extents)
    assert images.files["var/big.bin"] in covered
    assert images.sparse_data in covered
    dense = {rel: data for rel, data in images.files.items() if rel != "var/sparse.bin"}
    assert all(content in covered for content in dense.values())
    (log_block,) = struct.unpack_from("<I", images.ext4.read_bytes()[:2048], 1024 + 24)
    block = 1024 << log_block
    assert sum(e.length for e in extents) >= sum(len(c) // block * block for c in dense.values())


@pytest.mark.root
@needs_root
def test_file_extents_is_none_for_what_cannot_be_mounted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = _mbr_disk(tmp_path / "disk.img", [(0x83, 2048, 2048)], 2 * 1024 * 1024)
    broken = tmp_path / "broken.img"
    with broken.open("wb") as f:  # an ext magic on an otherwise empty superblock
        f.truncate(8 * 1024 * 1024)
        f.seek(1080)
        f.write(b"\x53\xef")
    with caplog.at_level(logging.INFO):
        assert file_extents(disk) is None
        assert file_extents(broken) is None
    assert "no filesystem starts at byte 0" in caplog.text
    assert "mount failed" in caplog.text


@pytest.mark.root
@needs_root
def test_extent_scanner_refuses_to_mount_outside_a_private_namespace(images: Images) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "imageswarm.agent.extents", "--fs", "ext", str(images.ext4)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 5
    assert "refusing to mount" in proc.stderr
    attached = subprocess.run(
        ["losetup", "-j", str(images.ext4)], capture_output=True, text=True, check=True
    )
    assert attached.stdout == ""
