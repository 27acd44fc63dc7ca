"""`imageswarm daemon --config FILE`: run the controller or node service until SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from aiohttp import web

from imageswarm.daemon import config, tls
from imageswarm.daemon.app import create_app


def register(groups: Any) -> None:
    parser = groups.add_parser("daemon", help="run the imageswarm service (controller or node)")
    parser.add_argument("--config", type=Path, required=True, help="YAML config file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    ssl_context = tls.load(cfg)  # before anything starts: a bad TLS file is a startup error
    app = create_app(cfg)
    web.run_app(
        app,
        host=cfg.api_listen.host,
        port=cfg.api_listen.port,
        ssl_context=ssl_context,
        print=None,
        shutdown_timeout=5,
        access_log=None,
        handle_signals=True,
    )
    return 0
