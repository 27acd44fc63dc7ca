"""Real libtorrent sessions on loopback addresses, one process, talking BitTorrent v2."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from imageswarm.agent.chunkhash import pieces_root
from imageswarm.agent.errors import ImageSwarmError, InvalidInputError
from imageswarm.daemon.swarm.events import CacheFlushed
from imageswarm.daemon.swarm.session import (
    Download,
    HashFailed,
    PeerBanned,
    PeerBlocked,
    Swarm,
    SwarmSettings,
)
from imageswarm.daemon.swarm.torrent import (
    PIECE_LENGTH,
    TorrentFile,
    build_torrent,
    chunk_relpath,
)

SEEDER, LEECHER_A, LEECHER_B = "127.0.0.2", "127.0.0.3", "127.0.0.4"
LOOPBACK = ("127.0.0.0/8",)


class Swarms:
    """Starts sessions for a test and closes every one of them afterwards."""

    def __init__(self) -> None:
        self.made: list[Swarm] = []

    async def __call__(
        self, host: str, *, allowed: tuple[str, ...] = LOOPBACK, upload_rate_limit: int = 0
    ) -> Swarm:
        swarm = Swarm(SwarmSettings(host, 0, allowed, upload_rate_limit=upload_rate_limit))
        self.made.append(swarm)
        await swarm.start()
        return swarm


@pytest.fixture
async def swarms() -> AsyncIterator[Swarms]:
    factory = Swarms()
    yield factory
    await asyncio.gather(*(swarm.close(timeout=10) for swarm in factory.made))


def make_chunks(store: Path, count: int, seed: int, size: int | None = None) -> list[TorrentFile]:
    rng = random.Random(seed)
    files = []
    for _ in range(count):
        data = rng.randbytes(size or rng.randint(16384, PIECE_LENGTH))
        digest = hashlib.sha256(data).hexdigest()
        path = store / chunk_relpath(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(TorrentFile(digest, len(data), pieces_root(data)))
    return files


def assert_same_chunks(source: Path, copy: Path, files: list[TorrentFile]) -> None:
    for f in files:
        data = (copy / chunk_relpath(f.hash)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.hash
        assert data == (source / chunk_relpath(f.hash)).read_bytes()


async def complete(download: Download) -> None:
    async with asyncio.timeout(30):
        await download.finished()
        await download.flush()


async def seeded(swarms: Swarms, store: Path, files: list[TorrentFile]) -> tuple[Swarm, bytes]:
    torrent = build_torrent(files)
    seeder = await swarms(SEEDER)
    seeding = await seeder.add(torrent, store, seed=True)
    assert await seeder.add(torrent, store, seed=True) is seeding  # idempotent
    async with asyncio.timeout(10):
        await seeding.finished()
    assert seeding.status().is_seeding
    return seeder, torrent


async def test_two_leechers_get_every_chunk_from_one_seeder(tmp_path: Path, swarms: Swarms) -> None:
    store = tmp_path / "seeder"
    files = make_chunks(store, 24, seed=1)
    total = sum(f.length for f in files)
    seeder, torrent = await seeded(swarms, store, files)

    downloads = []
    for i, host in enumerate((LEECHER_A, LEECHER_B)):
        leecher = await swarms(host)
        download = await leecher.add(torrent, tmp_path / f"leecher{i}")
        download.connect_peer(SEEDER, seeder.listen_port)
        downloads.append(download)
    for download in downloads:
        await complete(download)

    for i, download in enumerate(downloads):
        assert_same_chunks(store, tmp_path / f"leecher{i}", files)
        status = download.status()
        assert status.is_seeding
        assert status.progress == 1.0
        assert status.total_done == status.total_wanted == total
        assert status.total_payload_download >= total
        assert status.errors == ()
        assert download.hash_failures == 0
        sources = download.bytes_by_source()
        # Every block is attributed to the peer that sent it, once (redundant ones aside).
        assert sources["peer"] == total and sources["web_seed"] == 0, sources
        assert sum(sources.values()) == status.total_payload_download
        assert download.bytes_by_ip() == {SEEDER: total}
    assert await seeder.total_uploaded() >= total
    assert (await seeder.totals()).payload_downloaded == 0


async def test_leecher_holding_half_the_chunks_downloads_only_the_rest(
    tmp_path: Path, swarms: Swarms
) -> None:
    store, mine = tmp_path / "seeder", tmp_path / "leecher"
    files = make_chunks(store, 24, seed=2)
    total = sum(f.length for f in files)
    held = files[::2]
    for f in held:
        (mine / chunk_relpath(f.hash)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store / chunk_relpath(f.hash), mine / chunk_relpath(f.hash))
    seeder, torrent = await seeded(swarms, store, files)

    leecher = await swarms(LEECHER_A)
    download = await leecher.add(torrent, mine)
    async with asyncio.timeout(10):
        await download.checked()
    assert download.status().total_done == sum(f.length for f in held)
    download.connect_peer(SEEDER, seeder.listen_port)
    await complete(download)

    assert_same_chunks(store, mine, files)
    assert download.status().total_payload_download < 0.6 * total

    await download.remove()
    assert download.info_hash not in leecher.downloads
    with pytest.raises(ImageSwarmError):
        download.status()
    assert (mine / chunk_relpath(files[0].hash)).exists()  # remove keeps the files


async def test_recheck_fetches_a_chunk_lost_after_finishing(tmp_path: Path, swarms: Swarms) -> None:
    store, mine = tmp_path / "seeder", tmp_path / "leecher"
    files = make_chunks(store, 8, seed=6)
    seeder, torrent = await seeded(swarms, store, files)
    leecher = await swarms(LEECHER_A)
    download = await leecher.add(torrent, mine)
    download.connect_peer(SEEDER, seeder.listen_port)
    await complete(download)

    (mine / chunk_relpath(files[3].hash)).unlink()
    async with asyncio.timeout(10):
        await download.recheck()
    assert download.status().total_done == sum(f.length for f in files) - files[3].length
    download.connect_peer(SEEDER, seeder.listen_port)
    await complete(download)
    assert_same_chunks(store, mine, files)

    await download.remove(delete_files=True)
    assert not any((mine / chunk_relpath(f.hash)).exists() for f in files)


async def test_upload_limit_holds_for_loopback_peers(tmp_path: Path, swarms: Swarms) -> None:
    store = tmp_path / "seeder"
    files = make_chunks(store, 32, seed=3, size=PIECE_LENGTH)  # 8 MiB
    torrent = build_torrent(files)
    seeder = await swarms(SEEDER, upload_rate_limit=2_000_000)
    await seeder.add(torrent, store, seed=True)

    leecher = await swarms(LEECHER_A)
    download = await leecher.add(torrent, tmp_path / "leecher")
    started = time.monotonic()
    download.connect_peer(SEEDER, seeder.listen_port)
    await complete(download)
    elapsed = time.monotonic() - started

    assert_same_chunks(store, tmp_path / "leecher", files)
    assert elapsed >= 3.0, f"8 MiB at 2 MB/s took only {elapsed:.1f}s: the limit did not apply"


async def test_peer_outside_the_allowed_cidrs_is_refused(tmp_path: Path, swarms: Swarms) -> None:
    store = tmp_path / "seeder"
    files = make_chunks(store, 8, seed=4)
    seeder, torrent = await seeded(swarms, store, files)
    seeding = seeder.downloads[next(iter(seeder.downloads))]

    leecher = await swarms(LEECHER_B, allowed=(f"{LEECHER_A}/32",))
    download = await leecher.add(torrent, tmp_path / "leecher")
    download.connect_peer(SEEDER, seeder.listen_port)  # outgoing: refused by the leecher
    seeding.connect_peer(LEECHER_B, leecher.listen_port)  # incoming: refused by the leecher
    await asyncio.sleep(3)

    status = download.status()
    assert status.total_payload_download == 0
    assert status.num_peers == 0
    assert any(isinstance(e, PeerBlocked) and e.ip == SEEDER for e in download.events)


async def test_corrupt_seeder_is_caught_and_an_honest_one_completes(
    tmp_path: Path, swarms: Swarms
) -> None:
    honest_store, bad_store = tmp_path / "honest", tmp_path / "bad"
    files = make_chunks(honest_store, 16, seed=5)
    shutil.copytree(honest_store, bad_store)
    torrent = build_torrent(files)

    # Seed mode would catch the corruption itself (it hashes each piece on its first request),
    # so the bad seeder checks its files while they are good, and one rots afterwards. (With
    # every file rotten, the honest seeder can complete pieces that still hold bad blocks and
    # be banned in turn: libtorrent blames every peer of a failed piece.)
    bad = await swarms(SEEDER)
    bad_seeding = await bad.add(torrent, bad_store)
    async with asyncio.timeout(10):
        await bad_seeding.finished()
    path = bad_store / chunk_relpath(files[0].hash)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with path.open("r+b") as out:
        out.write(data)
    honest = await swarms(LEECHER_A)
    await honest.add(torrent, honest_store, seed=True)

    leecher = await swarms(LEECHER_B)
    download = await leecher.add(torrent, tmp_path / "leecher")
    download.connect_peer(SEEDER, bad.listen_port)
    async with asyncio.timeout(10):
        while download.hash_failures == 0:  # noqa: ASYNC110 (a counter, not an awaitable)
            await asyncio.sleep(0.05)
    download.connect_peer(LEECHER_A, honest.listen_port)
    await complete(download)

    assert_same_chunks(honest_store, tmp_path / "leecher", files)
    failures = [e for e in download.events if isinstance(e, HashFailed)]
    assert len(failures) == download.hash_failures >= 1
    assert all(e.piece == failures[0].piece for e in failures)  # only the rotten chunk failed
    # libtorrent bans the bad seeder when it alone sent a failed piece, or not at all when it
    # verified the blocks against the merkle tree; it never bans the honest one here.
    assert {e.ip for e in download.events if isinstance(e, PeerBanned)} <= {SEEDER}


async def test_settings_are_checked_before_a_session_exists() -> None:
    with pytest.raises(InvalidInputError, match="enable_dht"):
        SwarmSettings(SEEDER, 0, LOOPBACK, extra={"enable_dht": True})
    with pytest.raises(InvalidInputError, match="CIDR"):
        SwarmSettings(SEEDER, 0, ("127.0.0.0/33",))
    with pytest.raises(InvalidInputError, match="no_such_setting"):
        Swarm(SwarmSettings(SEEDER, 0, LOOPBACK, extra={"no_such_setting": 1}))
    with pytest.raises(InvalidInputError, match="unchoke_slots_limit"):
        Swarm(SwarmSettings(SEEDER, 0, LOOPBACK, extra={"unchoke_slots_limit": "many"}))


class _FlushOnlyHandle:
    """Stands in for libtorrent's handle in a test of Download's own bookkeeping."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush_cache(self) -> None:
        self.flushes += 1


async def test_each_cache_flushed_alert_belongs_to_the_oldest_flush_even_if_cancelled() -> None:
    """libtorrent posts one alert per flush_cache call, in order. A flush whose waiter was
    cancelled still owns the next alert: handing it to a later flush would wake that one
    before its own flush is done (and a piece check would read unwritten blocks)."""
    info_hash = "ab" * 32
    download = Download(cast(Any, None), info_hash, Path("/nonexistent"), [], [])
    handle = _FlushOnlyHandle()
    download._handle = cast(Any, handle)
    first = asyncio.ensure_future(download.flush())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.ensure_future(download.flush())
    await asyncio.sleep(0)
    assert handle.flushes == 2
    download._on_event(CacheFlushed(info_hash))  # the cancelled flush's alert
    await asyncio.sleep(0)
    assert not second.done()
    download._on_event(CacheFlushed(info_hash))  # its own
    await asyncio.wait_for(second, 1)
