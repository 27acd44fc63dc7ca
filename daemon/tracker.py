"""A small private BitTorrent HTTP tracker (BEP 3 + BEP 23 compact peers) for the controller.

It answers only for torrents the controller published and only to peers inside the cluster
CIDRs; everyone else gets a bencoded failure. Peers are kept in memory and expire after three
missed announces: after a controller restart the swarm refills within one interval.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs

import libtorrent as lt
from aiohttp import web

PeerKey = tuple[str, int]
Response = dict[str, int | bytes]


def _failure(reason: str) -> Response:
    return {"failure reason": reason.encode()}


@dataclass
class _Peer:
    ip: str
    port: int
    seen: float
    seeding: bool


class Tracker:
    def __init__(self, cidrs: Iterable[str], interval: int = 5) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self.interval = interval
        self._swarms: dict[bytes, dict[PeerKey, _Peer]] = {}
        self.announces = 0

    def allow(self, info_hash_v2_hex: str) -> None:
        """Serve the torrent with this (full) v2 info-hash; peers announce its first 20 bytes."""
        self._swarms.setdefault(bytes.fromhex(info_hash_v2_hex)[:20], {})

    def forget(self, info_hash_v2_hex: str) -> None:
        self._swarms.pop(bytes.fromhex(info_hash_v2_hex)[:20], None)

    def peers(self, info_hash_v2_hex: str) -> list[PeerKey]:
        swarm = self._swarms.get(bytes.fromhex(info_hash_v2_hex)[:20], {})
        return sorted(swarm)

    def _in_cluster(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def announce(self, query: str, remote: str) -> Response:
        """Answer one announce; returns the bencodable response dictionary."""
        params = parse_qs(query, encoding="latin-1", keep_blank_values=True)

        def one(key: str) -> str | None:
            values = params.get(key)
            return values[0] if values else None

        raw_hash = one("info_hash")
        if raw_hash is None or len(raw_hash.encode("latin-1")) != 20:
            return _failure("info_hash must be 20 bytes")
        swarm = self._swarms.get(raw_hash.encode("latin-1"))
        if swarm is None:
            return _failure("unknown torrent: this tracker serves only its own images")
        if not self._in_cluster(remote):
            return _failure(f"{remote} is outside the cluster networks")
        try:
            port = int(one("port") or "")
            left = int(one("left") or "0")
            numwant = min(int(one("numwant") or "50"), 200)
        except ValueError:
            return _failure("port, left and numwant must be integers")
        if not 0 < port < 65536:
            return _failure("port out of range")
        self.announces += 1
        now = time.monotonic()
        for key in [k for k, p in swarm.items() if now - p.seen > 3 * self.interval]:
            del swarm[key]
        key = (remote, port)
        if one("event") == "stopped":
            swarm.pop(key, None)
        else:
            swarm[key] = _Peer(remote, port, now, left == 0)
        others = [p for k, p in swarm.items() if k != key]
        if left == 0:
            others = [p for p in others if not p.seeding]  # seeds need leechers, not seeds
        random.shuffle(others)
        others = others[:numwant]
        peers4 = b"".join(
            socket.inet_aton(p.ip) + struct.pack("!H", p.port) for p in others if ":" not in p.ip
        )
        peers6 = b"".join(
            socket.inet_pton(socket.AF_INET6, p.ip) + struct.pack("!H", p.port)
            for p in others
            if ":" in p.ip
        )
        seeds = sum(1 for p in swarm.values() if p.seeding)
        return {
            "interval": self.interval,
            "min interval": self.interval,
            "complete": seeds,
            "incomplete": len(swarm) - seeds,
            "peers": peers4,
            "peers6": peers6,
        }

    async def handle(self, request: web.Request) -> web.Response:
        response = self.announce(request.rel_url.raw_query_string, request.remote or "")
        entry: dict[str, lt._Entry] = dict(response)
        return web.Response(body=lt.bencode(entry), content_type="text/plain")
