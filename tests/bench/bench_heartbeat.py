"""Heartbeats against one controller: latency and CPU at fleet sizes of 1,000 to 10,000 nodes.

For each fleet size N: a fresh controller process (`imageswarm daemon --config ...`, role
controller, a temporary cache dir, on 127.0.0.90) and a load generator in a second process (one
asyncio loop, one aiohttp session with a keep-alive connection pool). The generator enrolls N
nodes (concurrently, before anything is measured), then makes each node heartbeat every 10 s
with a realistic body (a done fetch with bytes by source, an agent.last with phases, an action
report), the N nodes spread uniformly over the interval. After one full interval of warm-up
(every node's first heartbeat, which brings it online, is the expensive one) it measures for a
steady window: per-request latency (send to full answer read) and the CPU (utime + stime from
/proc/PID/stat) of the controller and of the generator itself, as a fraction of one core.

    .venv/bin/python -m tests.bench.bench_heartbeat [--nodes 1000 2500 5000 10000] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the repository's `tests.bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
import yaml

from tests.bench.benchkit import load_average, machine_line, markdown_table

HOST = "127.0.0.90"
TOKEN = "bench-operator"
SECRET = "bench-join"
INTERVAL = 10.0
LIMIT_MS = 50.0
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid`, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# The load generator (runs in its own process: `--generate`)


def heartbeat_body(i: int) -> dict[str, Any]:
    """A node's steady-state heartbeat: runs an image, fetched it, applied it, reports done."""
    current = f"{i:064x}"
    previous = f"{i + 1:064x}"
    phases = [
        {"name": name, "seconds": seconds, "ok": True}
        for name, seconds in (("prepare", 2.4), ("swap", 0.6), ("commit", 0.02), ("hooks", 0.0))
    ]
    return {
        "current_image": current,
        "previous_image": previous,
        "kernel": "6.1.0-28-amd64",
        "agent": {
            "pending": None,
            "last": {
                "kind": "apply",
                "image_id": current,
                "result": "applied",
                "error": None,
                "phases": phases,
                "services": [],
                "reboot": {"needed": False, "policy": "auto"},
            },
            "drift": {"clean": True},
        },
        "fetches": {
            current: {
                "state": "done",
                "done_bytes": 191_234_567,
                "total_bytes": 191_234_567,
                "bytes_by_source": {
                    "local": 150_000_000,
                    "controller": 1_234_567,
                    "peers": 40_000_000,
                    "web_seed": 0,
                    "unattributed": 0,
                },
                "duration": 4.2,
                "error": None,
            }
        },
        "action": {
            "id": f"r-{i % 7}:apply:{current}",
            "status": "done",
            "detail": "apply done",
            "seconds": 3.1,
        },
    }


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    base = args.url
    n = args.count
    connector = aiohttp.TCPConnector(limit=args.connections, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        tokens: list[str] = [""] * n
        sem = asyncio.Semaphore(args.connections)

        async def enroll(i: int) -> None:
            async with sem:
                body = {"name": f"node-{i:05d}", "join_secret": SECRET, "labels": {"rack": "r1"}}
                async with session.post("/api/v1/nodes/enroll", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                    tokens[i] = (await resp.json())["token"]

        t0 = time.monotonic()
        await asyncio.gather(*(enroll(i) for i in range(n)))
        enroll_seconds = time.monotonic() - t0
        bodies = [json.dumps(heartbeat_body(i)).encode() for i in range(n)]
        headers = [
            {"Authorization": f"Bearer {t}", "Content-Type": "application/json"} for t in tokens
        ]
        latencies: list[float] = []
        errors = 0
        measuring = False
        pending: set[asyncio.Task[None]] = set()

        async def beat(i: int) -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                async with session.post(
                    f"/api/v1/nodes/node-{i:05d}/heartbeat", data=bodies[i], headers=headers[i]
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if measuring:
                latencies.append(time.perf_counter() - start)
                errors += not ok

        step = INTERVAL / n
        warmup_beats = n  # one full interval: every node's first (online) heartbeat
        window_beats = round(args.window / step)
        start = time.monotonic()
        max_lag = 0.0
        cpu0 = ctl0 = t_window = 0.0
        for k in range(warmup_beats + window_beats):
            if k == warmup_beats:
                measuring = True
                t_window = time.monotonic()
                cpu0, ctl0 = time.process_time(), cpu_seconds(args.controller_pid)
            due = start + k * step
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif measuring:
                max_lag = max(max_lag, -delay)
            task = asyncio.create_task(beat(k % n))
            pending.add(task)
            task.add_done_callback(pending.discard)
        # The window ends with the last scheduled send; its requests still count once answered.
        elapsed = time.monotonic() - t_window
        cpu1, ctl1 = time.process_time(), cpu_seconds(args.controller_pid)
        measuring_tasks = list(pending)
        if measuring_tasks:
            await asyncio.wait(measuring_tasks, timeout=30)
    latencies.sort()
    return {
        "nodes": n,
        "enroll_seconds": enroll_seconds,
        "requests": len(latencies),
        "errors": errors,
        "rate": len(latencies) / elapsed,
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "max": (latencies[-1] if latencies else float("nan")) * 1000,
        "controller_cpu": (ctl1 - ctl0) / elapsed,
        "generator_cpu": (cpu1 - cpu0) / elapsed,
        "max_lag_ms": max_lag * 1000,
    }


# The driver: one controller and one generator per fleet size


@contextlib.contextmanager
def controller(workdir: Path, port: int) -> Any:
    config = {
        "role": "controller",
        "node_name": "bench-controller",
        "api_listen": f"{HOST}:{port}",
        "cache_dir": str(workdir / "cache"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "api_token": TOKEN,
        "join_secret": SECRET,
        "heartbeat_interval": INTERVAL,
        "swarm": {"listen": f"{HOST}:0"},
    }
    path = workdir / "controller.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).with_name("imageswarm")
    log = (workdir / "controller.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "daemon", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited: {(workdir / 'controller.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("controller did not start listening within 30 s")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def measure(n: int, window: float, connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-heartbeat-") as tmp:
        port = free_port(HOST)
        with controller(Path(tmp), port) as proc:
            argv = [
                sys.executable,
                "-m",
                "tests.bench.bench_heartbeat",
                "--generate",
                f"--url=http://{HOST}:{port}",
                f"--count={n}",
                f"--window={window}",
                f"--connections={connections}",
                f"--controller-pid={proc.pid}",
            ]
            root = Path(__file__).resolve().parents[2]
            out = subprocess.run(argv, cwd=root, check=True, capture_output=True, text=True)
            result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 2500, 5000, 10000])
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured per size")
    parser.add_argument("--connections", type=int, default=64, help="generator's pool size")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--controller-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        print(json.dumps(asyncio.run(generate(args))), flush=True)
        return 0
    load = load_average()
    rows, results = [], []
    for n in args.nodes:
        r = measure(n, args.window, args.connections)
        results.append(r)
        print(
            f"N={n}: enrolled in {r['enroll_seconds']:.1f} s, {r['requests']} requests, "
            f"{r['errors']} errors, max {r['max']:.1f} ms, generator lag up to "
            f"{r['max_lag_ms']:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
        rows.append(
            [
                f"{n}",
                f"{r['rate']:.0f}",
                f"{r['p50']:.1f}",
                f"{r['p99']:.1f}",
                f"{r['controller_cpu'] * 100:.0f}",
                f"{r['generator_cpu'] * 100:.0f}",
            ]
        )
    print(f"\nheartbeat every {INTERVAL:g} s, window {args.window:g} s; {machine_line(load)}\n")
    header = ["N", "requests/s", "p50 ms", "p99 ms", "controller CPU %", "generator CPU %"]
    print(markdown_table(header, rows))
    fine = [r["nodes"] for r in results if r["p99"] < LIMIT_MS and r["errors"] == 0]
    largest = max(fine) if fine else None
    print(f"\nlargest N with p99 < {LIMIT_MS:g} ms (and no errors): {largest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
