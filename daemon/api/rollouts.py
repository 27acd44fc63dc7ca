"""Rollout API: start, list, show, and pause/resume/abort/rollback (operator token to change).

A refused request is a 400/404/409 problem document and changes nothing.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from imageswarm.daemon.appkeys import CONFIG, FLEET, ROLLOUTS
from imageswarm.daemon.errors import BadRequest, NotFound
from imageswarm.daemon.fleet import Fleet
from imageswarm.daemon.jsonfields import IMAGE_ID, NAME, Fields, read_json
from imageswarm.daemon.problems import require_token
from imageswarm.daemon.rolloutstate import Strategy

routes = web.RouteTableDef()


def require_operator(request: web.Request) -> None:
    require_token(request, request.app[CONFIG].api_token)


def select(fleet: Fleet, selector: Any) -> list[str]:
    """The target names for the request's `nodes`: "all", a list of names, or {"labels": {}}."""
    if selector == "all":
        names = [n.name for n in fleet.nodes()]
        if not names:
            raise BadRequest("field 'nodes': no node is enrolled")
        return names
    if isinstance(selector, list):
        if not selector or not all(isinstance(n, str) and NAME.fullmatch(n) for n in selector):
            raise BadRequest("field 'nodes': expected a non-empty list of node names")
        if len(set(selector)) != len(selector):
            twice = sorted({n for n in selector if selector.count(n) > 1})
            raise BadRequest(f"field 'nodes': {', '.join(twice)} listed more than once")
        unknown = [n for n in selector if fleet.find(n) is None]
        if unknown:
            raise NotFound(f"field 'nodes': unknown nodes: {', '.join(unknown)}")
        return list(selector)
    if isinstance(selector, dict):
        f = Fields(selector, "nodes")
        f.only("labels")
        wanted = f.labels("labels")
        if not wanted:
            raise f.fail("labels", 'at least one label (use "all" for every node)')
        names = [
            n.name for n in fleet.nodes() if all(n.labels.get(k) == v for k, v in wanted.items())
        ]
        if not names:
            raise BadRequest(f"field 'nodes': no enrolled node has the labels {wanted}")
        return names
    raise BadRequest('field \'nodes\': expected "all", a list of node names or {"labels": {...}}')


@routes.get("/api/v1/rollouts")
async def list_rollouts(request: web.Request) -> web.Response:
    rollouts = await request.app[ROLLOUTS].rollouts()
    return web.json_response({"rollouts": [r.to_json() for r in rollouts]})


@routes.post("/api/v1/rollouts")
async def start_rollout(request: web.Request) -> web.Response:
    require_operator(request)
    f = Fields(await read_json(request))
    f.only("image_id", "nodes", "strategy")
    image_id = f.text("image_id", IMAGE_ID, 64)
    f.required("nodes")
    strategy = Strategy.parse(f.get("strategy"))
    targets = select(request.app[FLEET], f.get("nodes"))
    rollout = await request.app[ROLLOUTS].create(image_id, targets, strategy)
    return web.json_response(rollout.to_json(), status=201)


@routes.get("/api/v1/rollouts/{id}")
async def show_rollout(request: web.Request) -> web.Response:
    rollout = await request.app[ROLLOUTS].get(request.match_info["id"])
    return web.json_response(rollout.to_json())


@routes.post("/api/v1/rollouts/{id}/pause")
async def pause(request: web.Request) -> web.Response:
    require_operator(request)
    rollout = await request.app[ROLLOUTS].pause(request.match_info["id"])
    return web.json_response(rollout.to_json())


@routes.post("/api/v1/rollouts/{id}/resume")
async def resume(request: web.Request) -> web.Response:
    require_operator(request)
    rollout = await request.app[ROLLOUTS].resume(request.match_info["id"])
    return web.json_response(rollout.to_json())


@routes.post("/api/v1/rollouts/{id}/abort")
async def abort(request: web.Request) -> web.Response:
    require_operator(request)
    rollout = await request.app[ROLLOUTS].abort(request.match_info["id"])
    return web.json_response(rollout.to_json())


@routes.post("/api/v1/rollouts/{id}/rollback")
async def rollback(request: web.Request) -> web.Response:
    require_operator(request)
    rollout = await request.app[ROLLOUTS].rollback(request.match_info["id"])
    return web.json_response(rollout.to_json())
