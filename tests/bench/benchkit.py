"""Shared by the benchmark scripts: a realistic ext4 image, a scratch filesystem, a signing key,
markdown tables.

Not a test module, so pytest does not collect it; the scripts import it as tests.bench.benchkit.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imageswarm.agent.keys import SigningKey
from imageswarm.daemon.localcluster import build_ext4, make_tree

MIB = 1024 * 1024
#: make_tree's small files are uniform in 1..256 KiB, so 128.5 KiB on average.
_MEAN_FILE_KIB = 128.5
#: make_tree's fixed content: four 1 MiB libraries and a 64 KiB kernel.
_FIXED_KIB = 4 * 1024 + 64


def build_image(workdir: Path, mib: int, *, fill: float = 0.70, seed: int = 1) -> Path:
    """An ext4 image of `mib` MiB whose files (make_tree content) fill about `fill` of it."""
    files = max(1, round((fill * mib * 1024 - _FIXED_KIB) / _MEAN_FILE_KIB))
    tree = workdir / "tree"
    make_tree(tree, files=files, seed=seed)
    image = workdir / "image.raw"
    build_ext4(tree, image, mib)
    return image


#: Set in the copy of a benchmark that runs inside its own mount namespace.
_NAMESPACE_ENV = "IMAGESWARM_BENCH_NAMESPACE"


def can_use_scratch_fs() -> bool:
    """Mounting a scratch filesystem needs root."""
    return os.geteuid() == 0


def enter_private_namespace() -> None:
    """Re-run this benchmark (same interpreter, same arguments) in a private mount namespace.

    A scratch filesystem mounted there is seen by the benchmark and its child processes only,
    and it disappears with the last of them, even when the benchmark is killed. Returns at
    once when already inside.
    """
    if os.environ.get(_NAMESPACE_ENV) == "1":
        return
    os.environ[_NAMESPACE_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable]
    os.execvp("unshare", argv + sys.orig_argv[1:])


@contextlib.contextmanager
def scratch_fs(parent: Path, size_mib: int) -> Iterator[Path]:
    """A fresh, journaled ext4 on a sparse file in `parent`, loop-mounted; yields its root.

    The benchmarks write their stores and downloads here rather than wherever the temporary
    folder happens to be, so that every run starts on the same kind of filesystem with no
    history: on an ext4 without a journal (such as some VMs' root), creating files within
    minutes of deleting thousands is several times slower (inode allocation skips recently
    deleted inodes one by one), so one benchmark's clean-up would slow the next one's files.
    Call `enter_private_namespace` first: the mount must not be visible on the host.
    """
    if os.environ.get(_NAMESPACE_ENV) != "1":
        raise RuntimeError("scratch_fs needs enter_private_namespace() first")
    image = parent / "scratch.ext4"
    mount_point = parent / "scratch"
    mount_point.mkdir()
    with image.open("xb") as f:
        f.truncate(size_mib * MIB)
    # Inode tables and journal written now, so no lazy-init thread writes during a measurement.
    options = "lazy_itable_init=0,lazy_journal_init=0,nodiscard"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", options, str(image)], check=True, capture_output=True
    )
    subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount_point)], check=True, capture_output=True
    )
    try:
        yield mount_point
    finally:
        # Lazy: never leave it mounted under a folder that is about to be removed.
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
        image.unlink()


def describe_fs(path: Path) -> str:
    """The type of the filesystem holding `path`, and for ext4 whether it has a journal."""
    path = path.resolve()
    best = ("", "?", "?")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mount_point, fstype = line.split()[:3]
        under = path == Path(mount_point) or Path(mount_point) in path.parents
        if under and len(mount_point) >= len(best[0]):
            best = (mount_point, device, fstype)
    mount_point, device, fstype = best
    if fstype == "ext4":
        journal = any(Path("/proc/fs/jbd2").glob(f"{Path(device).name}-*"))
        fstype += "" if journal else " without a journal"
    return f"{fstype} ({device} on {mount_point})"


def signing_key() -> SigningKey:
    """A throw-away key: publishing signs the manifest, and a benchmark needs no key file."""
    return SigningKey(Ed25519PrivateKey.generate())


def load_average() -> float:
    """The 1-minute load average: other work on the machine shows up in every timing."""
    return os.getloadavg()[0]


def machine_line(load_at_start: float) -> str:
    """Cores, Python, the load average at the start and now, and today's date."""
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, 1-min load average "
        f"{load_at_start:.1f} at start and {load_average():.1f} at end, "
        f"{datetime.date.today().isoformat()}"
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column is left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
