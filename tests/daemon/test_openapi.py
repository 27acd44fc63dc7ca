"""The OpenAPI document is valid and matches the controller's real router, route for route."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from openapi_schema_validator import OAS30Validator
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate

from imageswarm.daemon import config as cfgmod
from imageswarm.daemon.app import create_app
from imageswarm.daemon.openapi import (
    EVENT_KINDS,
    STRATEGY_DEFAULTS,
    openapi_document,
    openapi_handler,
)

#: BitTorrent protocols the controller also serves; the document says why they are left out.
EXCLUDED = ("/announce", "/webseed/")
METHODS = ("get", "put", "post", "delete", "patch")
SAMPLE = "x1"
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
DOC = openapi_document()


def violation(schema: str, instance: Any) -> str | None:
    """Why `instance` does not match components/schemas/`schema`, or None."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": DOC["components"]}
    try:
        validate_instance(instance, root, cls=OAS30Validator, check_schema=False)
    except Exception as err:  # jsonschema's ValidationError (an untyped package)
        path = list(getattr(err, "absolute_path", []))
        return f"{schema}: {getattr(err, 'message', err)} at {path}"
    return None


def _controller(tmp: Path) -> web.Application:
    data = {
        "role": "controller",
        "node_name": "controller",
        "api_listen": "127.0.0.1:7700",
        "cache_dir": str(tmp / "controller"),
        "api_token": "t",
        "join_secret": "j",
    }
    return create_app(cfgmod.parse(tmp / "controller.yaml", data))


def _router_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route, sub-applications included, HEAD left out.

    A sub-application's resources already carry its prefix once it is mounted.
    """
    found: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            found |= _router_routes(resource.get_info()["app"])
            continue
        for route in resource:
            if route.method != "HEAD":
                found.add((route.method, resource.canonical))
    return {(m, p) for m, p in found if not p.startswith(EXCLUDED)}


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def _sample(template: str) -> str:
    return re.sub(r"\{[^}]+\}", SAMPLE, template)


def _pattern(template: str) -> re.Pattern[str]:
    """A router template as a regex; `{var}` and `{var:regex}` match one path segment."""
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def test_document_is_valid_openapi_3() -> None:
    doc = openapi_document()
    assert doc["openapi"] == "3.0.3"
    validate(doc)
    assert "/announce" not in doc["paths"] and "BitTorrent" in doc["info"]["description"]


async def test_every_router_route_is_documented(tmp_path: Path) -> None:
    routes = _router_routes(_controller(tmp_path))
    documented = [(m, _sample(p)) for m, p in _documented(openapi_document())]
    missing = sorted(
        (method, path)
        for method, path in routes
        if not any(m == method and _pattern(path).fullmatch(s) for m, s in documented)
    )
    assert not missing, f"routes the controller serves but the document lacks: {missing}"


async def test_every_documented_operation_resolves_on_the_router(tmp_path: Path) -> None:
    app = _controller(tmp_path)
    absent = []
    for method, path in sorted(_documented(openapi_document())):
        match = await app.router.resolve(make_mocked_request(method, _sample(path), app=app))
        if match.http_exception is not None:
            absent.append((method, path, match.http_exception.status))
    assert not absent, f"documented but not served (method, path, status): {absent}"


def test_errors_are_problem_documents_and_mutations_need_a_token() -> None:
    doc = openapi_document()
    responses = doc["components"]["responses"]
    operation_ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            operation_ids.append(op["operationId"])
            for code, answer in op["responses"].items():
                if code.startswith("4"):
                    name = answer["$ref"].rsplit("/", 1)[-1]
                    media = responses[name]["content"]["application/problem+json"]
                    assert media["schema"] == {"$ref": "#/components/schemas/Problem"}
            if method != "get" and path != "/api/v1/nodes/enroll":
                assert op.get("security"), f"{method} {path} has no security requirement"
                assert "401" in op["responses"], f"{method} {path} does not document 401"
    assert len(operation_ids) == len(set(operation_ids))
    heartbeat = doc["paths"]["/api/v1/nodes/{name}/heartbeat"]["post"]
    assert heartbeat["security"] == [{"nodeToken": []}]
    assert doc["paths"]["/api/v1/events"]["get"]["security"] == [{"operatorToken": []}]


def test_event_kinds_are_the_contracts() -> None:
    contract = (Path(__file__).parents[2] / "docs" / "control-plane.md").read_text()
    section = contract.split("## Events", 1)[1].split("##", 1)[0]
    kinds = set(re.findall(r"`([a-z]+\.[a-z]+)`", section))
    assert kinds == set(EVENT_KINDS)
    schemas = openapi_document()["components"]["schemas"]
    assert all(name in schemas for name in EVENT_KINDS.values())


async def test_handler_serves_the_document(aiohttp_client: ClientFactory) -> None:
    app = web.Application()
    app.router.add_get("/api/v1/openapi.json", openapi_handler)
    client = await aiohttp_client(app)
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == openapi_document()


def test_strategy_defaults_are_the_engines() -> None:
    from imageswarm.daemon.rollouts import Strategy

    assert Strategy().to_json() == STRATEGY_DEFAULTS


HEARTBEAT = {
    "current_image": "abcd0123abcd0123",
    "previous_image": None,
    "kernel": "6.1.0-18-amd64",
    "agent": {
        "pending": {"kind": "apply", "image_id": "ffff0123abcd0123", "phase": "swap"},
        "last": {
            "kind": "apply",
            "image_id": "abcd0123abcd0123",
            "result": "applied",
            "error": None,
            "phases": [{"name": "swap", "seconds": 1.2, "ok": True}],
            "services": [],
            "reboot": {},
        },
        "drift": {"clean": True},
    },
    "fetches": {
        "ffff0123abcd0123": {
            "state": "downloading",
            "done_bytes": 1,
            "total_bytes": 2,
            "bytes_by_source": dict.fromkeys(
                ("local", "controller", "peers", "web_seed", "unattributed"), 0
            ),
            "duration": 1.5,
            "error": None,
        }
    },
    "action": {"id": "r-1:apply:ffff", "status": "running", "detail": "swap", "seconds": 1.0},
}


def test_the_contracts_examples_match_the_schemas() -> None:
    cases: list[tuple[str, Any]] = [
        ("Heartbeat", HEARTBEAT),
        ("Heartbeat", {**HEARTBEAT, "agent": {"pending": None, "last": None, "drift": None}}),
        (
            "HeartbeatAnswer",
            {
                "interval": 10,
                "action": {
                    "id": "r-1:apply:abcd",
                    "kind": "apply",
                    "image_id": "abcd0123abcd0123",
                    "policy": "auto",
                    "health": {"command": "true"},
                },
            },
        ),
        (
            "Instruction",
            {"id": "", "kind": "none", "image_id": None, "policy": "auto", "health": None},
        ),
        ("EnrollRequest", {"name": "node-1.a", "join_secret": "s", "labels": {"role": "compute"}}),
        (
            "RolloutRequest",
            {
                "image_id": "abcd0123abcd0123",
                "nodes": {"labels": {"role": "compute"}},
                "strategy": {"prefetch": True, "canary": 1, "batch": "25%", "max_failures": 0}
                | {"reboot": "hold", "health": {"url": "http://127.0.0.1:8080/health"}},
            },
        ),
        ("RolloutRequest", {"image_id": "abcd0123abcd0123", "nodes": ["n1", "n2"]}),
        ("EventNodeProgress", {"node": "n1", "fetches": HEARTBEAT["fetches"], "agent": None}),
    ]
    for schema, instance in cases:
        assert violation(schema, instance) is None, violation(schema, instance)
    refused: list[tuple[str, Any]] = [
        ("RolloutRequest", {"image_id": "abcd", "nodes": "all", "strategy": {"canery": 1}}),
        ("RolloutRequest", {"image_id": "abcd", "nodes": [], "strategy": {}}),
        ("RolloutRequest", {"image_id": "abcd", "nodes": "all", "strategy": {"batch": "0%"}}),
        ("RolloutRequest", {"image_id": "abcd", "nodes": "all", "strategy": {"reboot": "now"}}),
        ("RolloutRequest", {"image_id": "abcd", "nodes": "all", "strategy": {"health": {}}}),
        ("EnrollRequest", {"name": "bad name", "join_secret": "s"}),
        ("LabelsRequest", {"labels": {"role": 1}}),
    ]
    for schema, instance in refused:
        assert violation(schema, instance) is not None, instance
