"""Node API (enroll, heartbeat: node token) and the operator's view of nodes (list, show, labels).

The heartbeat answer is the node's instruction: the fleet takes the report, then the rollout
engine takes the node's action status and says what the node should do next.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from imageswarm.daemon.appkeys import CONFIG, FLEET, ROLLOUTS
from imageswarm.daemon.fleet import Node
from imageswarm.daemon.jsonfields import NAME, Fields, read_json
from imageswarm.daemon.nodereport import Heartbeat
from imageswarm.daemon.problems import require_token

routes = web.RouteTableDef()


def _node_json(request: web.Request, node: Node) -> dict[str, Any]:
    return node.to_json(request.app[ROLLOUTS].rollout_of(node.name))


@routes.post("/api/v1/nodes/enroll")
async def enroll(request: web.Request) -> web.Response:
    f = Fields(await read_json(request))
    f.only("name", "join_secret", "labels")
    name = f.text("name", NAME, 64)
    secret = f.text("join_secret")
    labels = f.labels("labels")
    token = await request.app[FLEET].enroll(name, secret, labels)
    return web.json_response({"name": name, "token": token}, status=201)


@routes.post("/api/v1/nodes/{name}/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    fleet = request.app[FLEET]
    node = fleet.authenticate(name, request.headers.get("Authorization", ""))
    beat = Heartbeat.parse(await read_json(request))
    await fleet.heartbeat(node, beat)
    action = await request.app[ROLLOUTS].on_heartbeat(name, beat.action)
    interval = request.app[CONFIG].heartbeat_interval
    body = {"interval": int(interval) if interval.is_integer() else interval, "action": action}
    return web.json_response(body)


@routes.get("/api/v1/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    nodes = [_node_json(request, n) for n in request.app[FLEET].nodes()]
    return web.json_response({"nodes": nodes})


@routes.get("/api/v1/nodes/{name}")
async def show_node(request: web.Request) -> web.Response:
    node = request.app[FLEET].get(request.match_info["name"])
    return web.json_response(_node_json(request, node))


@routes.put("/api/v1/nodes/{name}/labels")
async def set_labels(request: web.Request) -> web.Response:
    require_token(request, request.app[CONFIG].api_token)
    fleet = request.app[FLEET]
    fleet.get(request.match_info["name"])
    f = Fields(await read_json(request))
    f.only("labels")
    f.required("labels")
    node = await fleet.set_labels(request.match_info["name"], f.labels("labels"))
    return web.json_response(_node_json(request, node))
