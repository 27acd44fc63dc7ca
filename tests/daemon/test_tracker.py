"""The private tracker: compact peers, only own torrents, only cluster addresses."""

from __future__ import annotations

import socket
import struct
from urllib.parse import quote_from_bytes, urlencode

from imageswarm.daemon.tracker import Tracker

INFO = "ab" * 32


def _query(info_hash: bytes, port: int, left: int = 100, event: str = "") -> str:
    params = urlencode({"port": port, "left": left, "event": event, "compact": 1})
    return f"info_hash={quote_from_bytes(info_hash)}&{params}"


def _peers(blob: object) -> list[tuple[str, int]]:
    assert isinstance(blob, bytes)
    return [
        (socket.inet_ntoa(blob[i : i + 4]), struct.unpack("!H", blob[i + 4 : i + 6])[0])
        for i in range(0, len(blob), 6)
    ]


def test_announce_returns_other_peers_compactly() -> None:
    tracker = Tracker(["127.0.0.0/8"], interval=5)
    tracker.allow(INFO)
    ih = bytes.fromhex(INFO)[:20]
    first = tracker.announce(_query(ih, 6881, left=0), "127.0.0.2")
    assert first["peers"] == b"" and first["interval"] == 5
    second = tracker.announce(_query(ih, 6882), "127.0.0.3")
    assert _peers(second["peers"]) == [("127.0.0.2", 6881)]
    third = tracker.announce(_query(ih, 6881, left=0), "127.0.0.2")
    assert _peers(third["peers"]) == [("127.0.0.3", 6882)]  # seeds get leechers only
    tracker.announce(_query(ih, 6882, event="stopped"), "127.0.0.3")
    assert tracker.peers(INFO) == [("127.0.0.2", 6881)]


def test_unknown_torrent_and_outsiders_are_refused() -> None:
    tracker = Tracker(["127.0.0.0/8"])
    tracker.allow(INFO)
    assert "unknown torrent" in str(tracker.announce(_query(b"x" * 20, 1), "127.0.0.2"))
    ih = bytes.fromhex(INFO)[:20]
    assert "outside the cluster" in str(tracker.announce(_query(ih, 1), "192.0.2.1"))
    assert "20 bytes" in str(tracker.announce("info_hash=abc&port=1", "127.0.0.2"))
    assert "integers" in str(tracker.announce(_query(ih, 1) + "&numwant=x", "127.0.0.2"))
    assert tracker.peers(INFO) == []
