"""Every way to name an image: raw, qcow2 and tar files, and an image in the node's store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from imageswarm.agent import keys
from imageswarm.agent.store import Store
from imageswarm.daemon.publish import publish
from tests.agent.roots import Images, Node, mount_readonly, tree_digest


def _expected_v2(node: Node, images: Images) -> dict[str, tuple[object, ...]]:
    return tree_digest(mount_readonly(node.ns, images.v2, node.work / "v2"))


def test_qcow2_image_gets_the_same_id_as_its_raw_form(node: Node, images: Images) -> None:
    qcow = node.work / "v2.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(images.v2), str(qcow)], check=True
    )
    op = json.loads(node.agent("apply", "--image", str(qcow), "--json").stdout)
    raw = json.loads(node.agent("plan", "--image", str(images.v2), "--json").stdout)
    assert raw["changed"] == raw["added"] == raw["removed"] == 0  # already there
    assert tree_digest(node.view()) == _expected_v2(node, images)
    assert (node.view() / "etc/image_id").read_text().strip() == op["image"]["image_id"]


def test_tar_image(node: Node, images: Images) -> None:
    expected = _expected_v2(node, images)
    tar = node.work / "v2.tar"
    node.ns.run(
        "tar",
        "--numeric-owner",
        "--xattrs",
        "--acls",
        "-cf",
        str(tar),
        "-C",
        str(node.work / "v2"),
        ".",
    )
    op = json.loads(node.agent("apply", "--image", str(tar), "--json").stdout)
    assert op["result"] == "applied" and op["image"]["format"] == "tar"
    assert tree_digest(node.view()) == expected


def test_store_image_verified_by_signature_and_sha256(
    node: Node, images: Images, tmp_path: Path
) -> None:
    key = keys.generate(tmp_path / "controller.key")
    store = Store.open(tmp_path / "store")
    manifest = publish(images.v2, "v2", store, key).manifest
    store.assemble(manifest)
    out = node.agent(
        "apply",
        "--image-id",
        manifest.image_id,
        "--store",
        str(store.root),
        "--trusted-key",
        str(key.public),
        "--json",
    )
    op = json.loads(out.stdout)
    assert op["image"]["image_id"] == manifest.image_id
    assert (node.view() / "etc/image_id").read_text().strip() == manifest.image_id
    assert tree_digest(node.view()) == _expected_v2(node, images)


def test_health_check_that_passes(node: Node, images: Images) -> None:
    op = json.loads(
        node.agent("apply", "--image", str(images.v2), "--health-cmd", "true", "--json").stdout
    )
    assert "health" in [p["name"] for p in op["phases"]]
    assert op["result"] == "applied"
