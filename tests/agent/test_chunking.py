"""Cutting images: coverage, holes, extent-aligned cuts and the one-pass whole-image hash."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from pathlib import Path

from imageswarm.agent.chunkhash import MAX_CHUNK, block_hashes, is_chunk_name, pieces_root
from imageswarm.agent.chunking import MIN_CHUNK, ImageReader, Piece, Span, segments


def _cut(path: Path, extents: list[Span] | None = None) -> tuple[list[Piece], str]:
    with ImageReader(path) as reader:
        pieces = [Piece(p.offset, p.length, p.name, None) for p in reader.pieces(extents)]
        return pieces, reader.sha256()


def _names(pieces: list[Piece]) -> set[str]:
    return {p.name for p in pieces if p.name}


def test_pieces_cover_the_image_in_order_and_hash_matches(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(os.urandom(3 * 1024 * 1024 + 1234))
    pieces, sha = _cut(img)
    assert sha == hashlib.sha256(img.read_bytes()).hexdigest()
    offset = 0
    data = img.read_bytes()
    for piece in pieces:
        assert piece.offset == offset
        assert 0 < piece.length <= MAX_CHUNK
        assert piece.name == pieces_root(data[offset : offset + piece.length]).hex()
        offset += piece.length
    assert offset == len(data)


def test_zero_runs_become_holes_and_short_zero_runs_do_not(tmp_path: Path) -> None:
    img = tmp_path / "img"
    with img.open("wb") as f:
        f.write(os.urandom(1 << 20))
        f.write(bytes(5 << 20))  # a hole
        f.write(os.urandom(1 << 20))
        f.write(bytes(4096))  # too short to be a hole
        f.write(os.urandom(1 << 20))
    pieces, _ = _cut(img)
    holes = [p for p in pieces if p.name is None]
    assert [(h.offset, h.length) for h in holes] == [(1 << 20, 5 << 20)]


def test_empty_image_has_no_pieces(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(b"")
    pieces, sha = _cut(img)
    assert pieces == []
    assert sha == hashlib.sha256(b"").hexdigest()


def test_extent_cuts_keep_a_files_chunks_wherever_it_lands(tmp_path: Path) -> None:
    """The same file content at two different offsets yields the same chunk names."""
    rng = random.Random(7)
    payload = rng.randbytes(700 * 1024)
    filler_a = rng.randbytes(300 * 1024 + 4096)
    filler_b = rng.randbytes(123 * 1024 + 8192)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(filler_a + payload + filler_a)
    b.write_bytes(filler_b + payload + filler_b)
    pa, _ = _cut(a, [Span(len(filler_a), len(payload))])
    pb, _ = _cut(b, [Span(len(filler_b), len(payload))])
    in_a = {p.name for p in pa if len(filler_a) <= p.offset < len(filler_a) + len(payload)}
    in_b = {p.name for p in pb if len(filler_b) <= p.offset < len(filler_b) + len(payload)}
    assert in_a == in_b
    assert sum(p.length for p in pa if p.name in in_a) >= len(payload)


def test_segments_merge_tiny_files_but_never_glue_metadata_to_files() -> None:
    size = 1 << 20
    files = [Span(100_000, 1000), Span(101_000, 2000), Span(500_000, 100_000)]
    segs = segments(size, files)
    assert segs[0] == (0, 100_000, False)
    assert (100_000, 103_000, True) in segs  # two tiny adjacent files merged with each other
    assert (103_000, 500_000, False) in segs
    assert (500_000, 600_000, True) in segs
    assert segs[-1] == (600_000, size, False)
    # a 2 KiB metadata gap between two files stays its own segment
    gap = segments(size, [Span(0, 50_000), Span(52_048, 50_000)])
    assert (50_000, 52_048, False) in gap
    assert segments(size, None) == [(0, size, False)]
    assert all(b[0] == a[1] for a, b in itertools.pairwise(segs))
    assert MIN_CHUNK == 16 * 1024


def test_small_files_merge_only_with_small_files() -> None:
    """A run of files under MIN_CHUNK is one segment, but a file of MIN_CHUNK or more next to
    it (before or after) is never merged into it: it is cut by its own content."""
    size = 1 << 20
    big, small = 40_000, 3_000
    files = [
        Span(0, big),  # a large file, then a run of three small ones touching it
        Span(big, small),
        Span(big + small, small),
        Span(big + 2 * small, small),
        Span(big + 3 * small, big),  # another large file right after the run
        Span(2 * big + 3 * small, small),  # and a lone small file after it
    ]
    segs = segments(size, files)
    end = 2 * big + 4 * small
    assert segs[:4] == [
        (0, big, True),
        (big, big + 3 * small, True),
        (big + 3 * small, 2 * big + 3 * small, True),
        (2 * big + 3 * small, end, True),
    ]
    assert segs[4:] == [(end, size, False)]


def test_leaf_hashes_cover_the_image_in_16k_blocks_whatever_the_cuts(tmp_path: Path) -> None:
    """The image torrent's leaf layer comes from the same pass; segment ends (here extents
    at odd 4 KiB offsets) must not shift the 16 KiB blocks."""
    img = tmp_path / "img"
    data = os.urandom(5 * 1024 * 1024 + 777) + bytes(300_000) + os.urandom(12_345)
    img.write_bytes(data)
    extents = [Span(4096 * 3, 70_000), Span(4096 * 41, 2_000_000), Span(4096 * 700, 9_000)]
    with ImageReader(img) as reader:
        for _ in reader.pieces(extents):
            pass
        assert reader.sha256() == hashlib.sha256(data).hexdigest()
        assert reader.leaf_hashes() == block_hashes(data)


def test_chunk_names_are_64_lowercase_hex_digits() -> None:
    name = pieces_root(b"x").hex()
    assert is_chunk_name(name)
    for bad in (name.upper(), name[:-1], name + "0", name + "\n", "g" * 64, ""):
        assert not is_chunk_name(bad), bad
