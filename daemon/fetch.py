"""Fetching an image on a node: signed manifest -> swarm download -> flush -> verified image.

Each image travels in two torrents (daemon/swarm/torrent.py), and a node picks one:
- **chunks** when it already holds most of the image's chunks (an earlier version): only the
  chunks it lacks move, straight into its store; then it rebuilds the image from the store.
- **image** when it holds little of it: the single-file torrent of the whole image, which
  libtorrent moves several times faster than thousands of chunk files; pieces that are all
  zeros are never requested. The file is then cut into the store (so the next version can
  come as a delta).

A node downloads only the signed manifest (gzipped) and the image torrent from the controller:
the chunk torrent is a function of the manifest, so the node builds it and checks its info-hash
against the signed one (every node of a rollout asks at once, over the controller's link).

libtorrent's "finished" is never trusted alone: what is on disk is proven. A delta's chunks and
the image rebuilt from them are hashed once it fires and the cache is flushed; a whole image
file is checked piece by piece against the signed image torrent, mostly while it downloads
(daemon/swarm/piececheck.py), so only its last pieces are left at the end. What fails is
fetched again (bounded). Only then is the manifest committed to the store, so a crash at any
point leaves no half-held image behind. Once held, the node seeds the image in both torrents.
The controller's web seed is added only when peers stall, so the controller sends little more
than one copy per swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from imageswarm.agent import manifest as mf
from imageswarm.agent.errors import ChunkCorruptError, ImageSwarmError, ManifestError, StoreError
from imageswarm.agent.store import Store
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.config import Config
from imageswarm.daemon.errors import ControllerError, NotFound
from imageswarm.daemon.swarm.piececheck import PieceChecker
from imageswarm.daemon.swarm.session import Download, Swarm
from imageswarm.daemon.swarm.torrent import (
    check_image_torrent,
    chunk_torrent,
    hole_pieces,
    image_file_name,
    info_hash_v2,
)

log = logging.getLogger(__name__)
_RETRIES = 3
_PROVE_EVERY = 1.0  # seconds between checks of the pieces a whole-image download got
#: Fetch the whole image instead of chunks when the store lacks more than this share of its
#: chunk bytes: below it, the delta is small and the chunk torrent's per-file cost is harmless.
WHOLE_IMAGE_ABOVE = 0.5
#: A whole-image fetch first copies the chunks the store holds into the image file when they
#: are at least this share of its chunk bytes (libtorrent then checks the file, which costs a
#: read of the whole image: not worth it for a few shared chunks).
PREFILL_ABOVE = 0.1


@dataclass
class FetchState:
    image_id: str
    state: str = "queued"  # queued, resolving, downloading, verifying, done, failed
    error: str | None = None
    torrent: str | None = None  # which torrent carries it: "chunks" (delta) or "image" (whole)
    in_store: bool = False  # its chunks are in the store (a whole image is cut after "done")
    name: str | None = None
    size: int = 0
    total_bytes: int = 0  # bytes of unique chunks the image needs
    done_bytes: int = 0
    received_bytes: int = 0  # payload libtorrent received, redundant blocks included
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    hash_failures: int = 0
    web_seed_used: bool = False
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration"] = (self.finished or time.time()) - self.started
        return data


class FetchManager:
    def __init__(self, config: Config, store: Store, swarm: Swarm) -> None:
        self.config, self.store, self.swarm = config, store, swarm
        # Everything a fetch needs is on the controller's swarm plane (plain HTTP even when the
        # REST API uses TLS, docs/control-plane.md "TLS"): signed manifests, torrents, the
        # tracker and the web seed. Their integrity comes from the manifest's signature.
        self.controller_url = config.swarm_url
        self.controller_host = urlsplit(self.controller_url).hostname or ""
        self.states: dict[str, FetchState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._downloads: dict[str, Download] = {}
        self._cutting: set[asyncio.Task[None]] = set()  # whole images being cut into the store

    async def start(self) -> None:
        """Seed every image the store already holds (after a restart)."""
        for image_id in self.store.image_ids():
            manifest = self.store.load_manifest(image_id, self.config.trusted_keys)
            if not await self._cut_held(manifest):
                continue
            dl = await self.swarm.add(
                self.store.load_torrent(image_id), self.store.root, trackers=[self._announce()]
            )
            self._downloads[image_id] = dl
            if not self.store.image_path(image_id).is_file():
                await asyncio.to_thread(self.store.assemble, manifest)
            await self._seed_image(image_id)
            self.states[image_id] = FetchState(
                image_id,
                "done",
                name=manifest.name,
                size=manifest.size,
                in_store=not self.store.missing(manifest),
                finished=time.time(),
            )

    async def _cut_held(self, manifest: mf.Manifest) -> bool:
        """A held whole image whose cut into the store a crash interrupted: cut it now, from
        the local file (checking every chunk: the file was proven before the crash, not
        since), rather than fetch its chunks again from peers. False when the file turns out
        not to be the image: it is then neither seeded nor listed (and removed unless pinned;
        the agent refuses a pinned one at its SHA-256 check), so a new fetch starts over."""
        path = self.store.image_path(manifest.image_id)
        if not path.is_file() or not self.store.missing(manifest):
            return True
        try:
            stored = await asyncio.to_thread(self.store.take_chunks, manifest, path, verify=True)
        except ChunkCorruptError as exc:
            log.error("%s is not the image it should be: %s", path, exc)
            with contextlib.suppress(StoreError):
                self.store.remove_image(manifest.image_id)
            return False
        except (ImageSwarmError, OSError) as exc:  # its chunk torrent fetches what is missing
            log.warning("cutting %s into the store failed: %s", manifest.image_id, exc)
            return True
        log.info("%s: cut into the store on start (%d chunks)", manifest.image_id, stored)
        return True

    async def _seed_image(self, image_id: str) -> None:
        """Seed a held image's image torrent from its verified file."""
        await self.swarm.add(
            self.store.load_image_torrent(image_id),
            self.store.images_dir,
            seed=True,
            trackers=[self._announce()],
        )

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._cutting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _announce(self) -> str:
        return f"{self.controller_url}/announce"

    def state(self, image_id: str) -> FetchState:
        st = self.states.get(image_id)
        if st is None:
            raise NotFound(f"image {image_id} is not known to this node")
        dl = self._downloads.get(image_id)
        if dl is not None and st.state == "downloading":
            self._refresh(st, dl)
        return st

    def fetch(self, image_id: str) -> FetchState:
        """Start fetching (idempotent: a running or finished fetch is returned as is)."""
        st = self.states.get(image_id)
        if st is not None and st.state != "failed":
            return self.state(image_id)
        st = FetchState(image_id)
        self.states[image_id] = st
        self._tasks[image_id] = asyncio.create_task(self._run(st), name=f"fetch-{image_id}")
        return st

    def _refresh(self, st: FetchState, dl: Download) -> None:
        status = dl.status()  # one sample of the torrent and its peers serves all three reads
        st.done_bytes = status.total_done
        st.received_bytes = status.total_payload_download
        if st.torrent == "image":
            st.total_bytes = status.total_wanted
        st.hash_failures = dl.hash_failures
        by_source = dl.bytes_by_source(refresh=False)
        controller = dl.bytes_by_ip(refresh=False).get(self.controller_host, 0)
        st.bytes_by_source = {
            "local": st.bytes_by_source.get("local", 0),
            "controller": controller,
            "peers": max(0, by_source.get("peer", 0) - controller),
            "web_seed": by_source.get("web_seed", 0),
            "unattributed": by_source.get("unattributed", 0),
        }

    async def _run(self, st: FetchState) -> None:
        try:
            await self._fetch(st)
        except asyncio.CancelledError:
            st.state, st.error = "failed", "cancelled"
            raise
        except (ImageSwarmError, OSError) as exc:
            log.warning("fetch of %s failed: %s", st.image_id, exc)
            st.state, st.error = "failed", str(exc)
        except Exception as exc:
            log.exception("fetch of %s crashed", st.image_id)
            st.state, st.error = "failed", f"internal error: {exc!r}"
        finally:
            st.finished = time.time()
            self._tasks.pop(st.image_id, None)

    async def _fetch(self, st: FetchState) -> None:
        st.state = "resolving"
        async with ApiClient(self.controller_url, timeout=30) as api:
            try:
                base = f"/api/v1/images/{st.image_id}"
                raw = await api.get_bytes(f"{base}/manifest")
                image_torrent = await api.get_bytes(f"{base}/image-torrent")
            except ControllerError as exc:
                if exc.status == 404:
                    raise NotFound(f"the controller has no image {st.image_id}") from None
                raise
        manifest = mf.verify(raw, self.config.trusted_keys)
        if manifest.image_id != st.image_id:
            raise ManifestError(f"controller sent the manifest of {manifest.image_id}")
        try:  # a large image has 100k chunks: not on the event loop
            torrent = await asyncio.to_thread(
                chunk_torrent, manifest.unique_chunks(), manifest.name
            )
        except ValueError as exc:
            raise ManifestError(f"the manifest does not describe a chunk torrent: {exc}") from None
        if info_hash_v2(torrent) != manifest.info_hash:
            raise ManifestError(
                "the chunk torrent built from the manifest does not have the info-hash it signs"
            )
        check_image_torrent(
            image_torrent, manifest.image_id, manifest.size, manifest.image_info_hash
        )
        st.name, st.size, st.total_bytes = manifest.name, manifest.size, manifest.stored_bytes
        if self._cutting:  # an image just fetched whole may hold most of this one's chunks
            await asyncio.wait(self._cutting)
        missing = sum(self.store.missing(manifest).values())
        st.bytes_by_source = {"local": st.total_bytes - missing}
        st.state = "downloading"
        whole = missing > WHOLE_IMAGE_ABOVE * manifest.stored_bytes
        if whole:
            st.torrent, st.bytes_by_source = "image", {"local": 0}
            prefill = st.total_bytes - missing >= PREFILL_ABOVE * manifest.stored_bytes
            await self._fetch_image(st, manifest, image_torrent, prefill=prefill)
        else:
            st.torrent = "chunks"
            await self._fetch_chunks(st, manifest, torrent)
            st.in_store = True
        self.store.save_image(manifest, torrent, image_torrent)
        await self._seed_image(st.image_id)
        st.state = "done"
        log.info(
            "%s fetched (%s torrent) and verified: %s", st.image_id, st.torrent, st.bytes_by_source
        )
        if whole:  # the image is usable now; its chunks serve later deltas and delta peers
            task = asyncio.create_task(self._cut(st, manifest, torrent), name=f"cut-{st.image_id}")
            self._cutting.add(task)
            task.add_done_callback(self._cutting.discard)

    async def _cut(self, st: FetchState, manifest: mf.Manifest, torrent: bytes) -> None:
        """Cut a verified whole image into the store, then seed its chunk torrent too.

        Off the fetch's critical path: when a whole fleet verifies at once, writing every
        chunk as well doubled the time to "done" on a busy machine. A crash before it ends
        leaves a held image whose chunk torrent, added on restart, checks what is there and
        fetches the rest from peers.
        """
        try:
            path = self.store.image_path(manifest.image_id)
            stored = await asyncio.to_thread(self.store.take_chunks, manifest, path)
            dl = await self.swarm.add(
                torrent, self.store.root, seed=True, trackers=[self._announce()]
            )
            self._downloads[manifest.image_id] = dl
            st.in_store = True
            log.info("%s: cut into the store (%d new chunks)", manifest.image_id, stored)
        except (ImageSwarmError, OSError) as exc:
            log.warning("cutting %s into the store failed: %s", manifest.image_id, exc)

    async def _fetch_chunks(self, st: FetchState, manifest: mf.Manifest, torrent: bytes) -> None:
        """Download the chunks the store lacks into it, then rebuild and check the image."""
        dl = await self.swarm.add(torrent, self.store.root, trackers=[self._announce()])
        self._downloads[st.image_id] = dl
        for attempt in range(_RETRIES + 1):
            await self._download(st, dl)
            st.state = "verifying"
            await dl.flush()
            try:
                await asyncio.to_thread(self.store.assemble, manifest)
                break
            except ChunkCorruptError:
                bad = await asyncio.to_thread(self.store.bad_chunks, manifest)
                log.warning(
                    "%s: %d chunks bad on disk after finish; refetching", st.image_id, len(bad)
                )
                if attempt == _RETRIES:
                    raise
                for name in bad:
                    self.store.chunk_path(name).unlink(missing_ok=True)
                await dl.recheck()
                st.state = "downloading"
        self._refresh(st, dl)

    async def _fetch_image(
        self, st: FetchState, manifest: mf.Manifest, torrent: bytes, *, prefill: bool
    ) -> None:
        """Download the whole image file, check it and put it in place. With `prefill`, the
        chunks the store holds are copied into the file first, so only the pieces they do not
        cover travel."""
        skip = hole_pieces([(c.hash, c.length) for c in manifest.chunks], manifest.size)
        partial = self.store.partial_dir
        path = partial / image_file_name(st.image_id)
        if prefill:
            local = await asyncio.to_thread(self.store.prefill, manifest, path)
            st.bytes_by_source = {"local": local}
        checker = PieceChecker(path, torrent, manifest.size)
        dl = await self.swarm.add(torrent, partial, trackers=[self._announce()], skip_pieces=skip)
        self._downloads[st.image_id] = dl
        for attempt in range(_RETRIES + 1):
            proving = asyncio.create_task(self._prove_as_they_come(dl, checker))
            try:
                await self._download(st, dl)
            finally:
                proving.cancel()
                await asyncio.gather(proving, return_exceptions=True)
            st.state = "verifying"
            await dl.flush()
            try:
                await asyncio.to_thread(self._prove_image, manifest, checker)
                break
            except ChunkCorruptError as exc:
                log.warning("%s: %s; checking every piece again", st.image_id, exc)
                if attempt == _RETRIES:
                    raise
                await dl.recheck()
                st.state = "downloading"
        self._refresh(st, dl)
        await dl.remove()  # the file moves to images/, where its seed is added again
        self.store.place_image(st.image_id, path)

    async def _prove_as_they_come(self, dl: Download, checker: PieceChecker) -> None:
        """Check pieces on disk as libtorrent gets them, so that few are left at the end.
        libtorrent keeps written blocks in memory for a while: the pieces it had before a
        flush of its cache are on disk after it."""
        while True:
            await asyncio.sleep(_PROVE_EVERY)
            try:
                had = dl.pieces_had()
                ready = [index for index in checker.unchecked() if had[index]]
                if ready:
                    await dl.flush()
                    await asyncio.to_thread(checker.check, ready)
            except (ImageSwarmError, OSError) as exc:  # the last check at the end decides
                log.info("%s: checking pieces while downloading: %s", dl.info_hash, exc)

    def _prove_image(self, manifest: mf.Manifest, checker: PieceChecker) -> None:
        """Prove the rest of a downloaded image (blocking): every piece must match the signed
        image torrent; then the file is made whole and durable."""
        self.store.complete_image(manifest, checker.path)
        bad = checker.check(checker.unchecked())
        if bad:
            raise ChunkCorruptError(
                f"{len(bad)} pieces of image {manifest.image_id} differ on disk from its signed "
                f"image torrent (first: piece {bad[0]})"
            )

    async def _download(self, st: FetchState, dl: Download) -> None:
        finished = asyncio.ensure_future(dl.finished())
        last_done, last_change = -1, time.monotonic()
        try:
            while not finished.done():
                # Sample often: libtorrent forgets a peer's byte count when it disconnects,
                # and a small delta finishes within a second.
                await asyncio.wait([finished], timeout=0.2)
                self._refresh(st, dl)
                if st.done_bytes != last_done:
                    last_done, last_change = st.done_bytes, time.monotonic()
                stalled = time.monotonic() - last_change
                if not st.web_seed_used and stalled >= self.config.swarm.web_seed_after:
                    log.info("%s: no progress for %.0fs, adding web seed", st.image_id, stalled)
                    dl.add_web_seed(f"{self.controller_url}/webseed/")
                    st.web_seed_used = True
            finished.result()
        finally:
            finished.cancel()
