"""SIGKILL the agent at every phase of a swap: the next run leaves the root exactly the old image
or exactly the new one, never a mix, and read-only again.

The agent's failpoints (IMAGESWARM_FAILPOINT) kill it as it enters a phase, or kill rsync and
the agent after 20 itemized lines of the real swap. The v2 used here rewrites 40 more files
than the session's v2, so that kill lands half-way through the swap.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imageswarm.agent.apply import FAILPOINT_ENV
from imageswarm.agent.journal import StateDir
from tests.agent.roots import (
    Images,
    Node,
    agent_status,
    derive_image,
    image_id_of,
    mount_readonly,
    root_image_id,
    root_is_read_only,
    tree_digest,
    write,
)

Digest = dict[str, tuple[object, ...]]

#: Failpoints that kill the agent before the root is touched: the operation is abandoned.
BEFORE_SWAP = ("phase:prepare", "phase:pre-configure")
#: Failpoints at or after the swap: the operation is finished.
FROM_SWAP = (
    "phase:swap",
    "rsync",
    "phase:configure",
    "phase:post-configure",
    "phase:health",
    "phase:commit",
)


@pytest.fixture(scope="module")
def v2wide(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's v2 with 40 more files rewritten: a swap of more than 20 itemized lines."""

    def rewrite_data(tree: Path) -> None:
        # A new mtime: same-size files with v1's mtime would be copied apart from the main
        # rsync run (the agent's hidden-change pass), which the rsync failpoint does not watch.
        for i in range(1, 41):
            write(tree / f"usr/share/data/f{i:03d}", os.urandom(4096 + i), mtime=1_600_000_000)

    dest = tmp_path_factory.mktemp("v2wide") / "v2wide.img"
    return derive_image(images.v2, dest, rewrite_data)


@dataclass(frozen=True)
class Expected:
    v1: Digest
    v2: Digest
    v1_id: str
    v2_id: str


@pytest.fixture
def expected(node: Node, images: Images, v2wide: Path) -> Expected:
    """v1 and v2 mounted read-only beside the root, in the node's namespace."""
    exp = Expected(
        tree_digest(mount_readonly(node.ns, images.v1, node.work / "v1")),
        tree_digest(mount_readonly(node.ns, v2wide, node.work / "v2")),
        image_id_of(images.v1),
        image_id_of(v2wide),
    )
    assert exp.v1 != exp.v2
    assert tree_digest(node.view()) == exp.v1
    assert root_image_id(node) == exp.v1_id
    return exp


def _killed(node: Node, failpoint: str, action: str, *args: str) -> None:
    proc = node.agent(action, *args, check=False, env={FAILPOINT_ENV: failpoint})
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stdout, proc.stderr)


def _phase_of(failpoint: str) -> str:
    """The phase the journal names after a kill at `failpoint`."""
    return "swap" if failpoint == "rsync" else failpoint.removeprefix("phase:")


def _pending_phase(node: Node, kind: str, image_id: str) -> str | None:
    pending = agent_status(node)["pending"]
    assert pending is not None
    assert (pending["kind"], pending["image"]["image_id"]) == (kind, image_id)
    phases: list[dict[str, str]] = pending["phases"]
    return phases[-1]["name"] if phases else None


def _assert_runs(node: Node, digest: Digest, image_id: str) -> dict[str, Any]:
    """The root is exactly the image, read-only, recorded as current, nothing pending."""
    assert tree_digest(node.view()) == digest
    assert root_image_id(node) == image_id
    assert root_is_read_only(node)
    state = StateDir(node.state)  # read directly: a CLI run costs more than the check
    assert state.journal() is None
    status = state.status()
    assert status["current"]["image_id"] == image_id
    return status


@pytest.mark.parametrize("failpoint", BEFORE_SWAP + FROM_SWAP)
def test_a_killed_apply_recovers_to_exactly_one_image(
    node: Node, v2wide: Path, expected: Expected, failpoint: str
) -> None:
    health = ["--health-cmd", "true"] if failpoint == "phase:health" else []
    _killed(node, failpoint, "apply", "--image", str(v2wide), *health)

    assert _pending_phase(node, "apply", expected.v2_id) == _phase_of(failpoint)
    if failpoint == "rsync":
        # The kill really landed half-way: the root is neither image now.
        assert tree_digest(node.view()) not in (expected.v1, expected.v2)

    op = json.loads(node.agent("recover", "--json", *health).stdout)
    assert op["recovered"] is True
    if failpoint in BEFORE_SWAP:
        assert op["result"] == "aborted", op
        _assert_runs(node, expected.v1, expected.v1_id)
    else:
        assert op["result"] == "applied", op
        status = _assert_runs(node, expected.v2, expected.v2_id)
        assert status["previous"]["image_id"] == expected.v1_id


@pytest.mark.parametrize(
    ("failpoint", "ends_on"), [("phase:prepare", "v2"), ("rsync", "v1"), ("phase:commit", "v1")]
)
def test_a_killed_rollback_recovers_to_exactly_one_image(
    node: Node, v2wide: Path, expected: Expected, failpoint: str, ends_on: str
) -> None:
    node.agent("apply", "--image", str(v2wide))
    _killed(node, failpoint, "rollback")
    assert _pending_phase(node, "rollback", expected.v1_id) == _phase_of(failpoint)
    if failpoint == "rsync":
        assert tree_digest(node.view()) not in (expected.v1, expected.v2)

    node.agent("recover")
    if ends_on == "v1":
        _assert_runs(node, expected.v1, expected.v1_id)
    else:  # killed before the swap: the rollback is abandoned, v2 stays
        _assert_runs(node, expected.v2, expected.v2_id)


def test_apply_finishes_a_pending_operation_before_its_own(
    node: Node, images: Images, v2wide: Path, expected: Expected
) -> None:
    _killed(node, "rsync", "apply", "--image", str(v2wide))
    op = json.loads(node.agent("apply", "--image", str(images.v1), "--json").stdout)
    assert op["result"] == "applied"
    status = _assert_runs(node, expected.v1, expected.v1_id)
    # v1 was applied over a v2 the recovery had finished, not over the half-swapped root.
    assert op["old"]["image_id"] == expected.v2_id
    assert status["previous"]["image_id"] == expected.v2_id
    assert "nothing to recover" in node.agent("recover").stdout


def test_apply_abandons_a_pending_operation_that_had_not_swapped(
    node: Node, v2wide: Path, expected: Expected
) -> None:
    _killed(node, "phase:pre-configure", "apply", "--image", str(v2wide))
    op = json.loads(node.agent("apply", "--image", str(v2wide), "--json").stdout)
    assert op["result"] == "applied" and not op["recovered"]
    _assert_runs(node, expected.v2, expected.v2_id)


def test_a_restore_that_cannot_finish_stays_pending_until_recovered(
    node: Node, images: Images, v2wide: Path, expected: Expected
) -> None:
    """The automatic rollback after a failed configure cannot open v1's kept copy: the agent
    must say the root was changed and keep the restore pending, and `recover` finishes it."""
    kept = node.state / "images" / f"{expected.v1_id}.img"
    kept.unlink()  # possibly a hard link to the session's v1: never write through it
    kept.write_bytes(bytes(1 << 20))
    hook = node.hooks / "configure.d" / "10-fail"
    hook.parent.mkdir()
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)

    failed = node.agent("apply", "--image", str(v2wide), "--hooks", str(node.hooks), check=False)
    assert failed.returncode == 1, failed.stderr
    [error] = failed.stderr.strip().splitlines()
    assert error.startswith("imageswarm: error: restore of")
    assert "cannot be restored" in error and "pending" in error
    assert _pending_phase(node, "restore", expected.v1_id) is None  # it never got to swap
    assert tree_digest(node.view()) == expected.v2
    assert root_is_read_only(node)

    kept.unlink()
    shutil.copyfile(images.v1, kept)
    op = json.loads(node.agent("recover", "--json").stdout)
    assert (op["kind"], op["result"]) == ("restore", "rolled-back")
    _assert_runs(node, expected.v1, expected.v1_id)
