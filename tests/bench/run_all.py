"""Run every benchmark in this folder (bench_*.py) in turn, each in its own process.

Each benchmark prints its own markdown table; this prints a summary of exit codes and
durations at the end and exits non-zero when any benchmark failed.

    .venv/bin/python tests/bench/run_all.py [--only publish] [--list]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def discover() -> list[str]:
    """The benchmark names (bench_<name>.py), sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def run(name: str) -> tuple[int, float]:
    """Run one benchmark as a module from the repository root; return its status and seconds."""
    print(f"\n## bench_{name}\n", flush=True)
    start = time.monotonic()
    argv = [sys.executable, "-m", f"tests.bench.bench_{name}"]
    proc = subprocess.run(argv, cwd=ROOT, check=False)
    return proc.returncode, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)} (have: {', '.join(names)})")
    chosen = [n for n in names if not args.only or n in args.only]
    outcomes = [(name, *run(name)) for name in chosen]
    print("\n| benchmark | exit status | seconds |\n|:---|---:|---:|")
    for name, status, seconds in outcomes:
        print(f"| bench_{name} | {status} | {seconds:.0f} |")
    return 1 if any(status != 0 for _, status, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
