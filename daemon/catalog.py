"""The controller's image catalog: publishes into its store and seeds every image it holds,
through both of its torrents (the chunk torrent and the single-file image torrent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from imageswarm.agent.errors import StoreError
from imageswarm.agent.keys import SigningKey
from imageswarm.agent.manifest import Manifest
from imageswarm.agent.store import Store
from imageswarm.daemon.errors import Conflict, NotFound
from imageswarm.daemon.publish import PublishResult, publish
from imageswarm.daemon.swarm.session import Swarm
from imageswarm.daemon.tracker import Tracker

log = logging.getLogger(__name__)


class Catalog:
    def __init__(
        self, store: Store, key: SigningKey, swarm: Swarm, tracker: Tracker, announce_url: str
    ) -> None:
        self.store, self.key, self.swarm, self.tracker = store, key, swarm, tracker
        self.announce_url = announce_url
        self._lock = asyncio.Lock()  # one publish at a time: chunk dedup and abort stay exact
        self._usage_checks: list[Callable[[str], str | None]] = []

    async def start(self) -> None:
        """Seed every image already in the store (after a restart)."""
        for image_id in self.store.image_ids():
            await self._seed(self.store.load_manifest(image_id))

    async def _seed(self, manifest: Manifest) -> None:
        image_id, trackers = manifest.image_id, [self.announce_url]
        if not self.store.image_path(image_id).is_file():  # e.g. removed by hand: rebuild it
            await asyncio.to_thread(self.store.assemble, manifest)
        for info_hash in (manifest.info_hash, manifest.image_info_hash):
            self.tracker.allow(info_hash)
        torrent = self.store.load_torrent(image_id)
        await self.swarm.add(torrent, self.store.root, seed=True, trackers=trackers)
        image_torrent = self.store.load_image_torrent(image_id)
        await self.swarm.add(image_torrent, self.store.images_dir, seed=True, trackers=trackers)

    async def publish(self, source: Path, name: str) -> PublishResult:
        async with self._lock:
            result = await asyncio.to_thread(publish, source, name, self.store, self.key)
            await self._seed(result.manifest)
        return result

    def manifests(self) -> list[Manifest]:
        return [self.store.load_manifest(i) for i in self.store.image_ids()]

    def manifest(self, image_id: str) -> Manifest:
        try:
            return self.store.load_manifest(image_id)
        except StoreError:
            raise NotFound(f"image {image_id} does not exist") from None

    def add_usage_check(self, check: Callable[[str], str | None]) -> None:
        """`check(image_id)` says why an image must not be deleted (None: it may be)."""
        self._usage_checks.append(check)

    async def delete(self, image_id: str) -> Manifest:
        """Stop seeding an image and remove it with the chunks no other image uses.

        Refused (Conflict) while a usage check objects: a node runs it or keeps it to roll back
        to, or a rollout targets it. Holds the publish lock, so a publish running meanwhile
        cannot count on a chunk this removes.
        """
        async with self._lock:
            manifest = self.manifest(image_id)
            for check in self._usage_checks:
                reason = check(image_id)
                if reason is not None:
                    raise Conflict(f"image {image_id} is in use: {reason}")
            self.store.remove_image(image_id)  # the manifest goes first: nothing can target it now
            for info_hash in (manifest.info_hash, manifest.image_info_hash):
                self.tracker.forget(info_hash)
                download = self.swarm.downloads.get(info_hash)
                if download is not None:
                    await download.remove()
            await asyncio.to_thread(self._remove_unused_chunks, manifest)
        log.info("deleted image %s (%s)", image_id, manifest.name)
        return manifest

    def _remove_unused_chunks(self, manifest: Manifest) -> None:
        live = self.store.refcounts()
        for name in manifest.unique_chunks():
            if name not in live:
                path = self.store.chunk_path(name)
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # only when its prefix directory is now empty
                    path.parent.rmdir()
