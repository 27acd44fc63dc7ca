"""Every object shared through the aiohttp application, declared once, typed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from imageswarm.agent.store import Store
from imageswarm.daemon.config import Config

if TYPE_CHECKING:
    from imageswarm.daemon.catalog import Catalog
    from imageswarm.daemon.fetch import FetchManager
    from imageswarm.daemon.swarm.session import Swarm
    from imageswarm.daemon.tracker import Tracker
    from imageswarm.daemon.webseed import WebSeed

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
SWARM: web.AppKey[Swarm] = web.AppKey("swarm")
TRACKER: web.AppKey[Tracker] = web.AppKey("tracker")
WEBSEED: web.AppKey[WebSeed] = web.AppKey("webseed")
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog")
FETCHER: web.AppKey[FetchManager] = web.AppKey("fetcher")
