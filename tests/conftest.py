"""Shared fixtures: small real ext4 images built with mkfs.ext4 -d from generated trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageswarm.daemon.localcluster import build_ext4, make_tree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mounts, namespaces)")


@pytest.fixture(scope="session")
def ext4_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(v1, v2, tree): a 64 MiB ext4 image and a rebuild with one 1 MiB file changed."""
    work = tmp_path_factory.mktemp("ext4pair")
    tree = work / "tree"
    make_tree(tree, files=300, seed=1)
    build_ext4(tree, work / "v1.img", 64)
    big = tree / "usr/lib/big0.so"
    big.write_bytes(os.urandom(big.stat().st_size))
    build_ext4(tree, work / "v2.img", 64)
    return work / "v1.img", work / "v2.img", tree
