"""The controller's REST API as an OpenAPI 3.0.3 document, served at `/api/v1/openapi.json`.

Written from docs/control-plane.md and the image routes; tests/daemon/test_openapi.py checks it
against the real router both ways, so a route cannot be added or dropped without this file.
Request bodies an operator types are closed (`additionalProperties: false`: a misspelt key is
refused rather than silently defaulted); responses and the node's heartbeat stay open, so
either side can add a field without breaking the other.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from aiohttp import web

from imageswarm.agent.kernel import POLICIES
from imageswarm.daemon.dashboard import ASSETS as DASHBOARD_ASSETS
from imageswarm.daemon.rolloutstate import STATES, STATUSES

Schema = dict[str, Any]

DESCRIPTION = """\
imageswarm controller: images, nodes, rollouts and the event stream.

Reads are open; every mutating call needs the operator token (`Authorization: Bearer ...`,
the controller's `api_token`; without one configured, the controller does not check). Node
heartbeats carry the node token that enrollment returned. Errors are RFC 7807
`application/problem+json` documents.

Not described here, because they are BitTorrent protocols rather than this REST API: the
tracker (`GET /announce`, BEP 3/23) and the web seed (`GET /webseed/chunks/...`, BEP 19).
"""

NAME_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
ROLLOUT_STATES = list(STATES)
NODE_STATUSES = list(STATUSES)
REBOOT = list(POLICIES)
#: What the engine (rollouts.Strategy) takes for a key a request leaves out; a test compares.
STRATEGY_DEFAULTS: dict[str, Any] = {
    "prefetch": True,
    "canary": 1,
    "batch": "25%",
    "max_failures": 0,
    "reboot": "auto",
    "health": None,
}
EVENT_KINDS = {
    "image.published": "EventImage",
    "image.deleted": "EventImage",
    "node.enrolled": "EventNode",
    "node.online": "EventNode",
    "node.offline": "EventNode",
    "node.progress": "EventNodeProgress",
    "rollout.created": "EventRolloutCreated",
    "rollout.state": "EventRolloutState",
    "rollout.node": "EventRolloutNode",
}
_PROBLEMS = {
    400: "Malformed request: bad JSON, parameter or value",
    401: "Missing or wrong bearer token (or join secret)",
    404: "No such image, node or rollout",
    409: "The request contradicts the current state",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """An object schema; every property is required unless `required` says otherwise."""
    schema: Schema = {"type": "object", "properties": props, **extra}
    schema["required"] = list(props) if required is None else required
    if not schema["required"]:
        del schema["required"]
    return schema


def closed(props: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return obj(props, required, additionalProperties=False)


#: JSON null in OpenAPI 3.0.3, where `nullable` counts only beside a `type` in the same object.
NULL: Schema = {"type": "object", "nullable": True, "enum": [None]}


def nullable(schema: Schema) -> Schema:
    if "$ref" in schema or "oneOf" in schema:  # nullable would not reach into these
        return {"oneOf": [schema, NULL]}
    return {**schema, "nullable": True}


def mapping(values: Schema, description: str) -> Schema:
    return {"type": "object", "additionalProperties": values, "description": description}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer", "minimum": 0}
TIME: Schema = {"type": "string", "format": "date-time"}
BOOL: Schema = {"type": "boolean"}
BINARY: Schema = {"type": "string", "format": "binary"}


def _manifest_fields() -> dict[str, Schema]:
    return {
        "format_version": {"type": "integer"},
        "image_id": ref("ImageId"),
        "name": STR,
        "created": TIME,
        "source_format": {"type": "string", "enum": ["raw", "qcow2", "tar"]},
        "format": STR,
        "size": INT,
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "chunking": STR,
        "kernels": {"type": "array", "items": STR},
        "info_hash": STR,
        "image_info_hash": STR,
        "key_id": STR,
    }


def _image_schemas() -> dict[str, Schema]:
    chunk = obj(
        {"hash": nullable(STR), "length": INT, "hole": {"type": "boolean"}}, ["hash", "length"]
    )
    manifest = obj(
        {**_manifest_fields(), "chunks": {"type": "array", "items": ref("Chunk")}, "signature": STR}
    )
    counts = {"chunk_count": INT, "unique_chunks": INT, "stored_bytes": INT}
    return {
        "ImageId": {"type": "string", "pattern": NAME_PATTERN},
        "Chunk": chunk,
        "Manifest": {**manifest, "description": "The signed manifest, byte for byte as signed."},
        "ImageSummary": obj({**_manifest_fields(), "signature": STR, **counts}),
        "ImageList": obj({"images": {"type": "array", "items": ref("ImageSummary")}}),
        "PublishResult": obj(
            {"manifest": ref("Manifest"), "new_chunks": INT, "new_bytes": INT, "existed": BOOL}
        ),
    }


def _node_schemas() -> dict[str, Schema]:
    sources = ["local", "controller", "peers", "web_seed", "unattributed"]
    fetch = obj(
        {
            "state": {
                "type": "string",
                "enum": ["queued", "resolving", "downloading", "verifying", "done", "failed"],
            },
            "done_bytes": INT,
            "total_bytes": INT,
            "bytes_by_source": {
                **obj(dict.fromkeys(sources, INT), []),
                "additionalProperties": INT,
            },
            "duration": {"type": "number", "description": "seconds since the fetch started"},
            "error": nullable(STR),
            "torrent": {
                "type": "string",
                "nullable": True,
                "enum": ["chunks", "image", None],
                "description": "chunks: a delta into the store; image: the whole image file",
            },
        },
        ["state", "done_bytes", "total_bytes"],
    )
    phase = obj({"name": STR, "seconds": {"type": "number"}, "ok": BOOL})
    last = obj(
        {
            "kind": {"type": "string", "enum": ["apply", "rollback"]},
            "image_id": nullable(STR),
            "result": STR,
            "error": nullable(STR),
            "phases": {"type": "array", "items": phase},
            "services": {"type": "array", "items": {}},
            "reboot": {"type": "object"},
        },
        ["kind", "result"],
    )
    agent = obj(
        {
            "pending": nullable(obj({"kind": STR, "image_id": nullable(STR), "phase": STR}, [])),
            "last": nullable(ref("AgentLast")),
            "drift": nullable(obj({"clean": BOOL}, ["clean"])),
        },
        [],
    )
    report = obj(
        {
            "id": STR,
            "status": {"type": "string", "enum": ["running", "done", "failed"]},
            "detail": nullable(STR),
            "seconds": {"type": "number"},
        },
        ["id", "status"],
    )
    fetches = mapping(ref("Fetch"), "fetch progress per image id")
    node = obj(
        {
            "name": ref("NodeName"),
            "labels": ref("Labels"),
            "last_seen": nullable(TIME),
            "online": BOOL,
            "current_image": nullable(STR),
            "previous_image": nullable(STR),
            "kernel": nullable(STR),
            "agent": nullable(ref("AgentReport")),
            "fetches": fetches,
            "action": nullable(ref("ActionReport")),
            "rollout": {**nullable(STR), "description": "the active rollout targeting it"},
        }
    )
    heartbeat = obj(
        {
            "current_image": nullable(STR),
            "previous_image": nullable(STR),
            "kernel": STR,
            "agent": ref("AgentReport"),
            "fetches": fetches,
            "action": nullable(ref("ActionReport")),
        },
        ["current_image", "previous_image", "kernel"],
    )
    instruction = obj(
        {
            "id": {"type": "string", "description": "stable per instruction; '' for none"},
            "kind": {"type": "string", "enum": ["none", "prefetch", "apply", "rollback"]},
            "image_id": nullable(STR),
            "policy": {"type": "string", "enum": REBOOT},
            "health": ref("Health"),
        },
        ["id", "kind"],
    )
    return {
        "NodeName": {"type": "string", "pattern": NAME_PATTERN},
        "Labels": mapping({"type": "string"}, "label name -> value"),
        "Fetch": fetch,
        "AgentLast": last,
        "AgentReport": agent,
        "ActionReport": report,
        "Node": node,
        "NodeList": obj({"nodes": {"type": "array", "items": ref("Node")}}),
        "LabelsRequest": closed({"labels": ref("Labels")}),
        "EnrollRequest": closed(
            {"name": ref("NodeName"), "join_secret": STR, "labels": ref("Labels")},
            ["name", "join_secret"],
        ),
        "EnrollAnswer": obj({"name": ref("NodeName"), "token": STR}),
        "Heartbeat": heartbeat,
        "HeartbeatAnswer": obj(
            {"interval": {"type": "number", "minimum": 0}, "action": ref("Instruction")}
        ),
        "Instruction": instruction,
    }


def _rollout_schemas() -> dict[str, Schema]:
    batch = {
        "oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": "^(100|[1-9][0-9]?)%$"},
        ],
        "description": "nodes per batch: a count, or a percent of all targets rounded up",
    }
    knobs: dict[str, Schema] = {
        "prefetch": {**BOOL, "description": "fetch on every target before any applies"},
        "canary": {**INT, "description": "targets in batch 0, before the others"},
        "batch": batch,
        "max_failures": {**INT, "description": "failures tolerated before the rollout halts"},
        "reboot": {"type": "string", "enum": REBOOT},
        "health": ref("Health"),
    }
    selector = {
        "oneOf": [
            {"type": "string", "enum": ["all"]},
            {"type": "array", "items": ref("NodeName"), "minItems": 1},
            closed({"labels": ref("Labels")}),
        ],
        "description": "every node, these names, or the nodes carrying all these labels",
    }
    node = obj(
        {
            "name": ref("NodeName"),
            "batch": INT,
            "status": {"type": "string", "enum": NODE_STATUSES},
            "detail": nullable(STR),
            "started": nullable(TIME),
            "finished": nullable(TIME),
        }
    )
    return {
        "Health": {
            "oneOf": [closed({"command": STR}), closed({"url": {**STR, "format": "uri"}}), NULL],
            "description": "how a node checks itself after applying; null: no check",
        },
        "StrategyRequest": {
            **closed(
                {
                    k: {**v, "default": STRATEGY_DEFAULTS[k]} if k != "health" else v
                    for k, v in knobs.items()
                },
                [],
            ),
            "description": "keys left out take these defaults (health: null, no check)",
        },
        "Strategy": obj(knobs, list(knobs)),
        "RolloutRequest": closed(
            {"image_id": ref("ImageId"), "nodes": selector, "strategy": ref("StrategyRequest")},
            ["image_id", "nodes"],
        ),
        "RolloutNode": node,
        "Rollout": obj(
            {
                "id": STR,
                "image_id": ref("ImageId"),
                "strategy": ref("Strategy"),
                "state": {"type": "string", "enum": ROLLOUT_STATES},
                "batch": {**INT, "description": "index of the current batch, 0-based"},
                "batches": INT,
                "created": TIME,
                "updated": TIME,
                "reason": nullable(STR),
                "nodes": {"type": "array", "items": ref("RolloutNode")},
                "counts": obj(dict.fromkeys(NODE_STATUSES, INT)),
            }
        ),
        "RolloutList": obj({"rollouts": {"type": "array", "items": ref("Rollout")}}),
    }


def _event_schemas() -> dict[str, Schema]:
    return {
        "EventImage": obj({"image_id": ref("ImageId")}),
        "EventNode": obj({"node": ref("NodeName")}),
        "EventNodeProgress": obj(
            {
                "node": ref("NodeName"),
                "fetches": mapping(ref("Fetch"), "fetch progress per image id"),
                "agent": nullable(ref("AgentReport")),
                "action": nullable(ref("ActionReport")),
            },
            ["node"],
            description="a node's latest fetch and apply progress, at most 1/s per node",
        ),
        "EventRolloutCreated": obj(
            {
                "id": STR,
                "image_id": ref("ImageId"),
                "strategy": ref("Strategy"),
                "targets": INT,
                "batches": INT,
            },
            ["id", "image_id"],
        ),
        "EventRolloutState": obj(
            {
                "id": STR,
                "state": {"type": "string", "enum": ROLLOUT_STATES},
                "batch": INT,
                "reason": nullable(STR),
            }
        ),
        "EventRolloutNode": obj(
            {
                "id": STR,
                "node": ref("NodeName"),
                "status": {"type": "string", "enum": NODE_STATUSES},
                "detail": nullable(STR),
            }
        ),
    }


def _content(media: str, schema: Schema, description: str = "") -> Schema:
    content: Schema = {"content": {media: {"schema": schema}}}
    return {"description": description, **content} if description else content


def _json(schema: Schema, description: str) -> Schema:
    return _content("application/json", schema, description)


def _op(
    op_id: str,
    summary: str,
    tag: str,
    ok: dict[int, Schema],
    errors: tuple[int, ...] = (),
    *,
    auth: str | None = None,
    body: Schema | None = None,
    params: list[Schema] | None = None,
) -> Schema:
    responses: dict[str, Schema] = {str(code): answer for code, answer in ok.items()}
    for code in errors:
        responses[str(code)] = {"$ref": f"#/components/responses/Problem{code}"}
    op: Schema = {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses}
    if auth is not None:
        op["security"] = [{auth: []}]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _paths() -> dict[str, Schema]:
    image = [_path_param("image_id", ref("ImageId"))]
    node = [_path_param("name", ref("NodeName"))]
    rollout = [_path_param("id", STR)]
    op, j, op_ = "operatorToken", _json, _op
    page = {200: _content("text/html", STR, "the page; it asks for the operator token")}
    asset = ("text/javascript", "text/css")
    paths: dict[str, Schema] = {
        "/healthz": {
            "get": op_(
                "health",
                "Liveness and role",
                "service",
                {200: j(obj({"status": STR, "role": STR, "node": STR}), "alive")},
            )
        },
        "/metrics": {
            "get": op_(
                "metrics",
                "Prometheus metrics",
                "service",
                {200: _content("text/plain", STR, "Prometheus text exposition")},
            )
        },
        "/api/v1/openapi.json": {
            "get": op_("openapi", "This document", "service", {200: j({"type": "object"}, "OK")})
        },
        "/": {"get": op_("dashboard", "The live dashboard (a public page)", "dashboard", page)},
        "/dashboard": {
            "get": op_("dashboardAlias", "The live dashboard, as at /", "dashboard", page)
        },
        "/dashboard/{asset}": {
            "parameters": [
                _path_param("asset", {"type": "string", "enum": list(DASHBOARD_ASSETS)})
            ],
            "get": op_(
                "dashboardAsset",
                "The dashboard's script and style sheet",
                "dashboard",
                {200: {"description": "the file", "content": {t: {"schema": STR} for t in asset}}},
                (404,),
            ),
        },
        "/api/v1/images": {
            "get": op_("listImages", "List images", "images", {200: j(ref("ImageList"), "OK")}),
            "post": {
                **op_(
                    "publishImage",
                    "Publish an image (raw, qcow2 or tar) sent as the body",
                    "images",
                    {
                        201: j(ref("PublishResult"), "published"),
                        200: j(ref("PublishResult"), "already published (existed: true)"),
                    },
                    (400, 401),
                    auth=op,
                    params=[{"name": "name", "in": "query", "required": True, "schema": STR}],
                ),
                "requestBody": {"required": True, **_content("application/octet-stream", BINARY)},
            },
        },
        "/api/v1/images/{image_id}": {
            "parameters": image,
            "get": op_(
                "getImage", "One image", "images", {200: j(ref("ImageSummary"), "OK")}, (400, 404)
            ),
            "delete": op_(
                "deleteImage",
                "Delete an image (409 while a node runs it or an active rollout targets it)",
                "images",
                {204: {"description": "deleted"}},
                (400, 401, 404, 409),
                auth=op,
            ),
        },
        "/api/v1/images/{image_id}/manifest": {
            "parameters": image,
            "get": op_(
                "getManifest",
                "The signed manifest",
                "images",
                {200: j(ref("Manifest"), "OK")},
                (400, 404),
            ),
        },
        "/api/v1/images/{image_id}/torrent": {
            "parameters": image,
            "get": op_(
                "getTorrent",
                "The image's chunk torrent (v2, one file per unique chunk: for delta fetches)",
                "images",
                {200: _content("application/x-bittorrent", BINARY, "bencoded torrent")},
                (400, 404),
            ),
        },
        "/api/v1/images/{image_id}/image-torrent": {
            "parameters": image,
            "get": op_(
                "getImageTorrent",
                "The image torrent (v2, one file: the whole image; for fetches from scratch)",
                "images",
                {200: _content("application/x-bittorrent", BINARY, "bencoded torrent")},
                (400, 404),
            ),
        },
        "/api/v1/nodes": {
            "get": op_("listNodes", "List nodes", "nodes", {200: j(ref("NodeList"), "OK")})
        },
        "/api/v1/nodes/enroll": {
            "post": op_(
                "enrollNode",
                "Enroll (or re-enroll, rotating the token) with the join secret",
                "node-api",
                {201: j(ref("EnrollAnswer"), "enrolled")},
                (400, 401),
                body=ref("EnrollRequest"),
            )
        },
        "/api/v1/nodes/{name}": {
            "parameters": node,
            "get": op_("getNode", "One node", "nodes", {200: j(ref("Node"), "OK")}, (404,)),
        },
        "/api/v1/nodes/{name}/heartbeat": {
            "parameters": node,
            "post": op_(
                "heartbeat",
                "Report state; the answer is the node's instruction",
                "node-api",
                {200: j(ref("HeartbeatAnswer"), "the instruction")},
                (400, 401, 404),
                auth="nodeToken",
                body=ref("Heartbeat"),
            ),
        },
        "/api/v1/nodes/{name}/labels": {
            "parameters": node,
            "put": op_(
                "setNodeLabels",
                "Replace a node's labels",
                "nodes",
                {200: j(ref("Node"), "the node")},
                (400, 401, 404),
                auth=op,
                body=ref("LabelsRequest"),
            ),
        },
        "/api/v1/rollouts": {
            "get": op_(
                "listRollouts", "List rollouts", "rollouts", {200: j(ref("RolloutList"), "OK")}
            ),
            "post": op_(
                "startRollout",
                "Start a rollout (nothing is stored when it is refused)",
                "rollouts",
                {201: j(ref("Rollout"), "started")},
                (400, 401, 404, 409),
                auth=op,
                body=ref("RolloutRequest"),
            ),
        },
        "/api/v1/rollouts/{id}": {
            "parameters": rollout,
            "get": op_(
                "getRollout", "One rollout", "rollouts", {200: j(ref("Rollout"), "OK")}, (404,)
            ),
        },
        "/api/v1/events": {
            "get": {
                **op_(
                    "events",
                    "Server-Sent Events: `id: <seq>`, `event: <kind>`, `data: <json>`",
                    "events",
                    {
                        200: {
                            "description": "the stream; `: keepalive` every 15 s. Data per kind: "
                            + ", ".join(f"{k} -> {v}" for k, v in EVENT_KINDS.items()),
                            "content": {"text/event-stream": {"schema": STR}},
                        }
                    },
                    (400, 401),
                    auth=op,
                    params=[
                        {
                            "name": "since",
                            "in": "query",
                            "schema": INT,
                            "description": "replay events after this sequence number",
                        },
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "schema": INT,
                            "description": "as `since`; sent by reconnecting clients",
                        },
                    ],
                ),
                "x-event-kinds": {kind: ref(name) for kind, name in EVENT_KINDS.items()},
            }
        },
    }
    verbs = {
        "pause": "Stop starting new batches",
        "resume": "Continue a paused or halted rollout",
        "abort": "End the rollout",
        "rollback": "Restore the previous image on every node this rollout touched",
    }
    for verb, summary in verbs.items():
        paths[f"/api/v1/rollouts/{{id}}/{verb}"] = {
            "parameters": rollout,
            "post": op_(
                f"{verb}Rollout",
                f"{summary} (409 when the state does not allow it)",
                "rollouts",
                {200: j(ref("Rollout"), "the rollout")},
                (401, 404, 409),
                auth=op,
            ),
        }
    return paths


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change it)."""
    problem = obj(
        {"type": STR, "title": STR, "status": {"type": "integer"}, "detail": STR},
        description="RFC 7807 problem details",
    )
    responses = {
        f"Problem{code}": {
            "description": text,
            "content": {"application/problem+json": {"schema": ref("Problem")}},
        }
        for code, text in _PROBLEMS.items()
    }
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "imageswarm controller", "version": "1", "description": DESCRIPTION},
        "tags": [
            {"name": name, "description": text}
            for name, text in (
                ("images", "Publish and inspect images"),
                ("nodes", "The fleet as the operator sees it"),
                ("rollouts", "Staged rollouts"),
                ("events", "The event log, live"),
                ("node-api", "Called by node daemons"),
                ("service", "Health, metrics, this document"),
                ("dashboard", "The operator's web page (docs/control-plane.md, Dashboard)"),
            )
        ],
        "paths": _paths(),
        "components": {
            "schemas": {
                "Problem": problem,
                **_image_schemas(),
                **_node_schemas(),
                **_rollout_schemas(),
                **_event_schemas(),
            },
            "responses": responses,
            "securitySchemes": {
                "operatorToken": {**bearer, "description": "the controller's api_token"},
                "nodeToken": {**bearer, "description": "the token enrollment returned"},
            },
        },
    }


@functools.cache
def _served() -> bytes:
    return json.dumps(openapi_document(), indent=1).encode()


async def openapi_handler(request: web.Request) -> web.Response:
    return web.Response(body=_served(), content_type="application/json")
