"""Shared by the benchmark scripts: a realistic ext4 image, a signing key, markdown tables.

Not a test module, so pytest does not collect it; the scripts import it as tests.bench.benchkit.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imageswarm.agent.keys import SigningKey
from imageswarm.daemon.localcluster import build_ext4, make_tree

MIB = 1024 * 1024
#: make_tree's small files are uniform in 1..256 KiB, so 128.5 KiB on average.
_MEAN_FILE_KIB = 128.5
#: make_tree's fixed content: four 1 MiB libraries and a 64 KiB kernel.
_FIXED_KIB = 4 * 1024 + 64


def build_image(workdir: Path, mib: int, *, fill: float = 0.70, seed: int = 1) -> Path:
    """An ext4 image of `mib` MiB whose files (make_tree content) fill about `fill` of it."""
    files = max(1, round((fill * mib * 1024 - _FIXED_KIB) / _MEAN_FILE_KIB))
    tree = workdir / "tree"
    make_tree(tree, files=files, seed=seed)
    image = workdir / "image.raw"
    build_ext4(tree, image, mib)
    return image


def signing_key() -> SigningKey:
    """A throw-away key: publishing signs the manifest, and a benchmark needs no key file."""
    return SigningKey(Ed25519PrivateKey.generate())


def load_average() -> float:
    """The 1-minute load average: other work on the machine shows up in every timing."""
    return os.getloadavg()[0]


def machine_line(load_at_start: float) -> str:
    """Cores, Python, the load average at the start and now, and today's date."""
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, 1-min load average "
        f"{load_at_start:.1f} at start and {load_average():.1f} at end, "
        f"{datetime.date.today().isoformat()}"
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column is left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
