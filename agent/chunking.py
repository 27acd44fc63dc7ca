"""Cutting an image into content-defined chunks, in one read.

Cut points come from three places, in this order of precedence:
1. the image's file-data extents, when known (a file's chunks then do not depend on where the
   image builder placed it, so a rebuilt image shares every unchanged file's chunks);
2. runs of all-zero 4 KiB blocks, which become holes (never stored, never transferred);
3. inside file data, FastCDC 2020 (min/avg/max 16/64/256 KiB); filesystem metadata between
   files (inode tables, bitmaps, directories) is cut into 4 KiB pieces, the filesystem's
   blocks, the unit in which it changes, so one changed inode or bitmap bit costs 4 KiB.

Runs of files shorter than the minimum chunk are merged (never with a larger file), so that a
tree of tiny files does not flood the torrent with tiny pieces. The whole-image SHA-256 and the
image's BEP 52 leaf layer (SHA-256 of every 16 KiB block, for the single-file image torrent) are
computed on a worker thread from the same mapped pages while the main thread cuts and names
chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyfastcdc import FastCDC

from imageswarm.agent.chunkhash import BLOCK, MAX_CHUNK, block_hashes, pieces_root
from imageswarm.agent.extents import Extent

MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
ZERO_BLOCK = 4096
#: Metadata between files is cut into pieces of this size (a filesystem block).
META_BLOCK = 4096
#: Zero runs shorter than this stay inside a data chunk (a hole entry would cost more).
MIN_HOLE = 16 * 1024
_HASH_WINDOW = 8 * 1024 * 1024
_ZEROS = bytes(ZERO_BLOCK)


#: A byte range of an image: the one type for file extents and the cuts made from them.
Span = Extent


@dataclass(frozen=True)
class Piece:
    """One cut: a data chunk (`name` set, `data` valid until the next piece) or a hole."""

    offset: int
    length: int
    name: str | None
    data: memoryview | None


def segments(size: int, extents: Sequence[Span] | None) -> list[tuple[int, int, bool]]:
    """Split [0, size) at every extent edge into (start, end, is_file_data) segments.

    Runs of adjacent file-data extents shorter than MIN_CHUNK (small files, or small pieces of
    a fragmented file) are merged into one segment (so a tree of tiny files does not become a
    torrent of tiny pieces), but an extent of MIN_CHUNK or more is never merged with them: it
    is cut by its own content wherever it lies, and a rewritten small file beside it changes
    only its own run's chunks (a Debian minbase with one package installed: 1.65x -> 1.46x
    the ideal delta, for 0-6% more chunks; docs/benchmarks.md).
    Metadata is never merged into file data: it changes on every build (timestamps, checksums
    seeded by the filesystem UUID), and a metadata block glued to a file would make that
    file's chunk change with it.
    """
    edges: dict[int, bool] = {0: False}
    for ext in extents or ():
        if ext.offset < size:
            edges[ext.offset] = True
        if 0 < ext.end < size:
            edges.setdefault(ext.end, False)
    ordered = sorted(edges.items())
    out: list[tuple[int, int, bool]] = []
    small_run = False  # out[-1] is a run of files each shorter than MIN_CHUNK
    for (start, is_file), (end, _) in itertools.pairwise([*ordered, (size, False)]):
        if end <= start:
            continue
        short = end - start < MIN_CHUNK
        if is_file and out and out[-1][2]:
            if short and small_run:
                out[-1] = (out[-1][0], end, True)
                continue
        elif (
            out
            and not is_file
            and not out[-1][2]
            and (short or out[-1][1] - out[-1][0] < MIN_CHUNK)
        ):
            out[-1] = (out[-1][0], end, False)
            continue
        out.append((start, end, is_file))
        small_run = is_file and short
    return out


def _zero_runs(view: memoryview, base: int) -> Iterator[tuple[int, int, bool]]:
    """Split `view` (which starts at image offset `base`) into (start, end, is_zero) runs.

    Zero detection works on 4 KiB blocks aligned to the image, and only runs of at least
    MIN_HOLE bytes count as holes. Offsets returned are relative to `view`.
    """
    size = len(view)
    first = min(size, (-base) % ZERO_BLOCK)
    runs: list[tuple[int, int, bool]] = []
    pos = first
    if first:
        runs.append((0, first, False))
    while pos < size:
        end = min(size, pos + ZERO_BLOCK)
        zero = end - pos == ZERO_BLOCK and view[pos:end].tobytes() == _ZEROS
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], end, zero)
        else:
            runs.append((pos, end, zero))
        pos = end
    # Short zero runs stay data; then merge neighbours of the same kind.
    out: list[tuple[int, int, bool]] = []
    for start, end, zero in runs:
        is_hole = zero and end - start >= MIN_HOLE
        if out and out[-1][2] == is_hole:
            out[-1] = (out[-1][0], end, is_hole)
        else:
            out.append((start, end, is_hole))
    yield from out


def _metadata_cuts(run: memoryview) -> list[tuple[int, int]]:
    """(start, length) cuts of `run` every META_BLOCK bytes from its start. In an image of a
    filesystem with 4 KiB blocks a run starts on a block (at an extent's edge or a zero run's),
    so these are the filesystem's blocks; in a tar they move with the headers they cut."""
    return [(pos, min(META_BLOCK, len(run) - pos)) for pos in range(0, len(run), META_BLOCK)]


class ImageReader:
    """Maps an image file and cuts it into pieces, hashing the whole image alongside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self._map: mmap.mmap | None = None
        if self.size:
            self._map = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._whole = hashlib.sha256()
        self._leaves: list[bytes] = []
        self._leafed_to = 0  # leaf hashes cover [0, this); only the hasher thread moves it
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-sha256")
        self._pending: list[Future[None]] = []
        self._hashed_to = 0
        self._cdc = FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._hasher.shutdown(wait=True)
        self._pending.clear()
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)

    def _hash_until(self, offset: int) -> None:
        assert self._map is not None
        while self._hashed_to < offset:
            end = min(offset, self._hashed_to + _HASH_WINDOW)
            self._pending.append(self._hasher.submit(self._update, self._hashed_to, end))
            self._hashed_to = end
        self._pending = [f for f in self._pending if not f.done()]

    def _update(self, start: int, end: int) -> None:
        assert self._map is not None
        # Windows end where segments end; leaf blocks are aligned to the image, so a block
        # that straddles a window's end is hashed with the next window.
        leaf_end = end if end == self.size else end - end % BLOCK
        with memoryview(self._map) as view:
            with view[start:end] as part:
                self._whole.update(part)
            if leaf_end > self._leafed_to:
                with view[self._leafed_to : leaf_end] as blocks:
                    self._leaves.extend(block_hashes(blocks))
                self._leafed_to = leaf_end

    def pieces(self, extents: Sequence[Span] | None = None) -> Iterator[Piece]:
        """Yield the image's pieces in order; holes are merged. Call once."""
        if self._map is None:
            return
        hole: Span | None = None
        with memoryview(self._map) as whole_view:
            for seg_start, seg_end, is_file in segments(self.size, extents):
                by_content = is_file or extents is None
                self._hash_until(seg_end)
                segment = whole_view[seg_start:seg_end]
                for start, end, is_hole in _zero_runs(segment, seg_start):
                    if is_hole:
                        if hole is not None and hole.end == seg_start + start:
                            hole = Span(hole.offset, hole.length + end - start)
                        else:
                            hole = Span(seg_start + start, end - start)
                        continue
                    if hole is not None:
                        yield Piece(hole.offset, hole.length, None, None)
                        hole = None
                    run = segment[start:end]
                    if by_content:
                        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(run)]
                    else:
                        cuts = _metadata_cuts(run)
                    for cut_offset, cut_length in cuts:
                        data = run[cut_offset : cut_offset + cut_length]
                        yield Piece(
                            seg_start + start + cut_offset,
                            cut_length,
                            pieces_root(data).hex(),
                            data,
                        )
                        data.release()
                    run.release()
                segment.release()
        if hole is not None:
            yield Piece(hole.offset, hole.length, None, None)

    def sha256(self) -> str:
        """The whole image's hex SHA-256; valid once `pieces()` has been exhausted."""
        if self._map is not None:
            self._hash_until(self.size)
            for fut in self._pending:
                fut.result()
            self._pending.clear()
        return self._whole.hexdigest()

    def leaf_hashes(self) -> list[bytes]:
        """SHA-256 of each 16 KiB block of the image, in order; valid after `sha256()`."""
        assert len(self._leaves) == -(-self.size // BLOCK), "call sha256() first"
        return self._leaves
