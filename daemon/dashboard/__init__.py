"""The operator's live dashboard: three static files the controller serves at `/`.

The page holds no secret. It asks the operator for the bearer token (kept in sessionStorage)
and sends it in the `Authorization` header on the event stream and on every change it makes,
so authentication is exactly the REST API's. The files are read once when the app is built:
a broken install fails at start, not on the first page load. The Content-Security-Policy
allows nothing outside this controller (no CDN, font or analytics host can be reached).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from imageswarm.daemon.errors import NotFound

#: The files served, with their media types; nothing else under /dashboard/ resolves.
FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
ASSETS = tuple(name for name in FILES if name != "index.html")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded controller serves new files
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class File:
    body: bytes
    content_type: str
    etag: str


class Dashboard:
    def __init__(self, files: dict[str, File]) -> None:
        self.files = files

    @classmethod
    def load(cls) -> Dashboard:
        folder = resources.files(__name__)
        files = {}
        for name, content_type in FILES.items():
            body = folder.joinpath(name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            files[name] = File(body, content_type, etag)
        return cls(files)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.page)
        router.add_get("/dashboard", self.page)
        router.add_get("/dashboard/{asset}", self.asset)

    def _serve(self, request: web.Request, name: str) -> web.Response:
        file = self.files[name]
        headers = {**_HEADERS, "ETag": file.etag}
        if name == "index.html":
            headers["Content-Security-Policy"] = CSP
        if request.headers.get("If-None-Match") == file.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=file.body, content_type=file.content_type, charset="utf-8", headers=headers
        )

    async def page(self, request: web.Request) -> web.Response:
        return self._serve(request, "index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        if name not in ASSETS:
            raise NotFound(f"the dashboard has no file {name!r} (it has {', '.join(ASSETS)})")
        return self._serve(request, name)
