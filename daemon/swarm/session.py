"""The daemon's one libtorrent session and its alert pump.

libtorrent runs its own threads and reports through alerts. A single pump owns ``pop_alerts()``:
libtorrent writes a byte to a socketpair whenever its alert queue stops being empty
(``session.set_alert_fd``), the event loop watches the other end, and the pump copies each alert
at once into a frozen event (alerts die on the next pop) and dispatches it by type. Downloads
expose awaitable milestones resolved by the pump, so callers await instead of polling. Nothing
here calls back into Python from a libtorrent thread (``set_alert_notify`` with a Python callable
can deadlock on the GIL).

libtorrent 2.1.1 ships type stubs; its objects stay inside this module, and callers see frozen
dataclasses, ``Download`` and ``Swarm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, cast

import libtorrent as lt

from imageswarm.agent.errors import ImageSwarmError, InvalidInputError, StoreError

from .torrent import info_hash_v2

log = logging.getLogger(__name__)

SettingValue = int | bool | str

# Settings the privacy and addressing rules of the swarm depend on: never taken from ``extra``.
_RESERVED: Final = frozenset(
    {
        "alert_mask",
        "dht_bootstrap_nodes",
        "enable_dht",
        "enable_lsd",
        "enable_natpmp",
        "enable_upnp",
        "listen_interfaces",
        "outgoing_interfaces",
    }
)

_ALERT_MASK: Final = (
    lt.alert.category_t.status_notification
    | lt.alert.category_t.error_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.peer_notification
    | lt.alert.category_t.tracker_notification
    | lt.alert.category_t.performance_warning
    | lt.alert.category_t.ip_block_notification
)

_TORRENT_FLAGS: Final = (
    lt.torrent_flags.auto_managed
    | lt.torrent_flags.apply_ip_filter
    | lt.torrent_flags.disable_dht
    | lt.torrent_flags.disable_lsd
    | lt.torrent_flags.disable_pex
)

_WARN_CATEGORIES: Final = (
    lt.alert.category_t.error_notification | lt.alert.category_t.performance_warning
)

_MAX_EVENTS: Final = 1000
_START_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class SwarmSettings:
    """Everything the session is built from; tuned for a private swarm inside a datacenter."""

    listen_host: str
    listen_port: int
    allowed_cidrs: tuple[str, ...]
    upload_rate_limit: int = 0  # bytes/s, 0 = unlimited; applies to loopback and LAN peers too
    download_rate_limit: int = 0
    enable_utp: bool = False  # uTP cost 2-3x the CPU per byte of TCP in our measurements
    whole_pieces_threshold: int = 0
    max_allowed_in_request_queue: int = 32
    file_pool_size: int = 4096  # one file per chunk: keep many open
    connections_limit: int = 2000
    active_torrents_limit: int = 10000
    min_announce_interval: int = 5
    stop_tracker_timeout: int = 1  # bounds close(): the "stopped" announce waits this long
    alert_queue_size: int = 10000
    peer_stats_interval: float = 1.0  # seconds between per-peer byte counter refreshes
    extra: Mapping[str, SettingValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise InvalidInputError(
                f"The swarm listen address {self.listen_host!r} is not an IP address."
            ) from None
        if not 0 <= self.listen_port <= 65535:
            raise InvalidInputError(f"The swarm listen port {self.listen_port} is not 0..65535.")
        if not self.allowed_cidrs:
            raise InvalidInputError("The swarm needs at least one allowed peer CIDR.")
        for cidr in self.allowed_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InvalidInputError(f"The allowed peer CIDR {cidr!r} is not valid.") from None
        if self.upload_rate_limit < 0 or self.download_rate_limit < 0:
            raise InvalidInputError("Swarm rate limits must be 0 (unlimited) or positive.")
        if self.peer_stats_interval <= 0:
            raise InvalidInputError("The swarm peer statistics interval must be positive.")
        reserved = sorted(_RESERVED & self.extra.keys())
        if reserved:
            raise InvalidInputError(
                f"The swarm setting {reserved[0]!r} is fixed by imageswarm and cannot be changed."
            )
        object.__setattr__(self, "allowed_cidrs", tuple(self.allowed_cidrs))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


def settings_pack(settings: SwarmSettings) -> dict[str, SettingValue]:
    """Return the libtorrent settings_pack (as a dict) a session is created with."""
    host = settings.listen_host
    listen = f"[{host}]" if ":" in host else host
    active = settings.active_torrents_limit
    pack: dict[str, SettingValue] = {
        # Private swarm: no discovery or port mapping that could leave the cluster.
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "dht_bootstrap_nodes": "",
        "anonymous_mode": False,
        "user_agent": "imageswarm/0.1",
        # Listen, announce and connect from the node's own address (several nodes may share a
        # host on 127.0.0.x in tests and labs).
        "listen_interfaces": f"{listen}:{settings.listen_port}",
        "outgoing_interfaces": host,
        "alert_mask": _ALERT_MASK,
        "alert_queue_size": settings.alert_queue_size,
        "upload_rate_limit": settings.upload_rate_limit,
        "download_rate_limit": settings.download_rate_limit,
        "enable_outgoing_utp": settings.enable_utp,
        "enable_incoming_utp": settings.enable_utp,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # Measured on a 16-node swarm: 3.1x -> 1.7x the theoretical bound, seeder upload from
        # 2-3 copies down to 1.1-1.5.
        "whole_pieces_threshold": settings.whole_pieces_threshold,
        "max_allowed_in_request_queue": settings.max_allowed_in_request_queue,
        "suggest_mode": int(lt.suggest_mode_t.no_piece_suggestions),
        "file_pool_size": settings.file_pool_size,
        "connections_limit": settings.connections_limit,
        "active_downloads": active,
        "active_seeds": active,
        "active_limit": active,
        "announce_to_all_trackers": True,
        "announce_to_all_tiers": True,
        "min_announce_interval": settings.min_announce_interval,
        "stop_tracker_timeout": settings.stop_tracker_timeout,
    }
    pack.update(settings.extra)
    return pack


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


@dataclass(frozen=True)
class SessionTotals:
    """Payload bytes moved by the whole session since it started."""

    payload_uploaded: int
    payload_downloaded: int


# Events recorded on a download for the caller (dl.events).


@dataclass(frozen=True)
class HashFailed:
    info_hash: str
    piece: int


@dataclass(frozen=True)
class PeerBanned:
    info_hash: str
    ip: str
    port: int


@dataclass(frozen=True)
class PeerBlocked:
    info_hash: str
    ip: str
    reason: int


@dataclass(frozen=True)
class FileError:
    info_hash: str
    file: str
    message: str


@dataclass(frozen=True)
class TorrentError:
    info_hash: str
    message: str


@dataclass(frozen=True)
class TrackerError:
    info_hash: str
    url: str
    message: str


DownloadEvent = HashFailed | PeerBanned | PeerBlocked | FileError | TorrentError | TrackerError

# Events only the pump uses.


@dataclass(frozen=True)
class _TorrentChecked:
    info_hash: str


@dataclass(frozen=True)
class _TorrentFinished:
    info_hash: str


@dataclass(frozen=True)
class _CacheFlushed:
    info_hash: str


@dataclass(frozen=True)
class _TorrentRemoved:
    info_hash: str


@dataclass(frozen=True)
class _TorrentDeleted:
    info_hash: str
    error: str  # empty when the files were deleted


@dataclass(frozen=True)
class _Listen:
    tcp: bool
    port: int
    error: str  # empty when listening succeeded


@dataclass(frozen=True)
class _Stats:
    values: Mapping[str, int]  # counter name -> value


@dataclass(frozen=True)
class _Logged:
    level: int
    message: str


_Event = (
    DownloadEvent
    | _TorrentChecked
    | _TorrentFinished
    | _CacheFlushed
    | _TorrentRemoved
    | _TorrentDeleted
    | _Listen
    | _Stats
    | _Logged
)


def _hex(digest: lt.sha256_hash) -> str:
    return "" if digest.is_all_zeros() else str(digest)


def _ih(alert: lt.torrent_alert) -> str:
    return _hex(alert.handle.info_hashes().v2)


def _to_event(a: lt.alert) -> _Event | None:
    """Copy what we use out of one alert, which libtorrent invalidates on the next pop."""
    if isinstance(a, lt.torrent_checked_alert):
        return _TorrentChecked(_ih(a))
    if isinstance(a, lt.torrent_finished_alert):
        return _TorrentFinished(_ih(a))
    if isinstance(a, lt.cache_flushed_alert):
        return _CacheFlushed(_ih(a))
    if isinstance(a, lt.torrent_removed_alert):
        return _TorrentRemoved(_hex(a.info_hashes.v2))
    if isinstance(a, lt.torrent_deleted_alert):
        return _TorrentDeleted(_hex(a.info_hashes.v2), "")
    if isinstance(a, lt.torrent_delete_failed_alert):
        return _TorrentDeleted(_hex(a.info_hashes.v2), a.error.message() or "unknown error")
    if isinstance(a, lt.hash_failed_alert):
        return HashFailed(_ih(a), int(a.piece_index))
    if isinstance(a, lt.peer_ban_alert):
        host, port = a.ip
        return PeerBanned(_ih(a), str(host), int(port))
    if isinstance(a, lt.peer_blocked_alert):
        host, _port = a.ip
        return PeerBlocked(_ih(a), str(host), int(a.reason))
    if isinstance(a, lt.file_error_alert):
        return FileError(_ih(a), str(a.filename()), a.error.message())
    if isinstance(a, lt.torrent_error_alert):
        return TorrentError(_ih(a), a.error.message())
    if isinstance(a, lt.tracker_error_alert):
        return TrackerError(_ih(a), a.tracker_url(), a.message())
    if isinstance(a, lt.listen_succeeded_alert | lt.listen_failed_alert):
        tcp = a.socket_type == lt.socket_type_t.tcp
        failed = isinstance(a, lt.listen_failed_alert)
        return _Listen(tcp, int(a.port), a.message() if failed else "")
    if isinstance(a, lt.session_stats_alert):
        return _Stats(MappingProxyType(dict(a.values)))
    if a.category() & _WARN_CATEGORIES:
        return _Logged(logging.WARNING, f"{a.what()}: {a.message()}")
    return _Logged(logging.DEBUG, f"{a.what()}: {a.message()}")


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
        self, swarm: Swarm, info_hash: str, save_path: Path, trackers: Sequence[str]
    ) -> None:
        self.info_hash: Final = info_hash
        self.events: list[DownloadEvent] = []
        self.hash_failures = 0
        self._swarm = swarm
        self._info: lt.torrent_info | None = None
        self._save_path = save_path
        self._trackers = list(trackers)
        self._web_seeds: list[str] = []
        self._handle: lt.torrent_handle | None = None
        self._attached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readded: asyncio.Future[None] | None = None  # while recheck() swaps the torrent
        self._checked = _Milestone()
        self._finished = _Milestone()
        self._removed = _Milestone()
        self._deleted = _Milestone()
        self._flushes: list[asyncio.Future[None]] = []
        # (ip, port, kind) -> (bytes of earlier connections, bytes of the current one)
        self._peer_bytes: dict[tuple[str, int, str], tuple[int, int]] = {}
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
        st = handle.status(0)
        self._refresh_peer_bytes()
        self._base_down += int(st.total_payload_download)
        self._base_up += int(st.total_payload_upload)
        self._peer_bytes = {k: (earlier + now, 0) for k, (earlier, now) in self._peer_bytes.items()}
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
        self._refresh_peer_bytes()
        self._swarm._remove(handle, delete_files)
        await self._removed.wait()
        if delete_files:
            await self._deleted.wait()

    # Queries and commands

    def status(self) -> DownloadStatus:
        st = self._live_handle().status(0)  # 0: none of the costly optional fields
        self._refresh_peer_bytes()
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
            total_payload_download=self._base_down + int(st.total_payload_download),
            total_payload_upload=self._base_up + int(st.total_payload_upload),
            is_seeding=bool(st.is_seeding),
            errors=tuple(errors),
        )

    def connect_peer(self, host: str, port: int) -> None:
        """Connect to a peer directly (subject to the allowed CIDRs)."""
        self._live_handle().connect_peer((host, port))

    def add_web_seed(self, url: str) -> None:
        """Add an HTTP seed serving a store: ``url`` + ``chunks/ab/<hash>`` is a chunk."""
        self._live_handle().add_url_seed(url)
        self._web_seeds.append(url)

    def bytes_by_source(self) -> dict[str, int]:
        """Payload bytes received so far by kind of source: "peer", "web_seed" and "unattributed".

        libtorrent counts bytes per connection and forgets them on disconnect, so connections
        are sampled (here, in ``status`` and every ``peer_stats_interval``); "unattributed" is
        what connections received after their last sample, e.g. peers that left the moment the
        download finished. The three add up to the torrent's payload download.
        """
        self._refresh_peer_bytes()
        totals = {"peer": 0, "web_seed": 0}
        for (_ip, _port, kind), (earlier, current) in self._peer_bytes.items():
            totals[kind] += earlier + current
        totals["unattributed"] = max(0, self._payload_downloaded - sum(totals.values()))
        return totals

    def bytes_by_ip(self) -> dict[str, int]:
        """Payload bytes received so far from BitTorrent peers, by peer IP (web seeds excluded)."""
        self._refresh_peer_bytes()
        totals: dict[str, int] = {}
        for (ip, _port, kind), (earlier, current) in self._peer_bytes.items():
            if kind == "peer":
                totals[ip] = totals.get(ip, 0) + earlier + current
        return totals

    # Internals, called by the swarm

    def _attach(self, handle: lt.torrent_handle) -> None:
        self._handle = handle
        if not self._attached.done():
            self._attached.set_result(None)
        if self._checked.done:
            self._check_finished()

    def _live_handle(self) -> lt.torrent_handle:
        if self._handle is None or self._removed.done:
            raise ImageSwarmError(f"The torrent {self.info_hash} is not in the swarm session.")
        return self._handle

    def _check_finished(self) -> None:
        # libtorrent posts no torrent_finished_alert for a torrent that is complete on disk
        # when added (seed mode, or every chunk already in the store).
        if self._handle is None or self._finished.done:
            return
        if self._handle.status(0).is_finished:
            self._finished.set()

    def _refresh_peer_bytes(self) -> None:
        if self._handle is None or self._removed.done:
            return
        st = self._handle.status(0)
        self._payload_downloaded = self._base_down + int(st.total_payload_download)
        for p in self._handle.get_peer_info():
            web = p.connection_type in (lt.peer_info.web_seed, lt.peer_info.http_seed)
            key = (str(p.ip[0]), int(p.ip[1]), "web_seed" if web else "peer")
            earlier, current = self._peer_bytes.get(key, (0, 0))
            now = int(p.total_download)
            if now < current:  # a new connection from the same endpoint: bank the old one
                earlier += current
            self._peer_bytes[key] = (earlier, now)

    def _record(self, event: DownloadEvent) -> None:
        self.events.append(event)
        del self.events[:-_MAX_EVENTS]

    def _on_event(self, event: _Event) -> None:
        match event:
            case _TorrentChecked():
                self._checked.set()
                self._check_finished()
            case _TorrentFinished():
                self._finished.set()
                self._refresh_peer_bytes()  # before more peers leave
            case _CacheFlushed():
                # Flushes complete in the order they were asked for.
                while self._flushes:
                    waiter = self._flushes.pop(0)
                    if not waiter.done():
                        waiter.set_result(None)
                        break
            case _TorrentRemoved() if self._readded is not None:
                self._readded.set_result(None)
            case _TorrentRemoved():
                self._removed.set()
                gone = ImageSwarmError(f"The torrent {self.info_hash} was removed from the swarm.")
                self._fail_waiters(gone)
            case _TorrentDeleted(error=""):
                self._deleted.set()
            case _TorrentDeleted(error=error):
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


class Swarm:
    """Owns the daemon's libtorrent session, its alert pump and its downloads."""

    def __init__(self, settings: SwarmSettings) -> None:
        """Build the session; nothing is pumped or announced before ``start``."""
        self.settings: Final = settings
        self._session: lt.session | None = _new_session(settings)
        self._downloads: dict[str, Download] = {}
        self._listening: asyncio.Future[int] | None = None
        self._stats: list[asyncio.Future[Mapping[str, int]]] = []
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    def create(cls, settings: SwarmSettings) -> Swarm:
        """The same as ``Swarm(settings)``."""
        return cls(settings)

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
    ) -> Download:
        """Add a torrent (idempotent: an info-hash already present returns its Download).

        ``seed`` skips the check of the files against the torrent: only for a caller that has
        just written and verified them (the publisher).
        """
        info_hash = info_hash_v2(torrent)
        existing = self._downloads.get(info_hash)
        if existing is not None:
            await asyncio.shield(existing._attached)
            return existing
        download = Download(self, info_hash, save_path, trackers)
        download._web_seeds.extend(web_seeds)
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
            download._handle = None
            download._removed.fail(closed)
            download._deleted.fail(closed)
            download._fail_waiters(closed)
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
                event = _to_event(alert)
            except Exception:
                log.exception("could not read a libtorrent %s", type(alert).__name__)
                continue
            if event is not None:
                self._dispatch(event)

    def _dispatch(self, event: _Event) -> None:
        """Route one event; a failing handler is logged and never stops the pump."""
        try:
            match event:
                case _Listen():
                    self._on_listen(event)
                case _Stats():
                    self._on_stats(event)
                case _Logged():
                    log.log(event.level, "%s", event.message)
                case _:
                    download = self._downloads.get(event.info_hash)
                    if download is None:
                        log.info("%s", event)  # e.g. an incoming peer refused by the ip filter
                        return
                    download._on_event(event)
                    if isinstance(event, _TorrentRemoved) and download._removed.done:
                        del self._downloads[event.info_hash]
        except Exception:
            log.exception("handling %s failed", event)

    def _on_listen(self, event: _Listen) -> None:
        if not event.tcp or self._listening is None or self._listening.done():
            return
        if event.error:
            self._listening.set_exception(
                ImageSwarmError(f"The swarm cannot listen for peers: {event.error}.")
            )
        else:
            self._listening.set_result(event.port)

    def _on_stats(self, event: _Stats) -> None:
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


def _new_session(settings: SwarmSettings) -> lt.session:
    pack = settings_pack(settings)
    defaults = cast(dict[str, SettingValue], lt.default_settings())
    for name, value in settings.extra.items():
        default = defaults.get(name)
        if default is not None and type(value) is not type(default):
            raise InvalidInputError(
                f"The libtorrent setting {name!r} takes a value of type "
                f"{type(default).__name__}, not {value!r}."
            )
    try:
        # flags=0: no default plugins, so no ut_pex (and no ut_metadata: we always have the
        # torrent); smart_ban is added back to ban peers that send corrupt blocks.
        session = lt.session(cast("lt.settings_pack", pack), 0)
    except KeyError as err:  # the binding's message names the setting
        raise InvalidInputError(f"libtorrent refused the settings: {err.args[0]}.") from None
    except TypeError as err:
        raise InvalidInputError(f"libtorrent refused the settings: {err}.") from None
    session.add_extension("smart_ban")
    # The filters below are set just after the session starts listening; until a torrent is
    # added, a peer that slips in can only be refused for an unknown info-hash.
    applied = cast(dict[str, SettingValue], session.get_settings())
    for name, value in pack.items():
        if applied.get(name) != value:  # the binding silently drops values of the wrong type
            raise InvalidInputError(f"libtorrent did not accept {value!r} for setting {name!r}.")
    session.set_ip_filter(_allow_only(settings.allowed_cidrs))
    # By default libtorrent puts LAN and loopback peers in a "local" peer class without rate
    # limits; put every address in the global class so the limits hold for all peers.
    every = lt.ip_filter()
    global_class = 1 << lt.session.global_peer_class_id
    every.add_rule("0.0.0.0", "255.255.255.255", global_class)
    every.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", global_class)
    session.set_peer_class_filter(every)
    return session


def _allow_only(cidrs: Sequence[str]) -> lt.ip_filter:
    """Return an ip_filter that blocks every address except those in ``cidrs``."""
    blocked, allowed = 1, 0
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", blocked)
    f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", blocked)
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        f.add_rule(str(net.network_address), str(net.broadcast_address), allowed)
    return f
