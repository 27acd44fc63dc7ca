"""`imageswarm lab`: a cluster on one machine, to try imageswarm and to measure it.

`lab up` builds a controller host and N node hosts as network namespaces on a bridge
(198.18.<subnet>.0/24, links shaped with tc tbf, optional packet loss with nftables), each
node on its own read-only loop-mounted ext4 root in a mount namespace of its own, and starts
the real daemons in them; `lab down` removes all of it; `lab exec HOST -- CMD` runs a command
on one host; `lab status` shows the hosts (see imageswarm.daemon.lab).

`lab demo` publishes v2 and rolls it out (prefetch over the swarm, canary 1, batches of 2,
each node swapping its root in place), then does the same with v3 (one more file changed:
nodes fetch only the delta), showing the live `rollout watch` view and, after each rollout,
where every node's bytes came from. It runs on the network-namespace lab when it can (root,
iproute2) and otherwise on loopback addresses (127.0.0.10-13), nodes still in mount
namespaces of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imageswarm.agent import imagebuild
from imageswarm.daemon.cli.imagecmd import CONTROLLER, TOKEN
from imageswarm.daemon.cli.progress import human
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.errors import ControllerError
from imageswarm.daemon.lab import cleanup, net, state
from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.lab.hosts import Lab, LabSpec, daemon_running, exec_argv, unsupported
from imageswarm.daemon.lab.shaping import format_rate, parse_loss, parse_rate
from imageswarm.daemon.localcluster import LocalCluster, make_tree

SOURCES = ("local", "controller", "peers", "web_seed", "unattributed")
LAB_DIR = Path(".lab/lab")


def register(groups: Any) -> None:
    parser = groups.add_parser("lab", help="a cluster of network namespaces on this machine")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    up = sub.add_parser("up", help="build the lab and start its daemons (root)")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--rate", default="200mbit", help="each host's link, each way (tc units)")
    up.add_argument("--loss", default="0%", help="packets each host drops on arrival")
    up.add_argument("--image-mib", type=int, default=64, help="size of the nodes' v1 root")
    _where(up)
    up.set_defaults(func=up_cmd)

    down = sub.add_parser("down", help="remove the lab: processes, namespaces, links, mounts")
    _where(down)
    down.add_argument("--all", action="store_true", help="every isw<n>-* object of any lab")
    down.set_defaults(func=down_cmd)

    run = sub.add_parser("exec", help="run a command on one host: lab exec node1 -- CMD")
    run.add_argument("host", help="controller, node1, node2, ...")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD", help="after --")
    run.add_argument("--workdir", type=Path, default=LAB_DIR)
    run.set_defaults(func=exec_cmd)

    status = sub.add_parser("status", help="the lab's hosts and their state")
    status.add_argument("--workdir", type=Path, default=LAB_DIR)
    status.set_defaults(func=status_cmd)

    demo = sub.add_parser("demo", help="staged rollouts on the lab (or on loopback)")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--workdir", type=Path, default=Path(".lab/demo"))
    demo.add_argument("--image-mib", type=int, default=64)
    demo.add_argument(
        "--rate", type=float, default=16.0, help="each host's link (or upload limit), MiB/s"
    )
    demo.add_argument("--subnet", type=int, default=0, help="198.18.<subnet>.0/24")
    demo.add_argument("--loopback", action="store_true", help="skip the lab even as root")
    demo.set_defaults(func=demo_cmd)


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=LAB_DIR, help=f"default {LAB_DIR}")
    parser.add_argument("--subnet", type=int, default=0, help="198.18.<subnet>.0/24 (0-255)")


# --- lab up / down / exec / status ---------------------------------------------------------


def up_cmd(args: argparse.Namespace) -> int:
    spec = LabSpec(
        workdir=args.workdir,
        nodes=args.nodes,
        subnet=args.subnet,
        rate=parse_rate(args.rate),
        loss=parse_loss(args.loss),
        image_mib=args.image_mib,
    )
    if reason := unsupported(spec):
        raise LabError(reason)
    lab = Lab(spec)
    start = time.monotonic()
    print(
        f"lab up: controller and {spec.nodes} nodes on {lab.plan.cidr}, links "
        f"{format_rate(spec.rate)}, loss {spec.loss:g}%, {spec.image_mib} MiB roots"
    )
    asyncio.run(lab.up())
    assert lab.state is not None
    print(f"up in {time.monotonic() - start:.1f}s\n")
    print(describe(lab.state))
    url, work = lab.plan.controller_url, lab.workdir
    print(
        f"\ncontroller  {url}\ndashboard   {url}/\ntoken       {lab.state.token}\n"
        f"\nfrom this machine (it is {lab.plan.gateway} on {lab.plan.bridge}):\n"
        f"  export {CONTROLLER}={url} {TOKEN}={lab.state.token}\n"
        "  imageswarm nodes list\n"
        "  imageswarm image publish IMAGE.img --name v2\n"
        "  imageswarm rollout start IMAGE_ID --canary 1 --batch 2 --watch\n"
        f"  imageswarm lab exec node1 --workdir {work} -- \\\n"
        "      sh -c 'cat $IMAGESWARM_LAB_ROOT/etc/image_id'   # a node's own root\n"
        f"  imageswarm lab down --workdir {work}\n"
        f"nodes' v1 root: {work / 'v1.img'} (from {work / 'tree'}); logs: {work}/*/daemon.log"
    )
    return 0


def down_cmd(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise LabError("lab down needs root: it removes network namespaces, links and mounts")
    removed = cleanup.down(args.workdir, args.subnet, every_lab=args.all)
    print(f"lab down: removed {removed.summary()}")
    return 0


def exec_cmd(args: argparse.Namespace) -> int:
    # argparse leaves everything after HOST here, `--workdir DIR` included when it is given
    # there (`lab exec node1 --workdir DIR -- CMD`); the command is what follows `--`.
    rest: list[str] = list(args.argv)
    workdir: Path = args.workdir
    while rest and rest[0] != "--":
        if rest[0] == "--workdir" and len(rest) > 1:
            workdir, rest = Path(rest[1]), rest[2:]
        elif rest[0].startswith("--workdir="):
            workdir, rest = Path(rest[0].partition("=")[2]), rest[1:]
        else:
            break
    argv = rest[1:] if rest[:1] == ["--"] else rest
    recorded = _recorded(workdir)
    full = exec_argv(recorded, args.host, argv)
    env = dict(os.environ)
    h = recorded.host(args.host)
    if h.root:
        env["IMAGESWARM_LAB_ROOT"] = h.root
    sys.stdout.flush()
    os.execvpe(full[0], full, env)


def status_cmd(args: argparse.Namespace) -> int:
    recorded = _recorded(args.workdir)
    print(describe(recorded, asyncio.run(_online(recorded))))
    return 0


def _recorded(workdir: Path) -> state.LabState:
    recorded = state.load(workdir.resolve())
    if recorded is None:
        raise LabError(f"no lab recorded in {workdir} (imageswarm lab up --workdir {workdir})")
    return recorded


async def _online(recorded: state.LabState) -> dict[str, dict[str, Any]]:
    try:
        async with ApiClient(recorded.plan.controller_url, token=recorded.token, timeout=3) as api:
            nodes: list[dict[str, Any]] = (await api.get_json("/api/v1/nodes"))["nodes"]
    except ControllerError:
        return {}
    return {str(n["name"]): n for n in nodes}


def describe(recorded: state.LabState, nodes: dict[str, dict[str, Any]] | None = None) -> str:
    plan = recorded.plan
    lines = [
        f"lab {recorded.phase} in {recorded.workdir}: {plan.cidr} on bridge {plan.bridge} "
        f"(this machine {plan.gateway}), links {format_rate(recorded.rate)}, "
        f"loss {recorded.loss:g}%",
        f"{'host':<11} {'address':<15} {'netns':<12} {'daemon':<12}"
        + (f" {'online':<7} image" if nodes is not None else ""),
    ]
    for h in recorded.hosts:
        there = net.netns_id(h.netns) is not None
        alive = daemon_running(h)
        row = (
            f"{h.name:<11} {h.ip:<15} {h.netns if there else '(gone)':<12} "
            f"{f'pid {h.pid}' if alive else 'not running':<12}"
        )
        if nodes is not None and h.role == "node":
            node = nodes.get(h.name, {})
            row += f" {'yes' if node.get('online') else 'no':<7} {node.get('current_image') or '-'}"
        lines.append(row)
    return "\n".join(lines)


# --- lab demo ------------------------------------------------------------------------------


def table(image_id: str, size: int, nodes: list[dict[str, Any]]) -> str:
    lines = [
        f"{'node':<7} {'image':<17} {'torrent':<7} {'fetch s':>7} {'apply s':>7} "
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
            f"{fetch.get('torrent') or '-':<7} {fetch.get('duration', 0):>7.1f} {apply_s:>7.1f} "
            + " ".join(f"{human(src.get(c, 0)):>11}" for c in SOURCES)
            + f" {wire / max(size, 1):>10.1%}"
        )
    return "\n".join(lines)


def _images(work: Path, mib: int) -> list[Path]:
    tree = work / "tree"
    make_tree(tree, files=300, seed=1)
    images: list[Path] = []
    for version, changed in (("v1", None), ("v2", "usr/lib/big0.so"), ("v3", "usr/lib/big1.so")):
        if changed:
            path = tree / changed
            path.write_bytes(bytes(reversed(path.read_bytes())))
        # Each version is built on the one before, as an image pipeline would
        # (`imageswarm image build --base`): unchanged files keep their blocks.
        base = images[-1] if images else None
        imagebuild.build_ext4(tree, work / f"{version}.img", mib, base=base)
        images.append(work / f"{version}.img")
    return images


def demo_cmd(args: argparse.Namespace) -> int:
    work: Path = args.workdir.resolve()
    bits = round(args.rate * 8 * 1.048576) * 10**6  # MiB/s as whole Mbit/s: 16 -> 134mbit
    spec = LabSpec(work / "lab", args.nodes, args.subnet, rate=bits, image_mib=args.image_mib)
    why_not = "--loopback" if args.loopback else unsupported(spec)
    if why_not and os.geteuid() != 0:
        print(
            "lab demo needs root: each node gets a private mount namespace and a loop-mounted root"
            " (and the network-namespace lab needs root too)"
        )
        return 1
    if why_not is None and state.load(spec.workdir) is not None:
        cleanup.down(spec.workdir)  # what an interrupted demo left
    if work.exists():
        shutil.rmtree(work)
    (work / "images").mkdir(parents=True)
    print(
        f"building {args.image_mib} MiB ext4 images: v1, v2 (one 1 MiB file changed), v3 (one more)"
    )
    v1, v2, v3 = _images(work / "images", args.image_mib)
    if why_not is None:
        return asyncio.run(_lab_demo(Lab(dataclasses.replace(spec, root_image=v1)), [v2, v3]))
    print(f"not using the network-namespace lab ({why_not}): daemons on loopback addresses")
    cluster = LocalCluster(
        work, nodes=args.nodes, upload_rate_limit=int(args.rate * 1024 * 1024), root_image=v1
    )
    cluster.write_configs()
    cluster.start()
    try:
        return asyncio.run(_demo(cluster, [v2, v3]))
    finally:
        cluster.stop()


async def _lab_demo(lab: Lab, images: list[Path]) -> int:
    print(
        f"lab: a controller and {lab.plan.nodes} node hosts as network namespaces on bridge "
        f"{lab.plan.bridge} ({lab.plan.cidr}); links {format_rate(lab.spec.rate)} (tc tbf)"
    )
    cluster = await lab.up()
    try:
        return await _demo(cluster, images)
    finally:
        removed = await asyncio.to_thread(lab.down)
        print(f"lab down: removed {removed.summary()}")


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
                f"--token={cluster.api_token}",  # "=": a token may start with "-"
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
