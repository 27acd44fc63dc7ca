"""One torrent in the swarm: awaitable milestones, commands, and payload bytes by source.

The swarm's alert pump resolves a download's milestones (``checked``, ``finished``, removal,
deletion, cache flushes) by calling ``_on_event``, so callers await instead of polling.
Bytes by source come from sampling libtorrent's per-peer counters (``status`` does, and the
swarm every ``peer_stats_interval``): see ``_sample`` for how they are read without counting a
reconnecting peer twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import libtorrent as lt

from imageswarm.agent.errors import ImageSwarmError, StoreError

from .events import (
    CacheFlushed,
    DownloadEvent,
    Event,
    FileError,
    HashFailed,
    PeerBanned,
    PeerBlocked,
    TorrentChecked,
    TorrentDeleted,
    TorrentError,
    TorrentFinished,
    TorrentRemoved,
    TrackerError,
)

_MAX_EVENTS: Final = 1000


@dataclass(frozen=True)
class DownloadStatus:
    """A snapshot of one torrent."""

    state: str
    progress: float
    total_wanted: int
    total_done: int
    download_rate: int
    upload_rate: int
    num_peers: int
    num_seeds: int
    total_payload_download: int
    total_payload_upload: int
    is_seeding: bool
    errors: tuple[str, ...]


class _Owner(Protocol):
    """What a download asks of the swarm that owns it (a Protocol: no import of the session)."""

    async def _add_torrent(self, download: Download, *, seed: bool) -> lt.torrent_handle: ...

    def _remove(self, handle: lt.torrent_handle, delete_files: bool) -> None: ...


class _Milestone:
    """A fact that becomes true once; waiters can also be failed without making it true."""

    def __init__(self) -> None:
        self.done = False
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def reset(self) -> None:
        self.done = False  # waiters stay: they are resolved when it becomes true again

    def fail(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(exc)

    async def wait(self) -> None:
        if self.done:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


class Download:
    """One torrent in the session; milestones are resolved by the swarm's alert pump."""

    def __init__(
        self,
        swarm: _Owner,
        info_hash: str,
        save_path: Path,
        trackers: Sequence[str],
        web_seeds: Sequence[str],
        skip_pieces: Sequence[int] = (),
    ) -> None:
        self.info_hash: Final = info_hash
        self.events: list[DownloadEvent] = []
        self.hash_failures = 0
        self._swarm = swarm
        self._info: lt.torrent_info | None = None
        self._save_path = save_path
        self._trackers = list(trackers)
        self._web_seeds = list(web_seeds)
        self._skip_pieces = tuple(skip_pieces)
        self._handle: lt.torrent_handle | None = None
        self._attached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readded: asyncio.Future[None] | None = None  # while recheck() swaps the torrent
        self._checked = _Milestone()
        self._finished = _Milestone()
        self._removed = _Milestone()
        self._deleted = _Milestone()
        self._flushes: list[asyncio.Future[None]] = []
        # (peer ip, kind) -> (bytes banked from counters that were reset, last counter value)
        self._peer_bytes: dict[tuple[str, str], tuple[int, int]] = {}
        # Payload totals: of the torrent's earlier incarnations (see recheck), and in all.
        self._base_down = self._base_up = 0
        self._payload_downloaded = 0

    # Milestones

    async def checked(self) -> None:
        """Return once libtorrent has checked which pieces are already on disk."""
        await self._checked.wait()

    async def finished(self) -> None:
        """Return once every wanted piece is downloaded and verified (not yet flushed)."""
        await self._finished.wait()

    async def flush(self) -> None:
        """Write everything downloaded so far to the files and close them."""
        handle = self._live_handle()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append(waiter)
        handle.flush_cache()
        await waiter

    async def recheck(self) -> None:
        """Check the files again (e.g. after deleting bad chunks); missing pieces download anew.

        ``finished`` waits again until every piece is back. libtorrent 2.1.1's force_recheck
        of a finished v2 torrent with pad files then requests the pad bytes and never
        finishes, so the torrent is removed and added again instead; peers connected by hand
        must be connected again.
        """
        handle = self._live_handle()
        st = self._sample(handle)
        self._base_down += int(st.total_payload_download)
        self._base_up += int(st.total_payload_upload)
        # The re-added torrent starts every peer's counter from zero: bank what they sent.
        self._peer_bytes = {k: (banked + last, 0) for k, (banked, last) in self._peer_bytes.items()}
        self._readded = asyncio.get_running_loop().create_future()
        try:
            self._swarm._remove(handle, delete_files=False)
            await self._readded
        finally:
            self._readded = None
        self._handle = None
        self._checked.reset()
        self._finished.reset()
        self._attach(await self._swarm._add_torrent(self, seed=False))
        await self._checked.wait()

    async def remove(self, delete_files: bool = False) -> None:
        """Remove the torrent from the session; ``delete_files`` also deletes its chunk files.

        Chunk files may be shared with other images in the store: delete only what no other
        image uses.
        """
        handle = self._live_handle()
        self._sample(handle)
        self._swarm._remove(handle, delete_files)
        await self._removed.wait()
        if delete_files:
            await self._deleted.wait()

    # Queries and commands

    def status(self) -> DownloadStatus:
        st = self._sample(self._live_handle())
        errors = [e.message for e in self.events if isinstance(e, FileError | TorrentError)]
        if st.errc.value() and st.errc.message() not in errors:
            errors.append(st.errc.message())
        return DownloadStatus(
            state=str(st.state),
            progress=float(st.progress),
            total_wanted=int(st.total_wanted),
            total_done=int(st.total_wanted_done),
            download_rate=int(st.download_payload_rate),
            upload_rate=int(st.upload_payload_rate),
            num_peers=int(st.num_peers),
            num_seeds=int(st.num_seeds),
            total_payload_download=self._payload_downloaded,
            total_payload_upload=self._base_up + int(st.total_payload_upload),
            is_seeding=bool(st.is_seeding),
            errors=tuple(errors),
        )

    def connect_peer(self, host: str, port: int) -> None:
        """Connect to a peer directly (subject to the allowed CIDRs)."""
        self._live_handle().connect_peer((host, port))

    def pieces_had(self) -> list[bool]:
        """For every piece, whether libtorrent has it (downloaded and hash-checked)."""
        return list(self._live_handle().status(lt.torrent_handle.query_pieces).pieces)

    def add_web_seed(self, url: str) -> None:
        """Add an HTTP seed: ``url`` + the torrent's path of a file serves that file
        (``chunks/ab/<hash>`` for a chunk torrent, ``<image_id>.img`` for an image torrent)."""
        self._live_handle().add_url_seed(url)
        self._web_seeds.append(url)

    def bytes_by_source(self, *, refresh: bool = True) -> dict[str, int]:
        """Payload bytes received so far by kind of source: "peer", "web_seed" and "unattributed".

        "unattributed" is what libtorrent counted for the torrent beyond the last sample of its
        peers, e.g. from peers that left the moment the download finished. The three add up to
        the torrent's payload download, redundant blocks (the endgame) included. With
        ``refresh=False`` the last sample is used (e.g. the one ``status()`` just took).
        """
        if refresh:
            self._refresh_peer_bytes()
        totals = {"peer": 0, "web_seed": 0}
        for (_ip, kind), (banked, last) in self._peer_bytes.items():
            totals[kind] += banked + last
        totals["unattributed"] = max(0, self._payload_downloaded - sum(totals.values()))
        return totals

    def bytes_by_ip(self, *, refresh: bool = True) -> dict[str, int]:
        """Payload bytes received so far from BitTorrent peers, by peer IP (web seeds excluded)."""
        if refresh:
            self._refresh_peer_bytes()
        return {
            ip: banked + last
            for (ip, kind), (banked, last) in self._peer_bytes.items()
            if kind == "peer"
        }

    # Internals, called by the swarm

    def _attach(self, handle: lt.torrent_handle) -> None:
        self._handle = handle
        if not self._attached.done():
            self._attached.set_result(None)
        if self._checked.done:
            self._check_finished()

    def _detach(self, exc: ImageSwarmError) -> None:
        """The session is gone: fail every waiter with ``exc``."""
        self._handle = None
        self._removed.fail(exc)
        self._deleted.fail(exc)
        self._fail_waiters(exc)

    def _current_handle(self) -> lt.torrent_handle | None:
        return None if self._removed.done else self._handle

    def _live_handle(self) -> lt.torrent_handle:
        handle = self._current_handle()
        if handle is None:
            raise ImageSwarmError(f"The torrent {self.info_hash} is not in the swarm session.")
        return handle

    def _check_finished(self) -> None:
        # libtorrent posts no torrent_finished_alert for a torrent that is complete on disk
        # when added (seed mode, or every chunk already in the store).
        if self._handle is None or self._finished.done:
            return
        if self._handle.status(0).is_finished:
            self._finished.set()

    def _refresh_peer_bytes(self) -> None:
        handle = self._current_handle()
        if handle is not None:
            self._sample(handle)

    def _sample(self, handle: lt.torrent_handle) -> lt.torrent_status:
        """Record what each peer sent so far; return the torrent status read alongside.

        libtorrent keeps one entry per peer IP (one connection per IP is allowed) and carries
        its byte count over from one connection to the next, so a peer's counter only grows,
        even while a closing connection and its successor are both listed (the larger one is
        current). A counter that falls to under half its last value belongs to a fresh entry
        (libtorrent dropped the old one): the old count is banked. (Carrying over rounds down
        to whole KiB, which is why a small drop is not a reset.)
        """
        st = handle.status(0)  # 0: none of the costly optional fields
        self._payload_downloaded = self._base_down + int(st.total_payload_download)
        now: dict[tuple[str, str], int] = {}
        for p in handle.get_peer_info():
            web = p.connection_type in (lt.peer_info.web_seed, lt.peer_info.http_seed)
            key = (str(p.ip[0]), "web_seed" if web else "peer")
            now[key] = max(now.get(key, 0), int(p.total_download))
        for key, total in now.items():
            banked, last = self._peer_bytes.get(key, (0, 0))
            if total < last // 2:
                banked += last
            elif total < last:
                total = last
            self._peer_bytes[key] = (banked, total)
        return st

    def _record(self, event: DownloadEvent) -> None:
        self.events.append(event)
        del self.events[:-_MAX_EVENTS]

    def _on_event(self, event: Event) -> None:
        match event:
            case TorrentChecked():
                self._checked.set()
                self._check_finished()
            case TorrentFinished():
                self._finished.set()
                self._refresh_peer_bytes()  # before more peers leave
            case CacheFlushed():
                # One alert per flush_cache call, in the order they were asked for: each alert
                # is the oldest waiter's, even if that waiter was cancelled meanwhile (handing
                # it to the next one would wake that one before its own flush is done).
                if self._flushes:
                    waiter = self._flushes.pop(0)
                    if not waiter.done():
                        waiter.set_result(None)
            case TorrentRemoved() if self._readded is not None:
                self._readded.set_result(None)
            case TorrentRemoved():
                self._removed.set()
                gone = ImageSwarmError(f"The torrent {self.info_hash} was removed from the swarm.")
                self._fail_waiters(gone)
            case TorrentDeleted(error=""):
                self._deleted.set()
            case TorrentDeleted(error=error):
                self._deleted.fail(
                    StoreError(f"Deleting the files of torrent {self.info_hash} failed: {error}.")
                )
            case HashFailed():
                self.hash_failures += 1
                self._record(event)
            case TorrentError(message=message):
                self._record(event)
                self._fail_waiters(StoreError(f"The torrent {self.info_hash} stopped: {message}."))
            case PeerBanned() | PeerBlocked() | FileError() | TrackerError():
                self._record(event)
            case _:
                pass

    def _fail_waiters(self, exc: ImageSwarmError) -> None:
        self._checked.fail(exc)
        self._finished.fail(exc)
        flushes, self._flushes = self._flushes, []
        for waiter in flushes:
            if not waiter.done():
                waiter.set_exception(exc)
