"""Applying an image in place to a real read-only ext4 root in a private mount namespace."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent.roots import AGENT, Images, Namespace, Node, mount_readonly, tree_digest


def _hook(hooks: Path, phase: str, name: str, body: str) -> None:
    path = hooks / f"{phase}.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _record_hooks(node: Node) -> Path:
    log = node.work / "hooks.log"
    for phase in ("pre-configure", "configure", "post-configure", "error"):
        for name in ("20-second", "10-first"):
            _hook(
                node.hooks,
                phase,
                name,
                f'echo "{phase} {name} $IMAGESWARM_OLD_IMAGE $IMAGESWARM_NEW_IMAGE '
                f'$IMAGESWARM_ROOT $IMAGESWARM_REBOOT $LANG $(wc -l < $IMAGESWARM_CHANGES)" '
                f">> {log}\n",
            )
    return log


def _image_id(node: Node) -> str:
    return (node.view() / "etc/image_id").read_text().strip()


def _mounted_ro(node: Node) -> bool:
    out = node.ns.run("findmnt", "-n", "-o", "OPTIONS", str(node.root)).stdout
    return "ro" in out.strip().split(",")


def test_apply_swaps_a_live_read_only_root_in_place(node: Node, images: Images) -> None:
    log = _record_hooks(node)
    v1_id = _image_id(node)
    # Host state the image must not overwrite.
    node.ns.run("mount", "-o", "remount,rw", str(node.root))
    (node.view() / "etc/hostname").write_text("node-7\n")
    (node.view() / "var/log/node.log").write_text("node's own log\n")
    with (node.view() / "etc/passwd").open("a") as f:
        f.write("localuser:x:1000:1000::/home/localuser:/bin/sh\n")
    node.ns.run("mount", "-o", "remount,ro", str(node.root))
    # A process started from v1's binary before the swap.
    sleeper = subprocess.Popen(node.ns.argv(str(node.root / "usr/bin/sleep"), "300"))
    try:
        out = node.agent("apply", "--image", str(images.v2), "--hooks", str(node.hooks), "--json")
        op = json.loads(out.stdout)
        assert op["result"] == "applied", op
        assert sleeper.poll() is None, "the v1 process must survive the swap"
        assert any(s["pid"] == sleeper.pid or "sleep" in s["comm"] for s in op["services"])
    finally:
        sleeper.kill()
        sleeper.wait()

    expected = mount_readonly(node.ns, images.v2, node.work / "v2")
    assert tree_digest(node.view()) == tree_digest(expected)
    assert _mounted_ro(node)
    new_id = _image_id(node)
    assert new_id != v1_id and new_id == op["image"]["image_id"]
    # Preserved and merged host state.
    assert (node.view() / "etc/hostname").read_text() == "node-7\n"
    assert (node.view() / "var/log/node.log").read_text() == "node's own log\n"
    assert (node.view() / "var/log/image.log").read_text() == "from the image\n"
    passwd = (node.view() / "etc/passwd").read_text()
    assert "newsvc:" in passwd and "localuser:" in passwd
    # The same-size, same-mtime change was not missed.
    assert (node.view() / "etc/app.conf").read_text() == "setting = 2\n"
    # Hooks: phase order, LANG=C name order, environment.
    lines = log.read_text().splitlines()
    assert [ln.split()[:2] for ln in lines] == [
        ["pre-configure", "10-first"],
        ["pre-configure", "20-second"],
        ["configure", "10-first"],
        ["configure", "20-second"],
        ["post-configure", "10-first"],
        ["post-configure", "20-second"],
    ]
    for line in lines:
        _, _, old, new, root, reboot, lang, changes = line.split()
        assert (old, new, root, reboot, lang) == (v1_id, new_id, str(node.root), "no-reboot", "C")
        assert int(changes) >= 4
    status = json.loads(node.agent("status", "--json").stdout)
    assert status["current"]["image_id"] == new_id
    assert status["previous"]["image_id"] == v1_id
    assert status["pending"] is None
    assert [p["name"] for p in status["last"]["phases"]] == [
        "prepare",
        "pre-configure",
        "swap",
        "configure",
        "post-configure",
        "commit",
    ]


def test_plan_and_dry_run_change_nothing(node: Node, images: Images) -> None:
    before = tree_digest(node.view(), skip=())
    plan = json.loads(node.agent("plan", "--image", str(images.v2), "--json").stdout)
    assert plan["changed"] >= 3 and plan["added"] >= 1 and plan["removed"] >= 1
    dry = node.agent("apply", "--image", str(images.v2), "--dry-run")
    assert "nothing changed" in dry.stdout
    assert tree_digest(node.view(), skip=()) == before


def test_rollback_restores_the_previous_image(node: Node, images: Images) -> None:
    expected = tree_digest(mount_readonly(node.ns, images.v1, node.work / "v1"))
    v1_id = _image_id(node)
    node.agent("apply", "--image", str(images.v2))
    assert tree_digest(node.view()) != expected
    node.agent("rollback")
    assert tree_digest(node.view()) == expected
    assert _image_id(node) == v1_id
    assert _mounted_ro(node)
    clean = node.agent("verify", check=False)
    assert clean.returncode == 0, clean.stdout


def test_verify_reports_drift(node: Node) -> None:
    node.ns.run("mount", "-o", "remount,rw", str(node.root))
    (node.view() / "usr/share/doc/readme").write_text("tampered\n")
    node.ns.run("mount", "-o", "remount,ro", str(node.root))
    drift = node.agent("verify", check=False)
    assert drift.returncode == 1
    assert "usr/share/doc/readme" in drift.stdout
    assert os.path.exists(node.view() / "etc/image_id")


def test_restart_services_restarts_exactly_the_units_running_replaced_files(
    node: Node, images: Images
) -> None:
    """A process in a (v1 name=systemd) cgroup named like a service runs v1's binary: after the
    swap the agent names that unit and restarts exactly it, through systemctl on PATH."""
    hierarchy = Path("/sys/fs/cgroup/systemd")
    if not (hierarchy / "cgroup.procs").exists():
        pytest.skip("no name=systemd cgroup hierarchy to place a fake service in")
    unit = f"imageswarm-test-{os.getpid()}.service"
    slice_dir = hierarchy / "system.slice"
    made_slice = not slice_dir.exists()
    cgroup = slice_dir / unit
    cgroup.mkdir(parents=True)
    fake = node.work / "bin"
    fake.mkdir()
    calls = node.work / "systemctl.calls"
    (fake / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake / "systemctl").chmod(0o755)
    sleeper = subprocess.Popen(node.ns.argv(str(node.root / "usr/bin/sleep"), "300"))
    try:
        time.sleep(0.2)
        for pid in _pids_of(sleeper.pid):
            (cgroup / "cgroup.procs").write_text(str(pid))
        env = {"PATH": f"{fake}:{os.environ['PATH']}"}
        out = node.agent(
            "apply", "--image", str(images.v2), "--restart-services", "--json", env=env
        )
        op = json.loads(out.stdout)
        ours = [s for s in op["services"] if s["unit"] == unit]
        assert ours and all(s["restarted"] for s in ours), op["services"]
        assert calls.read_text().split("\n")[0] == f"restart {unit}"
        assert len(calls.read_text().splitlines()) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
        for member in (cgroup / "cgroup.procs").read_text().split():
            (hierarchy / "cgroup.procs").write_text(member)
        cgroup.rmdir()
        if made_slice:
            slice_dir.rmdir()


def _pids_of(parent: int) -> list[int]:
    """`parent` (nsenter) and its children (the sleep it runs)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [parent, *map(int, children)]


def test_directory_roots_never_remount_the_filesystem_around_them(
    namespace: Namespace, images: Images, tmp_path: Path
) -> None:
    """A root that is a plain directory is written in place; the mount holding it is never
    remounted (that would flip a whole other filesystem, such as the host's /). A directory on a
    read-only mount that is not itself a mount point is refused, changing nothing."""
    root = tmp_path / "dirroot"
    root.mkdir()
    state = tmp_path / "state"
    env = {**os.environ, "IMAGESWARM_RUNNING_KERNEL": "6.1.0-test-amd64"}
    common = ["--root", str(root), "--state-dir", str(state), "--reboot-command", "true"]

    def agent(action: str, *args: str) -> subprocess.CompletedProcess[str]:
        return namespace.run(*AGENT, action, *common, *args, env=env)

    before = namespace.run("findmnt", "-n", "-o", "OPTIONS", "--target", str(tmp_path)).stdout
    agent("apply", "--image", str(images.v1), "--allow-no-rollback")
    agent("apply", "--image", str(images.v2))
    after = namespace.run("findmnt", "-n", "-o", "OPTIONS", "--target", str(tmp_path)).stdout
    assert before == after
    expected = tree_digest(mount_readonly(namespace, images.v2, tmp_path / "v2"))
    assert tree_digest(namespace.view(root)) == expected
    # The same directory behind a read-only bind mount that is not the root itself.
    ro = tmp_path / "ro"
    ro.mkdir()
    namespace.run("mount", "--bind", str(tmp_path), str(ro))
    namespace.run("mount", "-o", "remount,bind,ro", str(ro))
    refused = namespace.run(
        *AGENT,
        "apply",
        "--root",
        str(ro / "dirroot"),
        "--state-dir",
        str(state),
        "--image",
        str(images.v1),
        env=env,
        check=False,
    )
    assert refused.returncode == 1
    assert "remounts only a root that is itself a mount point" in refused.stderr
    assert tree_digest(namespace.view(root)) == expected
