"""The controller's image catalog: publishes into its store and seeds every image it holds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from imageswarm.agent.errors import StoreError
from imageswarm.agent.keys import SigningKey
from imageswarm.agent.manifest import Manifest
from imageswarm.agent.store import Store
from imageswarm.daemon.errors import NotFound
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

    async def start(self) -> None:
        """Seed every image already in the store (after a restart)."""
        for image_id in self.store.image_ids():
            await self._seed(self.store.load_manifest(image_id))

    async def _seed(self, manifest: Manifest) -> None:
        self.tracker.allow(manifest.info_hash)
        torrent = self.store.load_torrent(manifest.image_id)
        await self.swarm.add(torrent, self.store.root, seed=True, trackers=[self.announce_url])

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
