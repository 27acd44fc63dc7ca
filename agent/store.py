"""The per-machine content-addressed chunk store: the one place that knows its layout.

    <root>/chunks/ab/<name>          one file per unique chunk (name = BEP 52 root, see chunkhash)
    <root>/manifests/<image_id>.json signed manifest, verbatim
    <root>/torrents/<image_id>.torrent        the chunk torrent (files: chunks/ab/<name>)
    <root>/torrents/<image_id>.image.torrent  the image torrent (one file: <image_id>.img)
    <root>/images/<image_id>.img     the assembled, verified image (the image torrent's file)
    <root>/partial/<image_id>.img    an image torrent's download in progress
    <root>/pins.json                 {"current": id, "previous": id}: never collected
    <root>/tmp/                      work files; anything here is garbage after a crash

The store root doubles as the chunk torrent's save path: a torrent named "chunks" whose files
are chunks/ab/<name> finds the chunks a node already holds in place; images/ is the image
torrent's save path once an image is held, partial/ while it downloads. Reference counts are
derived from the manifests on disk, so they can never drift from what the store holds.
A chunk file may be partial while libtorrent downloads it; nothing trusts a chunk by its
presence alone: readers verify its root, writers publish it only once complete and synced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from imageswarm.agent import manifest as mf
from imageswarm.agent.chunkhash import is_chunk_name, pieces_root
from imageswarm.agent.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    ManifestError,
    StoreError,
)
from imageswarm.agent.fsutil import atomic_write, fsync_dir, pwrite_all, syncfs, write_all
from imageswarm.agent.keys import PublicKey

_BATCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GcReport:
    images_removed: tuple[str, ...]
    chunks_removed: int
    bytes_freed: int


class ChunkWriter:
    """Adds chunks durably in batches: write to tmp, one syncfs, then rename into place."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._batch: list[tuple[Path, Path]] = []
        self._batch_bytes = 0
        self._queued: set[str] = set()
        self.committed: list[str] = []
        self.written = 0
        self.bytes_written = 0

    def add(self, name: str, data: memoryview | bytes) -> bool:
        """Queue chunk `name`; False when the store already holds it."""
        if name in self._queued or self._store.has_chunk(name, len(data)):
            return False
        tmp = self._store.tmp_path("chunk")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        self._batch.append((tmp, self._store.chunk_path(name)))
        self._queued.add(name)
        self._batch_bytes += len(data)
        self.written += 1
        self.bytes_written += len(data)
        if self._batch_bytes >= _BATCH_BYTES:
            self.commit()
        return True

    def commit(self) -> None:
        if not self._batch:
            return
        syncfs(self._store.root)
        for tmp, final in self._batch:
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            self.committed.append(final.name)
        syncfs(self._store.root)
        self._batch.clear()
        self._batch_bytes = 0

    def abort(self) -> None:
        """Undo everything this writer added, so a failed publish leaves the store as it was."""
        for tmp, _ in self._batch:
            tmp.unlink(missing_ok=True)
        self._batch.clear()
        for name in self.committed:
            path = self._store.chunk_path(name)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only succeeds when the prefix dir is now empty
                path.parent.rmdir()
        self.committed.clear()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Store:
        if not root.is_dir():
            if not create:
                raise StoreError(f"store {root} does not exist")
            try:
                root.mkdir(parents=True)
            except OSError as exc:
                raise StoreError(f"cannot create store {root}: {exc.strerror}") from None
        store = cls(root)
        for sub in ("chunks", "manifests", "torrents", "images", "partial", "tmp"):
            (root / sub).mkdir(exist_ok=True)
        return store

    # --- paths -----------------------------------------------------------------------------
    def chunk_path(self, name: str) -> Path:
        if not is_chunk_name(name):
            raise StoreError(f"{name!r} is not a chunk name")
        return self.root / "chunks" / name[:2] / name

    def manifest_path(self, image_id: str) -> Path:
        return self.root / "manifests" / f"{image_id}.json"

    def torrent_path(self, image_id: str) -> Path:
        return self.root / "torrents" / f"{image_id}.torrent"

    def image_torrent_path(self, image_id: str) -> Path:
        return self.root / "torrents" / f"{image_id}.image.torrent"

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / f"{image_id}.img"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    def tmp_path(self, kind: str) -> Path:
        return self.root / "tmp" / f"{kind}-{secrets.token_hex(8)}"

    # --- chunks ----------------------------------------------------------------------------
    def has_chunk(self, name: str, length: int) -> bool:
        """Present with the right size (cheap; `read_chunk` verifies content)."""
        try:
            return self.chunk_path(name).stat().st_size == length
        except FileNotFoundError:
            return False

    def read_chunk(self, name: str, length: int) -> bytes:
        """The chunk's bytes, verified against its name."""
        path = self.chunk_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ChunkMissingError(f"chunk {name} is not in the store {self.root}") from None
        if len(data) != length or pieces_root(data).hex() != name:
            raise ChunkCorruptError(
                f"chunk {name} in {self.root} is corrupt (its content does not hash to its name)"
            )
        return data

    def missing(self, manifest: mf.Manifest) -> dict[str, int]:
        return {n: ln for n, ln in manifest.unique_chunks().items() if not self.has_chunk(n, ln)}

    def bad_chunks(self, manifest: mf.Manifest) -> list[str]:
        """Names of the manifest's chunks that are missing or do not hash to their name."""
        bad = []
        for name, length in manifest.unique_chunks().items():
            try:
                self.read_chunk(name, length)
            except StoreError:
                bad.append(name)
        return bad

    def writer(self) -> ChunkWriter:
        return ChunkWriter(self)

    # --- manifests -------------------------------------------------------------------------
    def save_image(self, manifest: mf.Manifest, torrent: bytes, image_torrent: bytes) -> None:
        """Record an image: torrents first, the manifest last (its presence is the commit)."""
        atomic_write(self.torrent_path(manifest.image_id), torrent)
        atomic_write(self.image_torrent_path(manifest.image_id), image_torrent)
        atomic_write(self.manifest_path(manifest.image_id), manifest.raw)

    def image_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "manifests").glob("*.json"))

    def has_image(self, image_id: str) -> bool:
        return self.manifest_path(image_id).is_file()

    def load_manifest(
        self, image_id: str, trusted: Iterable[PublicKey] | None = None
    ) -> mf.Manifest:
        """Read a stored manifest; with `trusted`, also verify its signature."""
        try:
            raw = self.manifest_path(image_id).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"image {image_id} is not in the store {self.root}") from None
        manifest = mf.parse(raw) if trusted is None else mf.verify(raw, trusted)
        if manifest.image_id != image_id:
            raise ManifestError(f"manifest file for {image_id} describes {manifest.image_id}")
        return manifest

    def load_torrent(self, image_id: str) -> bytes:
        try:
            return self.torrent_path(image_id).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"image {image_id} has no torrent in {self.root}") from None

    def load_image_torrent(self, image_id: str) -> bytes:
        try:
            return self.image_torrent_path(image_id).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"image {image_id} has no image torrent in {self.root}") from None

    # --- assembly --------------------------------------------------------------------------
    def assemble(self, manifest: mf.Manifest, dest: Path | None = None) -> Path:
        """Rebuild the image from verified chunks (holes stay sparse), check its SHA-256,
        and move it into place atomically. Reads every chunk from disk: this is the check
        that a download really landed, whatever the torrent engine said."""
        dest = dest or self.image_path(manifest.image_id)
        tmp = self.tmp_path("image")
        whole = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            offset = 0
            for entry in manifest.chunks:
                if entry.hash is None:
                    zeros = bytes(min(entry.length, 1 << 20))
                    left = entry.length
                    while left:
                        step = min(left, len(zeros))
                        whole.update(zeros[:step])
                        left -= step
                else:
                    data = self.read_chunk(entry.hash, entry.length)
                    whole.update(data)
                    pwrite_all(fd, data, offset)
                offset += entry.length
            os.ftruncate(fd, offset)
            if whole.hexdigest() != manifest.sha256:
                raise ChunkCorruptError(
                    f"image {manifest.image_id} rebuilt from the store has SHA-256 "
                    f"{whole.hexdigest()}, not {manifest.sha256} as its manifest says"
                )
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return dest

    def prefill(self, manifest: mf.Manifest, path: Path) -> int:
        """Write the chunks of `manifest` the store holds into a new sparse image file at
        `path`, each verified against its name; return the bytes written. A torrent added on
        that file then finds the pieces they cover complete, so they are not downloaded again."""
        written = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            for entry in manifest.chunks:
                if entry.hash is not None and self.has_chunk(entry.hash, entry.length):
                    try:
                        data = self.read_chunk(entry.hash, entry.length)
                    except ChunkCorruptError:
                        data = b""  # a bad chunk is simply not used
                    if data:
                        pwrite_all(fd, data, offset)
                        written += len(data)
                offset += entry.length
            os.ftruncate(fd, manifest.size)
        finally:
            os.close(fd)
        return written

    def complete_image(self, manifest: mf.Manifest, path: Path) -> None:
        """Make a downloaded image file exactly the image's size and durable: a download never
        writes trailing pieces that are all zeros, so the file may be short (it is extended
        with zeros); anything past the image's end is not part of it and is cut off. Its
        content must be proven by the caller (the fetch checks every piece against the signed
        image torrent, daemon/swarm/piececheck.py)."""
        with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "rb+") as f:
            f.truncate(manifest.size)
            os.fsync(f.fileno())

    def take_chunks(self, manifest: mf.Manifest, path: Path, *, verify: bool = False) -> int:
        """Store, durably, the chunks of a proven image file (see `complete_image`) that the
        store lacks; return how many. Just proven, they need no hashing of their own: the
        file is the signed image, so the bytes at each listed offset are the chunks the
        publisher named. ``verify`` hashes each one anyway (a file proven long ago) and
        raises ChunkCorruptError, storing nothing, at the first that differs."""
        with self.writer() as writer, open(path, "rb") as f:
            offset = 0
            for entry in manifest.chunks:
                if entry.hash is not None and not self.has_chunk(entry.hash, entry.length):
                    data = os.pread(f.fileno(), entry.length, offset)
                    if verify and pieces_root(data).hex() != entry.hash:  # the writer aborts
                        raise ChunkCorruptError(
                            f"{path} does not hold chunk {entry.hash} at offset {offset}"
                        )
                    writer.add(entry.hash, data)
                offset += entry.length
            return writer.written

    def place_image(self, image_id: str, path: Path) -> Path:
        """Move a verified image file to its place in the store."""
        dest = self.image_path(image_id)
        os.replace(path, dest)
        fsync_dir(dest.parent)
        return dest

    # --- pins, references, garbage collection ----------------------------------------------
    def pins(self) -> dict[str, str | None]:
        path = self.root / "pins.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"current": None, "previous": None}
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc})") from None
        return {"current": data.get("current"), "previous": data.get("previous")}

    def set_current(self, image_id: str) -> None:
        """Make `image_id` current; the old current becomes previous."""
        if not self.has_image(image_id):
            raise StoreError(f"cannot pin {image_id}: it is not in the store {self.root}")
        pins = self.pins()
        if pins["current"] != image_id:
            pins = {"current": image_id, "previous": pins["current"]}
        atomic_write(self.root / "pins.json", json.dumps(pins).encode())

    def refcounts(self) -> Counter[str]:
        """How many stored images use each chunk."""
        counts: Counter[str] = Counter()
        for image_id in self.image_ids():
            counts.update(self.load_manifest(image_id).unique_chunks().keys())
        return counts

    def remove_image(self, image_id: str) -> None:
        pins = self.pins()
        if image_id in pins.values():
            raise StoreError(f"image {image_id} is pinned as current or previous; not removing it")
        self.manifest_path(image_id).unlink(missing_ok=True)
        self.torrent_path(image_id).unlink(missing_ok=True)
        self.image_torrent_path(image_id).unlink(missing_ok=True)
        self.image_path(image_id).unlink(missing_ok=True)
        (self.partial_dir / f"{image_id}.img").unlink(missing_ok=True)

    def gc(self, keep: Iterable[str] = ()) -> GcReport:
        """Remove every image not in `keep` or pinned, then every chunk no image uses."""
        keep_set = set(keep) | {i for i in self.pins().values() if i}
        removed = tuple(i for i in self.image_ids() if i not in keep_set)
        for image_id in removed:
            self.remove_image(image_id)
        live = self.refcounts()
        freed = count = 0
        for sub in (self.root / "chunks").iterdir():
            for path in sub.iterdir():
                if path.name not in live:
                    freed += path.stat().st_size
                    path.unlink()
                    count += 1
        for path in (self.root / "tmp").iterdir():
            path.unlink()
        return GcReport(removed, count, freed)
