"""The composition root: `create_app(config)` builds the whole daemon for either role.

Each long-lived resource is one cleanup_ctx entry, built before `yield`, torn down after.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

from aiohttp import web

from imageswarm.agent import keys
from imageswarm.agent.store import Store
from imageswarm.daemon import appkeys as K
from imageswarm.daemon.api import events as events_api
from imageswarm.daemon.api import images as images_api
from imageswarm.daemon.api import node as node_api
from imageswarm.daemon.api import nodes as nodes_api
from imageswarm.daemon.api import rollouts as rollouts_api
from imageswarm.daemon.catalog import Catalog
from imageswarm.daemon.config import Config
from imageswarm.daemon.dashboard import Dashboard
from imageswarm.daemon.db import Database
from imageswarm.daemon.events import EventBus
from imageswarm.daemon.fetch import FetchManager
from imageswarm.daemon.fleet import Fleet
from imageswarm.daemon.heartbeat import HeartbeatLoop
from imageswarm.daemon.metrics import Metrics
from imageswarm.daemon.metrics import handle as metrics_handler
from imageswarm.daemon.openapi import openapi_handler
from imageswarm.daemon.problems import problem_middleware
from imageswarm.daemon.rollouts import RolloutEngine
from imageswarm.daemon.swarm.session import Swarm, SwarmSettings
from imageswarm.daemon.tracker import Tracker
from imageswarm.daemon.webseed import WebSeed

log = logging.getLogger(__name__)
#: What the plain-HTTP swarm listener serves (docs/control-plane.md, "TLS"): the tracker, the
#: web seed and each image's signed manifest and torrents. Public content whose integrity the
#: manifest's signature guarantees; no token, secret or operator route ever travels on it.
SWARM_ROUTES = re.compile(
    r"/healthz|/announce|/webseed/.+|/api/v1/images/\{image_id\}/(manifest|torrent|image-torrent)"
)


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
    announce = f"{config.swarm_url}/announce"
    catalog = Catalog(app[K.STORE], key, app[K.SWARM], app[K.TRACKER], announce)
    await catalog.start()
    app[K.CATALOG] = catalog
    yield


async def _control_plane_ctx(app: web.Application) -> AsyncIterator[None]:
    """SQLite, the event log, the fleet and the rollout engine (docs/control-plane.md)."""
    config, metrics, catalog = app[K.CONFIG], app[K.METRICS], app[K.CATALOG]
    async with contextlib.AsyncExitStack() as stack:
        db = await Database.open(config.database)
        stack.push_async_callback(db.close)
        bus = EventBus(db)
        await bus.start()
        stack.callback(bus.close)
        fleet = Fleet(
            db, bus, metrics, join_secret=config.join_secret, interval=config.heartbeat_interval
        )
        await fleet.start()
        stack.push_async_callback(fleet.close)
        engine = RolloutEngine(db, bus, fleet, metrics, catalog.store.has_image)
        await engine.start()
        stack.push_async_callback(engine.close)
        catalog.add_usage_check(fleet.image_user)
        catalog.add_usage_check(engine.image_user)
        app[K.DATABASE], app[K.EVENTS], app[K.FLEET], app[K.ROLLOUTS] = db, bus, fleet, engine
        yield


async def _swarm_http_ctx(app: web.Application) -> AsyncIterator[None]:
    """The controller's plain-HTTP swarm listener: its SWARM_ROUTES, the same handlers."""
    listen = app[K.CONFIG].swarm_http_listen
    assert listen is not None
    swarm = web.Application(middlewares=[app[K.METRICS].middleware(), problem_middleware])
    swarm[K.CONFIG], swarm[K.STORE] = app[K.CONFIG], app[K.STORE]
    swarm[K.CATALOG], swarm[K.WEBSEED] = app[K.CATALOG], app[K.WEBSEED]
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "GET" and SWARM_ROUTES.fullmatch(path):
            swarm.router.add_get(path, route.handler)
    runner = web.AppRunner(swarm, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, listen.host, listen.port).start()
    log.info("swarm listener (tracker, web seed, signed images) on http://%s", listen)
    yield
    await runner.cleanup()


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    fetcher = FetchManager(app[K.CONFIG], app[K.STORE], app[K.SWARM])
    await fetcher.start()
    app[K.FETCHER] = fetcher
    yield
    await fetcher.close()


async def _heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    loop = HeartbeatLoop(app[K.CONFIG], app[K.FETCHER], app.get(K.HEARTBEAT_SETTINGS))
    loop.start()
    app[K.HEARTBEAT] = loop
    yield
    await loop.close(timeout=10)


async def node_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[K.HEARTBEAT].status_json())


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
        metrics = Metrics()
        app[K.METRICS] = metrics
        app.middlewares.insert(0, metrics.middleware())  # outermost: counts problem answers too
        app[K.EVENT_STREAMS] = set()
        app.cleanup_ctx.append(_control_plane_ctx)
        app.on_shutdown.append(events_api.close_streams)
        app.router.add_routes(images_api.routes)
        app.router.add_routes(nodes_api.routes)
        app.router.add_routes(rollouts_api.routes)
        app.router.add_routes(events_api.routes)
        app.router.add_get("/metrics", metrics_handler)
        app.router.add_get("/api/v1/openapi.json", openapi_handler)
        Dashboard.load().add_routes(app.router)  # the operator's page at / (docs/control-plane.md)

        async def _webseed_ctx(app: web.Application) -> AsyncIterator[None]:
            app[K.WEBSEED] = WebSeed(app[K.STORE])
            yield

        app.cleanup_ctx.append(_webseed_ctx)
        app.router.add_get(WebSeed.PREFIX + "/chunks/{prefix}/{name}", _webseed_chunk)
        app.router.add_get(WebSeed.PREFIX + "/{file}", _webseed_image)
        if config.swarm_http_listen is not None:
            app.cleanup_ctx.append(_swarm_http_ctx)
    else:
        app.cleanup_ctx.append(_node_ctx)
        app.cleanup_ctx.append(_heartbeat_ctx)
        app.router.add_routes(node_api.routes)
        app.router.add_get("/api/v1/status", node_status)
    return app


async def _webseed_chunk(request: web.Request) -> web.StreamResponse:
    return await request.app[K.WEBSEED].handle_chunk(request)


async def _webseed_image(request: web.Request) -> web.StreamResponse:
    return await request.app[K.WEBSEED].handle_image(request)
