"""The controller's BEP 19 web seed: the chunk store served read-only over HTTP.

A node's torrent is named "chunks" and its files are chunks/ab/<name>, so libtorrent asks for
<base>/chunks/ab/<name> with Range headers; aiohttp's FileResponse answers ranges natively.
Only complete, well-named chunks are served; the byte count feeds the metrics.
"""

from __future__ import annotations

from aiohttp import web

from imageswarm.agent.chunkhash import is_chunk_name
from imageswarm.agent.store import Store


class WebSeed:
    PREFIX = "/webseed"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.bytes_served = 0
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not is_chunk_name(name) or request.match_info["prefix"] != name[:2]:
            raise web.HTTPNotFound(text="not a chunk name")
        path = self.store.chunk_path(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise web.HTTPNotFound(text=f"chunk {name} is not in this store") from None
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
