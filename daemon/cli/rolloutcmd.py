"""`imageswarm rollout`: start, list, show, pause, resume, abort, roll back and watch rollouts.

`start` sends only the strategy keys given on the command line: the controller owns the
defaults and answers with the effective strategy (see `rollout show`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from imageswarm.agent.kernel import POLICIES
from imageswarm.daemon.cli import watch
from imageswarm.daemon.cli.imagecmd import controller_args, controller_client

ROLLOUTS = "/api/v1/rollouts"
ACTIONS = {
    "pause": "stop starting new batches (nodes mid-apply finish)",
    "resume": "continue a paused or halted rollout (a halted one retries its failed nodes)",
    "abort": "end the rollout; nodes mid-apply finish",
    "rollback": "tell every node this rollout applied to restore its previous image",
}
_LABEL = re.compile(r"^([^=,\s]+)=([^=,]*)$")


def node_selector(text: str) -> str | list[str] | dict[str, dict[str, str]]:
    """`all`, `n1,n2` (names) or `role=compute,zone=a` (labels, all must match)."""
    if text == "all":
        return "all"
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry")
    labels = [_LABEL.match(p) for p in parts]
    if all(labels):
        return {"labels": {m.group(1): m.group(2) for m in labels if m}}
    if any("=" in p for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} mixes node names and labels; give names (n1,n2) or labels (key=value,...)"
        )
    return parts


def batch_size(text: str) -> int | str:
    """A node count (`3`) or a percent of the targets (`25%`); the controller checks ranges."""
    if re.fullmatch(r"\d+%", text):
        return text
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is neither a count (3) nor a percent (25%)")


def register(groups: Any) -> None:
    parser = groups.add_parser("rollout", help="start and follow staged rollouts of an image")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    start = sub.add_parser("start", help="roll an image out to nodes in batches")
    start.add_argument("image_id", metavar="IMAGE", help="the image id to roll out")
    start.add_argument(
        "--nodes",
        type=node_selector,
        default="all",
        help="all (default), names n1,n2 or labels role=compute,zone=a",
    )
    start.add_argument(
        "--canary", type=int, metavar="N", help="nodes in a first batch of their own"
    )
    start.add_argument("--batch", type=batch_size, metavar="N|P%", help="nodes per batch")
    start.add_argument("--max-failures", type=int, metavar="N", help="failures before halting")
    start.add_argument("--reboot", choices=POLICIES, help="reboot policy when the kernel changes")
    start.add_argument(
        "--no-prefetch", action="store_true", help="do not fetch on every node before applying"
    )
    health = start.add_mutually_exclusive_group()
    health.add_argument("--health-cmd", metavar="CMD", help="health check command on each node")
    health.add_argument("--health-url", metavar="URL", help="health check URL each node probes")
    start.add_argument("--watch", action="store_true", help="follow the rollout (as `watch`)")
    controller_args(start)
    start.add_argument("--json", action="store_true")
    start.set_defaults(func=cmd_start)

    lst = sub.add_parser("list", help="list rollouts")
    controller_args(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one rollout and its nodes")
    show.add_argument("rollout_id", metavar="ID")
    controller_args(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    for action, text in ACTIONS.items():
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("rollout_id", metavar="ID")
        if action in ("resume", "rollback"):
            cmd.add_argument("--watch", action="store_true", help="then follow the rollout")
        controller_args(cmd)
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(func=cmd_action, verb=action, watch=False)

    follow = sub.add_parser(
        "watch", help="follow a rollout live; exit 0 when done, 2 when halted or aborted"
    )
    follow.add_argument("rollout_id", metavar="ID")
    controller_args(follow)
    follow.add_argument("--json", action="store_true", help="print each event as a JSON line")
    follow.set_defaults(func=cmd_watch)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    strategy: dict[str, Any] = {}
    if args.no_prefetch:
        strategy["prefetch"] = False
    for key in ("canary", "batch", "max_failures", "reboot"):
        if getattr(args, key) is not None:
            strategy[key] = getattr(args, key)
    if args.health_cmd is not None:
        strategy["health"] = {"command": args.health_cmd}
    elif args.health_url is not None:
        strategy["health"] = {"url": args.health_url}
    return {"image_id": args.image_id, "nodes": args.nodes, "strategy": strategy}


def cmd_start(args: argparse.Namespace) -> int:
    return asyncio.run(_start(args))


async def _start(args: argparse.Namespace) -> int:
    async with controller_client(args) as api:
        rollout = await api.post_json(ROLLOUTS, request_body(args))
        if args.json:
            print(json.dumps(rollout) if args.watch else json.dumps(rollout, indent=1))
        else:
            print(rollout["id"])
            print(
                f"rollout {rollout['id']} started: image {rollout['image_id']} on "
                f"{len(rollout['nodes'])} nodes in {rollout['batches']} batches",
                file=sys.stderr,
            )
        if not args.watch:
            return 0
        sys.stdout.flush()
        return await watch.watch(api, rollout["id"], watch.display_for(sys.stdout, args.json))


def cmd_list(args: argparse.Namespace) -> int:
    rollouts: list[dict[str, Any]] = asyncio.run(_get(args, ROLLOUTS))["rollouts"]
    if args.json:
        print(json.dumps(rollouts, indent=1))
        return 0
    rows = [("ID", "IMAGE", "STATE", "BATCH", "APPLIED", "FAILED", "CREATED")]
    for r in rollouts:
        counts, nodes = r.get("counts", {}), len(r.get("nodes", []))
        rows.append(
            (
                r["id"],
                r["image_id"],
                r["state"],
                _batch(r),
                f"{counts.get('applied', 0)}/{nodes}",
                str(counts.get("failed", 0)),
                str(r.get("created") or "-"),
            )
        )
    print(table(rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    rollout = asyncio.run(_get(args, f"{ROLLOUTS}/{args.rollout_id}"))
    print(json.dumps(rollout, indent=1) if args.json else describe(rollout))
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    return asyncio.run(_action(args))


async def _action(args: argparse.Namespace) -> int:
    async with controller_client(args) as api:
        rollout = await api.post_json(f"{ROLLOUTS}/{args.rollout_id}/{args.verb}")
        if args.json:
            print(json.dumps(rollout) if args.watch else json.dumps(rollout, indent=1))
        else:
            reason = f" ({rollout['reason']})" if rollout.get("reason") else ""
            print(f"rollout {rollout['id']}: {rollout['state']}{reason}")
        if not args.watch:
            return 0
        sys.stdout.flush()
        return await watch.watch(api, rollout["id"], watch.display_for(sys.stdout, args.json))


def cmd_watch(args: argparse.Namespace) -> int:
    return asyncio.run(_watch(args))


async def _watch(args: argparse.Namespace) -> int:
    async with controller_client(args) as api:
        return await watch.watch(api, args.rollout_id, watch.display_for(sys.stdout, args.json))


async def _get(args: argparse.Namespace, path: str) -> Any:
    async with controller_client(args) as api:
        return await api.get_json(path)


def _batch(rollout: dict[str, Any]) -> str:
    return f"{rollout.get('batch', 0) + 1}/{rollout['batches']}" if rollout.get("batches") else "-"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def strategy_text(strategy: dict[str, Any]) -> str:
    parts = ["prefetch" if strategy.get("prefetch", True) else "no prefetch"]
    for key in ("canary", "batch", "max_failures", "reboot"):
        if key in strategy:
            parts.append(f"{key.replace('_', ' ')} {strategy[key]}")
    health = strategy.get("health") or {}
    if health:
        parts.append(f"health {health.get('command') or health.get('url')}")
    return ", ".join(parts)


def describe(rollout: dict[str, Any]) -> str:
    counts = rollout.get("counts", {})
    nodes = rollout.get("nodes", [])
    reason = f" ({rollout['reason']})" if rollout.get("reason") else ""
    head = [
        ("id", rollout["id"]),
        ("image", rollout["image_id"]),
        ("state", rollout["state"] + reason),
        ("batch", _batch(rollout)),
        ("strategy", strategy_text(rollout.get("strategy", {}))),
        ("created", str(rollout.get("created") or "-")),
        ("updated", str(rollout.get("updated") or "-")),
        ("nodes", ", ".join(f"{n} {s}" for s, n in counts.items() if n) or str(len(nodes))),
    ]
    rows = [("NODE", "BATCH", "STATUS", "STARTED", "FINISHED", "DETAIL")]
    for n in nodes:
        rows.append(
            (
                n["name"],
                str(n.get("batch", "-")),
                n["status"],
                str(n.get("started") or "-"),
                str(n.get("finished") or "-"),
                n.get("detail") or "",
            )
        )
    return "\n".join(f"{k:<9} {v}" for k, v in head) + "\n\n" + table(rows)
