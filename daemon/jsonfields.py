"""Reading JSON request bodies: typed field access whose errors are 400s naming the field,
and the formats of the names the API accepts."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from imageswarm.daemon.errors import BadRequest

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
IMAGE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 that says why it is not."""
    try:
        text = await request.text()
    except (UnicodeDecodeError, LookupError) as exc:  # bytes not in its charset, unknown charset
        raise BadRequest(f"the request body is not text in its charset ({exc})") from None
    if not text.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed reads of one JSON object; every error is a 400 that names the dotted field."""

    _MISSING: Any = object()

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, dict):
            where = f"field '{path}'" if path else "the request body"
            raise BadRequest(f"{where}: expected a JSON object, got {_show(data)}")
        self.data: dict[str, Any] = data
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str) -> BadRequest:
        value = self.data.get(key, self._MISSING)
        got = "nothing (the field is required)" if value is self._MISSING else _show(value)
        return BadRequest(f"field '{self.name(key)}': expected {expected}, got {got}")

    def only(self, *keys: str) -> None:
        extra = sorted(set(self.data) - set(keys))
        if extra:
            raise BadRequest(f"unknown field '{self.name(extra[0])}' (known: {', '.join(keys)})")

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def text(self, key: str, pattern: re.Pattern[str] | None = None, limit: int = 4096) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value or len(value) > limit:
            raise self.fail(key, f"a non-empty string of at most {limit} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"a string matching {pattern.pattern}")
        return value

    def opt_text(
        self, key: str, pattern: re.Pattern[str] | None = None, limit: int = 4096
    ) -> str | None:
        """A string, or None when the field is null or missing ("" counts as None too)."""
        value = self.data.get(key)
        if value is None or value == "":
            return None
        return self.text(key, pattern, limit)

    def required(self, *keys: str) -> None:
        for key in keys:
            if key not in self.data:
                raise self.fail(key, "a value")

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int:
        value = self.data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        return value

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise self.fail(key, "a number")
        return float(value)

    def boolean(self, key: str, default: bool | None = None) -> bool | None:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def sub(self, key: str) -> Fields | None:
        value = self.data.get(key)
        return None if value is None else Fields(value, self.name(key))

    def labels(self, key: str) -> dict[str, str]:
        value = self.data.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and LABEL_KEY.fullmatch(k) and isinstance(v, str) and len(v) <= 256
            for k, v in value.items()
        ):
            raise self.fail(key, f"a mapping of names ({LABEL_KEY.pattern}) to strings")
        return dict(value)
