"""`imageswarm image build`: an ext4 image of a root tree, built to delta well against the
previous version (see imageswarm.agent.imagebuild)."""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

from imageswarm.agent import imagebuild


def register(image_actions: Any) -> None:
    """Add `build` to the `image` command's actions."""
    build = image_actions.add_parser(
        "build",
        help="build a reproducible ext4 image of a root tree, on the previous version's image "
        "with --base (root)",
        description="Build OUT, an ext4 image of TREE. The same tree gives the same bytes. "
        "With --base, OUT is a copy of that image brought to TREE in place, so an image that "
        "changed little is a small delta from it: build every version on the previous one.",
    )
    build.add_argument("tree", type=Path, help="the root tree")
    build.add_argument("out", type=Path, help="the image file to write")
    build.add_argument(
        "--size-mib", type=int, required=True, metavar="N", help="the image's size in MiB"
    )
    build.add_argument(
        "--base", type=Path, metavar="IMAGE", help="the previous version's image to build on"
    )
    build.add_argument(
        "--uuid",
        type=_uuid,
        help=f"the filesystem UUID, which also seeds its checksums: the same for every version "
        f"(default {imagebuild.DEFAULT_UUID}; with --base, the base's)",
    )
    build.add_argument(
        "--mtimes",
        choices=["tree", "content"],
        default="tree",
        help="tree (default): every file's mtime is the tree's; content: with --base, a file "
        "whose content the base already has keeps the base's mtime (smaller deltas, but "
        "mtimes can disagree with what caches built in the tree recorded)",
    )
    build.set_defaults(func=cmd_build)


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def cmd_build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    imagebuild.build_ext4(
        args.tree,
        args.out,
        args.size_mib,
        base=args.base,
        fs_uuid=args.uuid,
        mtimes=args.mtimes,
    )
    on = f" on {args.base}" if args.base else ""
    print(f"built {args.out}{on}: {args.size_mib} MiB ext4 in {time.monotonic() - start:.1f} s")
    return 0
