"""Schemathesis against the real controller over HTTP: no generated request gets a 5xx answer,
and every answer matches the OpenAPI document the controller serves (status code, content type,
body schema, headers).

The controller runs in-process (pytest-aiohttp's server on this test's event loop); schemathesis
and hypothesis are synchronous (requests), so they run on a worker thread while the loop serves.
Each operation gets a bounded number of generated cases, positive and negative (data that breaks
the schema, which the controller must answer with a 4xx, never a 5xx).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imageswarm.daemon.app import create_app
from tests.daemon.controlkit import SECRET, TOKEN, controller_config

HOST = "127.0.0.120"
NODE = "fuzzed-node"
EXAMPLES = 25  # per operation and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: An event stream never ends by itself: a request to it would block its case forever.
#: (tests/daemon/test_control_api.py covers the stream.)
SKIP = {("GET", "/api/v1/events")}
ServerFactory = Callable[..., Awaitable[TestServer]]


def _run_cases(strategy: SearchStrategy[Case[Any]], base_url: str, headers: dict[str, str]) -> int:
    """Send the strategy's cases, check each answer; returns how many ran (raises on failure)."""
    count = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Case[Any]) -> None:
        nonlocal count
        count += 1
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()
    return count


def _fuzz(base_url: str, node_token: str) -> tuple[int, list[str]]:
    """Run every operation's cases; returns (cases run, failures as text)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json")
    failures: list[str] = []
    count = 0
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # the document itself is broken
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIP:
            continue
        security = operation.definition.raw.get("security") or []
        schemes = {name for requirement in security for name in requirement}
        headers: dict[str, str] = {}
        path_parameters: dict[str, Any] | None = None
        if "operatorToken" in schemes:
            headers["Authorization"] = f"Bearer {TOKEN}"
        if "nodeToken" in schemes:
            headers["Authorization"] = f"Bearer {node_token}"
            path_parameters = {"name": NODE}  # the node the token belongs to: reach the body
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(mode, path_parameters=path_parameters)
            try:
                count += _run_cases(strategy, base_url, headers)
            except Unsatisfiable:
                # Nothing in this operation can be made invalid (no parameters, no body, or
                # only free-form strings): there are no negative cases to send.
                assert mode is GenerationMode.NEGATIVE, operation.path
            except (Exception, FailureGroup) as exc:  # collect a failure, go on with the others
                label = f"{operation.method.upper()} {operation.path} ({mode.value})"
                failures.append(f"{label}: {exc}")
    return count, failures


async def test_no_server_errors_and_answers_match_the_document(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    app: web.Application = create_app(controller_config(tmp_path, HOST))
    server = await aiohttp_server(app, host=HOST, port=0)
    base_url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        body = {"name": NODE, "join_secret": SECRET, "labels": {"role": "fuzz"}}
        async with session.post(f"{base_url}/api/v1/nodes/enroll", json=body) as resp:
            assert resp.status == 201, await resp.text()
            node_token: str = (await resp.json())["token"]
    count, failures = await asyncio.to_thread(_fuzz, base_url, node_token)
    assert count > 100
    assert not failures, "\n\n".join(failures)


async def test_a_body_that_is_not_utf8_is_a_400(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """Found by schemathesis: undecodable bytes were an unhandled UnicodeDecodeError (a 500)."""
    server = await aiohttp_server(create_app(controller_config(tmp_path, HOST)), host=HOST, port=0)
    async with aiohttp.ClientSession() as session:
        for content_type in ("application/json", "application/json; charset=no-such-codec"):
            url = str(server.make_url("/api/v1/nodes/enroll"))
            headers = {"Content-Type": content_type}
            async with session.post(url, data=b"\xcb5\xef\x90", headers=headers) as resp:
                assert resp.status == 400, await resp.text()
                assert "charset" in (await resp.json())["detail"]
