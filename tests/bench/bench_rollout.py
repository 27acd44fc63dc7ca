"""End-to-end rollout on the network-namespace lab: publish to all-applied, against its bound.

A fresh lab of N node hosts (default 8), every link shaped with tc tbf at --rate each way, every
node on its own read-only ext4 root of --mib MiB (v1: a make_tree tree filling about 45% of it).
v2 is the same tree with --change-mib MiB of files rewritten with new random content, built
the same way (`mkfs.ext4 -d`). Timed on the operator's clock: from the start of `imageswarm
image publish v2.img` (run on the controller host) through `rollout start` (prefetch on, one
batch of every node by default: --canary 0 --batch 100%) to the rollout's "done", every node
applied (its root swapped in place by its agent).

Compared with the ideal: the distribution bound for the bytes each node must receive
(D = the image's unique chunk bytes minus those the node already held, from its own fetch
state; T_dist = max(D/u_s, D/d_min, N*D/(u_s + sum u_i))), plus the apply time of one node
(median of the nodes' own agent phase durations in this run), plus the publish time.

    .venv/bin/python -m tests.bench.bench_rollout  # --nodes 8 --mib 128 --change-mib 16
                                                   # --rate 50mbit

Needs root. Lab on 198.18.<subnet>.0/24 (default 220), workdir on tmpfs by default.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.lab.hosts import Lab, LabSpec, exec_argv
from imageswarm.daemon.lab.shaping import format_rate, parse_rate
from imageswarm.daemon.localcluster import build_ext4, make_tree
from tests.bench.bench_swarm import CLI, lab_up, sent_bytes, t_min
from tests.bench.benchkit import MIB, load_average, machine_line, markdown_table


def change_tree(tree: Path, mib: int, seed: int = 2) -> int:
    """Rewrite files of `tree` with new random content (same sizes) until `mib` MiB are new."""
    rng = random.Random(seed)
    files = sorted(tree.rglob("*.bin"))
    rng.shuffle(files)
    changed = 0
    for path in files:
        if changed >= mib * MIB:
            break
        size = path.stat().st_size
        path.write_bytes(rng.randbytes(size))
        changed += size
    return changed


def on_controller(lab: Lab, *args: str) -> str:
    """Run the CLI on the controller host (loopback to its API: no shaped link crossed)."""
    assert lab.state is not None
    argv = [*CLI, *args, "--controller", lab.plan.controller_url, "--token", lab.state.token]
    proc = subprocess.run(
        exec_argv(lab.state, "controller", argv), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


async def rollout(lab: Lab, v2: Path, strategy: list[str], limit_s: float) -> dict[str, Any]:
    assert lab.state is not None
    ctl = lab.plan.controller.netns
    load0, sent0 = load_average(), sent_bytes(ctl)
    t0 = time.monotonic()
    out = await asyncio.to_thread(on_controller, lab, "image", "publish", str(v2), "--name", "v2",
                                  "--json")  # fmt: skip
    manifest = json.loads(out)
    image_id = manifest["image_id"]
    published = time.monotonic() - t0
    start = ["rollout", "start", image_id, *strategy, "--reboot", "never", "--json"]
    started = json.loads(await asyncio.to_thread(on_controller, lab, *start))
    rollout_id = started.get("id") or started["rollout"]["id"]
    async with (
        ApiClient(lab.plan.controller_url, token=lab.state.token) as api,
        asyncio.timeout(limit_s),
    ):
        while True:
            r = await api.get_json(f"/api/v1/rollouts/{rollout_id}")
            if r["state"] in ("done", "failed", "halted", "aborted"):
                break
            await asyncio.sleep(0.2)
        total = time.monotonic() - t0
        nodes: list[dict[str, Any]] = (await api.get_json("/api/v1/nodes"))["nodes"]
    if r["state"] != "done":
        raise RuntimeError(f"rollout ended {r['state']}: {r}")
    return {
        "manifest": manifest,
        "publish_s": published,
        "total_s": total,
        "nodes": nodes,
        "rollout": r,
        "controller_sent": sent_bytes(ctl) - sent0,
        "load": (load0, load_average()),
    }


def report(result: dict[str, Any], rate: int, args: argparse.Namespace) -> str:
    image_id = result["manifest"]["image_id"]
    size = int(result["manifest"]["size"])
    rows_fetch, applies, needs = [], [], []
    for node in sorted(result["nodes"], key=lambda n: int(str(n["name"]).removeprefix("node"))):
        fetch = node["fetches"][image_id]
        src = fetch["bytes_by_source"]
        need = int(fetch["total_bytes"]) - int(src.get("local", 0))
        last = (node.get("agent") or {}).get("last") or {}
        apply_s = sum(float(p.get("seconds", 0)) for p in last.get("phases", []))
        needs.append(need)
        applies.append(apply_s)
        wire = sum(int(src.get(k, 0)) for k in ("controller", "peers", "web_seed", "unattributed"))
        rows_fetch.append((node["name"], fetch["torrent"], fetch["duration"], apply_s, need, wire))
    need = max(needs)
    dist = t_min(need, rate, len(needs))
    apply_one = sorted(applies)[len(applies) // 2]
    ideal = dist + apply_one
    total, publish_s = result["total_s"], result["publish_s"]
    header = [
        "N",
        "image MiB",
        "D: new MiB per node",
        "publish s",
        "publish to all applied s",
        "T_dist(D) s",
        "apply s (median node)",
        "ratio to T_dist + apply",
        "ratio to publish + T_dist + apply",
        "controller sent / D",
    ]
    row = [
        str(len(needs)),
        f"{size / MIB:.0f}",
        f"{need / MIB:.1f}",
        f"{publish_s:.1f}",
        f"{total:.1f}",
        f"{dist:.1f}",
        f"{apply_one:.1f}",
        f"**{total / ideal:.2f}x**",
        f"{total / (ideal + publish_s):.2f}x",
        f"{result['controller_sent'] / need:.2f}",
    ]
    r = result["rollout"]
    stamp = [_seconds(str(t[k])) for t in r["nodes"] for k in ("started", "finished")]
    created, starts, ends = _seconds(r["created"]), stamp[0::2], stamp[1::2]
    slowest_fetch = max(f[2] for f in rows_fetch)
    phases = (
        f"rollout created -> first node applying: {min(starts) - created:.0f} s (slowest "
        f"fetch {slowest_fetch:.1f} s; the rest is instructions and reports riding the 1 s "
        f"heartbeats); first applying -> last applied: {max(ends) - min(starts):.0f} s "
        "(controller timestamps, whole seconds)"
    )
    lines = [markdown_table(header, [row]), "", phases, ""]
    detail = [
        [name, torrent, f"{fetch_s:.1f}", f"{apply_s:.1f}", f"{n / MIB:.1f}", f"{w / MIB:.1f}"]
        for name, torrent, fetch_s, apply_s, n, w in rows_fetch
    ]
    lines.append(
        markdown_table(
            ["node", "torrent", "fetch s", "apply s", "needed MiB", "received MiB"], detail
        )
    )
    load = result["load"]
    head = (
        f"N={len(needs)}, links {format_rate(rate)}; v1 {args.mib} MiB ext4 root, v2 = same tree "
        f"with {args.change_mib} MiB of files rewritten; strategy {' '.join(args.strategy)}, "
        f"prefetch on, reboot never; load {load[0]:.1f}->{load[1]:.1f} over the rollout"
    )
    return head + "\n\n" + "\n".join(lines)


def _seconds(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--mib", type=int, default=128, help="size of v1 and v2")
    parser.add_argument("--change-mib", type=int, default=16, help="file content new in v2")
    parser.add_argument("--rate", default="50mbit", help="every link, each way (tc units)")
    parser.add_argument("--subnet", type=int, default=220, help="198.18.<subnet>.0/24")
    parser.add_argument(
        "--strategy",
        nargs=argparse.REMAINDER,
        default=["--canary", "0", "--batch", "100%"],
        help="rollout start options (last on the line; default --canary 0 --batch 100%%)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/dev/shm/imageswarm-bench-rollout"), help="(tmpfs)"
    )
    parser.add_argument(
        "--swarm-config", type=json.loads, default={}, help="JSON merged into `swarm:` configs"
    )
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    rate = parse_rate(args.rate)
    work: Path = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    load_start = load_average()
    tree, v1, v2 = work / "tree", work / "v1.img", work / "v2.img"
    # Files fill about half of the root: the agent's swap needs room for the changed files
    # (rsync writes each new file beside the old one, and the agent keeps replaced files).
    files = round(args.mib * 1024 * 0.45 / 128.5)
    await asyncio.to_thread(make_tree, tree, files, 1)
    await asyncio.to_thread(build_ext4, tree, v1, args.mib)
    await asyncio.to_thread(change_tree, tree, args.change_mib)
    await asyncio.to_thread(build_ext4, tree, v2, args.mib)
    spec = LabSpec(
        work / "lab", args.nodes, args.subnet, rate=rate, image_mib=args.mib, root_image=v1,
        swarm=args.swarm_config,
    )  # fmt: skip
    async with lab_up(spec) as lab:
        limit = 60 + 20 * t_min(args.mib * MIB, rate, args.nodes)
        result = await rollout(lab, v2, list(args.strategy), limit)
    print(report(result, rate, args))
    print(f"\n{machine_line(load_start)}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_rollout needs root: it builds a network-namespace lab (imageswarm lab up)")
        return 1
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
