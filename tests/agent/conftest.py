"""Fixtures for the agent tests: real ext4 roots in private mount namespaces (see roots.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.roots import Images, Namespace, Node, make_images


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return make_images(tmp_path_factory.mktemp("agent-images"))


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def node(namespace: Namespace, images: Images, tmp_path: Path) -> Node:
    root = tmp_path / "root"
    disk = tmp_path / "disk.img"  # the node's own disk: a copy, never the image itself
    shutil.copyfile(images.v1, disk)
    namespace.mount_disk(disk, root)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    n = Node(namespace, root, tmp_path / "state", hooks, tmp_path)
    n.agent("adopt", "--image", str(images.v1))
    return n
