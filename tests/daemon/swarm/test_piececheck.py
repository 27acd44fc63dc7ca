"""A whole-image download is proven piece by piece against its signed image torrent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageswarm.agent.chunkhash import block_hashes
from imageswarm.agent.errors import ManifestError
from imageswarm.daemon.swarm.piececheck import PieceChecker
from imageswarm.daemon.swarm.torrent import PIECE_LENGTH, build_image_torrent

IMAGE_ID = "0123456789abcdef"


def _image(size: int, zero_piece: int | None = None) -> bytes:
    data = bytearray(os.urandom(size))
    if zero_piece is not None:
        start = zero_piece * PIECE_LENGTH
        data[start : start + PIECE_LENGTH] = bytes(len(data[start : start + PIECE_LENGTH]))
    return bytes(data)


@pytest.mark.parametrize("size", [1, 5000, PIECE_LENGTH, PIECE_LENGTH + 1, 3 * PIECE_LENGTH + 9])
def test_every_piece_of_the_image_passes_and_one_flipped_bit_fails_its_piece(
    tmp_path: Path, size: int
) -> None:
    image = _image(size)
    torrent = build_image_torrent(IMAGE_ID, size, block_hashes(image))
    path = tmp_path / "x.img"
    path.write_bytes(image)
    checker = PieceChecker(path, torrent, size)
    assert checker.pieces == -(-size // PIECE_LENGTH)
    assert checker.check(range(checker.pieces)) == [] and checker.unchecked() == []
    for index in range(checker.pieces):
        corrupt = bytearray(image)
        corrupt[min(size - 1, index * PIECE_LENGTH + 7)] ^= 1
        path.write_bytes(corrupt)
        checker = PieceChecker(path, torrent, size)
        assert checker.check(range(checker.pieces)) == [index]
        assert checker.unchecked() == [index]  # a bad piece stays to be proven


def test_pieces_in_holes_and_past_a_short_file_read_as_zeros(tmp_path: Path) -> None:
    """A download never writes pieces wholly in holes, nor trailing ones: those must be zeros."""
    size = 4 * PIECE_LENGTH
    image = _image(size, zero_piece=1)[: 3 * PIECE_LENGTH] + bytes(PIECE_LENGTH)
    torrent = build_image_torrent(IMAGE_ID, size, block_hashes(image))
    path = tmp_path / "x.img"
    with open(path, "wb") as f:  # piece 1 is a hole, piece 3 was never written
        f.write(image[:PIECE_LENGTH])
        f.seek(2 * PIECE_LENGTH)
        f.write(image[2 * PIECE_LENGTH : 3 * PIECE_LENGTH])
    checker = PieceChecker(path, torrent, size)
    assert checker.check([3, 1]) == [] and checker.unchecked() == [0, 2]
    assert checker.check([0, 2, 2]) == [] and checker.unchecked() == []
    with open(path, "r+b") as f:  # garbage where the image has zeros
        f.seek(PIECE_LENGTH + 5)
        f.write(b"x")
    assert PieceChecker(path, torrent, size).check(range(4)) == [1]


def test_a_torrent_of_another_size_is_refused(tmp_path: Path) -> None:
    image = _image(2 * PIECE_LENGTH)
    torrent = build_image_torrent(IMAGE_ID, len(image), block_hashes(image))
    with pytest.raises(ManifestError, match="one file of"):
        PieceChecker(tmp_path / "x.img", torrent, len(image) + 1)
