"""The one place that knows the image torrent layout.

An image's torrent is a private, BitTorrent v2-only torrent named ``chunks`` whose files are the
image's unique chunks at ``chunks/<hash[:2]>/<hash>``, exactly the chunk store's layout, so a node
adds it with ``save_path`` = its store root and already-held chunks count as "have" in place.
Every chunk is at most one piece long, so each file is exactly one piece and the torrent needs no
piece layers: a file's BEP 52 "pieces root" is the merkle root over its 16 KiB blocks, computed
here while the image is chunked instead of re-reading the chunk files with libtorrent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import libtorrent as lt

from imageswarm.agent.chunkhash import MAX_CHUNK
from imageswarm.agent.errors import ManifestError

PIECE_LENGTH = MAX_CHUNK  # every chunk is exactly one piece
TORRENT_NAME = "chunks"

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(rb"[0-9a-f]{2}")


@dataclass(frozen=True)
class TorrentFile:
    """One chunk file of the torrent: its content hash (hex), length and BEP 52 pieces root."""

    hash: str
    length: int
    root: bytes


def chunk_relpath(hash_hex: str) -> str:
    """Return the path of a chunk below the store root (and below the torrent's save path)."""
    if not _HASH_RE.fullmatch(hash_hex):
        raise ValueError(f"{hash_hex!r} is not a lowercase hex sha256")
    return f"{TORRENT_NAME}/{hash_hex[:2]}/{hash_hex}"


def build_torrent(files: Sequence[TorrentFile], *, comment: str = "") -> bytes:
    """Return the bencoded v2-only private torrent of ``files`` (same set, same bytes)."""
    if not files:
        raise ValueError("a torrent needs at least one chunk")
    tree: dict[bytes, dict[bytes, Any]] = {}
    for f in files:
        chunk_relpath(f.hash)
        if not 0 < f.length <= PIECE_LENGTH:
            raise ValueError(f"chunk {f.hash} has length {f.length}, outside 1..{PIECE_LENGTH}")
        if len(f.root) != 32:
            raise ValueError(f"chunk {f.hash} has a pieces root of {len(f.root)} bytes, not 32")
        leaves = tree.setdefault(f.hash[:2].encode(), {})
        name = f.hash.encode()
        if name in leaves:
            raise ValueError(f"chunk {f.hash} is listed twice")
        leaves[name] = {b"": {b"length": f.length, b"pieces root": f.root}}
    info = {
        b"name": TORRENT_NAME.encode(),
        b"piece length": PIECE_LENGTH,
        b"meta version": 2,
        b"file tree": tree,  # relative to the torrent's directory, which is its name
        b"private": 1,
    }
    # Every file fits in one piece, so BEP 52 wants no layer for any of them; libtorrent's own
    # creator writes the key anyway, so we do too.
    torrent: dict[bytes, Any] = {b"info": info, b"piece layers": {}}
    if comment:
        torrent[b"comment"] = comment.encode()
    encoded: bytes = lt.bencode(torrent)  # sorts every dict's keys: canonical, order independent
    return encoded


def _decode(torrent: bytes) -> dict[bytes, Any]:
    """Decode a torrent, accepting only the canonical bencoding (what build_torrent writes)."""
    try:
        decoded = lt.bdecode(torrent)
    except RuntimeError as err:  # libtorrent 2.1 raises; older bindings return None
        raise ManifestError(f"The torrent is not valid bencoding ({err}).") from None
    if not isinstance(decoded, dict):
        raise ManifestError("The torrent is not a bencoded dictionary.")
    # Re-encoding must give back the same bytes, so the info dict we hash is the one libtorrent
    # hashes (no unsorted keys, no trailing data, no leading zeros).
    if lt.bencode(decoded) != torrent:
        raise ManifestError("The torrent is not canonically bencoded.")
    top = cast(dict[bytes, Any], decoded)
    if not isinstance(top.get(b"info"), dict):
        raise ManifestError("The torrent has no info dictionary.")
    return top


def info_hash_v2(torrent: bytes) -> str:
    """Return the hex v2 info-hash (sha256 of the bencoded info dictionary) of a torrent."""
    info = _decode(torrent)[b"info"]
    return hashlib.sha256(lt.bencode(info)).hexdigest()


def check_torrent(torrent: bytes, expected: Sequence[TorrentFile]) -> None:
    """Raise ManifestError unless ``torrent`` is our layout and holds exactly ``expected``."""
    decoded = _decode(torrent)
    info: dict[bytes, Any] = decoded[b"info"]
    if b"pieces" in info or b"files" in info or b"length" in info:
        raise ManifestError("The torrent carries BitTorrent v1 data; it must be v2-only.")
    if info.get(b"meta version") != 2:
        raise ManifestError("The torrent is not a BitTorrent v2 torrent (meta version 2).")
    if info.get(b"private") != 1:
        raise ManifestError("The torrent is not marked private.")
    if info.get(b"piece length") != PIECE_LENGTH:
        raise ManifestError(
            f"The torrent's piece length is {info.get(b'piece length')!r}, not {PIECE_LENGTH}."
        )
    if info.get(b"name") != TORRENT_NAME.encode():
        raise ManifestError(f"The torrent is named {info.get(b'name')!r}, not {TORRENT_NAME!r}.")
    layers = decoded.get(b"piece layers", {})
    if layers != {}:
        raise ManifestError("The torrent has piece layers, but no chunk spans more than one piece.")
    found = _files_of(info.get(b"file tree"))
    wanted: dict[str, TorrentFile] = {}
    for f in expected:
        if f.hash in wanted:
            raise ManifestError(f"The manifest lists chunk {f.hash} twice.")
        wanted[f.hash] = f
    for name in sorted(wanted.keys() | found.keys()):
        if name not in found:
            raise ManifestError(f"The torrent lacks chunk {name}, which the manifest lists.")
        if name not in wanted:
            raise ManifestError(f"The torrent has chunk {name}, which the manifest does not list.")
        length, root = found[name]
        if length != wanted[name].length:
            raise ManifestError(
                f"The torrent gives chunk {name} {length} bytes, "
                f"but the manifest gives it {wanted[name].length}."
            )
        if root != wanted[name].root:
            raise ManifestError(
                f"The torrent's pieces root for chunk {name} differs from the manifest's."
            )
    try:
        lt.torrent_info(torrent)
    except RuntimeError as err:
        raise ManifestError(f"libtorrent refuses the torrent ({err}).") from None


def _files_of(tree: object) -> dict[str, tuple[int, bytes]]:
    """Return hash -> (length, pieces root) of a ``file tree``; raise on anything else in it."""
    bad = ManifestError("The torrent's file tree is not laid out as <ab>/<hash>.")
    if not isinstance(tree, dict):
        raise bad
    files: dict[str, tuple[int, bytes]] = {}
    for prefix, leaves in tree.items():
        if not _PREFIX_RE.fullmatch(prefix) or not isinstance(leaves, dict):
            raise bad
        for raw_name, node in leaves.items():
            name = raw_name.decode("ascii", "replace")
            if not _HASH_RE.fullmatch(name) or raw_name[:2] != prefix:
                raise bad
            if not isinstance(node, dict) or node.keys() != {b""}:
                raise bad
            leaf = node[b""]
            if not isinstance(leaf, dict):
                raise bad
            length, root = leaf.get(b"length"), leaf.get(b"pieces root")
            if not isinstance(length, int) or not 0 < length <= PIECE_LENGTH:
                raise ManifestError(f"The torrent gives chunk {name} an invalid length {length!r}.")
            if not isinstance(root, bytes) or len(root) != 32:
                raise ManifestError(f"The torrent gives chunk {name} no valid pieces root.")
            files[name] = (length, root)
    return files
