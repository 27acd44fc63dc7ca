"""A swap on a nearly full root: refused up front when it cannot fit, done when it just fits, and
rolled back exactly when the disk fills up half-way through it anyway.

`big` is v1 with 8 MiB of payload, 1 MiB of other files added and ten small files rewritten;
`base` is v1 with the same payload paths holding other content, so that base -> big rewrites
the payload. The node's root is a 48 MiB ext4; the tests fill it with a preallocated file
under var/log (preserved, so no part of what the images are compared on) to leave a chosen
number of bytes free.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageswarm.agent import space
from imageswarm.agent.journal import StateDir
from tests.agent.roots import (
    Images,
    Node,
    derive_image,
    image_id_of,
    mount_readonly,
    root_image_id,
    root_is_read_only,
    tree_digest,
    write,
)

MIB = 1 << 20
BLOCK = 4096
PAYLOAD = [(f"opt/payload/p{i:02d}", 512 * 1024) for i in range(16)]
ADDED = [(f"opt/added/a{i}", 256 * 1024) for i in range(4)]
REWRITTEN = [(f"usr/share/data/f{i:03d}", 4096 + i) for i in range(1, 11)]
#: What the swap from v1 or base to big writes: every new or rewritten file, in whole blocks.
CHANGE = sum(-(-size // BLOCK) * BLOCK for _, size in PAYLOAD + ADDED + REWRITTEN)


@dataclass(frozen=True)
class Sized:
    base: Path
    big: Path


@pytest.fixture(scope="module")
def sized(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Sized:
    def payload(files: list[tuple[str, int]], mtime: int) -> Callable[[Path], None]:
        def change(tree: Path) -> None:
            for rel, size in files:
                write(tree / rel, os.urandom(size), mtime=mtime)

        return change

    work = tmp_path_factory.mktemp("sized")
    base = derive_image(images.v1, work / "base.img", payload(PAYLOAD, 1_500_000_000))
    big = derive_image(base, work / "big.img", payload(PAYLOAD + ADDED + REWRITTEN, 1_600_000_000))
    return Sized(base, big)


def _free(node: Node) -> int:
    fs = os.statvfs(node.view())
    return fs.f_bfree * fs.f_frsize


def _fill(node: Node, leave: int) -> int:
    """Fill the root to leave about `leave` bytes free; returns the bytes free after."""
    node.ns.run("mount", "-o", "remount,rw", str(node.root))
    fd = os.open(node.view() / "var/log/filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, _free(node) - leave)
    finally:
        os.close(fd)
    node.ns.run("mount", "-o", "remount,ro", str(node.root))
    return _free(node)


def _marker_hook(node: Node, phase: str) -> Path:
    marker = node.work / f"{phase}.ran"
    hook = node.hooks / f"{phase}.d" / "10-mark"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    return marker


def test_a_root_too_full_for_the_change_is_refused_before_anything_is_touched(
    node: Node, sized: Sized
) -> None:
    free = _fill(node, CHANGE // 2)
    assert free < CHANGE  # the swap could not possibly fit
    ran = _marker_hook(node, "pre-configure")
    before = tree_digest(node.view(), skip=())
    v1_id = root_image_id(node)
    status_before = StateDir(node.state).status()

    refused = node.agent(
        "apply", "--image", str(sized.big), "--hooks", str(node.hooks), check=False
    )

    assert refused.returncode == 1, refused.stdout
    [error] = refused.stderr.strip().splitlines()
    assert f"not enough space on {node.root} for this swap" in error
    needs = re.search(r"it needs ([0-9.]+) MiB and ([0-9]+) inodes", error)
    assert needs is not None, error
    assert CHANGE / MIB <= float(needs[1]) + 0.05 < CHANGE / MIB + 0.2
    assert int(needs[2]) >= len(PAYLOAD + ADDED + REWRITTEN)
    assert f"the filesystem has {free / MIB:.1f} MiB and " in error
    assert error.endswith("root unchanged"), error
    assert not ran.exists(), "no hook may run before the space check"
    assert tree_digest(node.view(), skip=()) == before
    assert root_is_read_only(node)
    state = StateDir(node.state)
    assert state.journal() is None
    status = state.status()
    assert (status["current"], status["previous"]) == (
        status_before["current"],
        status_before["previous"],
    )
    assert status["current"]["image_id"] == v1_id
    assert status["last"]["result"] == "aborted"


def test_a_change_that_just_fits_is_applied(node: Node, sized: Sized) -> None:
    # The change, the agent's margin and 1 MiB for directories and metadata: no more.
    room = CHANGE + space.MARGIN_BYTES
    free = _fill(node, room + MIB)
    assert room < free < room + 2 * MIB

    node.agent("apply", "--image", str(sized.big))

    expected = tree_digest(mount_readonly(node.ns, sized.big, node.work / "big"))
    assert tree_digest(node.view()) == expected
    assert root_image_id(node) == image_id_of(sized.big)
    assert root_is_read_only(node)
    assert StateDir(node.state).journal() is None


def test_a_disk_filled_half_way_through_the_swap_is_rolled_back_exactly(
    node: Node, sized: Sized
) -> None:
    """Something else fills the root after the space check (a pre-configure hook, here), so
    rsync runs out of space half-way through rewriting the payload. The restore has no space
    to write base's files again, and a process maps one of them, so their backup dir cannot
    simply be deleted: the restore must put base's files back and free big's, and end on base
    exactly, with the very inodes it had."""
    node.agent("apply", "--image", str(sized.base))
    expected = tree_digest(mount_readonly(node.ns, sized.base, node.work / "base"))
    assert tree_digest(node.view()) == expected
    base_id = root_image_id(node)
    payload = [node.view() / rel for rel, _ in PAYLOAD]
    inodes = [os.stat(path).st_ino for path in payload]
    hook = node.hooks / "pre-configure.d" / "10-fill"
    hook.parent.mkdir(parents=True)
    hook.write_text(
        "#!/bin/sh\nset -e\n"
        'mount -o remount,rw "$IMAGESWARM_ROOT"\n'
        'free=$(( $(stat -f -c %f "$IMAGESWARM_ROOT") * $(stat -f -c %S "$IMAGESWARM_ROOT") ))\n'
        f'fallocate -l $(( free - {CHANGE // 2} )) "$IMAGESWARM_ROOT/var/log/filler"\n'
        'mount -o remount,ro "$IMAGESWARM_ROOT"\n'
    )
    hook.chmod(0o755)

    with subprocess.Popen(
        node.ns.argv(
            sys.executable,
            "-c",
            "import mmap, sys, time\n"
            "with open(sys.argv[1], 'rb') as f:\n"
            "    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
            "print('mapped', flush=True)\n"
            "time.sleep(300)\n",
            str(node.root / PAYLOAD[0][0]),
        ),
        stdout=subprocess.PIPE,
        text=True,
    ) as mapper:
        try:
            assert mapper.stdout is not None and mapper.stdout.readline() == "mapped\n"
            failed = node.agent(
                "apply", "--image", str(sized.big), "--hooks", str(node.hooks), check=False
            )
            assert mapper.poll() is None
        finally:
            mapper.kill()

    assert failed.returncode == 1, failed.stdout
    [error] = failed.stderr.strip().splitlines()
    # Half-way: the first payload files were rewritten, then one ran out of space.
    assert re.search(r'write failed on "[^"]*/opt/payload/p0[1-9]": No space left', error), error
    assert error.endswith(f"rolled back to {base_id}"), error
    assert tree_digest(node.view()) == expected
    assert [os.stat(path).st_ino for path in payload] == inodes  # put back, not copied
    assert root_image_id(node) == base_id
    assert root_is_read_only(node)
    state = StateDir(node.state)
    assert state.journal() is None
    status = state.status()
    assert status["current"]["image_id"] == base_id
    assert (status["last"]["kind"], status["last"]["result"]) == ("restore", "rolled-back")
    # The disk is still full of the filler, not of big's files.
    assert (node.view() / "var/log/filler").exists()
    assert _free(node) < CHANGE
