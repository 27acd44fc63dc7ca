"""Node-local API: fetch an image into this node's store and follow its progress."""

from __future__ import annotations

from aiohttp import web

from imageswarm.daemon.api.images import valid_image_id
from imageswarm.daemon.appkeys import CONFIG, FETCHER
from imageswarm.daemon.problems import require_token

routes = web.RouteTableDef()


@routes.get("/api/v1/images")
async def list_images(request: web.Request) -> web.Response:
    fetcher = request.app[FETCHER]
    states = [fetcher.state(i).to_json() for i in sorted(fetcher.states)]
    return web.json_response({"images": states})


@routes.get("/api/v1/images/{image_id}")
async def show_image(request: web.Request) -> web.Response:
    image_id = valid_image_id(request.match_info["image_id"])
    return web.json_response(request.app[FETCHER].state(image_id).to_json())


@routes.post("/api/v1/images/{image_id}/fetch")
async def fetch_image(request: web.Request) -> web.Response:
    require_token(request, request.app[CONFIG].api_token)
    image_id = valid_image_id(request.match_info["image_id"])
    state = request.app[FETCHER].fetch(image_id)
    return web.json_response(state.to_json(), status=202)
