"""Frozen copies of libtorrent alerts: the events the swarm's alert pump dispatches.

libtorrent invalidates an alert on the next ``pop_alerts()``, so the pump copies what it uses out
of each one at once (``to_event``) and nothing past this module touches an alert. Events carrying
a torrent name it by its v2 info-hash (hex). The public ones are recorded on a download for its
caller (``Download.events``); the rest only drive the pump: milestones, listening, statistics,
logging.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import libtorrent as lt

_WARN_CATEGORIES: Final = (
    lt.alert.category_t.error_notification | lt.alert.category_t.performance_warning
)

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

# Events only the pump uses; never shown to callers.


@dataclass(frozen=True)
class TorrentChecked:
    info_hash: str


@dataclass(frozen=True)
class TorrentFinished:
    info_hash: str


@dataclass(frozen=True)
class CacheFlushed:
    info_hash: str


@dataclass(frozen=True)
class TorrentRemoved:
    info_hash: str


@dataclass(frozen=True)
class TorrentDeleted:
    info_hash: str
    error: str  # empty when the files were deleted


@dataclass(frozen=True)
class Listen:
    tcp: bool
    port: int
    error: str  # empty when listening succeeded


@dataclass(frozen=True)
class Stats:
    values: Mapping[str, int]  # counter name -> value


@dataclass(frozen=True)
class Logged:
    level: int
    message: str


Event = (
    DownloadEvent
    | TorrentChecked
    | TorrentFinished
    | CacheFlushed
    | TorrentRemoved
    | TorrentDeleted
    | Listen
    | Stats
    | Logged
)


def _hex(digest: lt.sha256_hash) -> str:
    return "" if digest.is_all_zeros() else str(digest)


def _ih(alert: lt.torrent_alert) -> str:
    return _hex(alert.handle.info_hashes().v2)


def to_event(a: lt.alert) -> Event:
    """Copy what we use out of one alert, which libtorrent invalidates on the next pop."""
    if isinstance(a, lt.torrent_checked_alert):
        return TorrentChecked(_ih(a))
    if isinstance(a, lt.torrent_finished_alert):
        return TorrentFinished(_ih(a))
    if isinstance(a, lt.cache_flushed_alert):
        return CacheFlushed(_ih(a))
    if isinstance(a, lt.torrent_removed_alert):
        return TorrentRemoved(_hex(a.info_hashes.v2))
    if isinstance(a, lt.torrent_deleted_alert):
        return TorrentDeleted(_hex(a.info_hashes.v2), "")
    if isinstance(a, lt.torrent_delete_failed_alert):
        return TorrentDeleted(_hex(a.info_hashes.v2), a.error.message() or "unknown error")
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
        return Listen(tcp, int(a.port), a.message() if failed else "")
    if isinstance(a, lt.session_stats_alert):
        return Stats(MappingProxyType(dict(a.values)))
    if a.category() & _WARN_CATEGORIES:
        return Logged(logging.WARNING, f"{a.what()}: {a.message()}")
    return Logged(logging.DEBUG, f"{a.what()}: {a.message()}")
