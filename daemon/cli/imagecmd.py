"""`imageswarm image`: publish (offline or through the controller), fetch, list, show, delete."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from imageswarm.agent import keys
from imageswarm.agent import manifest as mf
from imageswarm.agent.errors import InvalidInputError
from imageswarm.agent.store import Store
from imageswarm.daemon.cli import buildcmd
from imageswarm.daemon.cli.progress import Progress, human
from imageswarm.daemon.client import ApiClient, default_url
from imageswarm.daemon.publish import publish

CONTROLLER = "IMAGESWARM_CONTROLLER"
NODE = "IMAGESWARM_NODE"
TOKEN = "IMAGESWARM_TOKEN"
CA = "IMAGESWARM_CA"


def register(groups: Any) -> None:
    parser = groups.add_parser("image", help="publish, fetch and inspect images")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    pub = sub.add_parser("publish", help="chunk, sign and publish an image (raw, qcow2 or tar)")
    pub.add_argument("file", type=Path)
    pub.add_argument("--name", required=True)
    pub.add_argument("--store", type=Path, help="publish offline into this store directory")
    pub.add_argument("--key", type=Path, help="signing key for --store (see `key generate`)")
    controller_args(pub)
    pub.add_argument("--json", action="store_true", help="print the signed manifest as JSON")
    pub.set_defaults(func=cmd_publish)

    fetch = sub.add_parser("fetch", help="ask the local node daemon to fetch an image")
    fetch.add_argument("image_id")
    fetch.add_argument("--node", default=default_url(NODE, "http://127.0.0.1:7701"))
    fetch.add_argument("--no-wait", action="store_true", help="return once the fetch started")
    fetch.add_argument("--json", action="store_true")
    fetch.set_defaults(func=cmd_fetch)

    lst = sub.add_parser("list", help="list images on the controller, a node or a store")
    controller_args(lst)
    lst.add_argument("--store", type=Path, help="list an offline store instead")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one image's manifest")
    show.add_argument("image_id")
    controller_args(show)
    show.add_argument("--store", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    delete = sub.add_parser("delete", help="delete an image no node runs and no rollout targets")
    delete.add_argument("image_id")
    controller_args(delete)
    delete.add_argument("--json", action="store_true")
    delete.set_defaults(func=cmd_delete)

    buildcmd.register(sub)


def controller_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--controller",
        default=default_url(CONTROLLER, "http://127.0.0.1:7700"),
        help=f"controller URL (default ${CONTROLLER} or http://127.0.0.1:7700)",
    )
    parser.add_argument("--token", default=default_url(TOKEN, "") or None, help=f"or ${TOKEN}")
    parser.add_argument(
        "--ca",
        type=Path,
        default=default_url(CA, "") or None,
        metavar="FILE",
        help=f"the CA certificate that signed an https:// controller's (or ${CA}; "
        "default: the system's CA store)",
    )


def controller_client(args: argparse.Namespace, timeout: float = 30.0) -> ApiClient:
    """The client `controller_args` describe: URL, operator token and CA."""
    return ApiClient(args.controller, token=args.token, ca=args.ca, timeout=timeout)


def summary(data: dict[str, Any]) -> str:
    chunks = data.get("chunks", [])
    stored = {c["hash"]: c["length"] for c in chunks if c.get("hash")}
    holes = sum(c["length"] for c in chunks if not c.get("hash"))
    rows = [
        ("image_id", data["image_id"]),
        ("name", data["name"]),
        ("created", data["created"]),
        ("format", f"{data['format']} (from {data['source_format']})"),
        ("size", f"{human(data['size'])} ({data['size']} bytes)"),
        ("sha256", data["sha256"]),
        (
            "chunks",
            f"{len(chunks)} entries, {len(stored)} unique, {human(sum(stored.values()))} "
            f"stored, {human(holes)} holes",
        ),
        ("kernels", ", ".join(data.get("kernels", [])) or "-"),
        ("info_hash", data["info_hash"]),
        ("signed by", data["key_id"]),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def _print_manifest(data: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(data, indent=1) if as_json else summary(data))


def cmd_publish(args: argparse.Namespace) -> int:
    if args.store is not None:
        if args.key is None:
            raise InvalidInputError("--store needs --key KEYFILE (create one with `key generate`)")
        key = keys.load(args.key)
        store = Store.open(args.store)
        size = args.file.stat().st_size if args.file.is_file() else 0
        bar = Progress("chunking", size)
        result = publish(args.file, args.name, store, key, progress=lambda d, t: bar.update(d))
        bar.finish(
            f"{'already published' if result.existed else 'published'}: "
            f"{result.new_chunks} new chunks, {human(result.new_bytes)} written"
        )
        _print_manifest(result.manifest.to_json(), args.json)
        return 0
    return asyncio.run(_publish_remote(args))


async def _publish_remote(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise InvalidInputError(f"{args.file} is not a file")
    bar = Progress("uploading", args.file.stat().st_size)
    async with controller_client(args, timeout=600) as api:
        data = await api.upload(
            f"/api/v1/images?name={quote(args.name)}", args.file, lambda d, t: bar.update(d)
        )
    bar.finish("published")
    _print_manifest(data["manifest"], args.json)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    return asyncio.run(_fetch(args))


async def _fetch(args: argparse.Namespace) -> int:
    async with ApiClient(args.node) as api:
        state = await api.post_json(f"/api/v1/images/{args.image_id}/fetch")
        bar: Progress | None = None
        while True:
            total = state.get("total_bytes") or 0
            if total and bar is None:
                bar = Progress("fetching", total)
            if bar is not None:
                bar.update(state.get("done_bytes", 0), state.get("bytes_by_source"))
            if args.no_wait or state["state"] in ("done", "failed"):
                break
            await asyncio.sleep(0.5)
            state = await api.get_json(f"/api/v1/images/{args.image_id}")
        if bar is not None:
            bar.finish()
    if args.json:
        print(json.dumps(state, indent=1))
    else:
        sources = state.get("bytes_by_source", {})
        print(
            f"{args.image_id}: {state['state']}"
            + (f" ({state['error']})" if state.get("error") else "")
            + "".join(f"  {k} {human(v)}" for k, v in sorted(sources.items()))
        )
    return 1 if state["state"] == "failed" else 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.store is not None:
        store = Store.open(args.store, create=False)
        images = [store.load_manifest(i).to_json() for i in store.image_ids()]
    else:
        images = asyncio.run(_get(args, "/api/v1/images"))["images"]
    if args.json:
        print(json.dumps(images, indent=1))
        return 0
    print(f"{'IMAGE_ID':<17} {'NAME':<24} {'SIZE':>10}  CREATED")
    for img in images:
        print(f"{img['image_id']:<17} {img['name']:<24} {human(img['size']):>10}  {img['created']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.store is not None:
        data = Store.open(args.store, create=False).load_manifest(args.image_id).to_json()
    else:
        raw = asyncio.run(_get_bytes(args, f"/api/v1/images/{args.image_id}/manifest"))
        data = mf.parse(raw).to_json()
    _print_manifest(data, args.json)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    asyncio.run(_delete(args, f"/api/v1/images/{quote(args.image_id)}"))
    print(
        json.dumps({"image_id": args.image_id, "deleted": True})
        if args.json
        else f"deleted {args.image_id}"
    )
    return 0


async def _delete(args: argparse.Namespace, path: str) -> None:
    async with controller_client(args) as api:
        await api.delete(path)


async def _get(args: argparse.Namespace, path: str) -> Any:
    async with controller_client(args) as api:
        return await api.get_json(path)


async def _get_bytes(args: argparse.Namespace, path: str) -> bytes:
    async with controller_client(args) as api:
        return await api.get_bytes(path)
