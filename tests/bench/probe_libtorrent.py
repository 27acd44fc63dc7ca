"""Probe two libtorrent 2.1 behaviours the swarm's tuning ran into, on loopback, in seconds.

1. **Super seeding's start.** One seed (upload-limited) and three leechers that connect to it
   and to each other; the time until every leecher received its first payload byte, and until
   all finished, with the seed's ``super_seeding`` flag off and on.
2. **Per-peer download limit.** One seed, one leecher (download-limited); after a while the
   leecher calls ``set_peer_download_limit`` on its connection to the seed (the binding marks
   it deprecated), and the rate before and after is compared.

    .venv/bin/python tests/bench/probe_libtorrent.py          # about 1 minute

Sessions listen on 127.0.0.2-5 with DHT, LSD, UPnP and NAT-PMP off and every address in the
global peer class (so the rate limits hold on loopback).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, cast

import libtorrent as lt

MIB = 1 << 20
PIECE = 256 * 1024
PORT = 7301


def make_torrent(folder: Path, mib: int) -> Any:
    (folder / "f.img").write_bytes(os.urandom(mib * MIB))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = lt.file_storage()
        lt.add_files(fs, str(folder / "f.img"))
        creator = lt.create_torrent(fs, PIECE, flags=lt.create_torrent.v2_only)
    creator.set_priv(True)
    lt.set_piece_hashes(creator, str(folder))
    return lt.torrent_info(lt.bencode(creator.generate()))


def session(host: int, **settings: Any) -> Any:
    pack: dict[str, Any] = {
        "listen_interfaces": f"127.0.0.{host}:{PORT + host}",
        "outgoing_interfaces": f"127.0.0.{host}",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "alert_mask": 0,
        **settings,
    }
    ses = lt.session(cast("lt.settings_pack", pack), 0)
    classes = lt.ip_filter()
    classes.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
    ses.set_peer_class_filter(classes)
    return ses


def add(ses: Any, info: Any, folder: Path, flags: int = 0) -> Any:
    params = lt.add_torrent_params()
    params.ti = info
    params.save_path = str(folder)
    params.flags = flags
    return ses.add_torrent(params)


def super_seed_start(info: Any, folder: Path, on: bool) -> tuple[float, float, float]:
    """(last leecher's first byte s, last leecher done s, seed payload sent / file size)."""
    seed = session(2, upload_rate_limit=4_000_000)
    flags = lt.torrent_flags.seed_mode | (lt.torrent_flags.super_seeding if on else 0)
    seed_handle = add(seed, info, folder, flags)
    leechers = []
    for host in (3, 4, 5):
        ses = session(host, upload_rate_limit=2_000_000)
        leechers.append((ses, add(ses, info, Path(tempfile.mkdtemp(dir=folder)))))
    for k, (_ses, handle) in enumerate(leechers):
        handle.connect_peer(("127.0.0.2", PORT + 2))
        for j in range(k):
            handle.connect_peer((f"127.0.0.{3 + j}", PORT + 3 + j))
    start = time.monotonic()
    first: list[float | None] = [None] * 3
    done: list[float | None] = [None] * 3
    while time.monotonic() - start < 120 and not all(done):
        time.sleep(0.05)
        now = time.monotonic() - start
        for k, (_ses, handle) in enumerate(leechers):
            status = handle.status()
            if first[k] is None and status.total_payload_download > 0:
                first[k] = now
            if done[k] is None and status.is_seeding:
                done[k] = now
    sent = seed_handle.status().total_payload_upload / info.total_size()
    return max(x or float("inf") for x in first), max(x or float("inf") for x in done), sent


def peer_limit(info: Any, folder: Path) -> tuple[float, float]:
    """Leecher's rate from the seed (MB/s) in the 2 s before and the 2 s after it limits that
    peer to 16 KiB/s with set_peer_download_limit."""
    seed = session(2)
    add(seed, info, folder, lt.torrent_flags.seed_mode)
    leecher = session(3, download_rate_limit=10_000_000)
    handle = add(leecher, info, Path(tempfile.mkdtemp(dir=folder)))
    handle.connect_peer(("127.0.0.2", PORT + 2))

    def rate() -> float:
        before = handle.status().total_payload_download
        time.sleep(2)
        return float(handle.status().total_payload_download - before) / 2 / 1e6

    time.sleep(2)
    unlimited = rate()
    with warnings.catch_warnings():  # the binding marks it deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        for peer in handle.get_peer_info():
            handle.set_peer_download_limit(peer.ip, 16 * 1024)
    limited = rate()
    return unlimited, limited


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small = make_torrent(folder, 32)
        print(f"libtorrent {lt.__version__}; 32 MiB file, 256 KiB pieces; seed 4 MB/s up, "
              "3 leechers 2 MB/s up, all on loopback\n")  # fmt: skip
        print("| seed | last leecher's first byte s | all done s | seed sent / file |")
        print("|:---|---:|---:|---:|")
        for on in (False, True):
            first, done, sent = super_seed_start(small, folder, on)
            name = "super seeding" if on else "plain seed"
            print(f"| {name} | {first:.2f} | {done:.1f} | {sent:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = make_torrent(folder, 256)
        unlimited, limited = peer_limit(big, folder)
        print("\n| leecher's rate from the seed | MB/s |")
        print("|:---|---:|")
        print(f"| before set_peer_download_limit (leecher limited to 10 MB/s) | {unlimited:.1f} |")
        print(f"| after set_peer_download_limit(seed, 16 KiB/s) | {limited:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
