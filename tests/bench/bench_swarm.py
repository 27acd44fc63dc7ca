"""Swarm against central HTTP on the network-namespace lab, and against the P2P bound.

For each N, in a fresh lab (`imageswarm.daemon.lab`: a controller host and N node hosts as
network namespaces on a bridge, every link shaped with tc tbf at --rate each way), every node
fetches the same image of F MiB, all at once, by one method:

- **swarm**: the nodes' REST API (`POST /api/v1/images/{id}/fetch`), timed until the slowest
  node's fetch is "done" (image on disk, hashed, cut into its store). Every node's state is
  sampled every --sample seconds, which gives when its download finished ("verifying") and
  its bytes by source over time.
- **http**: an aiohttp static server on the controller host (`lab exec controller`, no TLS, no
  swarm); every node host downloads the file at once, writes it to disk and sha256s it while
  streaming; timed until the slowest node holds a verified copy.

The image is ext4 filled almost to the brim with random files, so nearly no piece is a hole;
F in the bound is the bytes that must move (the image torrent's pieces outside holes), stated
in the table. Bound: T_min = max(F/u_s, F/d_min, N*F/(u_s + sum u_i)) with every rate = --rate.
Controller bytes sent are read from the tbf qdisc on the controller host's own link, CPU busy %
from /proc/stat (the whole machine). Methods alternate between N so background load falls on
both alike.

    .venv/bin/python -m tests.bench.bench_swarm   # --nodes 4 8 16 --mib 256 --rate 50mbit

50mbit by default: at 100mbit, 16 nodes kept this 2-core machine 100% busy and the slowest
download took 1.84x the bound (1.28x at 50mbit), so the CPU, not the swarm, was measured.
Needs root. Labs live on 198.18.<subnet>.0/24 (default 210); workdir on tmpfs by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from imageswarm.daemon.lab import net
from imageswarm.daemon.lab.hosts import Lab, LabSpec, exec_argv
from imageswarm.daemon.lab.shaping import format_rate, parse_rate
from imageswarm.daemon.localcluster import build_ext4, make_tree
from imageswarm.daemon.swarm.torrent import wanted_bytes
from tests.bench.benchkit import MIB, load_average, machine_line, markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLI = [sys.executable, "-m", "imageswarm.daemon.cli.main"]
HTTP_PORT = 7790
ROOT_MIB = 16  # the nodes' own roots: small, so a lab comes up fast

_SERVER = """
import sys
from aiohttp import web
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def image(request):
    return web.FileResponse(path)
app = web.Application()
app.router.add_get("/image", image)
web.run_app(app, host=host, port=port, access_log=None, print=lambda *a: print("ready", flush=True))
"""

_CLIENT = """
import hashlib, json, os, sys, time, urllib.request
url, out = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()
start, digest, got = time.time(), hashlib.sha256(), 0
with urllib.request.urlopen(url) as r, open(out, "wb") as f:
    while block := r.read(1 << 20):
        digest.update(block)
        f.write(block)
        got += len(block)
    f.flush()
    os.fsync(f.fileno())
cpu = sum(os.times()[:2])
print(json.dumps({"start": start, "done": time.time(), "bytes": got,
                  "sha256": digest.hexdigest(), "cpu": cpu}), flush=True)
os.unlink(out)
"""


@dataclass
class Image:
    path: Path
    size: int
    sha256: str
    needed: int  # bytes of the image torrent's pieces that are not wholly holes
    image_id: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeResult:
    name: str
    downloaded_s: float  # from the start to "download finished" (first sample past it)
    done_s: float  # to a verified image
    by_source: dict[str, int] = field(default_factory=dict)


@dataclass
class Run:
    method: str
    nodes: int
    seconds: float  # the slowest node
    controller_sent: int
    cpu_busy: float  # the whole machine, % of all cores
    lab_cpu: float  # the lab's own processes (daemons, or HTTP server and clients), same unit
    load: tuple[float, float]
    per_node: list[NodeResult]
    #: node -> [(seconds, controller, peers, web_seed, state)], swarm only
    timeline: dict[str, list[tuple[float, int, int, int, str]]] = field(default_factory=dict)
    label: str = ""


# --- measuring -----------------------------------------------------------------------------


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine; busy excludes idle and iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # guest time is already in user
    return total - fields[3] - fields[4], total


def lab_cpu_seconds(lab: Lab) -> float:
    """CPU seconds used so far by every process in the lab's network namespaces."""
    ids = {i for h in lab.plan.hosts if (i := net.netns_id(h.netns))}
    ticks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in ids:
                    fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                    ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return 100.0 * busy / total if total else 0.0


def sent_bytes(netns: str) -> int:
    """Bytes a host sent through the tbf qdisc on its own link (headers included)."""
    out = net.run(["tc", "-n", netns, "-s", "qdisc", "show", "dev", "eth0"]).stdout
    match = re.search(r"Sent (\d+) bytes", out)
    if not match:
        raise RuntimeError(f"no qdisc counters on {netns}: {out}")
    return int(match[1])


def t_min(needed: int, rate_bits: int, nodes: int) -> float:
    """max(F/u_s, F/d_min, N*F/(u_s + sum u_i)) with every link at `rate_bits` each way."""
    f, r = needed * 8, rate_bits
    return max(f / r, f / r, nodes * f / (r + nodes * r))


# --- the image -----------------------------------------------------------------------------


def build_full_image(workdir: Path, mib: int) -> Path:
    """An ext4 of `mib` MiB filled with 1 MiB random files to within ~2 MiB of full: no
    journal, few inodes, no reserved blocks, so almost no block is left as zeros."""
    tree, image = workdir / "full-tree", workdir / "image.raw"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "data").mkdir(parents=True)
    rng = os.urandom
    for i in range(mib - 3):
        (tree / "data" / f"f{i:05d}.bin").write_bytes(rng(MIB - 4096))
    mkfs = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "1024", "-m", "0"]
    mkfs += ["-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0"]
    subprocess.run([*mkfs, "-d", str(tree), str(image), f"{mib}M"], check=True, capture_output=True)
    shutil.rmtree(tree)
    return image


def needed_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of the image torrent's pieces that are not wholly holes: what must move."""
    chunks = [(c["hash"], c["length"]) for c in manifest["chunks"]]
    return wanted_bytes(chunks, int(manifest["size"]))


def describe_image(image: Image) -> str:
    holes = image.size - image.needed
    return (
        f"image: {image.size / MIB:.0f} MiB ext4 full of random files, sha256 "
        f"{image.sha256[:12]}; F = {image.needed / MIB:.1f} MiB must move (pieces wholly in "
        f"holes: {holes / MIB:.1f} MiB, never requested)"
    )


# --- one lab -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lab_up(spec: LabSpec) -> AsyncIterator[Lab]:
    lab = Lab(spec)
    try:
        await lab.up()
        yield lab
    finally:
        await asyncio.to_thread(lab.down)


def publish(lab: Lab, image: Image) -> None:
    """Publish on the controller host itself (loopback: the upload crosses no shaped link)."""
    assert lab.state is not None
    url = lab.plan.controller_url
    argv = [*CLI, "image", "publish", str(image.path), "--name", "bench", "--json"]
    argv += ["--controller", url, "--token", lab.state.token]
    out = subprocess.run(
        exec_argv(lab.state, "controller", argv), capture_output=True, text=True, check=True
    ).stdout
    image.manifest = json.loads(out)
    image.image_id = image.manifest["image_id"]


async def run_swarm(lab: Lab, image: Image, sample: float, limit_s: float) -> Run:
    assert lab.cluster is not None and lab.state is not None
    publish(lab, image)
    image_id = image.image_id
    nodes = lab.cluster.node_daemons
    ctl = lab.plan.controller.netns
    timeline: dict[str, list[tuple[float, int, int, int, str]]] = {d.name: [] for d in nodes}
    downloaded: dict[str, float] = {}
    final: dict[str, dict[str, Any]] = {}
    load0, sent0, cpu0 = load_average(), sent_bytes(ctl), cpu_ticks()
    own0 = lab_cpu_seconds(lab)
    t0 = time.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def post(url: str) -> None:
            async with http.post(f"{url}/api/v1/images/{image_id}/fetch") as resp:
                resp.raise_for_status()

        async def poll(name: str, url: str) -> None:
            async with http.get(f"{url}/api/v1/images/{image_id}") as resp:
                st = await resp.json()
            now = time.time() - t0
            src = st.get("bytes_by_source") or {}
            timeline[name].append(
                (now, src.get("controller", 0), src.get("peers", 0), src.get("web_seed", 0),
                 st["state"])
            )  # fmt: skip
            if st["state"] in ("verifying", "done"):
                downloaded.setdefault(name, now)
            if st["state"] == "failed":
                raise RuntimeError(f"{name}: fetch failed: {st.get('error')}")
            if st["state"] == "done":
                final[name] = st

        await asyncio.gather(*(post(d.url) for d in nodes))
        async with asyncio.timeout(limit_s):
            while len(final) < len(nodes):
                tick = asyncio.ensure_future(asyncio.sleep(sample))
                await asyncio.gather(*(poll(d.name, d.url) for d in nodes if d.name not in final))
                await tick
    cpu = busy_percent(cpu0, cpu_ticks())
    wall = time.time() - t0
    own = 100 * (lab_cpu_seconds(lab) - own0) / wall / (os.cpu_count() or 1)
    sent = sent_bytes(ctl) - sent0
    per_node = [
        NodeResult(
            d.name,
            min(downloaded[d.name], final[d.name]["finished"] - t0),
            final[d.name]["finished"] - t0,
            dict(final[d.name]["bytes_by_source"]),
        )
        for d in nodes
    ]
    slowest = max(n.done_s for n in per_node)
    load = (load0, load_average())
    return Run("swarm", len(nodes), slowest, sent, cpu, own, load, per_node, timeline)


def run_http(lab: Lab, image: Image, limit_s: float) -> Run:
    """Blocking (run it in a thread): processes on the hosts, timed by the clients."""
    assert lab.cluster is not None and lab.state is not None
    st = lab.state
    ctl = lab.plan.controller
    server_argv = [sys.executable, "-c", _SERVER, str(image.path), ctl.ip, str(HTTP_PORT)]
    server = subprocess.Popen(
        exec_argv(st, "controller", server_argv), stdout=subprocess.PIPE, text=True
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the HTTP server did not start")
        url = f"http://{ctl.ip}:{HTTP_PORT}/image"
        for d in lab.cluster.node_daemons:
            out = d.workdir / "http-download.img"
            argv = exec_argv(st, d.name, [sys.executable, "-c", _CLIENT, url, str(out)])
            clients.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for c in clients:
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("an HTTP client did not start")
        load0, sent0, cpu0 = load_average(), sent_bytes(ctl.netns), cpu_ticks()
        own0 = lab_cpu_seconds(lab)
        t0 = time.time()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        deadline = time.monotonic() + limit_s
        outs = [c.communicate(timeout=max(1.0, deadline - time.monotonic())) for c in clients]
        cpu = busy_percent(cpu0, cpu_ticks())
        wall = time.time() - t0
        own_s = lab_cpu_seconds(lab) - own0  # daemons and the server; clients report theirs
        sent = sent_bytes(ctl.netns) - sent0
    finally:
        for p in [*clients, server]:
            if p.poll() is None:
                p.kill()
            p.wait()
    per_node = []
    for d, (stdout, _) in zip(lab.cluster.node_daemons, outs, strict=True):
        got = json.loads(stdout.strip().splitlines()[-1])
        if got["sha256"] != image.sha256 or got["bytes"] != image.size:
            raise RuntimeError(f"{d.name}: HTTP download does not match the image: {got}")
        done = got["done"] - t0
        per_node.append(NodeResult(d.name, done, done, {"controller": got["bytes"]}))
    slowest = max(n.done_s for n in per_node)
    own_s += sum(json.loads(o.strip().splitlines()[-1])["cpu"] for o, _ in outs)
    own = 100 * own_s / wall / (os.cpu_count() or 1)
    load = (load0, load_average())
    return Run("http", len(per_node), slowest, sent, cpu, own, load, per_node)


# --- the table and the plots ---------------------------------------------------------------


def summary_table(runs: Sequence[Run], image: Image, rate: int) -> str:
    by = {(r.method, r.nodes): r for r in runs}
    header = [
        "N",
        "T_min s",
        "swarm s",
        "swarm / T_min",
        "HTTP s",
        "HTTP / T_min",
        "HTTP / swarm",
        "controller sent / F (swarm)",
        "controller sent / F (HTTP)",
        "slowest download s (swarm)",
        "verify s, median (max)",
        "CPU busy % (lab's own) swarm / HTTP",
        "load swarm / HTTP",
    ]
    rows = []
    for n in sorted({r.nodes for r in runs}):
        s, h = by.get(("swarm", n)), by.get(("http", n))
        bound = t_min(image.needed, rate, n)
        row = [str(n), f"{bound:.1f}"]
        row += [f"{s.seconds:.1f}", f"**{s.seconds / bound:.2f}x**"] if s else ["-", "-"]
        row += [f"{h.seconds:.1f}", f"{h.seconds / bound:.2f}x"] if h else ["-", "-"]
        row += [f"**{h.seconds / s.seconds:.1f}x**" if s and h else "-"]
        row += [f"{s.controller_sent / image.needed:.2f}" if s else "-"]
        row += [f"{h.controller_sent / image.needed:.2f}" if h else "-"]
        if s:
            verify = sorted(x.done_s - x.downloaded_s for x in s.per_node)
            row += [f"{max(x.downloaded_s for x in s.per_node):.1f}"]
            row += [f"{verify[len(verify) // 2]:.1f} ({verify[-1]:.1f})"]
        else:
            row += ["-", "-"]
        row += [" / ".join(f"{r.cpu_busy:.0f} ({r.lab_cpu:.0f})" for r in (s, h) if r)]
        row += [" / ".join(f"{r.load[0]:.1f}->{r.load[1]:.1f}" for r in (s, h) if r is not None)]
        rows.append(row)
    return markdown_table(header, rows)


def sources_table(runs: Sequence[Run], image: Image) -> str:
    """Where the swarm's bytes came from, summed over the nodes, per N."""
    header = ["N", "label", "from controller / F", "from peers / F", "from web seed / F"]
    rows = []
    for r in runs:
        if r.method != "swarm":
            continue
        total = {k: sum(x.by_source.get(k, 0) for x in r.per_node) for k in ("controller",
                 "peers", "web_seed")}  # fmt: skip
        rows.append(
            [str(r.nodes), r.label or "-"]
            + [f"{total[k] / image.needed:.2f}" for k in ("controller", "peers", "web_seed")]
        )
    return markdown_table(header, rows)


def plot(runs: Sequence[Run], image: Image, rate: int, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    ns = sorted({r.nodes for r in runs})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in (("swarm", "o-"), ("http", "s--")):
        pts = sorted((r.nodes, r.seconds) for r in runs if r.method == method)
        if pts:
            label = "imageswarm (verified)" if method == "swarm" else "central HTTP (sha256)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.plot(ns, [t_min(image.needed, rate, n) for n in ns], "k:", label="bound T_min")
    ax.set_xlabel("nodes N")
    ax.set_ylabel("seconds until the slowest node holds the image")
    ax.set_xticks(ns)
    ax.set_yscale("log")
    ax.set_title(f"{image.needed / MIB:.0f} MiB image, every link {format_rate(rate)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "swarm_vs_http.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    swarm = [r for r in runs if r.method == "swarm"]
    if swarm:
        r = max(swarm, key=lambda x: x.nodes)
        names = sorted(r.timeline, key=lambda s: int(s.removeprefix("node")))
        cols = 4
        rows_n = -(-len(names) // cols)
        fig, axes = plt.subplots(
            rows_n, cols, figsize=(12, 2.3 * rows_n), sharex=True, sharey=True, squeeze=False
        )
        ends = {x.name: x for x in r.per_node}
        for ax, name in zip(axes.flat, names, strict=False):
            samples = r.timeline[name]
            t = [s[0] for s in samples]
            ax.plot(t, [s[1] / MIB for s in samples], color="tab:red", label="controller")
            ax.plot(t, [s[2] / MIB for s in samples], color="tab:blue", label="peers")
            ax.plot(t, [s[3] / MIB for s in samples], color="tab:green", label="web seed")
            ax.axvline(ends[name].downloaded_s, color="gray", ls="--", lw=0.8)
            ax.axvline(ends[name].done_s, color="black", ls="-", lw=0.8)
            ax.set_title(name, fontsize=9)
            ax.grid(True, alpha=0.3)
        for ax in axes.flat[len(names) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="upper left")
        fig.supxlabel("seconds since every node was asked to fetch")
        fig.supylabel("MiB received")
        fig.suptitle(
            f"N={r.nodes}: bytes by source per node (dashed: download finished, solid: verified)"
        )
        fig.tight_layout()
        paths.append(out / "swarm_timeline.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--mib", type=int, default=256, help="image size F (default 256)")
    parser.add_argument("--rate", default="50mbit", help="every link, each way (tc units)")
    parser.add_argument(
        "--methods", nargs="+", choices=["swarm", "http"], default=["swarm", "http"]
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sample", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--subnet", type=int, default=210, help="198.18.<subnet>.0/24")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/dev/shm/imageswarm-bench-swarm"), help="(tmpfs)"
    )
    parser.add_argument(
        "--swarm-config",
        type=json.loads,
        default={},
        help="JSON merged into every daemon's `swarm:` config, e.g. '{\"settings\": {...}}'",
    )
    parser.add_argument("--label", default="", help="names this configuration in the output")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs/bench", help="PNG folder")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    rate = parse_rate(args.rate)
    work: Path = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    load_start = load_average()
    t_start = time.monotonic()
    path = await asyncio.to_thread(build_full_image, work, args.mib)
    sha = await asyncio.to_thread(lambda: subprocess.check_output(["sha256sum", str(path)]))
    root_tree, root = work / "root-tree", work / "root.img"
    make_tree(root_tree, files=40, seed=1)
    build_ext4(root_tree, root, ROOT_MIB)
    image = Image(path, path.stat().st_size, sha.split()[0].decode(), 0)
    runs: list[Run] = []
    step = 0
    for _ in range(args.rounds):
        for n in args.nodes:
            order = list(args.methods) if step % 2 == 0 else list(reversed(args.methods))
            step += 1
            for method in order:
                spec = LabSpec(
                    work / "lab", n, args.subnet, rate=rate, image_mib=ROOT_MIB,
                    root_image=root, swarm=args.swarm_config,
                )  # fmt: skip
                bound = t_min(image.size, rate, n)
                async with lab_up(spec) as lab:
                    if method == "swarm":
                        run = await run_swarm(lab, image, args.sample, 30 * bound + 120)
                    else:
                        run = await asyncio.to_thread(run_http, lab, image, 3 * n * bound + 120)
                if method == "swarm" and not image.needed:
                    image.needed = needed_bytes(image.manifest)
                run.label = args.label
                runs.append(run)
                print(
                    f"N={n} {method}: {run.seconds:.1f}s, controller sent "
                    f"{run.controller_sent / MIB:.0f} MiB, CPU {run.cpu_busy:.0f}% (lab "
                    f"{run.lab_cpu:.0f}%), load "
                    f"{run.load[0]:.1f}->{run.load[1]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    if not image.needed:  # no swarm run: count the holes from a scan of the image
        image.needed = image.size
    print(
        f"\n{describe_image(image)}; links {format_rate(rate)} (tc tbf, every host, both ways)"
        f"{'; swarm config ' + json.dumps(args.swarm_config) if args.swarm_config else ''}; "
        f"workdir on {work}; {machine_line(load_start)}; "
        f"{time.monotonic() - t_start:.0f} s in all\n"
    )
    print(summary_table(runs, image, rate))
    if any(r.method == "swarm" for r in runs):
        print()
        print(sources_table(runs, image))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rate": rate,
                    "image": {"size": image.size, "needed": image.needed, "id": image.image_id},
                    "swarm_config": args.swarm_config,
                    "runs": [asdict(r) for r in runs],
                }
            )
        )
    if not args.no_plots and runs:
        for p in plot(runs, image, rate, args.plots):
            print(f"\nplot: {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_swarm needs root: it builds a network-namespace lab (imageswarm lab up)")
        return 1
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
