"""What an image file is, whether it is whole, and what it boots, read without mounting it.

Three formats arrive: raw disk or filesystem images, qcow2 (converted to raw before use) and
tar archives of a root tree. Anything else is refused early with a sentence the user can act on.
Where the data of the files inside an image lies is found by the scanner in `extents`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from imageswarm.agent import extents
from imageswarm.agent.errors import ImageFormatError, InvalidInputError, ToolError
from imageswarm.agent.extents import Extent as Extent  # re-exported: file_extents returns it

ImageFormat = Literal["raw", "qcow2", "tar"]
FilesystemKind = Literal["ext", "xfs"]

log = logging.getLogger(__name__)

_HEAD_SIZE = 4096  # covers the MBR, the GPT header, the tar header and the ext superblock
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_EXTERNAL_DATA_FILE = 1 << 2  # incompatible feature bit
_EXT_MAGIC = 0xEF53
_EXT_INCOMPAT_64BIT = 0x80
_SECTOR = 512
_SCAN_TIMEOUT = 3600.0
# Kernel release strings as they appear in /lib/modules; anything else in an image is ignored.
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
_BOOT_FILE = re.compile(r"(?:vmlinuz|initrd\.img)-[A-Za-z0-9][A-Za-z0-9._+~-]*")
_MODULE_DIRS = ("lib/modules", "usr/lib/modules")


def detect_format(path: Path) -> ImageFormat:
    """Tell the format of an image file by its content, never by its name."""
    head = _read_head(path)
    if not head:
        raise ImageFormatError(f"The image file {path} is empty.")
    if head.startswith(_QCOW2_MAGIC):
        return "qcow2"
    if head[257:262] == b"ustar":
        return "tar"
    if _filesystem_kind(head) is not None or _has_partition_table(head):
        return "raw"
    # Checked last: tarfile takes anything that starts with a zero block for an empty archive.
    if _is_pre_posix_tar(path):
        return "tar"
    raise ImageFormatError(
        f"The file {path} is not a disk or filesystem image "
        "(no ext4/xfs superblock, no partition table)."
    )


def filesystem_kind(path: Path) -> FilesystemKind | None:
    """The filesystem starting at byte 0 of a raw image, or None (partitioned or unknown)."""
    return _filesystem_kind(_read_head(path))


def check_complete(path: Path, fmt: ImageFormat) -> None:
    """Raise ImageFormatError when the image is truncated or corrupt."""
    if fmt == "qcow2":
        _check_qcow2(path)
    elif fmt == "tar":
        _check_tar(path)
    else:
        _check_raw(path)


def convert_to_raw(src: Path, dst: Path) -> None:
    """Write the qcow2 image src as a sparse raw image dst; dst appears only when complete."""
    _refuse_external_files(src)
    part = dst.with_name(f".{dst.name}.part")
    proc = _run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(part)])
    if proc.returncode != 0:
        part.unlink(missing_ok=True)
        raise ToolError(f"qemu-img could not convert {src} to raw: {_first_lines(proc.stderr)}.")
    os.replace(part, dst)


def kernel_releases(image: Path, fmt: ImageFormat) -> list[str]:
    """Kernel releases in the image: module directories and /boot/vmlinuz-<release> files.

    qcow2 images must be converted to raw first (ValueError otherwise). Raw images other than
    ext2/3/4 (xfs, partitioned disks) cannot be read without mounting and yield [].
    """
    if fmt == "qcow2":
        raise ValueError("convert a qcow2 image to raw before reading its kernels")
    releases: set[str] = set()
    if fmt == "tar":
        for member in _tar_members(image):
            parts = _tar_path(member)
            for prefix in _MODULE_DIRS:
                depth = prefix.count("/") + 1
                under = parts[:depth] == prefix.split("/") and len(parts) > depth
                if under and (member.isdir() or len(parts) > depth + 1):
                    releases.add(parts[depth])
            if len(parts) == 2 and parts[0] == "boot" and (member.isreg() or member.issym()):
                releases.update(_vmlinuz_release(parts[1]))
        return _valid_releases(releases)
    if filesystem_kind(image) != "ext":
        log.info("Kernels in %s were not read: only ext2/3/4 images are read unmounted.", image)
        return []
    for directory in _MODULE_DIRS:  # /lib is often a symlink to usr/lib; debugfs follows it
        for name, mode, _ in _debugfs_ls(image, f"/{directory}"):
            if stat.S_ISDIR(mode) and name not in (".", ".."):
                releases.add(name)
    for name, mode, _ in _debugfs_ls(image, "/boot"):
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            releases.update(_vmlinuz_release(name))
    return _valid_releases(releases)


def boot_files(image: Path, fmt: ImageFormat) -> dict[str, str]:
    """sha256 (hex) of each regular /boot/vmlinuz-* and /boot/initrd.img-* file, by name."""
    if fmt == "qcow2":
        raise ValueError("convert a qcow2 image to raw before reading its boot files")
    digests: dict[str, str] = {}
    if fmt == "tar":
        with _open_tar(image) as archive:
            for member in archive:
                parts = _tar_path(member)
                name = parts[1] if len(parts) == 2 and parts[0] == "boot" else ""
                if member.isreg() and _BOOT_FILE.fullmatch(name):
                    data = archive.extractfile(member)
                    assert data is not None  # regular members always have data
                    digests[name] = _sha256(data)[0]
        return digests
    if filesystem_kind(image) != "ext":
        log.info("Boot files in %s were not read: only ext2/3/4 images are read unmounted.", image)
        return {}
    for name, mode, size in _debugfs_ls(image, "/boot"):
        if stat.S_ISREG(mode) and _BOOT_FILE.fullmatch(name):
            digests[name] = _debugfs_sha256(image, f"/boot/{name}", size)
    return digests


def file_extents(image: Path) -> list[Extent] | None:
    """Sorted, merged byte ranges of regular-file data in a raw filesystem image.

    None when the ranges cannot be known here (not root, no mount namespace or loop device,
    not a mountable filesystem, no FIEMAP); the reason is logged and the caller falls back to
    plain content-defined chunking. Inline and tail-packed file data is not included.
    """
    if os.geteuid() != 0:
        log.info("File extents of %s were not read: loop-mounting needs root.", image)
        return None
    kind = filesystem_kind(image)
    if kind is None:
        log.info("File extents of %s were not read: no filesystem starts at byte 0.", image)
        return None
    image = image.resolve()
    argv = ["unshare", "--mount", "--propagation", "private"]
    argv += [sys.executable, "-m", "imageswarm.agent.extents", "--fs", kind, str(image)]
    try:
        # cwd "/": an imageswarm folder in the caller's working directory must not shadow ours.
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_SCAN_TIMEOUT, cwd="/", check=False
        )
    except FileNotFoundError:
        log.info("File extents of %s were not read: unshare is not installed.", image)
        return None
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"Scanning the files in {image} took over {_SCAN_TIMEOUT:.0f} s.") from e
    reason = proc.stderr.strip()
    no_namespace = proc.returncode == 1 and reason.startswith("unshare:")  # e.g. no CAP_SYS_ADMIN
    if no_namespace or proc.returncode in (extents.EXIT_NOT_MOUNTABLE, extents.EXIT_NO_FIEMAP):
        log.info("File extents of %s were not read: %s", image, reason)
        return None
    if proc.returncode != 0:
        detail = reason.splitlines()[-1] if reason else f"exit status {proc.returncode}"
        raise ToolError(f"Scanning the files in {image} failed: {detail}.")
    report = json.loads(proc.stdout)
    if report["skipped"]:
        log.info("%d unreadable files or directories in %s were skipped.", report["skipped"], image)
    pairs = [(int(offset), int(length)) for offset, length in report["extents"]]
    return extents.merge_extents(pairs, image.stat().st_size)


def tar_member_extents(path: Path) -> list[Extent]:
    """The data of each non-empty regular member of an uncompressed tar, in archive order."""
    with _open_tar(path) as archive:
        return [
            Extent(m.offset_data, m.size)
            for m in archive
            if m.isreg() and not m.issparse() and m.size > 0
        ]


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(_HEAD_SIZE)
    except OSError as e:
        raise InvalidInputError(f"The image file {path} cannot be read: {e.strerror}.") from e


def _filesystem_kind(head: bytes) -> FilesystemKind | None:
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1080)[0] == _EXT_MAGIC:
        return "ext"
    if head.startswith(b"XFSB"):
        return "xfs"
    return None


def _has_partition_table(head: bytes) -> bool:
    if head[512:520] == b"EFI PART":
        return True
    if head[510:512] != b"\x55\xaa":
        return False
    return any(ptype and sectors for _, ptype, sectors in _mbr_partitions(head))


def _mbr_partitions(head: bytes) -> list[tuple[int, int, int]]:
    """(first sector, type, sector count) of the four primary MBR entries."""
    entries = []
    for i in range(4):
        entry = head[446 + 16 * i : 462 + 16 * i]
        start, sectors = struct.unpack_from("<II", entry, 8)
        entries.append((start, entry[4], sectors))
    return entries


def _is_pre_posix_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:") as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError):
        return False


def _check_raw(path: Path) -> None:
    head = _read_head(path).ljust(_HEAD_SIZE, b"\0")
    size = path.stat().st_size
    kind = _filesystem_kind(head)
    if kind == "ext":
        blocks_lo, log_block = struct.unpack_from("<I20xI", head, 1024 + 4)
        (incompat,) = struct.unpack_from("<I", head, 1024 + 0x60)
        (blocks_hi,) = struct.unpack_from("<I", head, 1024 + 0x150)
        blocks = (blocks_hi << 32 if incompat & _EXT_INCOMPAT_64BIT else 0) | blocks_lo
        if log_block > 6 or blocks == 0:  # 64 KiB is the largest ext4 block size
            raise ImageFormatError(
                f"The ext4 superblock of {path} is corrupt: it gives {blocks} blocks of "
                f"2^{10 + log_block} bytes."
            )
        needed, what = blocks * (1024 << log_block), "ext4 filesystem"
    elif kind == "xfs":
        block_size, data_blocks = struct.unpack_from(">IQ", head, 4)
        needed, what = block_size * data_blocks, "xfs filesystem"
    elif head[512:520] == b"EFI PART":
        (backup_lba,) = struct.unpack_from("<Q", head, 512 + 32)
        needed, what = (backup_lba + 1) * _SECTOR, "GPT partition table"
    elif _has_partition_table(head):
        ends = [(s + n) * _SECTOR for s, t, n in _mbr_partitions(head) if t and n]
        needed, what = max(ends), "MBR partition table"
    else:
        raise ImageFormatError(
            f"The file {path} is not a disk or filesystem image "
            "(no ext4/xfs superblock, no partition table)."
        )
    if needed > size:
        raise ImageFormatError(
            f"The image file {path} is truncated: its {what} needs {needed} bytes "
            f"but the file has only {size}."
        )


def _check_qcow2(path: Path) -> None:
    _refuse_external_files(path)
    proc = _run(["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)])
    # 0: clean; 3: only leaked clusters, which waste space but lose no data.
    if proc.returncode in (0, 3):
        return
    detail = _first_lines(proc.stderr, count=1).removeprefix("ERROR: ")
    if proc.returncode == 2:  # corruptions found; stderr has one line per corruption
        corruptions = json.loads(proc.stdout).get("corruptions", "some")
        detail = f"qemu-img check found {corruptions} errors, the first: {detail}"
    raise ImageFormatError(f"The qcow2 image {path} is truncated or corrupt: {detail}.")


def _refuse_external_files(path: Path) -> None:
    """Refuse backing and external data files: qemu-img would open files named by the image.

    Read from the header, not from `qemu-img info`, which already opens the backing chain.
    """
    head = _read_head(path).ljust(104, b"\0")
    version, backing_offset = struct.unpack_from(">IQ", head, 4)
    (incompatible,) = struct.unpack_from(">Q", head, 72)
    if backing_offset or (version >= 3 and incompatible & _QCOW2_EXTERNAL_DATA_FILE):
        raise ImageFormatError(
            f"The qcow2 image {path} refers to a backing or external data file; only "
            "self-contained images are accepted (flatten it with qemu-img convert first)."
        )


def _check_tar(path: Path) -> None:
    size = path.stat().st_size
    with _open_tar(path) as archive:
        for member in archive:
            if member.isreg() and not member.issparse() and member.offset_data + member.size > size:
                raise ImageFormatError(
                    f"The tar archive {path} is truncated: member {member.name} ends at byte "
                    f"{member.offset_data + member.size} but the file has only {size}."
                )
        end = archive.offset
    with path.open("rb") as f:
        f.seek(end)
        if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise ImageFormatError(
                f"The tar archive {path} is truncated or corrupt: there is no valid header or "
                f"end-of-archive marker at byte {end}."
            )


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """Read an uncompressed tar; tarfile errors raised inside the block become ImageFormatError."""
    try:
        with tarfile.open(path, "r:") as archive:
            yield archive
    except (tarfile.TarError, EOFError) as e:
        raise ImageFormatError(f"The tar archive {path} is truncated or corrupt: {e}.") from e


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    with _open_tar(path) as archive:
        return archive.getmembers()


def _tar_path(member: tarfile.TarInfo) -> list[str]:
    """The components of a member's path, without the leading "/" or "./"."""
    return [p for p in member.name.split("/") if p not in ("", ".")]


def _vmlinuz_release(name: str) -> list[str]:
    return [name.removeprefix("vmlinuz-")] if name.startswith("vmlinuz-") else []


def _valid_releases(releases: set[str]) -> list[str]:
    return sorted(r for r in releases if _RELEASE.fullmatch(r))


def _debugfs_ls(image: Path, directory: str) -> list[tuple[str, int, int]]:
    """(name, mode, size) of each entry of a directory in an ext image; [] when it is absent.

    `ls -p` prints one "/inode/mode/uid/gid/name/size/" line per entry (size empty for
    directories); names cannot contain "/", so splitting is safe. debugfs exits 0 even when
    it cannot open the image, so failure is recognised by its message.
    """
    proc = _run(["debugfs", "-c", "-R", f"ls -p {directory}", str(image)])
    _raise_if_debugfs_failed(image, proc)
    entries = []
    for line in proc.stdout.decode(errors="surrogateescape").splitlines():
        fields = line.split("/")
        if len(fields) == 8 and fields[0] == fields[7] == "":
            size = int(fields[6]) if fields[6].isdigit() else 0
            entries.append((fields[5], int(fields[2], 8), size))
    return entries


def _debugfs_sha256(image: Path, path: str, size: int) -> str:
    argv = ["debugfs", "-c", "-R", f"cat {path}", str(image)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        digest, read = _sha256(proc.stdout)
        stderr = proc.stderr.read()
    if proc.returncode != 0 or read != size:
        raise ToolError(
            f"debugfs could not read {path} from {image} ({read} of {size} bytes): "
            f"{_first_lines(stderr)}."
        )
    return digest


def _sha256(stream: IO[bytes]) -> tuple[str, int]:
    """Hex sha256 of everything the stream yields, and how many bytes that was."""
    digest, count = hashlib.sha256(), 0
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
        count += len(chunk)
    return digest.hexdigest(), count


def _raise_if_debugfs_failed(image: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    if proc.returncode != 0 or b"Filesystem not open" in proc.stderr:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ": " in ln]
        raise ToolError(f"debugfs could not read {image}: {'; '.join(lines[:2]).rstrip('.')}.")


def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, capture_output=True, check=False, timeout=3600)
    except FileNotFoundError as e:
        raise ToolError(f"{argv[0]} is not installed; it is needed to read image files.") from e
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{argv[0]} did not finish within an hour: {' '.join(argv)}.") from e


def _first_lines(output: bytes, count: int = 2) -> str:
    lines = [ln.strip() for ln in output.decode(errors="replace").splitlines() if ln.strip()]
    return "; ".join(ln.removeprefix("qemu-img: ") for ln in lines[:count]).rstrip(".")
