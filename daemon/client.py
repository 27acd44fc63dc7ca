"""A typed HTTP client for the imageswarm REST API, shared by the CLI and node daemons."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from imageswarm.daemon.errors import ControllerError

_READ = 1024 * 1024


class ApiClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        local_addr: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connector = aiohttp.TCPConnector(local_addr=(local_addr, 0) if local_addr else None)
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
            raise ControllerError(0, f"cannot reach {self.base_url}: {exc}") from None

    async def get_json(self, path: str) -> Any:
        return await self.request("GET", path)

    async def get_bytes(self, path: str) -> bytes:
        data = await self.request("GET", path)
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        return data

    async def post_json(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json=body)

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


def default_url(env: str, fallback: str) -> str:
    return os.environ.get(env, fallback)
