"""`imageswarm config`: example files and validation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imageswarm.daemon import config


def register(groups: Any) -> None:
    parser = groups.add_parser("config", help="example configs and validation")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex = sub.add_parser("example", help="print a commented, valid example config")
    ex.add_argument("--role", choices=sorted(config.EXAMPLES), required=True)
    ex.set_defaults(func=example)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=check_file)


def example(args: argparse.Namespace) -> int:
    print(config.EXAMPLES[args.role], end="")
    return 0


def check_file(args: argparse.Namespace) -> int:
    cfg = config.load(args.file)
    print(f"{args.file}: valid {cfg.role} config for {cfg.node_name}")
    return 0
