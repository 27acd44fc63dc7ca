"""Stale processes after a swap: real processes whose binary is replaced, and a fake /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageswarm.agent.services import (
    IGNORED_PREFIXES,
    StaleProcess,
    find_stale,
    restart_units,
    units_to_restart,
)

_SLEEP = shutil.which("sleep") or "/usr/bin/sleep"
# Scans of the whole root ("/") must not skip /tmp, where pytest's tmp_path lives.
_BUT_TMP = tuple(p for p in IGNORED_PREFIXES if p != "/tmp/")


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test, killed and reaped at its end whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _run_copy(
    spawn: list[subprocess.Popen[bytes]], root: Path, rel: str = "usr/bin/sleep"
) -> tuple[subprocess.Popen[bytes], Path]:
    """Copy sleep to root/rel and run `sleep 60` from there, once it has really exec'd."""
    binary = root / rel
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_SLEEP, binary)
    proc = subprocess.Popen([str(binary), "60"])
    spawn.append(proc)
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{proc.pid}/exe") != str(binary):
        assert time.monotonic() < deadline, "the copied sleep never started"
        time.sleep(0.01)
    return proc, binary


def _replace_like_rsync(path: Path) -> None:
    """rsync writes a temp file next to the target and renames it over the target."""
    tmp = path.with_name(f".{path.name}.XXXXXX")
    tmp.write_bytes(path.read_bytes() + b"\0new")
    tmp.chmod(0o755)
    os.replace(tmp, path)


def _pids(stale: list[StaleProcess]) -> set[int]:
    return {p.pid for p in stale}


def test_running_copy_is_not_stale_until_replaced(
    tmp_path: Path, spawn: list[subprocess.Popen[bytes]]
) -> None:
    root = tmp_path / "root"
    proc, binary = _run_copy(spawn, root)
    assert find_stale(root) == []

    _replace_like_rsync(binary)

    stale = find_stale(root)
    assert [(p.pid, p.files) for p in stale] == [(proc.pid, (str(binary),))]
    assert stale[0].comm == "sleep"


def test_deleted_binary_is_stale(tmp_path: Path, spawn: list[subprocess.Popen[bytes]]) -> None:
    root = tmp_path / "root"
    proc, binary = _run_copy(spawn, root)
    binary.unlink()
    assert [(p.pid, p.files) for p in find_stale(root)] == [(proc.pid, (str(binary),))]


def test_processes_outside_root_are_never_reported(
    tmp_path: Path, spawn: list[subprocess.Popen[bytes]]
) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    # A sibling whose name starts with the root's: a bare prefix check would take it for inside.
    sibling, sibling_binary = _run_copy(spawn, tmp_path / "root2")
    _replace_like_rsync(sibling_binary)
    host = subprocess.Popen([_SLEEP, "60"])
    spawn.append(host)

    assert find_stale(root) == []
    assert sibling.pid in _pids(find_stale(tmp_path / "root2"))
    # Through a symlink, the root is compared resolved.
    (tmp_path / "link").symlink_to(tmp_path / "root2")
    assert sibling.pid in _pids(find_stale(tmp_path / "link"))


def test_whole_system_scan_finds_the_replaced_process(
    tmp_path: Path, spawn: list[subprocess.Popen[bytes]]
) -> None:
    proc, binary = _run_copy(spawn, tmp_path / "root")
    _replace_like_rsync(binary)
    mine = [p for p in find_stale(Path("/"), ignore=_BUT_TMP) if p.pid == proc.pid]
    assert [p.files for p in mine] == [(str(binary),)]


def _fake_process(
    proc: Path, pid: int, exe: Path | None, maps: str, cgroup: str = "0::/\n", comm: str = "x"
) -> None:
    where = proc / str(pid)
    where.mkdir(parents=True)
    (where / "maps").write_text(maps)
    (where / "cgroup").write_text(cgroup)
    (where / "comm").write_text(comm + "\n")
    if exe is not None:
        (where / "exe").symlink_to(exe)


def _line(path: str, inode: int, dev: str = "fd:01") -> str:
    return f"7f0000000000-7f0000001000 r-xp 00000000 {dev} {inode}    {path}\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for rel in ("usr/bin/daemon", "usr/lib/lib a b.so", "usr/lib/libc.so", "etc/x"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return root


def test_maps_parser_with_spaces_deleted_and_inode_changes(tmp_path: Path, tree: Path) -> None:
    proc = tmp_path / "proc"
    exe = tree / "usr/bin/daemon"
    spaced = tree / "usr/lib/lib a b.so"
    libc = tree / "usr/lib/libc.so"
    maps = (
        _line(str(exe), exe.stat().st_ino)  # current
        + _line(f"{spaced} (deleted)", 999_999)  # the kernel says deleted
        + _line(str(libc), libc.stat().st_ino + 1)  # another inode is at the path now
        + _line(str(tree / "usr/lib/gone.so"), 12)  # nothing is at the path now
        + "7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n"  # anonymous
        + "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0          [stack]\n"
        + _line(str(tmp_path / "outside.so (deleted)"), 5)
        + _line(f"{tree}/tmp/scratch (deleted)", 6)  # under the root, but ignored
        + "garbage line\n"
    )
    _fake_process(proc, 100, exe, maps, comm="daemon")
    _fake_process(proc, 101, exe, _line(str(exe), exe.stat().st_ino))  # up to date

    assert find_stale(tree, proc=proc) == [
        StaleProcess(
            pid=100,
            comm="daemon",
            unit=None,
            files=(str(tree / "usr/lib/gone.so"), str(spaced), str(libc)),
        )
    ]


def test_deleted_executable_and_skipped_entries(tmp_path: Path, tree: Path) -> None:
    proc = tmp_path / "proc"
    exe = tree / "usr/bin/daemon"
    _fake_process(proc, 7, Path(f"{exe} (deleted)"), "")  # how the kernel shows a deleted exe
    _fake_process(proc, 8, None, "")  # a kernel thread: no exe
    _fake_process(proc, os.getpid(), exe, _line(f"{exe} (deleted)", 1))  # ourselves
    (proc / "self").symlink_to(proc / "8")
    (proc / "sys").mkdir()

    assert [(p.pid, p.files) for p in find_stale(tree, proc=proc)] == [(7, (str(exe),))]


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/foo.service\n", "foo.service"),
        ("0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty@tty1.service"),
        ("0::/system.slice/docker.service/payload\n", "docker.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n", None),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/system.slice/docker-0123abcd.scope\n", None),
        ("0::/init.scope\n", None),
        ("0::/\n", None),
        ("12:pids:/system.slice/bar.service\n1:name=systemd:/system.slice/bar.service\n", "bar"),
        ("1:name=systemd:/user.slice/user-0.slice/session-1.scope\n0::/\n", None),
        ("", None),
    ],
)
def test_unit_from_cgroup(tmp_path: Path, tree: Path, cgroup: str, unit: str | None) -> None:
    proc = tmp_path / "proc"
    exe = tree / "usr/bin/daemon"
    _fake_process(proc, 42, exe, f"{_line(str(exe), 1)}", cgroup=cgroup)
    expected = "bar.service" if unit == "bar" else unit
    assert [p.unit for p in find_stale(tree, proc=proc)] == [expected]


def test_whole_root_ignores_kernel_memory_names(tmp_path: Path, tree: Path) -> None:
    proc = tmp_path / "proc"
    exe = tree / "usr/bin/daemon"
    maps = (
        _line("/memfd:pulseaudio (deleted)", 1, "00:01")
        + _line("/SYSV00000000 (deleted)", 2, "00:01")
        + _line("/dev/zero (deleted)", 3, "00:01")
        + _line(str(exe), exe.stat().st_ino)
    )
    _fake_process(proc, 5, exe, maps)
    assert find_stale(Path("/"), proc=proc, ignore=_BUT_TMP) == []
    _fake_process(proc, 6, exe, _line(str(exe), exe.stat().st_ino + 1))
    assert [(p.pid, p.files) for p in find_stale(Path("/"), proc=proc, ignore=_BUT_TMP)] == [
        (6, (str(exe),))
    ]


def test_units_to_restart_sorted_unique() -> None:
    stale = [
        StaleProcess(3, "b", "b.service", ("/x",)),
        StaleProcess(1, "a", "a.service", ("/x",)),
        StaleProcess(2, "b", "b.service", ("/y",)),
        StaleProcess(4, "bash", None, ("/x",)),
    ]
    assert units_to_restart(stale) == ["a.service", "b.service"]
    assert units_to_restart([]) == []


def _fake_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls"
    script = tmp_path / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'case "$2" in\n'
        '  bad.service) echo "Job for bad.service failed." >&2; exit 1 ;;\n'
        "  slow.service) exec sleep 30 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script, log


def test_restart_units_reports_each_unit(tmp_path: Path) -> None:
    script, log = _fake_systemctl(tmp_path)
    results = restart_units(["a.service", "bad.service", "b.service"], systemctl=str(script))
    assert results == [
        ("a.service", True, ""),
        ("bad.service", False, "exit status 1: Job for bad.service failed."),
        ("b.service", True, ""),
    ]
    assert log.read_text().splitlines() == [
        "restart a.service",
        "restart bad.service",
        "restart b.service",
    ]


def test_restart_units_timeout_and_missing_systemctl(tmp_path: Path) -> None:
    script, _ = _fake_systemctl(tmp_path)
    start = time.monotonic()
    [(unit, ok, output)] = restart_units(["slow.service"], systemctl=str(script), timeout=0.5)
    assert (unit, ok) == ("slow.service", False)
    assert "did not finish within 0.5 s" in output
    assert time.monotonic() - start < 10

    [(unit, ok, output)] = restart_units(["a.service"], systemctl=str(tmp_path / "nope"))
    assert (unit, ok) == ("a.service", False)
    assert "could not be run" in output
