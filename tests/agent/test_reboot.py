"""The reboot decision under each policy, with a real swap to an image with another kernel."""

from __future__ import annotations

import json

import pytest

from tests.agent.roots import RELEASE_V1, RELEASE_V3, Images, Node


def _apply(node: Node, image: str, policy: str) -> dict[str, object]:
    out = node.agent("apply", "--image", image, "--policy", policy, "--json")
    op: dict[str, object] = json.loads(out.stdout)
    assert op["result"] == "applied", op
    return op


def _rebooted(node: Node) -> bool:
    return (node.work / "rebooted").exists()


@pytest.mark.parametrize("policy,reboots", [("auto", True), ("always", True), ("never", False)])
def test_new_kernel(node: Node, images: Images, policy: str, reboots: bool) -> None:
    op = _apply(node, str(images.v3), policy)
    reboot = op["reboot"]
    assert isinstance(reboot, dict)
    assert reboot["kernel_changed"] is True
    assert _rebooted(node) is reboots
    root = node.view()
    assert (root / f"lib/modules/{RELEASE_V3}").is_dir()
    kept = (root / f"lib/modules/{RELEASE_V1}").is_dir()
    if policy == "never":
        # Keep running: the running kernel's modules and boot files stay so modprobe works.
        assert kept and (root / f"boot/vmlinuz-{RELEASE_V1}").exists()
        assert "kernel pending" in str(reboot["summary"]).lower()
    else:
        assert not kept  # the image's tree exactly: the old kernel is gone after the reboot


@pytest.mark.parametrize("policy,reboots", [("auto", False), ("always", True), ("never", False)])
def test_same_kernel(node: Node, images: Images, policy: str, reboots: bool) -> None:
    op = _apply(node, str(images.v2), policy)
    reboot = op["reboot"]
    assert isinstance(reboot, dict) and reboot["kernel_changed"] is False
    assert _rebooted(node) is reboots


def test_hold_applies_then_waits_for_an_explicit_go(node: Node, images: Images) -> None:
    _apply(node, str(images.v3), "hold")
    assert not _rebooted(node)
    assert (node.view() / f"lib/modules/{RELEASE_V1}").is_dir()  # still running it
    status = json.loads(node.agent("status", "--json").stdout)
    assert status["reboot_held"] is True
    assert "reboot held" in node.agent("status").stdout
    node.agent("reboot")
    assert _rebooted(node)
    again = node.agent("reboot", check=False)
    assert again.returncode == 1 and "no reboot is held" in again.stderr
