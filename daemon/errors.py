"""Every error the daemon adds to the agent's tree (imageswarm.agent.errors), written down once.

ConfigError          raised when a config file is missing, not YAML, or fails validation.
ApiError             raised by a handler to answer with an application/problem+json document.
  BadRequest         raised when a request body or parameter is malformed (400).
  Unauthorized       raised when a bearer token is missing or wrong (401).
  NotFound           raised when a named image, node or rollout does not exist (404).
  Conflict           raised when the request contradicts current state (409).
  Unavailable        raised while the daemon is starting or a dependency is down (503).
ControllerError      raised by the CLI/node client when the controller answers with an error.
"""

from __future__ import annotations

from imageswarm.agent.errors import ImageSwarmError


class ConfigError(ImageSwarmError):
    pass


class ApiError(ImageSwarmError):
    status = 500
    type = "about:blank"
    title = "Internal Server Error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ApiError):
    status = 400
    type = "/problems/bad-request"
    title = "Bad Request"


class Unauthorized(ApiError):
    status = 401
    type = "/problems/unauthorized"
    title = "Unauthorized"


class NotFound(ApiError):
    status = 404
    type = "/problems/not-found"
    title = "Not Found"


class Conflict(ApiError):
    status = 409
    type = "/problems/conflict"
    title = "Conflict"


class Unavailable(ApiError):
    status = 503
    type = "/problems/unavailable"
    title = "Service Unavailable"


class ControllerError(ImageSwarmError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
