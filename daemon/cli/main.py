"""Entry point of the `imageswarm` command: one argparse tree, one error policy.

Expected failures (ImageSwarmError) print one line and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from imageswarm.agent.errors import ImageSwarmError
from imageswarm.daemon.cli import (
    agentcmd,
    configcmd,
    daemoncmd,
    imagecmd,
    keycmd,
    labcmd,
    nodescmd,
    rolloutcmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageswarm",
        description="Peer-to-peer OS-image distribution and in-place root swap.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    daemoncmd.register(groups)
    imagecmd.register(groups)
    rolloutcmd.register(groups)
    nodescmd.register(groups)
    keycmd.register(groups)
    agentcmd.register(groups)
    configcmd.register(groups)
    labcmd.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
    except ImageSwarmError as err:
        print(f"imageswarm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
