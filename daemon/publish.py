"""Publishing: image file -> chunks + image copy in the store, signed manifest, two v2
torrents, all in one read.

Used by the controller's REST API and by `imageswarm image publish --store` on build hosts.
The same pass stores the new chunks, writes a sparse copy of the image (the image torrent's
file, which the controller seeds) and hashes the image's 16 KiB blocks for that torrent.
A failed publish removes every chunk it added, so the store is left as it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from imageswarm.agent import imagefile
from imageswarm.agent.chunking import ImageReader, Span
from imageswarm.agent.errors import InvalidInputError
from imageswarm.agent.fsutil import fsync_dir, pwrite_all
from imageswarm.agent.keys import SigningKey
from imageswarm.agent.manifest import ChunkEntry, Manifest, image_id_for
from imageswarm.agent.store import Store
from imageswarm.daemon.swarm.torrent import build_image_torrent, chunk_torrent, info_hash_v2

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PublishResult:
    manifest: Manifest
    new_chunks: int
    new_bytes: int
    existed: bool


def _extents(path: Path, fmt: str) -> list[Span] | None:
    return imagefile.tar_member_extents(path) if fmt == "tar" else imagefile.file_extents(path)


def publish(
    source: Path,
    name: str,
    store: Store,
    key: SigningKey,
    *,
    progress: Progress | None = None,
) -> PublishResult:
    """Publish `source` (raw, qcow2 or tar) under `name` into `store`, signed with `key`."""
    if not name or len(name) > 200 or any(c in name for c in "\n\r\0"):
        raise InvalidInputError(f"image name {name!r} must be 1-200 printable characters")
    if not source.is_file():
        raise InvalidInputError(f"{source} is not a file")
    source_format = imagefile.detect_format(source)
    imagefile.check_complete(source, source_format)
    work: Path | None = None
    raw = source
    fmt = source_format
    if source_format == "qcow2":
        work = store.tmp_path("convert")
        imagefile.convert_to_raw(source, work)
        raw, fmt = work, "raw"
        imagefile.detect_format(raw)  # a qcow2 holding no filesystem is refused here too
    writer = store.writer()
    copy = store.tmp_path("image")
    copy_fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    placed: Path | None = None  # the image copy, once moved into place
    try:
        extents = _extents(raw, fmt)
        kernels = imagefile.kernel_releases(raw, fmt)
        entries: list[ChunkEntry] = []
        chunks: dict[str, int] = {}
        with ImageReader(raw) as reader:
            for piece in reader.pieces(extents):
                entries.append(ChunkEntry(piece.name, piece.length))
                if piece.name is not None and piece.data is not None:
                    writer.add(piece.name, piece.data)
                    pwrite_all(copy_fd, piece.data, piece.offset)  # holes stay unwritten
                    chunks.setdefault(piece.name, piece.length)
                if progress is not None:
                    progress(piece.offset + piece.length, reader.size)
            sha256 = reader.sha256()
            size = reader.size
            leaves = reader.leaf_hashes()
        image_id = image_id_for(sha256)
        if store.has_image(image_id):
            writer.abort()
            return PublishResult(store.load_manifest(image_id), 0, 0, existed=True)
        writer.commit()  # its syncfs also writes out the image copy
        os.ftruncate(copy_fd, size)
        os.fsync(copy_fd)
        placed = store.image_path(image_id)
        os.replace(copy, placed)
        fsync_dir(store.images_dir)
        torrent = chunk_torrent(chunks, name)
        image_torrent = build_image_torrent(image_id, size, leaves)
        manifest = Manifest(
            image_id=image_id,
            name=name,
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            source_format=source_format,
            format=fmt,
            size=size,
            sha256=sha256,
            chunks=_merge_holes(entries),
            kernels=tuple(kernels),
            info_hash=info_hash_v2(torrent),
            image_info_hash=info_hash_v2(image_torrent),
        ).signed(key)
        store.save_image(manifest, torrent, image_torrent)
    except BaseException:
        writer.abort()
        if placed is not None:
            placed.unlink(missing_ok=True)
        raise
    finally:
        os.close(copy_fd)
        copy.unlink(missing_ok=True)
        if work is not None:
            work.unlink(missing_ok=True)
    log.info(
        "published %s (%s): %d chunks, %d new (%d bytes)",
        image_id,
        name,
        len(chunks),
        writer.written,
        writer.bytes_written,
    )
    return PublishResult(manifest, writer.written, writer.bytes_written, existed=False)


def _merge_holes(entries: list[ChunkEntry]) -> tuple[ChunkEntry, ...]:
    out: list[ChunkEntry] = []
    for entry in entries:
        if entry.hash is None and out and out[-1].hash is None:
            out[-1] = ChunkEntry(None, out[-1].length + entry.length)
        else:
            out.append(entry)
    return tuple(out)
