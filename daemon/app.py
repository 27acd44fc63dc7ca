"""The composition root: `create_app(config)` builds the whole daemon for either role.

Each long-lived resource is one cleanup_ctx entry, built before `yield`, torn down after.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from imageswarm.agent import keys
from imageswarm.agent.store import Store
from imageswarm.daemon import appkeys as K
from imageswarm.daemon.api import images as images_api
from imageswarm.daemon.api import node as node_api
from imageswarm.daemon.catalog import Catalog
from imageswarm.daemon.config import Config
from imageswarm.daemon.fetch import FetchManager
from imageswarm.daemon.problems import problem_middleware
from imageswarm.daemon.swarm.session import Swarm, SwarmSettings
from imageswarm.daemon.tracker import Tracker
from imageswarm.daemon.webseed import WebSeed

log = logging.getLogger(__name__)


def swarm_settings(config: Config) -> SwarmSettings:
    return SwarmSettings(
        listen_host=config.swarm.listen.host,
        listen_port=config.swarm.listen.port,
        allowed_cidrs=config.cluster_cidrs,
        upload_rate_limit=config.swarm.upload_rate_limit,
        download_rate_limit=config.swarm.download_rate_limit,
        extra=dict(config.swarm.settings),
    )


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    app[K.STORE] = Store.open(app[K.CONFIG].store_dir)
    yield


async def _swarm_ctx(app: web.Application) -> AsyncIterator[None]:
    swarm = Swarm(swarm_settings(app[K.CONFIG]))
    await swarm.start()
    app[K.SWARM] = swarm
    yield
    await swarm.close(timeout=10)


async def _controller_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[K.CONFIG]
    assert config.signing_key is not None
    key = keys.load_or_create(config.signing_key)
    log.info("controller signing key %s (%s)", key.public.key_id, key.public)
    announce = f"http://{config.api_listen}/announce"
    catalog = Catalog(app[K.STORE], key, app[K.SWARM], app[K.TRACKER], announce)
    await catalog.start()
    app[K.CATALOG] = catalog
    yield


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    fetcher = FetchManager(app[K.CONFIG], app[K.STORE], app[K.SWARM])
    await fetcher.start()
    app[K.FETCHER] = fetcher
    yield
    await fetcher.close()


async def healthz(request: web.Request) -> web.Response:
    config = request.app[K.CONFIG]
    return web.json_response({"status": "ok", "role": config.role, "node": config.node_name})


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[problem_middleware], client_max_size=1024**2)
    app[K.CONFIG] = config
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_swarm_ctx)
    if config.role == "controller":
        tracker = Tracker(config.cluster_cidrs, interval=config.swarm.announce_interval)
        app[K.TRACKER] = tracker
        app.router.add_get("/announce", tracker.handle)
        app.cleanup_ctx.append(_controller_ctx)
        app.router.add_routes(images_api.routes)

        async def _webseed_ctx(app: web.Application) -> AsyncIterator[None]:
            app[K.WEBSEED] = WebSeed(app[K.STORE])
            yield

        app.cleanup_ctx.append(_webseed_ctx)
        app.router.add_get(WebSeed.PREFIX + "/chunks/{prefix}/{name}", _webseed_handler)
    else:
        app.cleanup_ctx.append(_node_ctx)
        app.router.add_routes(node_api.routes)
    return app


async def _webseed_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[K.WEBSEED].handle(request)
