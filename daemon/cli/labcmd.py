"""`imageswarm lab`: a local cluster to try imageswarm on one machine.

`lab demo` starts a controller and N nodes on loopback addresses, publishes an ext4 image,
fetches it on every node over the swarm, then publishes a second version with one file changed
and fetches that, printing where each node's bytes came from.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from imageswarm.daemon.cli.progress import human
from imageswarm.daemon.localcluster import LocalCluster, build_ext4, make_tree


def register(groups: Any) -> None:
    parser = groups.add_parser("lab", help="local demo cluster")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    demo = sub.add_parser("demo", help="publish and fetch an image on a loopback cluster")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--workdir", type=Path, default=Path(".lab/demo"))
    demo.add_argument("--image-mib", type=int, default=64)
    demo.add_argument(
        "--rate", type=float, default=16.0, help="per-daemon upload limit, MiB/s (0 = none)"
    )
    demo.set_defaults(func=demo_cmd)


def table(title: str, image_size: int, states: dict[str, dict[str, Any]]) -> str:
    cols = ("local", "controller", "peers", "web_seed", "unattributed")
    lines = [
        title,
        f"{'node':<8} {'state':<7} {'secs':>6} "
        + " ".join(f"{c:>11}" for c in cols)
        + f" {'wire/image':>10}",
    ]
    for name, st in states.items():
        src = st.get("bytes_by_source", {})
        wire = sum(src.get(c, 0) for c in cols[1:])
        lines.append(
            f"{name:<8} {st['state']:<7} {st['duration']:>6.1f} "
            + " ".join(f"{human(src.get(c, 0)):>11}" for c in cols)
            + f" {wire / max(image_size, 1):>10.1%}"
        )
    return "\n".join(lines)


def demo_cmd(args: argparse.Namespace) -> int:
    work: Path = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(f"building a {args.image_mib} MiB ext4 image (v1) and a copy with one file changed (v2)")
    tree = work / "tree"
    make_tree(tree, files=300, seed=1)
    build_ext4(tree, work / "v1.img", args.image_mib)
    changed = tree / "usr/lib/big0.so"
    changed.write_bytes(bytes(reversed(changed.read_bytes())))
    build_ext4(tree, work / "v2.img", args.image_mib)
    rate = int(args.rate * 1024 * 1024)
    cluster = LocalCluster(work, nodes=args.nodes, upload_rate_limit=rate)
    cluster.write_configs()
    cluster.start()
    try:
        return asyncio.run(_demo(cluster, work, args.nodes))
    finally:
        cluster.stop()


async def _demo(cluster: LocalCluster, work: Path, nodes: int) -> int:
    await cluster.wait_ready()
    print(f"controller {cluster.controller.url} and {nodes} nodes are up; logs in {work}")
    for version in ("v1", "v2"):
        start = time.monotonic()
        published = await cluster.publish(work / f"{version}.img", f"demo-{version}")
        manifest = published["manifest"]
        print(
            f"\npublished {version} as {manifest['image_id']}: {human(manifest['size'])}, "
            f"{len(manifest['chunks'])} chunks, {published['new_chunks']} new "
            f"({human(published['new_bytes'])}) in {time.monotonic() - start:.1f}s"
        )
        states = await cluster.fetch_all(manifest["image_id"])
        print(table(f"fetch of {version} ({manifest['image_id']}):", manifest["size"], states))
        failed = [n for n, s in states.items() if s["state"] != "done"]
        if failed:
            print(f"failed on {', '.join(failed)}")
            return 1
    print("\nevery node holds both images, verified (signature, every chunk, whole sha256)")
    return 0
