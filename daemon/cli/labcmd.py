"""`imageswarm lab`: a local cluster to try imageswarm on one machine.

`lab demo` starts a controller and N node daemons as separate processes on loopback addresses.
Each node runs in a private mount namespace of its own, on its own read-only ext4 root (a
loop-mounted copy of the v1 image, never this machine's root). The demo publishes v2 and rolls
it out (prefetch over the swarm, canary 1, batches of 2, each node swapping its root in place),
then does the same with v3 (one more file changed: nodes fetch only the delta), showing the live
`rollout watch` view and, after each rollout, where every node's bytes came from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imageswarm.daemon.cli.progress import human
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.localcluster import LocalCluster, build_ext4, make_tree

SOURCES = ("local", "controller", "peers", "web_seed", "unattributed")


def register(groups: Any) -> None:
    parser = groups.add_parser("lab", help="local demo cluster")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    demo = sub.add_parser("demo", help="staged rollouts on a loopback cluster of namespaced roots")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--workdir", type=Path, default=Path(".lab/demo"))
    demo.add_argument("--image-mib", type=int, default=64)
    demo.add_argument(
        "--rate", type=float, default=16.0, help="per-daemon upload limit, MiB/s (0 = none)"
    )
    demo.set_defaults(func=demo_cmd)


def table(image_id: str, size: int, nodes: list[dict[str, Any]]) -> str:
    lines = [
        f"{'node':<7} {'image':<17} {'fetch s':>7} {'apply s':>7} "
        + " ".join(f"{c:>11}" for c in SOURCES)
        + f" {'wire/image':>10}"
    ]
    for node in nodes:
        fetch = (node.get("fetches") or {}).get(image_id) or {}
        src = fetch.get("bytes_by_source") or {}
        wire = sum(src.get(c, 0) for c in SOURCES[1:])
        last = (node.get("agent") or {}).get("last") or {}
        apply_s = sum(p.get("seconds", 0) for p in last.get("phases", []))
        lines.append(
            f"{node['name']:<7} {node.get('current_image') or '-':<17} "
            f"{fetch.get('duration', 0):>7.1f} {apply_s:>7.1f} "
            + " ".join(f"{human(src.get(c, 0)):>11}" for c in SOURCES)
            + f" {wire / max(size, 1):>10.1%}"
        )
    return "\n".join(lines)


def _images(work: Path, mib: int) -> list[Path]:
    tree = work / "tree"
    make_tree(tree, files=300, seed=1)
    images = []
    for version, changed in (("v1", None), ("v2", "usr/lib/big0.so"), ("v3", "usr/lib/big1.so")):
        if changed:
            path = tree / changed
            path.write_bytes(bytes(reversed(path.read_bytes())))
        build_ext4(tree, work / f"{version}.img", mib)
        images.append(work / f"{version}.img")
    return images


def demo_cmd(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print(
            "lab demo needs root: each node gets a private mount namespace and a loop-mounted root"
        )
        return 1
    work: Path = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(
        f"building {args.image_mib} MiB ext4 images: v1, v2 (one 1 MiB file changed), v3 (one more)"
    )
    v1, v2, v3 = _images(work, args.image_mib)
    cluster = LocalCluster(
        work, nodes=args.nodes, upload_rate_limit=int(args.rate * 1024 * 1024), root_image=v1
    )
    cluster.write_configs()
    cluster.start()
    try:
        return asyncio.run(_demo(cluster, [v2, v3]))
    finally:
        cluster.stop()


async def _nodes(api: ApiClient) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = (await api.get_json("/api/v1/nodes"))["nodes"]
    return sorted(nodes, key=lambda n: str(n["name"]))


async def _demo(cluster: LocalCluster, images: list[Path]) -> int:
    await cluster.wait_ready()
    count = len(cluster.node_daemons)
    await cluster.wait_nodes_online()
    async with ApiClient(cluster.controller.url, token=cluster.api_token) as api:
        print(
            f"controller {cluster.controller.url} and {count} nodes are up, each on its own "
            f"read-only root (logs in {cluster.root})"
        )
        for image in images:
            start = time.monotonic()
            published = await cluster.publish(image, image.stem)
            manifest = published["manifest"]
            print(
                f"\npublished {image.stem} as {manifest['image_id']}: {human(manifest['size'])}, "
                f"{published['new_chunks']} new chunks ({human(published['new_bytes'])}) in "
                f"{time.monotonic() - start:.1f}s; rolling out: prefetch, canary 1, batches of 2"
            )
            argv = [
                sys.executable,
                "-m",
                "imageswarm.daemon.cli.main",
                "rollout",
                "start",
                manifest["image_id"],
                "--canary",
                "1",
                "--batch",
                "2",
                "--reboot",
                "never",
                "--watch",
                "--controller",
                cluster.controller.url,
                "--token",
                str(cluster.api_token),
            ]
            watch = await asyncio.to_thread(subprocess.run, argv, check=False)
            if watch.returncode != 0:
                print(f"rollout of {image.stem} did not finish (exit {watch.returncode})")
                return 1
            nodes = await _nodes(api)
            print(table(manifest["image_id"], manifest["size"], nodes))
            for d in cluster.node_daemons:
                on_disk = (d.root_view() / "etc/image_id").read_text().strip()
                if on_disk != manifest["image_id"]:
                    print(f"{d.name}: root says {on_disk}, expected {manifest['image_id']}")
                    return 1
    print(
        "\nevery node swapped its own read-only root in place to each image (verified: signature,"
        " every chunk, whole sha256; /etc/image_id written last), without a reboot"
    )
    return 0
