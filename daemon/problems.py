"""The REST error boundary: typed errors in, application/problem+json out, no tracebacks."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from hmac import compare_digest

from aiohttp import web

from imageswarm.agent.errors import ImageSwarmError, InvalidInputError, ManifestError
from imageswarm.daemon.errors import ApiError, BadRequest, Unauthorized

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBLEM = "application/problem+json"


def problem(status: int, type_: str, title: str, detail: str) -> web.Response:
    body = {"type": type_, "title": title, "status": status, "detail": detail}
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM)


def render(err: ApiError) -> web.Response:
    return problem(err.status, err.type, err.title, err.detail)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return render(err)
    except (InvalidInputError, ManifestError) as err:
        return render(BadRequest(str(err)))
    except ImageSwarmError as err:
        log.warning("%s %s failed: %s", request.method, request.path, err)
        return problem(500, "/problems/operation-failed", "Operation Failed", str(err))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, "about:blank", exc.reason, exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem(500, "about:blank", "Internal Server Error", "see the daemon's log")


def require_token(request: web.Request, token: str | None) -> None:
    """Raise Unauthorized unless the request carries `Authorization: Bearer <token>`."""
    if token is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not compare_digest(given.strip(), token):
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
