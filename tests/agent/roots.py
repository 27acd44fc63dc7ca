"""Real roots for the agent tests (the fixtures are in conftest.py).

ext4 images built with mkfs.ext4 -d are loop-mounted read-only inside a private mount
namespace that a sleeping process holds open. The test reads that namespace's files through
/proc/<pid>/root and runs the agent in it with nsenter; nothing is ever mounted in this
machine's own mount namespace, and the mounts vanish with the namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageswarm.agent.manifest import image_id_for
from imageswarm.daemon.localcluster import build_ext4

RELEASE_V1 = "6.1.0-test-amd64"
RELEASE_V3 = "6.2.0-test-amd64"


def write(path: Path, data: bytes | str, mode: int = 0o644, mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def base_tree(root: Path, release: str = RELEASE_V1) -> None:
    """A small OS-like tree: accounts, identity files, binaries, logs, a kernel and modules."""
    if root.exists():
        shutil.rmtree(root)
    write(
        root / "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nsvc:x:100:100::/nonexistent:/bin/false\n",
    )
    write(root / "etc/group", "root:x:0:\nsvc:x:100:\n")
    write(root / "etc/shadow", "root:*:19000:0:99999:7:::\nsvc:!:19000::::::\n", 0o640)
    write(root / "etc/gshadow", "root:*::\nsvc:!::\n", 0o640)
    write(root / "etc/hostname", "image-default\n")
    write(root / "etc/machine-id", "00000000000000000000000000000000\n")
    write(root / "etc/app.conf", "setting = 1\n", mtime=1_700_000_000)
    write(root / "var/lib/dpkg/status", "Package: base\nVersion: 1\n")
    write(root / "var/log/image.log", "from the image\n")
    write(root / "usr/share/doc/readme", "v1 docs\n")
    for i in range(50):
        write(root / f"usr/share/data/f{i:03d}", os.urandom(4096 + i))
    write(root / f"lib/modules/{release}/modules.dep", f"{release}\n")
    write(root / f"boot/vmlinuz-{release}", f"kernel {release}\n".encode() * 100)
    write(root / f"boot/initrd.img-{release}", f"initrd {release}\n".encode() * 100)
    sleep = shutil.which("sleep")
    assert sleep
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(sleep, root / "usr/bin/sleep")
    (root / "tmp").mkdir(exist_ok=True)
    (root / "var/tmp").mkdir(exist_ok=True)


def v2_changes(root: Path) -> None:
    """v2: changed content with the same size and mtime, added and removed files, a changed
    binary, a new system user."""
    write(root / "etc/app.conf", "setting = 2\n", mtime=1_700_000_000)  # same size, same mtime
    write(root / "usr/share/doc/readme", "v2 docs, longer\n")
    write(root / "usr/share/doc/new-file", "added in v2\n")
    (root / "usr/share/data/f000").unlink()
    write(root / "var/lib/dpkg/status", "Package: base\nVersion: 2\n")
    write(root / "var/log/image.log", "v2 image log: must not replace the node's\n")
    with (root / "usr/bin/sleep").open("ab") as f:
        f.write(b"\0v2")  # trailing bytes: still a valid ELF, but a different file
    passwd = (root / "etc/passwd").read_text() + "newsvc:x:101:101::/nonexistent:/bin/false\n"
    write(root / "etc/passwd", passwd)


def build_image(tree: Path, image: Path, size_mib: int = 48) -> Path:
    build_ext4(tree, image, size_mib)
    return image


@dataclass(frozen=True)
class Images:
    v1: Path
    v2: Path
    v3: Path  # v2 with a different kernel release
    trees: Path


def make_images(work: Path) -> Images:
    tree = work / "tree"
    base_tree(tree)
    v1 = build_image(tree, work / "v1.img")
    v2_changes(tree)
    v2 = build_image(tree, work / "v2.img")
    shutil.rmtree(tree / f"lib/modules/{RELEASE_V1}")
    for name in ("vmlinuz", "initrd.img"):
        (tree / f"boot/{name}-{RELEASE_V1}").unlink()
    write(tree / f"lib/modules/{RELEASE_V3}/modules.dep", f"{RELEASE_V3}\n")
    write(tree / f"boot/vmlinuz-{RELEASE_V3}", b"new kernel\n" * 100)
    write(tree / f"boot/initrd.img-{RELEASE_V3}", b"new initrd\n" * 100)
    v3 = build_image(tree, work / "v3.img")
    return Images(v1, v2, v3, work)


class Namespace:
    """A private mount namespace kept alive by a sleeping process."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
            start_new_session=True,
        )
        own = os.stat("/proc/self/ns/mnt").st_ino
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino == own:
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not create a mount namespace")
            time.sleep(0.01)

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*argv), capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def view(self, path: Path) -> Path:
        """`path` as this namespace sees it, readable from the test's namespace."""
        return Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    def mount_disk(self, image: Path, at: Path, *, readonly: bool = True) -> None:
        """Mount a node's disk (a copy: mounting writes to it) that the agent may remount rw."""
        at.mkdir(parents=True, exist_ok=True)
        # A writable loop device (so the agent can remount rw), then a read-only mount.
        self.run("mount", "-o", "loop", str(image), str(at))
        if readonly:
            self.run("mount", "-o", "remount,ro", str(at))

    def close(self) -> None:
        os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()


AGENT = [sys.executable, "-m", "imageswarm.daemon.cli.main", "agent"]


@dataclass
class Node:
    """A test root: v1 mounted read-only at `root` in `ns`, agent state beside it."""

    ns: Namespace
    root: Path
    state: Path
    hooks: Path
    work: Path

    def agent(
        self, action: str, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "IMAGESWARM_RUNNING_KERNEL": RELEASE_V1, **(env or {})}
        argv = [
            *AGENT,
            action,
            "--root",
            str(self.root),
            "--state-dir",
            str(self.state),
            "--reboot-command",
            f"touch {self.work}/rebooted",
            *args,
        ]
        return self.ns.run(*argv, check=check, env=full_env)

    def view(self) -> Path:
        return self.ns.view(self.root)


PRESERVED = (
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "var/tmp",
    "mnt",
    "media",
    "lost+found",
    "etc/machine-id",
    "etc/hostname",
    "etc/hosts",
    "etc/resolv.conf",
    "var/log",
    "home",
    "root",
    "etc/image_id",
    "etc/passwd",
    "etc/group",
    "etc/shadow",
    "etc/gshadow",
    "var/lib/imageswarm",
)


def tree_digest(root: Path, skip: Sequence[str] = PRESERVED) -> dict[str, tuple[object, ...]]:
    """Every file's type, mode, owner, size, mtime and content hash (or link target)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = (
                    "file",
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                    st.st_size,
                    int(st.st_mtime),
                    digest,
                )
            else:
                out[rel] = ("other", st.st_mode, st.st_uid, st.st_gid)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


# --- helpers for the recovery and bad-input tests -------------------------------------------


def mount_readonly(ns: Namespace, image: Path, at: Path) -> Path:
    """Mount `image` at `at` in `ns` without ever writing to it (loop, ro, journal not replayed);
    returns the mount as the test sees it. For the expected trees that roots are compared with."""
    at.mkdir(parents=True, exist_ok=True)
    ns.run("mount", "-o", "loop,ro,noload", str(image), str(at))
    return ns.view(at)


def derive_image(
    base: Path, dest: Path, change: Callable[[Path], None], size_mib: int | None = None
) -> Path:
    """A copy of the ext4 image `base` (grown to `size_mib`), changed by `change(tree)` while it
    is mounted read-write in a namespace of its own."""
    shutil.copyfile(base, dest)
    if size_mib is not None:
        os.truncate(dest, size_mib << 20)
        subprocess.run(["resize2fs", "-f", str(dest)], check=True, capture_output=True)
    at = dest.with_name(dest.name + ".mnt")
    ns = Namespace()
    try:
        ns.mount_disk(dest, at, readonly=False)
        change(ns.view(at))
        ns.run("umount", str(at))
    finally:
        ns.close()
    at.rmdir()
    return dest


def image_id_of(image: Path) -> str:
    """The id the agent gives an image file (derived from its SHA-256, as `publish` does)."""
    digest = hashlib.sha256()
    with image.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return image_id_for(digest.hexdigest())


def root_image_id(node: Node) -> str:
    return (node.view() / "etc/image_id").read_text().strip()


def root_is_read_only(node: Node) -> bool:
    out = node.ns.run("findmnt", "-n", "-o", "OPTIONS", str(node.root)).stdout
    return "ro" in out.strip().split(",")


def agent_status(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(node.agent("status", "--json").stdout)
    return data
