"""Publish throughput as a ratio to this machine's plain SHA-256 throughput.

Builds an ext4 image from a tree of random files, then measures in each round, side by side:
plain ``hashlib.sha256`` over the image (from the page cache), ``publish()`` into a fresh store,
and the parts of publish that can be timed alone (file extents, kernel lookup, cutting and
naming the chunks without writing them), and two references for the store's cost: publish
into a store on tmpfs, and the disk writing the same bytes as one file. Prints the median of
the rounds as a markdown table. As root it works on a fresh loop-mounted ext4 (see benchkit).

    .venv/bin/python tests/bench/bench_publish.py [--mib 256] [--rounds 3] [--fs scratch|workdir]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a script: make the repository's `tests.bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imageswarm.agent import imagefile
from imageswarm.agent.chunking import ImageReader, Span
from imageswarm.agent.store import Store
from imageswarm.daemon.publish import PublishResult, publish
from tests.bench.benchkit import (
    MIB,
    build_image,
    can_use_scratch_fs,
    describe_fs,
    enter_private_namespace,
    load_average,
    machine_line,
    markdown_table,
    median,
    scratch_fs,
    signing_key,
)

_READ_BLOCK = 4 * MIB


def sha256_file(path: Path) -> str:
    """Plain streaming SHA-256, the baseline every other row is a ratio to."""
    digest = hashlib.sha256()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def write_baseline(image: Path, dest: Path, length: int) -> float:
    """Seconds to write the first `length` bytes of `image` to one new file and fsync it:
    what the disk alone charges for storing that many bytes."""
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    os.sync()
    start = time.perf_counter()
    with image.open("rb", buffering=0) as src, dest.open("xb", buffering=0) as out:
        left = length
        while left > 0 and (n := src.readinto(view[: min(left, _READ_BLOCK)])):
            out.write(view[:n])
            left -= n
        os.fsync(out.fileno())
    return time.perf_counter() - start


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pieces_only(image: Path, extents: list[Span] | None) -> int:
    """Cut and name every chunk and hash the whole image, as publish does, writing nothing."""
    with ImageReader(image) as reader:
        count = sum(1 for _ in reader.pieces(extents))
        reader.sha256()
    return count


def extents_only(image: Path) -> list[Span] | None:
    return imagefile.file_extents(image)


def timed_publish(image: Path, store_dir: Path) -> tuple[float, PublishResult]:
    """Publish into a fresh store at `store_dir` (which must not exist yet).

    Stores are removed only at the end: on an ext4 without a journal, creating files just
    after deleting thousands is several times slower (inode allocation skips each recently
    deleted inode), which would charge the next round for this one's clean-up.
    """
    store = Store.open(store_dir)
    key = signing_key()
    os.sync()  # earlier rounds' dirty pages must not be flushed on this publish's time
    start = time.perf_counter()
    result = publish(image, "bench", store, key)
    return time.perf_counter() - start, result


def one_round(
    image: Path, workdir: Path, tmpfs: Path | None, n: int
) -> tuple[dict[str, float], PublishResult]:
    times: dict[str, float] = {}
    times["sha256"] = timed(lambda: sha256_file(image))
    times["publish"], result = timed_publish(image, workdir / f"store{n}")
    if tmpfs is not None:
        times["publish_tmpfs"], _ = timed_publish(image, tmpfs / f"store{n}")
    start = time.perf_counter()
    extents = extents_only(image)
    times["extents"] = time.perf_counter() - start
    times["kernels"] = timed(lambda: imagefile.kernel_releases(image, "raw"))
    times["pieces"] = timed(lambda: pieces_only(image, extents))
    times["disk"] = write_baseline(image, workdir / f"baseline{n}", result.new_bytes)
    return times, result


def report(
    image: Path,
    rounds: list[dict[str, float]],
    result: PublishResult,
    fs: str,
    load_at_start: float,
) -> str:
    mib = image.stat().st_size / MIB
    med = {step: median([r[step] for r in rounds]) for step in rounds[0]}
    base_rate = mib / med["sha256"]
    rest = med["publish"] - med["extents"] - med["kernels"] - med["pieces"]
    rows_spec = [
        ("plain sha256 (page cache)", med["sha256"]),
        ("**publish()** into a fresh store on disk", med["publish"]),
        ("↳ file extents (FIEMAP in a mount namespace)", med["extents"]),
        ("↳ kernel releases (debugfs)", med["kernels"]),
        ("↳ cut + name chunks + whole sha256, no writes", med["pieces"]),
        ("↳ rest: chunk files + syncfs, torrent, sign (derived)", rest),
    ]
    if "publish_tmpfs" in med:
        rows_spec.append(("publish() into a fresh store on tmpfs", med["publish_tmpfs"]))
    rows_spec.append(("disk alone: the stored bytes as one file + fsync", med["disk"]))
    rows = []
    for label, seconds in rows_spec:
        rate = mib / seconds if seconds > 0 else float("inf")
        share = f"{100 * seconds / med['publish']:.0f}%" if label.startswith("↳") else ""
        rows.append([label, f"{seconds:.3f}", f"{rate:.0f}", f"{rate / base_rate:.2f}", share])
    table = markdown_table(
        ["step", "seconds", "MiB/s", "ratio to sha256", "share of publish"], rows
    )
    stored = result.new_bytes / MIB
    head = (
        f"image: {mib:.0f} MiB ext4, {len(result.manifest.chunks)} manifest entries, "
        f"{result.new_chunks} unique chunks, {stored:.1f} MiB stored; "
        f"image and stores on {fs}; MiB/s counts image MiB in every row; "
        f"median of {len(rounds)} rounds; "
        f"{machine_line(load_at_start)}"
    )
    return f"{head}\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256, help="image size in MiB (default 256)")
    parser.add_argument("--fill", type=float, default=0.70, help="share filled with files")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random file tree")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    parser.add_argument(
        "--fs",
        choices=("scratch", "workdir"),
        default="scratch" if can_use_scratch_fs() else "workdir",
        help="build and publish on a fresh loop-mounted ext4 (default when root) or in the "
        "workdir's own filesystem",
    )
    parser.add_argument(
        "--tmpfs",
        default="/dev/shm",
        help="a tmpfs for the no-disk publish row, or 'none' to skip it (default /dev/shm)",
    )
    args = parser.parse_args(argv)
    if args.fs == "scratch":
        enter_private_namespace()
    load_at_start = load_average()
    if os.geteuid() != 0:
        print("note: not root, so publish runs without file extents", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir)))
        if args.fs == "scratch":
            work = stack.enter_context(scratch_fs(work, 8 * args.mib + 1024))
        tmpfs: Path | None = None
        if args.tmpfs != "none" and Path(args.tmpfs).is_dir():
            tmpfs = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmpfs)))
        image = build_image(work, args.mib, fill=args.fill, seed=args.seed)
        sha256_file(image)  # warm the page cache
        rounds: list[dict[str, float]] = []
        result: PublishResult | None = None
        for n in range(args.rounds):
            times, result = one_round(image, work, tmpfs, n)
            rounds.append(times)
            print(
                f"round {n + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in times.items()),
                file=sys.stderr,
            )
        assert result is not None
        print(report(image, rounds, result, describe_fs(work), load_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
