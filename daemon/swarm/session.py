"""The daemon's one libtorrent session and its alert pump.

libtorrent runs its own threads and reports through alerts. A single pump owns ``pop_alerts()``:
libtorrent writes a byte to a socketpair whenever its alert queue stops being empty
(``session.set_alert_fd``), the event loop watches the other end, and the pump copies each alert
at once into a frozen event (alerts die on the next pop) and dispatches it by type. Downloads
expose awaitable milestones resolved by the pump, so callers await instead of polling. Nothing
here calls back into Python from a libtorrent thread (``set_alert_notify`` with a Python callable
can deadlock on the GIL).

This module owns the session's lifetime (start, add, close), the pump and the session totals;
``settings`` (what the session is built from), ``events`` (alerts copied into frozen events) and
``download`` (one torrent) hold the rest, and their public names are re-exported here, where
callers import them. libtorrent 2.1.1 ships type stubs; its objects stay inside this package,
and callers see frozen dataclasses, ``Download`` and ``Swarm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

import libtorrent as lt

from imageswarm.agent.errors import ImageSwarmError

from .download import Download, DownloadStatus
from .events import (
    DownloadEvent,
    Event,
    FileError,
    HashFailed,
    Listen,
    Logged,
    PeerBanned,
    PeerBlocked,
    Stats,
    TorrentError,
    TorrentRemoved,
    TrackerError,
    to_event,
)
from .settings import SettingValue, SwarmSettings, new_session, settings_pack
from .torrent import info_hash_v2

__all__ = [
    "Download",
    "DownloadEvent",
    "DownloadStatus",
    "FileError",
    "HashFailed",
    "PeerBanned",
    "PeerBlocked",
    "SessionTotals",
    "SettingValue",
    "Swarm",
    "SwarmSettings",
    "TorrentError",
    "TrackerError",
    "settings_pack",
]

log = logging.getLogger(__name__)

_TORRENT_FLAGS: Final = (
    lt.torrent_flags.auto_managed
    | lt.torrent_flags.apply_ip_filter
    | lt.torrent_flags.disable_dht
    | lt.torrent_flags.disable_lsd
    | lt.torrent_flags.disable_pex
)

_START_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class SessionTotals:
    """Payload bytes moved by the whole session since it started."""

    payload_uploaded: int
    payload_downloaded: int


class Swarm:
    """Owns the daemon's libtorrent session, its alert pump and its downloads."""

    def __init__(self, settings: SwarmSettings) -> None:
        """Build the session; nothing is pumped or announced before ``start``."""
        self.settings: Final = settings
        self._session: lt.session | None = new_session(settings)
        self._downloads: dict[str, Download] = {}
        self._listening: asyncio.Future[int] | None = None
        self._stats: list[asyncio.Future[Mapping[str, int]]] = []
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._refresher: asyncio.Task[None] | None = None

    @property
    def _live(self) -> lt.session:
        if self._session is None:
            raise ImageSwarmError("The swarm session is closed.")
        return self._session

    async def start(self) -> None:
        """Start the alert pump and wait until the session listens for peers."""
        if self._reader is not None:
            raise ImageSwarmError("The swarm session was already started.")
        loop = asyncio.get_running_loop()
        self._listening = loop.create_future()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._live.set_alert_fd(self._writer.fileno())
        loop.add_reader(self._reader.fileno(), self._on_alert_fd)
        self._pump()  # alerts queued before the fd was set raised no notification
        self._refresher = asyncio.create_task(self._refresh_peers(), name="swarm-peer-stats")
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                await self._listening
        except TimeoutError:
            raise ImageSwarmError(
                f"The swarm did not start listening on {self.settings.listen_host} "
                f"within {_START_TIMEOUT:g} seconds."
            ) from None

    @property
    def listen_port(self) -> int:
        """The TCP port peers connect to (the actual one when the settings asked for 0)."""
        return int(self._live.listen_port())

    @property
    def downloads(self) -> Mapping[str, Download]:
        """The downloads in the session by v2 info-hash (hex)."""
        return MappingProxyType(self._downloads)

    async def add(
        self,
        torrent: bytes,
        save_path: Path,
        *,
        seed: bool = False,
        trackers: Sequence[str] = (),
        web_seeds: Sequence[str] = (),
        skip_pieces: Sequence[int] = (),
    ) -> Download:
        """Add a torrent (idempotent: an info-hash already present returns its Download).

        ``seed`` skips the check of the files against the torrent: only for a caller that has
        written and verified them (the publisher, or a node that has checked the image's
        SHA-256). ``skip_pieces`` are never requested (e.g. pieces that are all zeros).
        """
        info_hash = info_hash_v2(torrent)
        existing = self._downloads.get(info_hash)
        if existing is not None:
            await asyncio.shield(existing._attached)
            return existing
        download = Download(self, info_hash, save_path, trackers, web_seeds, skip_pieces)
        self._downloads[info_hash] = download
        try:
            try:
                loop = asyncio.get_running_loop()
                download._info = await loop.run_in_executor(None, lt.torrent_info, torrent)
            except RuntimeError as err:
                raise ImageSwarmError(f"libtorrent refuses torrent {info_hash}: {err}.") from None
            handle = await self._add_torrent(download, seed=seed)
        except BaseException as err:
            del self._downloads[info_hash]
            download._attached.set_exception(err)
            download._attached.exception()  # mark retrieved: there may be no other waiter
            raise
        download._attach(handle)
        return download

    async def totals(self) -> SessionTotals:
        """Payload bytes moved by the session so far (all torrents, removed ones included)."""
        waiter: asyncio.Future[Mapping[str, int]] = asyncio.get_running_loop().create_future()
        session = self._live
        self._stats.append(waiter)
        session.post_session_stats()
        values = await waiter
        return SessionTotals(
            payload_uploaded=values["net.sent_payload_bytes"],
            payload_downloaded=values["net.recv_payload_bytes"],
        )

    async def total_uploaded(self) -> int:
        """Payload bytes the session has uploaded so far."""
        return (await self.totals()).payload_uploaded

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop the pump and destroy the session, waiting at most ``timeout`` seconds.

        The timeout is ours, not the caller's: the session dies in a thread that cannot be
        cancelled, and when it overruns the alert socket must be leaked, not closed.
        """
        if self._session is None:
            return
        session, self._session = self._session, None
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        loop = asyncio.get_running_loop()
        if self._reader is not None:
            loop.remove_reader(self._reader.fileno())
        closed = ImageSwarmError("The swarm session was closed.")
        for download in self._downloads.values():
            download._detach(closed)
        for waiter in self._stats:
            if not waiter.done():
                waiter.set_exception(closed)
        self._downloads.clear()
        session.pause()
        destroyed: asyncio.Future[None] = loop.create_future()
        holder = [session]
        del session

        def mark_destroyed() -> None:
            if not destroyed.done():
                destroyed.set_result(None)

        def destroy() -> None:
            holder.clear()  # the last reference: ~session runs here, off the event loop
            loop.call_soon_threadsafe(mark_destroyed)

        # A daemon thread, not the default executor, so a hung shutdown cannot block the loop's
        # own shutdown either.
        threading.Thread(target=destroy, name="swarm-session-close", daemon=True).start()
        try:
            async with asyncio.timeout(timeout):
                await destroyed
        except TimeoutError:
            log.warning("the libtorrent session did not shut down within %gs", timeout)
            # libtorrent may still write to the alert fd: never let the number be reused.
            for sock in (self._reader, self._writer):
                if sock is not None:
                    sock.detach()
            return
        for sock in (self._reader, self._writer):
            if sock is not None:
                sock.close()

    # Internals

    async def _add_torrent(self, download: Download, *, seed: bool) -> lt.torrent_handle:
        params = lt.add_torrent_params()
        params.ti = download._info
        params.save_path = str(download._save_path)
        params.flags = _TORRENT_FLAGS | (lt.torrent_flags.seed_mode if seed else 0)
        params.trackers = download._trackers
        params.url_seeds = download._web_seeds
        if download._skip_pieces and not seed:
            assert download._info is not None
            priorities = [4] * download._info.num_pieces()  # 4: libtorrent's default priority
            for index in download._skip_pieces:
                priorities[index] = 0
            params.piece_priorities = priorities
        session = self._live
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, session.add_torrent, params
            )
        except RuntimeError as err:
            raise ImageSwarmError(f"Adding torrent {download.info_hash} failed: {err}.") from None

    def _remove(self, handle: lt.torrent_handle, delete_files: bool) -> None:
        self._live.remove_torrent(handle, lt.session.delete_files if delete_files else 0)

    def _on_alert_fd(self) -> None:
        assert self._reader is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._reader.recv(4096):
                pass
        self._pump()

    def _pump(self) -> None:
        if self._session is None:
            return
        for alert in self._session.pop_alerts():
            try:
                event = to_event(alert)
            except Exception:
                log.exception("could not read a libtorrent %s", type(alert).__name__)
                continue
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        """Route one event; a failing handler is logged and never stops the pump."""
        try:
            match event:
                case Listen():
                    self._on_listen(event)
                case Stats():
                    self._on_stats(event)
                case Logged():
                    log.log(event.level, "%s", event.message)
                case _:
                    download = self._downloads.get(event.info_hash)
                    if download is None:
                        log.info("%s", event)  # e.g. an incoming peer refused by the ip filter
                        return
                    download._on_event(event)
                    if isinstance(event, TorrentRemoved) and download._removed.done:
                        del self._downloads[event.info_hash]
        except Exception:
            log.exception("handling %s failed", event)

    def _on_listen(self, event: Listen) -> None:
        if not event.tcp or self._listening is None or self._listening.done():
            return
        if event.error:
            self._listening.set_exception(
                ImageSwarmError(f"The swarm cannot listen for peers: {event.error}.")
            )
        else:
            self._listening.set_result(event.port)

    def _on_stats(self, event: Stats) -> None:
        waiters, self._stats = self._stats, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(event.values)

    async def _refresh_peers(self) -> None:
        while True:
            await asyncio.sleep(self.settings.peer_stats_interval)
            for download in list(self._downloads.values()):
                try:
                    download._refresh_peer_bytes()
                except Exception:
                    log.exception("reading the peers of torrent %s failed", download.info_hash)
