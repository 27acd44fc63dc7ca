"""Controller image API: publish (upload), list, show, delete, the signed manifest, torrents."""

from __future__ import annotations

import functools
import gzip
import os
from typing import Any

from aiohttp import hdrs, web

from imageswarm.agent.manifest import Manifest
from imageswarm.daemon.appkeys import CATALOG, CONFIG, EVENTS, STORE
from imageswarm.daemon.errors import BadRequest
from imageswarm.daemon.problems import require_token

routes = web.RouteTableDef()
_SPOOL_BLOCK = 1024 * 1024


def summary(manifest: Manifest) -> dict[str, Any]:
    data = manifest.to_json()
    chunks = data.pop("chunks")
    data["chunk_count"] = len(chunks)
    data["unique_chunks"] = len(manifest.unique_chunks())
    data["stored_bytes"] = manifest.stored_bytes
    return data


def valid_image_id(image_id: str) -> str:
    if not image_id or len(image_id) > 64 or not all(c.isalnum() or c in "-_." for c in image_id):
        raise BadRequest(f"{image_id!r} is not an image id")
    return image_id


@routes.get("/api/v1/images")
async def list_images(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    return web.json_response({"images": [summary(m) for m in catalog.manifests()]})


@routes.post("/api/v1/images")
async def publish_image(request: web.Request) -> web.Response:
    require_token(request, request.app[CONFIG].api_token)
    name = request.query.get("name", "").strip()
    if not name:
        raise BadRequest("query parameter 'name' is required (the image's name)")
    store = request.app[STORE]
    spool = store.tmp_path("upload")
    try:
        size = 0
        with spool.open("wb") as out:
            async for block in request.content.iter_chunked(_SPOOL_BLOCK):
                out.write(block)
                size += len(block)
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise BadRequest("the request body is empty; send the image file as the body")
        result = await request.app[CATALOG].publish(spool, name)
    finally:
        spool.unlink(missing_ok=True)
    if not result.existed:
        manifest = result.manifest
        await request.app[EVENTS].publish(
            "image.published", image_id=manifest.image_id, name=manifest.name
        )
    body = {
        "manifest": result.manifest.to_json(),
        "new_chunks": result.new_chunks,
        "new_bytes": result.new_bytes,
        "existed": result.existed,
    }
    return web.json_response(body, status=200 if result.existed else 201)


@routes.get("/api/v1/images/{image_id}")
async def show_image(request: web.Request) -> web.Response:
    image_id = valid_image_id(request.match_info["image_id"])
    return web.json_response(summary(request.app[CATALOG].manifest(image_id)))


@routes.delete("/api/v1/images/{image_id}")
async def delete_image(request: web.Request) -> web.Response:
    require_token(request, request.app[CONFIG].api_token)
    image_id = valid_image_id(request.match_info["image_id"])
    manifest = await request.app[CATALOG].delete(image_id)
    await request.app[EVENTS].publish("image.deleted", image_id=image_id, name=manifest.name)
    return web.Response(status=204)


@routes.get("/api/v1/images/{image_id}/manifest")
async def get_manifest(request: web.Request) -> web.Response:
    image_id = valid_image_id(request.match_info["image_id"])
    manifest = request.app[CATALOG].manifest(image_id)
    vary = {hdrs.VARY: hdrs.ACCEPT_ENCODING}
    if not _accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING, "")):
        return web.Response(body=manifest.raw, content_type="application/json", headers=vary)
    # Every node of a rollout asks for it at once, over the controller's link: gzip halves it
    # (hex hashes), which shortens the start of a fetch.
    return web.Response(
        body=_gzipped(manifest.raw),
        content_type="application/json",
        headers={hdrs.CONTENT_ENCODING: "gzip", **vary},
    )


def _accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip;q=0`` does not)."""
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            try:
                return not q.startswith("q=") or float(q[2:]) > 0
            except ValueError:
                return False
    return False


@functools.lru_cache(maxsize=16)
def _gzipped(raw: bytes) -> bytes:
    """A manifest, compressed once (manifests never change)."""
    return gzip.compress(raw, compresslevel=6, mtime=0)


@routes.get("/api/v1/images/{image_id}/torrent")
async def get_torrent(request: web.Request) -> web.Response:
    image_id = valid_image_id(request.match_info["image_id"])
    request.app[CATALOG].manifest(image_id)
    body = request.app[STORE].load_torrent(image_id)
    return web.Response(body=body, content_type="application/x-bittorrent")


@routes.get("/api/v1/images/{image_id}/image-torrent")
async def get_image_torrent(request: web.Request) -> web.Response:
    image_id = valid_image_id(request.match_info["image_id"])
    request.app[CATALOG].manifest(image_id)
    body = request.app[STORE].load_image_torrent(image_id)
    return web.Response(body=body, content_type="application/x-bittorrent")
