"""In-place apply time against a bare `rsync -aHAX` of the same trees, measured in one run.

A tree of N small files (default 20,000) becomes v1; v2 is v1 with 1% of the files rewritten.
Both are ext4 images. Each measurement gets a fresh copy of v1 mounted as a root inside its
own private mount namespace:

- imageswarm: `imageswarm agent apply --image v2.img` on the read-only root (verify = hash the
  image, keep it for rollback, mount, plan with --checksum, remount rw, swap with --checksum,
  merge accounts, remount ro, commit). Phase times come from the agent's own report.
- bare rsync: `rsync -aHAX` from the mounted v2 to a writable root (size+mtime comparison).
- rsync --checksum: the same with --checksum, which is what the agent's swap pays for never
  missing a same-size, same-mtime change.

    .venv/bin/python -m tests.bench.bench_apply [--files 20000] [--changed 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.agent.roots import Namespace, mount_readonly
from tests.bench.benchkit import markdown_table

AGENT = [sys.executable, "-m", "imageswarm.daemon.cli.main", "agent"]


def make_tree(root: Path, files: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(files):
        path = root / f"usr/share/bench/d{i % 200:03d}/f{i:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(512, 8192)))
        os.utime(path, (1_700_000_000, 1_700_000_000))
        paths.append(path)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return paths


def build(tree: Path, image: Path, mib: int) -> None:
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-N",
            "65536",
            "-E",
            "root_owner=0:0",
            "-d",
            str(tree),
            str(image),
            f"{mib}M",
        ],
        check=True,
    )


def measure_agent(work: Path, v1: Path, v2: Path) -> tuple[float, dict[str, float], dict[str, int]]:
    ns = Namespace()
    try:
        disk = work / "agent-disk.img"
        shutil.copyfile(v1, disk)
        root = work / "agent-root"
        ns.mount_disk(disk, root)
        env = {**os.environ, "IMAGESWARM_RUNNING_KERNEL": "none-bench"}
        common = [
            "--root",
            str(root),
            "--state-dir",
            str(work / "state"),
            "--reboot-command",
            "true",
        ]
        ns.run(*AGENT, "adopt", *common, "--image", str(v1), env=env, timeout=600)
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        out = ns.run(*AGENT, "apply", *common, "--image", str(v2), "--json", env=env, timeout=1800)
        seconds = time.perf_counter() - start
        op = json.loads(out.stdout)
        phases = {p["name"]: p["seconds"] for p in op["phases"]}
        return seconds, phases, op["plan"]
    finally:
        ns.close()


def measure_rsync(work: Path, v1: Path, v2: Path, extra: list[str]) -> tuple[float, int]:
    ns = Namespace()
    try:
        disk = work / "rsync-disk.img"
        shutil.copyfile(v1, disk)
        root, source = work / "rsync-root", work / "rsync-source"
        ns.mount_disk(disk, root, readonly=False)
        mount_readonly(ns, v2, source)
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        out = ns.run(
            "rsync", "-aHAX", *extra, "--out-format=%i %n", f"{source}/", f"{root}/", timeout=1800
        )
        seconds = time.perf_counter() - start
        touched = sum(1 for line in out.stdout.splitlines() if line[:2] in (">f", "cL", "cd"))
        return seconds, touched
    finally:
        ns.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--mib", type=int, default=384)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        paths = make_tree(tree, args.files, seed=1)
        build(tree, work / "v1.img", args.mib)
        rng = random.Random(2)
        changed = rng.sample(paths, round(len(paths) * args.changed))
        for path in changed:
            path.write_bytes(rng.randbytes(path.stat().st_size))  # same size, new mtime
        build(tree, work / "v2.img", args.mib)
        v1, v2 = work / "v1.img", work / "v2.img"
        agent_s, phases, plan = measure_agent(work, v1, v2)
        bare_s, bare_touched = measure_rsync(work, v1, v2, [])
        sum_s, sum_touched = measure_rsync(work, v1, v2, ["--checksum"])
    touched = plan["added"] + plan["changed"] + plan["removed"] + plan["attributes"]
    rows = [
        ["imageswarm agent apply", f"{agent_s:.2f}", f"{agent_s / bare_s:.2f}x", str(touched)],
        ["bare rsync -aHAX", f"{bare_s:.2f}", "1.00x", str(bare_touched)],
        ["rsync -aHAX --checksum", f"{sum_s:.2f}", f"{sum_s / bare_s:.2f}x", str(sum_touched)],
    ]
    print(f"{args.files} files, {len(changed)} changed ({args.changed:.0%}), {args.mib} MiB ext4")
    print(markdown_table(["method", "seconds", "vs bare rsync", "files touched"], rows))
    print()
    print(markdown_table(["agent phase", "seconds"], [[k, f"{v:.2f}"] for k, v in phases.items()]))
    print(f"\nfiles changed: {len(changed)}; files the agent touched: {touched}")


if __name__ == "__main__":
    main()
