"""The one place that knows the layout of an image's two torrents.

Every image is carried by two private, BitTorrent v2-only torrents with 256 KiB pieces:

- The **chunk torrent**, named ``chunks``, whose files are the image's unique chunks at
  ``chunks/<hash[:2]>/<hash>``, exactly the chunk store's layout: a node that holds an earlier
  image adds it with ``save_path`` = its store root, so chunks it already holds count as "have"
  in place and only new chunks move. Every chunk is at most one piece long, so each file is one
  piece and the torrent needs no piece layers: a file's BEP 52 "pieces root" is the merkle root
  over its 16 KiB blocks, which is the chunk's name.
- The **image torrent**, one file ``<image_id>.img`` holding the whole image. libtorrent's cost
  per request grows with the number of files in a torrent (``hash_picker::pick_hashes`` walks
  them all), so a node that holds little of an image fetches it through this one instead: one
  file moves bytes several times faster than thousands (docs/benchmarks.md). Pieces that lie
  wholly in the image's holes are never requested (``hole_pieces``). Its piece layer and root are
  built from the image's leaf hashes, computed in the same pass that cuts the chunks.

Both info-hashes are in the signed manifest, so a torrent from anywhere is checked against it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import libtorrent as lt

from imageswarm.agent.chunkhash import BLOCK, MAX_CHUNK, merkle_root, pad_root
from imageswarm.agent.errors import ManifestError

PIECE_LENGTH = MAX_CHUNK  # every chunk is exactly one piece
TORRENT_NAME = "chunks"
_BLOCKS_PER_PIECE = PIECE_LENGTH // BLOCK
_IMAGE_ID_RE = re.compile(r"[0-9a-f]{16}")

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


def chunk_torrent(chunks: Mapping[str, int], image_name: str) -> bytes:
    """The chunk torrent of an image, from its unique chunks (name -> length) and its name.

    A pure function of the signed manifest: every chunk is one piece, so its pieces root is its
    name and the torrent needs no piece layers. Publish builds it this way, and a node builds
    it again from the manifest instead of downloading it (half a megabyte per node for a
    256 MiB image, over the controller's link, at the start of every fetch), then checks its
    info-hash against the manifest's.
    """
    files = [TorrentFile(name, length, bytes.fromhex(name)) for name, length in chunks.items()]
    return build_torrent(files, comment=f"imageswarm {image_name}")


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


# The image torrent


def image_file_name(image_id: str) -> str:
    """The image torrent's one file (and its name), below the torrent's save path."""
    if not _IMAGE_ID_RE.fullmatch(image_id):
        raise ValueError(f"{image_id!r} is not an image id (16 lowercase hex digits)")
    return f"{image_id}.img"


def build_image_torrent(image_id: str, size: int, leaves: Sequence[bytes]) -> bytes:
    """Return the bencoded v2-only private single-file torrent of an image of ``size`` bytes
    whose 16 KiB blocks hash to ``leaves`` (BEP 52: the last block is hashed as it is)."""
    if size <= 0 or len(leaves) != -(-size // BLOCK):
        raise ValueError(f"{len(leaves)} leaf hashes do not cover an image of {size} bytes")
    layers: dict[bytes, bytes] = {}
    if size <= PIECE_LENGTH:
        root = image_piece_hash(leaves, single=True)
    else:
        pieces = [
            image_piece_hash(leaves[i : i + _BLOCKS_PER_PIECE], single=False)
            for i in range(0, len(leaves), _BLOCKS_PER_PIECE)
        ]
        root = merkle_root(pieces, pad_root(_BLOCKS_PER_PIECE))
        layers[root] = b"".join(pieces)
    name = image_file_name(image_id).encode()
    info: dict[bytes, Any] = {
        b"name": name,
        b"piece length": PIECE_LENGTH,
        b"meta version": 2,
        b"file tree": {name: {b"": {b"length": size, b"pieces root": root}}},
        b"private": 1,
    }
    torrent: dict[bytes, Any] = {b"info": info, b"piece layers": layers}
    encoded: bytes = lt.bencode(torrent)
    return encoded


def image_piece_hash(leaves: Sequence[bytes], *, single: bool) -> bytes:
    """The image torrent's hash of one piece, from its 16 KiB blocks' hashes: its entry in the
    piece layer (the blocks padded to a whole piece with zero hashes), or, for a file of one
    piece (``single``), the file's pieces root."""
    if single:
        return merkle_root(list(leaves))
    return merkle_root([*leaves, *[bytes(32)] * (_BLOCKS_PER_PIECE - len(leaves))])


def check_image_torrent(torrent: bytes, image_id: str, size: int, info_hash: str) -> None:
    """Raise ManifestError unless ``torrent`` is the image torrent a signed manifest describes.

    The info-hash binds the info dictionary to the manifest; libtorrent then checks that the
    piece layer hashes up to the file's pieces root (refusing the torrent otherwise).
    """
    decoded = _decode(torrent)
    if hashlib.sha256(lt.bencode(decoded[b"info"])).hexdigest() != info_hash:
        raise ManifestError("The image torrent's info-hash does not match the signed manifest.")
    info: dict[bytes, Any] = decoded[b"info"]
    name = image_file_name(image_id).encode()
    tree = info.get(b"file tree")
    leaf = tree.get(name, {}).get(b"", {}) if isinstance(tree, dict) and len(tree) == 1 else {}
    if (
        info.get(b"meta version") != 2
        or b"pieces" in info
        or info.get(b"private") != 1
        or info.get(b"piece length") != PIECE_LENGTH
        or info.get(b"name") != name
        or not isinstance(leaf, dict)
        or leaf.get(b"length") != size
    ):
        raise ManifestError(
            f"The image torrent is not a private v2 torrent of one {size}-byte file."
        )
    try:
        lt.torrent_info(torrent)  # refuses a piece layer that does not hash to the root
    except RuntimeError as err:
        raise ManifestError(f"libtorrent refuses the image torrent ({err}).") from None


def image_piece_hashes(torrent: bytes, size: int) -> list[bytes]:
    """The expected hash of every piece of an image torrent's file of ``size`` bytes: its piece
    layer, or for a file of one piece its pieces root. Check the torrent against the signed
    manifest first (``check_image_torrent``): this only reads it."""
    decoded = _decode(torrent)
    info: dict[bytes, Any] = decoded[b"info"]
    try:
        (leaf,) = [node[b""] for node in info[b"file tree"].values()]
        root = leaf[b"pieces root"]
    except (KeyError, TypeError, ValueError):
        raise ManifestError("The image torrent does not hold exactly one file.") from None
    if leaf.get(b"length") != size or not isinstance(root, bytes) or len(root) != 32:
        raise ManifestError(f"The image torrent does not hold one file of {size} bytes.")
    if size <= PIECE_LENGTH:
        return [root]
    layer = decoded.get(b"piece layers", {}).get(root, b"")
    if not isinstance(layer, bytes) or len(layer) != 32 * -(-size // PIECE_LENGTH):
        raise ManifestError("The image torrent's piece layer does not cover the image.")
    return [layer[i : i + 32] for i in range(0, len(layer), 32)]


def hole_pieces(chunks: Sequence[tuple[str | None, int]], size: int) -> list[int]:
    """Indexes of the image torrent's pieces that lie wholly in holes (chunks without a hash):
    all zeros, so nobody needs to request them."""
    out: list[int] = []
    offset = 0
    for name, length in chunks:
        if name is None:
            first = -(-offset // PIECE_LENGTH)
            end = offset + length
            for index in range(first, -(-size // PIECE_LENGTH)):
                if min((index + 1) * PIECE_LENGTH, size) > end:
                    break
                out.append(index)
        offset += length
    return out


def wanted_bytes(chunks: Sequence[tuple[str | None, int]], size: int) -> int:
    """Bytes of the image torrent's pieces not wholly in holes: what a fetch from scratch moves."""
    skipped = set(hole_pieces(chunks, size))
    return sum(
        min(PIECE_LENGTH, size - start)
        for index, start in enumerate(range(0, size, PIECE_LENGTH))
        if index not in skipped
    )
