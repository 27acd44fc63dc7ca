"""The one definition of a chunk's name.

A chunk is named by its BitTorrent v2 "pieces root": the SHA-256 merkle root over 16 KiB
blocks (BEP 52). Using the torrent's own hash as the store's name means a chunk is hashed once
while an image is cut, the torrent can be built without reading the chunks again, and the hash
libtorrent verifies on the wire is the very name the store and the signed manifest use.
"""

from __future__ import annotations

import hashlib
import re

BLOCK = 16 * 1024
#: Largest chunk; also the torrent's piece length, so every chunk file is exactly one piece.
MAX_CHUNK = 256 * 1024
_ZERO_LEAF = bytes(32)
_NAME = re.compile(r"[0-9a-f]{64}")


def merkle_root(layer: list[bytes], pad: bytes = _ZERO_LEAF) -> bytes:
    """Return the root of a BEP 52 merkle tree over `layer`, padded to a power of two with `pad`.

    `pad` is the hash that stands for a missing node at this layer: a zero leaf for the block
    layer, or the root of a subtree of zero leaves for the piece layer (see `pad_root`).
    """
    if not layer:
        raise ValueError("a merkle tree needs at least one node")
    width = 1
    while width < len(layer):
        width *= 2
    layer = [*layer, *([pad] * (width - len(layer)))]
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def pad_root(leaves: int) -> bytes:
    """Root of a subtree of `leaves` (a power of two) zero leaves: the piece layer's padding."""
    return merkle_root([_ZERO_LEAF] * leaves)


def block_hashes(data: bytes | bytearray | memoryview) -> list[bytes]:
    """SHA-256 of each 16 KiB block of `data` (the last one may be shorter): the leaf layer."""
    view = memoryview(data)
    return [hashlib.sha256(view[i : i + BLOCK]).digest() for i in range(0, len(view), BLOCK)]


def pieces_root(data: bytes | bytearray | memoryview) -> bytes:
    """Return the 32-byte BEP 52 merkle root of `data` (1 byte to MAX_CHUNK bytes)."""
    view = memoryview(data)
    size = len(view)
    if not 0 < size <= MAX_CHUNK:
        raise ValueError(f"chunk length {size} is outside 1..{MAX_CHUNK}")
    return merkle_root(block_hashes(view))


def chunk_name(data: bytes | bytearray | memoryview) -> str:
    """Return the hex name under which `data` is stored and listed in manifests."""
    return pieces_root(data).hex()


def is_chunk_name(text: str) -> bool:
    """True when `text` is 64 lowercase hex digits."""
    return _NAME.fullmatch(text) is not None
