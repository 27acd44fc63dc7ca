"""Bad input and failures during an apply: the agent exits 1 with one clear error line, and the
root still runs exactly its old image, read-only.

Failures of an operation (a hook, the health check, a full disk) also run the error hooks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageswarm.agent import keys
from imageswarm.agent.journal import StateDir
from imageswarm.agent.store import Store
from imageswarm.daemon.publish import publish
from tests.agent.roots import (
    Images,
    Node,
    derive_image,
    image_id_of,
    mount_readonly,
    root_image_id,
    root_is_read_only,
    tree_digest,
)

Digest = dict[str, tuple[object, ...]]


@dataclass(frozen=True)
class Before:
    digest: Digest
    image_id: str


@pytest.fixture
def v1(node: Node, images: Images) -> Before:
    """v1, mounted read-only beside the root: what the root must still be after each failure."""
    before = Before(
        tree_digest(mount_readonly(node.ns, images.v1, node.work / "v1")), image_id_of(images.v1)
    )
    assert tree_digest(node.view()) == before.digest
    return before


@pytest.fixture
def error_log(node: Node) -> Path:
    """An error.d hook that records the IMAGESWARM_* environment it was given."""
    log = node.work / "error-hook.env"
    _hook(node, "error", "10-record", f"env | grep ^IMAGESWARM_ | sort >> {log}\n")
    return log


@pytest.fixture(scope="module")
def v2big(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v2 plus a 60 MiB incompressible file: more than the node's 48 MiB root can hold."""

    def add_big_file(tree: Path) -> None:
        with (tree / "usr/share/big.bin").open("wb") as f:
            for _ in range(60):
                f.write(os.urandom(1 << 20))

    dest = tmp_path_factory.mktemp("v2big") / "v2big.img"
    return derive_image(images.v2, dest, add_big_file, size_mib=128)


def _hook(node: Node, phase: str, name: str, body: str) -> None:
    path = node.hooks / f"{phase}.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1, no traceback, exactly one 'imageswarm: error:' line naming `words`."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("imageswarm: error: ")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def _still_v1(node: Node, v1: Before) -> None:
    assert tree_digest(node.view()) == v1.digest
    assert root_image_id(node) == v1.image_id
    assert root_is_read_only(node)
    state = StateDir(node.state)  # read directly: a CLI run costs more than the check
    assert state.journal() is None
    assert state.status()["current"]["image_id"] == v1.image_id


def _error_hook_env(log: Path) -> dict[str, str]:
    lines = log.read_text().splitlines()
    assert sum(ln.startswith("IMAGESWARM_PHASE=") for ln in lines) == 1, "ran more than once"
    return dict(ln.split("=", 1) for ln in lines)


def _assert_error_hook_ran(log: Path, node: Node, v1: Before, new_id: str) -> None:
    env = _error_hook_env(log)
    assert env["IMAGESWARM_PHASE"] == "error"
    assert env["IMAGESWARM_OPERATION"] == "apply"
    assert env["IMAGESWARM_OLD_IMAGE"] == v1.image_id
    assert env["IMAGESWARM_NEW_IMAGE"] == new_id
    assert env["IMAGESWARM_ROOT"] == str(node.root)


# --- refused before anything starts --------------------------------------------------------


def test_wrong_sha256_is_refused(node: Node, images: Images, v1: Before) -> None:
    wrong = "0" * 64
    proc = node.agent("apply", "--image", str(images.v2), "--sha256", wrong, check=False)
    _refused(proc, str(images.v2), "SHA-256", wrong)
    _still_v1(node, v1)


def test_missing_hooks_directory_is_refused(node: Node, images: Images, v1: Before) -> None:
    missing = node.work / "no-such-hooks"
    proc = node.agent("apply", "--image", str(images.v2), "--hooks", str(missing), check=False)
    _refused(proc, "hook directory", str(missing), "does not exist")
    _still_v1(node, v1)


def _corrupt_superblock(images: Images, dest: Path) -> None:
    shutil.copyfile(images.v2, dest)
    with dest.open("r+b") as f:  # over the block count and block size; the magic stays
        f.seek(1024)
        f.write(random.Random(7).randbytes(48))


def _truncated(images: Images, dest: Path) -> None:
    with images.v2.open("rb") as src, dest.open("wb") as out:
        out.write(src.read(images.v2.stat().st_size // 2))


def _text(images: Images, dest: Path) -> None:
    dest.write_text("this is not a disk image\n" * 200)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_corrupt_superblock, ("superblock", "corrupt")),
        (_truncated, ("truncated",)),
        (_text, ("not a disk or filesystem image",)),
    ],
    ids=["corrupt-superblock", "truncated", "text"],
)
def test_broken_image_file_is_refused(
    node: Node,
    images: Images,
    v1: Before,
    make: Callable[[Images, Path], None],
    words: tuple[str, ...],
) -> None:
    bad = node.work / "bad.img"
    make(images, bad)
    proc = node.agent("apply", "--image", str(bad), "--hooks", str(node.hooks), check=False)
    _refused(proc, str(bad), *words)
    _still_v1(node, v1)


def test_image_the_kernel_will_not_mount_aborts_with_the_root_unchanged(
    node: Node, images: Images, v1: Before, error_log: Path
) -> None:
    """Random bytes in the superblock's volume name: sizes still add up, so only the kernel's
    superblock checksum finds it, when the agent mounts the image."""
    bad = node.work / "bad.img"
    shutil.copyfile(images.v2, bad)
    with bad.open("r+b") as f:
        f.seek(1024 + 0x78)
        f.write(random.Random(8).randbytes(16))
    proc = node.agent("apply", "--image", str(bad), "--hooks", str(node.hooks), check=False)
    _refused(proc, f"mounting {node.state}", "corrupt", "root unchanged")
    _still_v1(node, v1)
    _assert_error_hook_ran(error_log, node, v1, image_id_of(bad))


@dataclass(frozen=True)
class Published:
    store: Path
    image_id: str
    key: keys.SigningKey


@pytest.fixture
def published(node: Node, images: Images) -> Published:
    """v2 published, signed, into a store of the node's."""
    key = keys.generate(node.work / "publisher.key")
    store_dir = node.work / "store"
    result = publish(images.v2, "v2", Store.open(store_dir), key)
    return Published(store_dir, result.manifest.image_id, key)


def _apply_from_store(
    node: Node, published: Published, trusted: object
) -> subprocess.CompletedProcess[str]:
    """`agent apply` of the published image from its store, trusting `trusted`."""
    return node.agent(
        "apply",
        "--image-id",
        published.image_id,
        "--store",
        str(published.store),
        "--trusted-key",
        str(trusted),
        check=False,
    )


def test_store_image_signed_by_an_untrusted_key_is_refused(
    node: Node, published: Published, v1: Before
) -> None:
    other = keys.generate(node.work / "other.key").public
    proc = _apply_from_store(node, published, other)
    _refused(proc, "signed by unknown key", published.key.public.key_id)
    _still_v1(node, v1)


def test_store_manifest_altered_after_signing_is_refused(
    node: Node, published: Published, v1: Before
) -> None:
    manifest = published.store / "manifests" / f"{published.image_id}.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"v2"', b'"v9"', 1))
    proc = _apply_from_store(node, published, published.key.public)
    _refused(proc, "signature does not match")
    _still_v1(node, v1)


def test_tampered_store_image_is_refused(node: Node, published: Published, v1: Before) -> None:
    store = Store.open(published.store, create=False)
    path = store.assemble(store.load_manifest(published.image_id))
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = _apply_from_store(node, published, published.key.public)
    _refused(proc, published.image_id, "SHA-256", "signed manifest")
    _still_v1(node, v1)


# --- failures during the operation ---------------------------------------------------------


def test_failing_pre_configure_hook_aborts_with_the_root_unchanged(
    node: Node, images: Images, v1: Before, error_log: Path
) -> None:
    _hook(node, "pre-configure", "50-check", "echo 'not enough memory' >&2\nexit 3\n")
    proc = node.agent("apply", "--image", str(images.v2), "--hooks", str(node.hooks), check=False)
    _refused(proc, "pre-configure hook 50-check exited 3", "not enough memory", "root unchanged")
    _still_v1(node, v1)
    _assert_error_hook_ran(error_log, node, v1, image_id_of(images.v2))
    assert StateDir(node.state).status()["last"]["result"] == "aborted"


def test_failing_configure_hook_rolls_back(
    node: Node, images: Images, v1: Before, error_log: Path
) -> None:
    v2_id = image_id_of(images.v2)
    # Fails for v2 only: the restore runs the configure hooks again, for v1, and they pass.
    body = (
        f'if [ "$IMAGESWARM_NEW_IMAGE" = {v2_id} ]; then\n'
        '  echo "cannot write config" >&2; exit 1\n'
        "fi\n"
        f'echo "$IMAGESWARM_OPERATION $IMAGESWARM_NEW_IMAGE" >> {node.work}/configured\n'
    )
    _hook(node, "configure", "50-setup", body)
    proc = node.agent("apply", "--image", str(images.v2), "--hooks", str(node.hooks), check=False)
    rolled_back = f"rolled back to {v1.image_id}"
    _refused(proc, "configure hook 50-setup exited 1", "cannot write config", rolled_back)
    assert (node.work / "configured").read_text() == f"restore {v1.image_id}\n"
    _still_v1(node, v1)
    _assert_error_hook_ran(error_log, node, v1, v2_id)


def test_hanging_hook_is_killed_at_its_timeout(
    node: Node, images: Images, v1: Before, error_log: Path
) -> None:
    pids = node.work / "hang.pids"
    _hook(node, "pre-configure", "50-hang", f"sleep 300 &\necho $! $$ > {pids}\nwait\n")
    start = time.monotonic()
    proc = node.agent(
        "apply",
        "--image",
        str(images.v2),
        "--hooks",
        str(node.hooks),
        "--hook-timeout",
        "2",
        check=False,
    )
    assert time.monotonic() - start < 30
    _refused(proc, "pre-configure hook 50-hang timed out after 2 s", "root unchanged")
    _still_v1(node, v1)
    _assert_error_hook_ran(error_log, node, v1, image_id_of(images.v2))
    for pid in pids.read_text().split():
        assert not _alive(int(pid)), f"hook process {pid} still runs"


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


def test_failing_health_check_rolls_back(
    node: Node, images: Images, v1: Before, error_log: Path
) -> None:
    proc = node.agent(
        "apply",
        "--image",
        str(images.v2),
        "--hooks",
        str(node.hooks),
        "--health-cmd",
        "false",
        check=False,
    )
    _refused(proc, "health check failed", "exit status 1", f"rolled back to {v1.image_id}")
    _still_v1(node, v1)
    _assert_error_hook_ran(error_log, node, v1, image_id_of(images.v2))


def test_an_image_the_root_has_no_room_for_is_refused_before_the_swap(
    node: Node, v2big: Path, v1: Before, error_log: Path
) -> None:
    """The space check refuses it up front (a disk filling up during the swap anyway is
    tests/agent/test_space.py's)."""
    free = _free_bytes(node)
    proc = node.agent("apply", "--image", str(v2big), "--hooks", str(node.hooks), check=False)
    _refused(proc, f"not enough space on {node.root}", "it needs 60.", "root unchanged")
    _still_v1(node, v1)
    assert _free_bytes(node) == free
    _assert_error_hook_ran(error_log, node, v1, image_id_of(v2big))


def _free_bytes(node: Node) -> int:
    st = os.statvfs(node.view())
    return st.f_bavail * st.f_frsize


def test_a_hook_that_always_fails_does_not_block_the_restore(
    node: Node, images: Images, v1: Before, error_log: Path
) -> None:
    """The configure hook fails for every image: the apply fails and the previous image is still
    restored (the restore reports the hook instead of giving up), so nothing stays pending."""
    _hook(node, "configure", "50-broken", 'echo "broken everywhere" >&2; exit 1\n')
    proc = node.agent("apply", "--image", str(images.v2), "--hooks", str(node.hooks), check=False)
    _refused(proc, "configure hook 50-broken exited 1", f"rolled back to {v1.image_id}")
    _still_v1(node, v1)
    status = json.loads(node.agent("status", "--json").stdout)
    assert status["pending"] is None
    assert "hook failed during restore" in status["last"]["error"]
