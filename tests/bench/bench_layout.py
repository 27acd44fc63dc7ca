"""Transfer rate of imageswarm's two torrent layouts against a single-file v2 torrent.

One image is published into a seeder store; that gives both of its torrents: the image torrent
(v2, one file, the whole image; what a node fetching from scratch uses, never requesting the
pieces that lie wholly in holes) and the chunk torrent (v2, one file per unique chunk; what a
node holding an earlier version uses for the delta). The reference is a single-file v2-only
torrent of the same image made by libtorrent's own creator (256 KiB pieces, every piece
transferred). A control layout is one file holding exactly the chunk torrent's bytes (the
unique chunks back to back), so that it moves the same payload as the chunk layout.

Each transfer runs a seeder and a leecher as two fresh processes (each with its own Swarm, so no
shared GIL) on loopback addresses: the seeder adds the torrent in seed mode, the leecher adds it
into an empty folder and connects to the seeder directly. The wall time runs from the leecher's
add to the end of its flush; CPU is read from /proc for both processes over the same window.
Layouts take turns within each round; the tables show the median over the rounds.

    .venv/bin/python tests/bench/bench_layout.py [--mib 256] [--rounds 5] [--rate BYTES_PER_S]
        [--sweep] [--file-pool-size N] [--extra LIBTORRENT_SETTING=VALUE ...] [--leech-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

import libtorrent as lt

if not __package__:  # run as a script: make the repository's `tests.bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imageswarm.agent.store import Store
from imageswarm.daemon.publish import publish
from imageswarm.daemon.swarm.session import SettingValue, Swarm, SwarmSettings
from imageswarm.daemon.swarm.torrent import PIECE_LENGTH, hole_pieces, wanted_bytes
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

SEEDER_HOST, LEECHER_HOST = "127.0.0.2", "127.0.0.3"
LOOPBACK = ("127.0.0.0/8",)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The requirement: our layout moves bytes at least this fast relative to a single file.
REQUIRED_RATIO = 0.70
SINGLE = "single file, whole image (libtorrent's creator)"


@dataclass(frozen=True)
class Knobs:
    """Session settings applied to both seeder and leecher (None: the project's default)."""

    name: str
    file_pool_size: int | None = None
    max_allowed_in_request_queue: int | None = None
    extra: Mapping[str, SettingValue] = field(default_factory=dict)

    def settings(self, host: str, upload_rate_limit: int) -> SwarmSettings:
        kwargs: dict[str, Any] = {"upload_rate_limit": upload_rate_limit, "extra": self.extra}
        if self.file_pool_size is not None:
            kwargs["file_pool_size"] = self.file_pool_size
        if self.max_allowed_in_request_queue is not None:
            kwargs["max_allowed_in_request_queue"] = self.max_allowed_in_request_queue
        return SwarmSettings(host, 0, LOOPBACK, **kwargs)


DEFAULTS = Knobs("project defaults")
#: Tried with --sweep, each on both peers and both layouts.
SWEEP = (
    Knobs("file_pool_size=40 (libtorrent default)", file_pool_size=40),
    Knobs("max_allowed_in_request_queue=500", max_allowed_in_request_queue=500),
    Knobs("aio_threads=2", extra={"aio_threads": 2}),
    Knobs("aio_threads=20", extra={"aio_threads": 20}),
    Knobs("hashing_threads=2", extra={"hashing_threads": 2}),
    Knobs("max_queued_disk_bytes=16 MiB", extra={"max_queued_disk_bytes": 16 * MIB}),
    Knobs(
        "send_buffer_watermark=4 MiB, factor 150",
        extra={"send_buffer_watermark": 4 * MIB, "send_buffer_watermark_factor": 150},
    ),
    Knobs("checking_mem_usage=1024", extra={"checking_mem_usage": 1024}),
    Knobs("mmap_file_size_cutoff=1 (mmap every file)", extra={"mmap_file_size_cutoff": 1}),
)


@dataclass(frozen=True)
class Layout:
    name: str
    torrent: bytes
    seed_path: Path  # the seeder's save path
    files: int
    payload: int  # bytes the leecher downloads
    skip_pieces: tuple[int, ...] = ()  # pieces the leecher never requests


@dataclass(frozen=True)
class PeerJob:
    """What one child process needs (picklable: children are spawned, not forked)."""

    host: str
    torrent: bytes
    save_path: Path
    seed: bool
    knobs: Knobs
    upload_rate_limit: int
    verbose: bool
    skip_pieces: tuple[int, ...] = ()


@dataclass(frozen=True)
class Transfer:
    wall: float
    cpu_seeder: float
    cpu_leecher: float
    payload: int

    @property
    def rate(self) -> float:
        return self.payload / MIB / self.wall

    @property
    def per_cpu(self) -> float:
        return self.payload / MIB / (self.cpu_seeder + self.cpu_leecher)


# Child processes


def _peer_process(conn: Connection, job: PeerJob) -> None:
    """Seeder: report the port, wait for "stop". Leecher: report ready, take the seeder's
    port, download, report the wall time and what libtorrent counted."""
    # libtorrent's performance warnings would bury the table; --verbose shows them.
    logging.basicConfig(level=logging.WARNING if job.verbose else logging.ERROR)
    asyncio.run(_peer(conn, job))


async def _peer(conn: Connection, job: PeerJob) -> None:
    swarm = Swarm(job.knobs.settings(job.host, job.upload_rate_limit if job.seed else 0))
    await swarm.start()
    try:
        if job.seed:
            await swarm.add(job.torrent, job.save_path, seed=True)
            conn.send(swarm.listen_port)
            await asyncio.to_thread(conn.recv)
            return
        conn.send("ready")
        port: int = await asyncio.to_thread(conn.recv)
        start = time.perf_counter()
        download = await swarm.add(job.torrent, job.save_path, skip_pieces=job.skip_pieces)
        download.connect_peer(SEEDER_HOST, port)
        await download.finished()
        await download.flush()
        wall = time.perf_counter() - start
        conn.send({"wall": wall, "downloaded": download.status().total_payload_download})
    finally:
        await swarm.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, all its threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _recv(conn: Connection, procs: Sequence[BaseProcess], what: str, timeout: float) -> Any:
    """The next message on `conn`; fails fast when one of `procs` has died."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        dead = [p.name for p in procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"the {' and '.join(dead)} exited before sending the {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
    return conn.recv()


def run_transfer(
    layout: Layout, knobs: Knobs, leech_dir: Path, rate: int, timeout: float, verbose: bool
) -> Transfer:
    """One transfer of `layout` into the empty `leech_dir`, between two fresh processes."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    seed_job = PeerJob(SEEDER_HOST, layout.torrent, layout.seed_path, True, knobs, rate, verbose)
    leech_job = PeerJob(
        LEECHER_HOST, layout.torrent, leech_dir, False, knobs, rate, verbose, layout.skip_pieces
    )
    seed_conn, seed_end = ctx.Pipe()
    leech_conn, leech_end = ctx.Pipe()
    seeder = ctx.Process(target=_peer_process, args=(seed_end, seed_job), name="seeder")
    leecher = ctx.Process(target=_peer_process, args=(leech_end, leech_job), name="leecher")
    procs = (seeder, leecher)
    try:
        for proc in procs:
            proc.start()
        port: int = _recv(seed_conn, procs, "seeder's port", 60)
        _recv(leech_conn, procs, "leecher's ready", 60)
        assert seeder.pid is not None and leecher.pid is not None
        os.sync()  # earlier transfers' dirty pages must not be written back during this one
        cpu_s, cpu_l = _cpu_seconds(seeder.pid), _cpu_seconds(leecher.pid)
        leech_conn.send(port)
        done: dict[str, float] = _recv(leech_conn, procs, "download result", timeout)
        cpu_s, cpu_l = _cpu_seconds(seeder.pid) - cpu_s, _cpu_seconds(leecher.pid) - cpu_l
        seed_conn.send("stop")
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in (seed_conn, seed_end, leech_conn, leech_end):
            conn.close()
    if int(done["downloaded"]) < layout.payload:
        raise RuntimeError(f"{layout.name}: got {done['downloaded']} of {layout.payload} B")
    return Transfer(done["wall"], cpu_s, cpu_l, layout.payload)


# Building the layouts from one image


def single_file_torrent(path: Path) -> bytes:
    """A v2-only, private, single-file torrent of `path` with 256 KiB pieces, by libtorrent."""
    entry = lt.create_file_entry(path.name, path.stat().st_size)
    creator = lt.create_torrent([entry], PIECE_LENGTH, lt.create_torrent.v2_only)
    creator.set_priv(True)
    lt.set_piece_hashes(creator, str(path.parent))
    encoded: bytes = lt.bencode(creator.generate())
    return encoded


def build_layouts(workdir: Path, mib: int, fill: float, seed: int) -> list[Layout]:
    image = build_image(workdir, mib, fill=fill, seed=seed)
    store = Store.open(workdir / "seed-store")
    manifest = publish(image, "bench", store, signing_key()).manifest
    chunk_torrent = store.load_torrent(manifest.image_id)
    unique = manifest.unique_chunks()
    chunks = Layout(
        "chunk files (ours: delta)", chunk_torrent, store.root, len(unique), sum(unique.values())
    )
    chunk_list = [(c.hash, c.length) for c in manifest.chunks]
    skip = hole_pieces(chunk_list, manifest.size)
    payload = wanted_bytes(chunk_list, manifest.size)
    whole = Layout(
        "image file (ours: from scratch)",
        store.load_image_torrent(manifest.image_id),
        store.images_dir,
        1,
        payload,
        tuple(skip),
    )

    single_dir = workdir / "single"
    assembled = store.assemble(manifest, single_dir / "image.raw")
    size = assembled.stat().st_size
    single = Layout(SINGLE, single_file_torrent(assembled), single_dir, 1, size)

    control_dir = workdir / "control"
    control_dir.mkdir()
    with (control_dir / "payload.bin").open("wb") as out:
        for name, length in unique.items():
            out.write(store.read_chunk(name, length))
    control_torrent = single_file_torrent(control_dir / "payload.bin")
    control = Layout("single file, same payload", control_torrent, control_dir, 1, chunks.payload)
    return [whole, chunks, single, control]


# Reporting


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def _spread(values: Sequence[float]) -> str:
    """The median, and the range in brackets."""
    return f"{median(values):.1f} [{min(values):.0f}-{max(values):.0f}]"


def layout_table(layouts: Sequence[Layout], results: Mapping[str, list[Transfer]]) -> str:
    base = next(x for x in layouts if x.name == SINGLE)  # libtorrent's single-file torrent
    base_rate = median([t.rate for t in results[base.name]])
    base_cpu = median([t.per_cpu for t in results[base.name]])
    rows = []
    for layout in layouts:
        runs = results[layout.name]
        rate, per_cpu = median([t.rate for t in runs]), median([t.per_cpu for t in runs])
        rows.append(
            [
                layout.name,
                str(layout.files),
                _f(layout.payload / MIB),
                _f(median([t.wall for t in runs]), 2),
                _spread([t.rate for t in runs]),
                _f(median([t.cpu_seeder for t in runs]), 2),
                _f(median([t.cpu_leecher for t in runs]), 2),
                _f(per_cpu),
                _f(rate / base_rate, 2),
                _f(per_cpu / base_cpu, 2),
            ]
        )
    header = [
        "layout",
        "files",
        "payload MiB",
        "wall s",
        "MiB/s",
        "seeder CPU s",
        "leecher CPU s",
        "MiB per CPU-s",
        "rate ratio",
        "CPU-efficiency ratio",
    ]
    return markdown_table(header, rows)


def knob_table(
    chunks: Layout, single: Layout, results: Mapping[str, Mapping[str, list[Transfer]]]
) -> str:
    rows = []
    for knobs_name, by_layout in results.items():
        c, s = by_layout[chunks.name], by_layout[single.name]
        c_rate, s_rate = median([t.rate for t in c]), median([t.rate for t in s])
        c_cpu, s_cpu = median([t.per_cpu for t in c]), median([t.per_cpu for t in s])
        rows.append(
            [
                knobs_name,
                _f(c_rate),
                _f(s_rate),
                _f(c_rate / s_rate, 2),
                _f(c_cpu),
                _f(s_cpu),
                _f(c_cpu / s_cpu, 2),
            ]
        )
    header = [
        "settings (both peers)",
        "chunks MiB/s",
        "single MiB/s",
        "rate ratio",
        "chunks MiB/CPU-s",
        "single MiB/CPU-s",
        "CPU ratio",
    ]
    return markdown_table(header, rows)


@dataclass
class Runner:
    """Runs transfers, each into a fresh leecher folder.

    A folder is removed after its transfer unless it lies on an ext4 without a journal: there,
    creating files within minutes of deleting thousands is several times slower (inode
    allocation skips recently deleted inodes one by one), which would charge the chunk layout
    for the benchmark's own clean-up; such folders are left for the end.
    """

    leech_root: Path
    rate: int
    timeout: float
    verbose: bool
    transfers: int = 0

    def __post_init__(self) -> None:
        self.remove_after = "without a journal" not in describe_fs(self.leech_root)

    def measure(
        self, layouts: Sequence[Layout], variants: Sequence[Knobs], rounds: int
    ) -> dict[str, dict[str, list[Transfer]]]:
        """`rounds` transfers of each layout under each variant: settings -> layout -> runs.

        Every round runs each variant once and each layout once per variant, starting one
        later each round, so that load from elsewhere on the machine falls on all alike.
        """
        results: dict[str, dict[str, list[Transfer]]] = {
            k.name: {layout.name: [] for layout in layouts} for k in variants
        }
        jobs = [(k, layout) for k in variants for layout in layouts]
        for n in range(rounds):
            for i in range(len(jobs)):
                knobs, layout = jobs[(n + i) % len(jobs)]
                self.transfers += 1
                leech_dir = self.leech_root / f"leech-{self.transfers}"
                leech_dir.mkdir()
                t = run_transfer(layout, knobs, leech_dir, self.rate, self.timeout, self.verbose)
                if self.remove_after:
                    shutil.rmtree(leech_dir)
                results[knobs.name][layout.name].append(t)
                print(
                    f"[{knobs.name}] round {n + 1}, {layout.name}: {t.wall:.2f}s "
                    f"{t.rate:.1f} MiB/s, CPU seeder {t.cpu_seeder:.2f}s "
                    f"leecher {t.cpu_leecher:.2f}s",
                    file=sys.stderr,
                )
        return results


def _parse_extra(items: Sequence[str]) -> dict[str, SettingValue]:
    extra: dict[str, SettingValue] = {}
    defaults = cast(dict[str, SettingValue], lt.default_settings())
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"--extra {item!r}: expected NAME=VALUE with a libtorrent setting")
        default = defaults[key]
        if isinstance(default, bool):
            extra[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            extra[key] = int(text)
        else:
            extra[key] = text
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256, help="image size in MiB (default 256)")
    parser.add_argument("--fill", type=float, default=0.70, help="share filled with files")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random file tree")
    parser.add_argument("--rounds", type=int, default=5, help="transfers per layout (median)")
    parser.add_argument("--rate", type=int, default=0, help="seeder upload limit in bytes/s")
    parser.add_argument("--file-pool-size", type=int, help="file_pool_size for both peers")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a libtorrent setting for both peers, overriding the project's (repeatable)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also try each setting of the sweep (~5 min)"
    )
    parser.add_argument(
        "--sweep-only",
        action="append",
        metavar="TEXT",
        help="sweep only the settings whose name contains TEXT (repeatable; implies --sweep)",
    )
    parser.add_argument("--sweep-rounds", type=int, default=3, help="transfers per setting")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per transfer")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    parser.add_argument(
        "--fs",
        choices=("scratch", "workdir"),
        default="scratch" if can_use_scratch_fs() else "workdir",
        help="seed and leech on a fresh loop-mounted ext4 (default when root) or in the "
        "workdir's own filesystem",
    )
    parser.add_argument(
        "--leech-dir", type=Path, help="where leechers write (default: beside the seeder)"
    )
    parser.add_argument("--verbose", action="store_true", help="show libtorrent's warnings")
    args = parser.parse_args(argv)
    if args.fs == "scratch":
        enter_private_namespace()
    load_at_start = load_average()
    knobs = DEFAULTS
    if args.file_pool_size is not None or args.extra:
        knobs = Knobs(
            "command line", file_pool_size=args.file_pool_size, extra=_parse_extra(args.extra)
        )
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir)))
        if args.fs == "scratch":
            work = stack.enter_context(scratch_fs(work, 8 * args.mib + 2048))
        leech_root = work
        if args.leech_dir is not None:
            leech_root = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.leech_dir)))
        layouts = build_layouts(work, args.mib, args.fill, args.seed)
        runner = Runner(leech_root, args.rate, args.timeout, args.verbose)
        image, chunks, single = layouts[0], layouts[1], layouts[2]
        results = runner.measure(layouts, [knobs], args.rounds)[knobs.name]
        sweep: dict[str, dict[str, list[Transfer]]] = {}
        if args.sweep or args.sweep_only:
            variants = [
                k for k in SWEEP if not args.sweep_only or any(m in k.name for m in args.sweep_only)
            ]
            sweep = runner.measure([chunks, single], [knobs, *variants], args.sweep_rounds)
        seed_fs, leech_fs = describe_fs(work), describe_fs(leech_root)
    single_rate = median([t.rate for t in results[single.name]])
    ratio = median([t.rate for t in results[image.name]]) / single_rate
    chunk_ratio = median([t.rate for t in results[chunks.name]]) / single_rate
    time_ratio = median([t.wall for t in results[image.name]]) / median(
        [t.wall for t in results[single.name]]
    )
    rate_text = "unlimited" if args.rate == 0 else f"{args.rate / MIB:.1f} MiB/s"
    print(
        f"image {args.mib} MiB ext4; seeder upload {rate_text}; settings: {knobs.name}; "
        f"seeder reads from {seed_fs}; leechers write to {leech_fs}; "
        f"median of {args.rounds} transfers per layout "
        f"(range in brackets); {machine_line(load_at_start)}\n"
    )
    print(layout_table(layouts, results))
    verdict = "meets" if ratio >= REQUIRED_RATIO else "MISSES"
    print(
        f"\nimage torrent (a fetch from scratch): rate = {ratio:.0%} of the single-file "
        f"torrent's ({verdict} the {REQUIRED_RATIO:.0%} requirement), time to hold the image = "
        f"{time_ratio:.2f}x; chunk torrent (a delta): rate = {chunk_ratio:.0%}"
    )
    if sweep:
        print(f"\nmedian of {args.sweep_rounds} transfers per setting and layout:\n")
        print(knob_table(chunks, single, sweep))
    elif ratio < REQUIRED_RATIO:
        print("run again with --sweep to try the session settings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
