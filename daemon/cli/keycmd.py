"""`imageswarm key`: signing keys for controllers and build hosts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imageswarm.agent import keys


def register(groups: Any) -> None:
    parser = groups.add_parser("key", help="manage Ed25519 signing keys")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = sub.add_parser("generate", help="create a signing key file and print its public key")
    gen.add_argument("keyfile", type=Path)
    gen.add_argument("--force", action="store_true", help="replace an existing key file")
    gen.set_defaults(func=generate)
    show = sub.add_parser("public", help="print the public key of a key file")
    show.add_argument("keyfile", type=Path)
    show.set_defaults(func=public)


def generate(args: argparse.Namespace) -> int:
    key = keys.generate(args.keyfile, overwrite=args.force)
    print(key.public)
    return 0


def public(args: argparse.Namespace) -> int:
    print(keys.load(args.keyfile).public)
    return 0
