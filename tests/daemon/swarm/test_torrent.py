"""The torrent layouts: our pieces roots and both torrents match what libtorrent itself computes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from imageswarm.agent.chunkhash import BLOCK, block_hashes, pieces_root
from imageswarm.agent.errors import ManifestError
from imageswarm.daemon.swarm.torrent import (
    PIECE_LENGTH,
    TorrentFile,
    build_image_torrent,
    build_torrent,
    check_image_torrent,
    check_torrent,
    chunk_relpath,
    hole_pieces,
    image_file_name,
    info_hash_v2,
    wanted_bytes,
)

SIZES = (1, BLOCK, BLOCK + 1, 100000, PIECE_LENGTH)


def write_chunks(store: Path, sizes: tuple[int, ...]) -> list[TorrentFile]:
    files = []
    for size in sizes:
        data = os.urandom(size)
        digest = hashlib.sha256(data).hexdigest()
        path = store / chunk_relpath(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(TorrentFile(digest, size, pieces_root(data)))
    return files


def roots_of(info: lt.torrent_info) -> dict[str, bytes]:
    layout = info.layout()
    roots = {}
    for i in range(layout.num_files()):
        if layout.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        roots[layout.file_path(i)] = layout.root(i).to_bytes()
    return roots


@pytest.fixture
def chunks(tmp_path: Path) -> list[TorrentFile]:
    return write_chunks(tmp_path, SIZES)


def test_pieces_root_and_torrent_match_libtorrent(
    tmp_path: Path, chunks: list[TorrentFile]
) -> None:
    entries = [lt.create_file_entry(chunk_relpath(f.hash), f.length) for f in chunks]
    creator = lt.create_torrent(entries, PIECE_LENGTH, lt.create_torrent.v2_only)
    lt.set_piece_hashes(creator, str(tmp_path))
    theirs = roots_of(lt.torrent_info(lt.bencode(creator.generate())))
    ours = {chunk_relpath(f.hash): f.root for f in chunks}
    assert theirs == ours

    torrent = build_torrent(chunks)
    decoded: Any = lt.bdecode(torrent)
    loaded = lt.torrent_info(decoded)
    assert roots_of(loaded) == ours
    assert roots_of(lt.torrent_info(torrent)) == ours
    assert loaded.name() == "chunks"
    assert loaded.priv()
    assert not loaded.info_hashes().has_v1()
    assert info_hash_v2(torrent) == str(loaded.info_hashes().v2)


def test_pieces_root_of_one_block_is_its_hash() -> None:
    data = b"x" * BLOCK
    assert pieces_root(data) == hashlib.sha256(data).digest()
    assert pieces_root(memoryview(data)) == pieces_root(data)


@pytest.mark.parametrize("size", [0, PIECE_LENGTH + 1])
def test_pieces_root_rejects_empty_and_oversized_chunks(size: int) -> None:
    with pytest.raises(ValueError):
        pieces_root(bytes(size))


def test_chunk_relpath_uses_the_store_layout() -> None:
    digest = "ab" + "0" * 62
    assert chunk_relpath(digest) == f"chunks/ab/{digest}"
    for bad in ("AB" + "0" * 62, "ab", "zz" + "0" * 62, "../" + "0" * 61):
        with pytest.raises(ValueError):
            chunk_relpath(bad)


def test_build_torrent_is_deterministic_and_checks_its_input(chunks: list[TorrentFile]) -> None:
    torrent = build_torrent(chunks, comment="test")
    assert build_torrent(list(reversed(chunks)), comment="test") == torrent
    check_torrent(torrent, list(reversed(chunks)))
    with pytest.raises(ValueError):
        build_torrent([*chunks, chunks[0]])
    with pytest.raises(ValueError):
        build_torrent([])
    with pytest.raises(ValueError):
        build_torrent([TorrentFile(chunks[0].hash, PIECE_LENGTH + 1, chunks[0].root)])


def tampered(torrent: bytes, edit: str) -> bytes:
    decoded: Any = lt.bdecode(torrent)
    info = decoded[b"info"]
    tree = info[b"file tree"]
    prefix = sorted(tree)[0]
    leaf = tree[prefix][sorted(tree[prefix])[0]][b""]
    if edit == "length":
        leaf[b"length"] += 1
    elif edit == "root":
        leaf[b"pieces root"] = bytes(32)
    elif edit == "public":
        del info[b"private"]
    elif edit == "piece length":
        info[b"piece length"] = PIECE_LENGTH * 2
    return lt.bencode(decoded)


@pytest.mark.parametrize("edit", ["length", "root", "public", "piece length"])
def test_check_torrent_rejects_a_tampered_torrent(chunks: list[TorrentFile], edit: str) -> None:
    torrent = tampered(build_torrent(chunks), edit)
    with pytest.raises(ManifestError):
        check_torrent(torrent, chunks)


def test_check_torrent_rejects_missing_and_extra_files(chunks: list[TorrentFile]) -> None:
    torrent = build_torrent(chunks[1:])
    with pytest.raises(ManifestError, match="lacks chunk"):
        check_torrent(torrent, chunks)
    with pytest.raises(ManifestError, match="does not list"):
        check_torrent(build_torrent(chunks), chunks[1:])


@pytest.mark.parametrize("garbage", [b"", b"garbage", b"d4:infoi1ee", b"le", b"d4:infod1:ai1eeeXX"])
def test_check_torrent_rejects_garbage(chunks: list[TorrentFile], garbage: bytes) -> None:
    with pytest.raises(ManifestError):
        check_torrent(garbage, chunks)
    with pytest.raises(ManifestError):
        info_hash_v2(garbage)


def test_check_torrent_rejects_a_hybrid_torrent(tmp_path: Path, chunks: list[TorrentFile]) -> None:
    entries = [lt.create_file_entry(chunk_relpath(f.hash), f.length) for f in chunks]
    creator = lt.create_torrent(entries, PIECE_LENGTH)  # v1 + v2
    creator.set_priv(True)
    lt.set_piece_hashes(creator, str(tmp_path))
    with pytest.raises(ManifestError, match="v1"):
        check_torrent(lt.bencode(creator.generate()), chunks)


# The image torrent

IMAGE_ID = "0123456789abcdef"
IMAGE_SIZES = (
    1,
    BLOCK,
    PIECE_LENGTH,
    PIECE_LENGTH + 1,
    5 * PIECE_LENGTH + 12345,
    17 * PIECE_LENGTH,
)


def _libtorrents_image_torrent(folder: Path, data: bytes) -> dict[bytes, Any]:
    path = folder / image_file_name(IMAGE_ID)
    path.write_bytes(data)
    creator = lt.create_torrent(
        [lt.create_file_entry(path.name, len(data))], PIECE_LENGTH, lt.create_torrent.v2_only
    )
    creator.set_priv(True)
    lt.set_piece_hashes(creator, str(folder))
    generated: dict[bytes, Any] = creator.generate()
    return generated


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_image_torrent_is_byte_for_byte_what_libtorrent_makes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    ours = build_image_torrent(IMAGE_ID, size, block_hashes(data))
    theirs = _libtorrents_image_torrent(tmp_path, data)
    decoded: Any = lt.bdecode(ours)
    assert decoded[b"info"] == theirs[b"info"]
    assert decoded[b"piece layers"] == theirs.get(b"piece layers", {})
    check_image_torrent(ours, IMAGE_ID, size, info_hash_v2(ours))


def test_image_torrent_checks_refuse_what_the_manifest_does_not_describe() -> None:
    size = 3 * PIECE_LENGTH + 7
    leaves = block_hashes(os.urandom(size))
    torrent = build_image_torrent(IMAGE_ID, size, leaves)
    good = info_hash_v2(torrent)
    with pytest.raises(ManifestError, match="info-hash"):
        check_image_torrent(torrent, IMAGE_ID, size, "0" * 64)
    with pytest.raises(ManifestError, match="one 999-byte file"):
        check_image_torrent(torrent, IMAGE_ID, 999, good)
    with pytest.raises(ManifestError, match="one"):
        check_image_torrent(torrent, "fedcba9876543210", size, good)
    # A piece layer that does not hash to the signed root: libtorrent refuses the torrent.
    decoded: Any = lt.bdecode(torrent)
    root = next(iter(decoded[b"piece layers"]))
    decoded[b"piece layers"][root] = bytes(32) + decoded[b"piece layers"][root][32:]
    with pytest.raises(ManifestError, match="piece layer"):
        check_image_torrent(lt.bencode(decoded), IMAGE_ID, size, good)
    with pytest.raises(ValueError, match="leaf hashes"):
        build_image_torrent(IMAGE_ID, size + BLOCK, leaves)
    with pytest.raises(ValueError, match="image id"):
        image_file_name("../etc/passwd")


def test_hole_pieces_are_the_pieces_wholly_inside_holes() -> None:
    p = PIECE_LENGTH
    size = 10 * p + 100
    chunks: list[tuple[str | None, int]] = [
        ("a", p // 2),  # [0, p/2): piece 0 has data
        (None, 2 * p),  # [p/2, 2.5p): piece 1 is all hole, pieces 0 and 2 only partly
        ("b", 3 * p + p // 2),  # [2.5p, 6p): pieces 2-5 have data
        (None, 4 * p + 100),  # [6p, 10p + 100): pieces 6-9 and the short last piece 10
    ]
    assert sum(length for _, length in chunks) == size
    assert hole_pieces(chunks, size) == [1, 6, 7, 8, 9, 10]
    assert wanted_bytes(chunks, size) == 5 * p  # pieces 0 and 2-5
    assert hole_pieces([("a", size)], size) == []
    assert hole_pieces([(None, size)], size) == list(range(11))
