"""`imageswarm nodes`: list and show enrolled nodes, and set their labels."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any
from urllib.parse import quote

from imageswarm.daemon.cli.imagecmd import controller_args, controller_client
from imageswarm.daemon.cli.progress import human
from imageswarm.daemon.cli.rolloutcmd import table

NODES = "/api/v1/nodes"


def label(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key.strip(), value


def register(groups: Any) -> None:
    parser = groups.add_parser("nodes", help="list, inspect and label enrolled nodes")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    lst = sub.add_parser("list", help="every enrolled node: online, images, kernel, labels")
    controller_args(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one node's full state")
    show.add_argument("name")
    controller_args(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    lab = sub.add_parser("label", help="set or remove a node's labels (rollouts select by them)")
    lab.add_argument("name")
    lab.add_argument("labels", nargs="*", type=label, metavar="KEY=VALUE", help="labels to set")
    lab.add_argument(
        "--remove", action="append", default=[], metavar="KEY", help="label to remove (repeatable)"
    )
    controller_args(lab)
    lab.add_argument("--json", action="store_true")
    lab.set_defaults(func=cmd_label)


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def cmd_list(args: argparse.Namespace) -> int:
    nodes: list[dict[str, Any]] = asyncio.run(_call(args, "GET", NODES))["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=1))
        return 0
    rows = [("NAME", "ONLINE", "CURRENT", "PREVIOUS", "KERNEL", "LABELS", "ROLLOUT")]
    for n in nodes:
        rows.append(
            (
                n["name"],
                "yes" if n.get("online") else "no",
                n.get("current_image") or "-",
                n.get("previous_image") or "-",
                n.get("kernel") or "-",
                _labels(n.get("labels") or {}),
                n.get("rollout") or "-",
            )
        )
    print(table(rows))
    return 0


def _fetch_text(image_id: str, fetch: dict[str, Any]) -> str:
    sources = sorted((fetch.get("bytes_by_source") or {}).items())
    by = ", ".join(f"{k} {human(v)}" for k, v in sources if v)
    done, total = human(fetch.get("done_bytes") or 0), human(fetch.get("total_bytes") or 0)
    text = f"{image_id} {fetch.get('state')} {done}/{total}" + (f" ({by})" if by else "")
    return text + (f" error: {fetch['error']}" if fetch.get("error") else "")


def describe(node: dict[str, Any]) -> str:
    action = node.get("action") or {}
    agent = node.get("agent") or {}
    online = "yes" if node.get("online") else "no"
    rows = [
        ("name", node["name"]),
        ("online", f"{online} (last seen {node.get('last_seen') or 'never'})"),
        ("current", node.get("current_image") or "-"),
        ("previous", node.get("previous_image") or "-"),
        ("kernel", node.get("kernel") or "-"),
        ("labels", _labels(node.get("labels") or {})),
        ("rollout", node.get("rollout") or "-"),
        ("action", f"{action.get('id')}: {action.get('status')}" if action else "-"),
    ]
    if pending := agent.get("pending"):
        what = f"{pending.get('kind')} {pending.get('image_id')}"
        rows.append(("pending", f"{what} (phase {pending.get('phase')})"))
    if last := agent.get("last"):
        error = f": {last['error']}" if last.get("error") else ""
        rows.append(
            ("last", f"{last.get('kind')} {last.get('image_id')} {last.get('result')}{error}")
        )
    for image_id, fetch in sorted((node.get("fetches") or {}).items()):
        rows.append(("fetch", _fetch_text(image_id, fetch)))
    return "\n".join(f"{k:<9} {v}" for k, v in rows)


def cmd_show(args: argparse.Namespace) -> int:
    node = asyncio.run(_call(args, "GET", f"{NODES}/{quote(args.name)}"))
    print(json.dumps(node, indent=1) if args.json else describe(node))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    return asyncio.run(_label(args))


async def _label(args: argparse.Namespace) -> int:
    """PUT replaces the whole label set, so read, change and write it back."""
    path = f"{NODES}/{quote(args.name)}"
    async with controller_client(args) as api:
        labels: dict[str, str] = dict((await api.get_json(path)).get("labels") or {})
        for key in args.remove:
            labels.pop(key, None)
        labels.update(dict(args.labels))
        node = await api.put_json(f"{path}/labels", {"labels": labels})
    if args.json:
        print(json.dumps(node, indent=1))
    else:
        print(f"{node['name']}: {_labels(node.get('labels') or {})}")
    return 0


async def _call(args: argparse.Namespace, method: str, path: str) -> Any:
    async with controller_client(args) as api:
        return await api.request(method, path)
