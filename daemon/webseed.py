"""The controller's BEP 19 web seed: the store's chunks and images served read-only over HTTP.

A chunk torrent is named "chunks" and its files are chunks/ab/<name>, so libtorrent asks for
<base>/chunks/ab/<name>; an image torrent's one file is <image_id>.img, asked for as
<base>/<image_id>.img. Both come with Range headers, which aiohttp's FileResponse answers
natively. Only well-named chunks and images of this store are served; the byte count feeds the
metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from imageswarm.agent.chunkhash import is_chunk_name
from imageswarm.agent.store import Store

_IMAGE_FILE_RE = re.compile(r"([0-9a-f]{16})\.img")


class WebSeed:
    PREFIX = "/webseed"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.bytes_served = 0
        self.requests = 0

    async def handle_chunk(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not is_chunk_name(name) or request.match_info["prefix"] != name[:2]:
            raise web.HTTPNotFound(text="not a chunk name")
        return self._serve(request, self.store.chunk_path(name), f"chunk {name}")

    async def handle_image(self, request: web.Request) -> web.StreamResponse:
        match = _IMAGE_FILE_RE.fullmatch(request.match_info["file"])
        if match is None:
            raise web.HTTPNotFound(text="not an image file name (<image_id>.img)")
        image_id = match.group(1)
        if not self.store.has_image(image_id):
            raise web.HTTPNotFound(text=f"image {image_id} is not in this store")
        return self._serve(request, self.store.image_path(image_id), f"image {image_id}")

    def _serve(self, request: web.Request, path: Path, what: str) -> web.StreamResponse:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise web.HTTPNotFound(text=f"{what} is not in this store") from None
        self.requests += 1
        try:
            rng = request.http_range
        except ValueError:
            rng = slice(None, None)
        start = rng.start or 0
        stop = size if rng.stop is None else min(rng.stop, size)
        if start < 0:
            start = max(0, size + start)
        self.bytes_served += max(0, stop - start)
        return web.FileResponse(path)
