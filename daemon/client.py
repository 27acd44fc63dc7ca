"""A typed HTTP client for the imageswarm REST API, shared by the CLI and node daemons."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from imageswarm.daemon import tls
from imageswarm.daemon.errors import ControllerError

_READ = 1024 * 1024
#: Python before 3.12.8 (and 3.13.0) can leak an SSL transport closed before its shutdown ends,
#: e.g. an event stream left mid-way (cpython#118960); aiohttp then aborts such transports.
_ABORT_CLOSED_SSL = sys.version_info < (3, 12, 8) or (3, 13) <= sys.version_info < (3, 13, 1)


class ApiClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        local_addr: str | None = None,
        ca: Path | None = None,
    ) -> None:
        """`ca`: the CA file an https:// controller's certificate must chain to (None: the
        system's store); ignored for http:// URLs."""
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        https = self.base_url.startswith("https:")
        connector = aiohttp.TCPConnector(
            local_addr=(local_addr, 0) if local_addr else None,
            ssl=tls.client_context(ca) if https else True,
            enable_cleanup_closed=https and _ABORT_CLOSED_SSL,
        )
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        text = await resp.text()
        try:
            detail = json.loads(text).get("detail", text)
        except (ValueError, AttributeError):
            detail = text[:500]
        raise ControllerError(resp.status, str(detail))

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._session.request(method, self.base_url + path, **kwargs) as resp:
                await self._check(resp)
                if resp.content_type == "application/json":
                    return await resp.json()
                return await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> ControllerError:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            why = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
            return ControllerError(
                0,
                f"cannot reach {self.base_url}: its TLS certificate is not trusted ({why}); "
                "give the CA that signed it (--ca FILE or $IMAGESWARM_CA; a node's controller_ca)",
            )
        return ControllerError(0, f"cannot reach {self.base_url}: {exc}")

    async def get_json(self, path: str) -> Any:
        return await self.request("GET", path)

    async def get_bytes(self, path: str) -> bytes:
        data = await self.request("GET", path)
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        return data

    async def post_json(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json=body)

    async def put_json(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, json=body)

    async def delete(self, path: str) -> None:
        await self.request("DELETE", path)

    @contextlib.asynccontextmanager
    async def event_stream(
        self, path: str, since: int | None = None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        """Connect to a Server-Sent Events endpoint; the stream is open once this is entered.

        `since` goes out as `Last-Event-ID`, so the server replays what came after it. Iterating
        ends when the server closes the stream; a dropped connection or a read timeout raises
        ControllerError with status 0 (the caller decides whether to reconnect).
        """
        headers = {"Accept": "text/event-stream"}
        if since is not None:
            headers["Last-Event-ID"] = str(since)
        try:
            resp = await self._session.get(self.base_url + path, headers=headers)
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise self._unreachable(exc) from None
        async with resp:
            await self._check(resp)
            stream = self._read_events(resp)
            try:
                yield stream
            finally:
                await stream.aclose()

    async def events(self, path: str, since: int | None = None) -> AsyncIterator[Event]:
        """The events of one connection to `path` (see event_stream)."""
        async with self.event_stream(path, since) as stream:
            async for event in stream:
                yield event

    async def _read_events(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[Event, None]:
        parser = SseParser()
        try:
            async for block in resp.content.iter_any():
                for event in parser.feed(block):
                    yield event
        except (TimeoutError, aiohttp.ClientError) as exc:
            why = type(exc).__name__
            raise ControllerError(
                0, f"the event stream from {self.base_url} dropped ({why})"
            ) from None

    async def upload(
        self, path: str, file: Path, progress: Callable[[int, int], None] | None = None
    ) -> Any:
        size = (await asyncio.to_thread(file.stat)).st_size

        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            with file.open("rb") as handle:
                while data := handle.read(_READ):
                    sent += len(data)
                    if progress is not None:
                        progress(sent, size)
                    yield data

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return await self.request("POST", path, data=chunks(), headers=headers)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: `id` is the controller's event sequence number."""

    id: int | None
    kind: str
    data: Any

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.kind, "data": self.data}


class SseParser:
    """Incremental text/event-stream parser (the WHATWG rules imageswarm needs).

    Lines end in LF, CRLF or CR; `:` starts a comment (keepalives); a blank line dispatches.
    `data` lines are joined with newlines and decoded as JSON when they are JSON.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._id: int | None = None
        self._kind = ""
        self._data: list[str] = []

    def feed(self, block: bytes) -> list[Event]:
        self._buffer += block
        events: list[Event] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, skip = cut
            line = self._buffer[:end].decode("utf-8", "replace")
            self._buffer = self._buffer[end + skip :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._kind = value
        elif field == "id" and value.isdigit():
            self._id = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._kind = ""
            return None
        text = "\n".join(self._data)
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        event = Event(self._id, self._kind or "message", data)
        self._kind, self._data = "", []
        return event


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """(index, separator length) of the first line end; a lone trailing CR waits for more."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, 1)
    if cr == len(buffer) - 1:
        return None
    return (cr, 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, 1)


def default_url(env: str, fallback: str) -> str:
    return os.environ.get(env, fallback)
