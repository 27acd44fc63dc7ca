"""Every object shared through the aiohttp application, declared once, typed."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from imageswarm.agent.store import Store
from imageswarm.daemon.config import Config

if TYPE_CHECKING:
    from imageswarm.daemon.catalog import Catalog
    from imageswarm.daemon.db import Database
    from imageswarm.daemon.events import EventBus
    from imageswarm.daemon.fetch import FetchManager
    from imageswarm.daemon.fleet import Fleet
    from imageswarm.daemon.heartbeat import HeartbeatLoop, HeartbeatSettings
    from imageswarm.daemon.metrics import Metrics
    from imageswarm.daemon.rollouts import RolloutEngine
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
HEARTBEAT: web.AppKey[HeartbeatLoop] = web.AppKey("heartbeat")
#: Optional, set before startup (tests shorten intervals and wrap the agent command).
HEARTBEAT_SETTINGS: web.AppKey[HeartbeatSettings] = web.AppKey("heartbeat_settings")
# The controller's control plane (docs/control-plane.md).
DATABASE: web.AppKey[Database] = web.AppKey("database")
EVENTS: web.AppKey[EventBus] = web.AppKey("events")
FLEET: web.AppKey[Fleet] = web.AppKey("fleet")
ROLLOUTS: web.AppKey[RolloutEngine] = web.AppKey("rollouts")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
#: The handler tasks of open SSE streams, ended at shutdown (see api/events.py).
EVENT_STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("event_streams")
