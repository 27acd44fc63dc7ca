"""The reboot decision: did the swap change the kernel, and what does the operator's policy say.

The running kernel keeps running after the swap, so only a reboot brings in a new one. A kernel
counts as changed when the image lacks the running release (its modules or its vmlinuz), or
ships different boot files under the same release (a rebuild that kept the version string).

Images are read through their own symlinks (/lib -> usr/lib on merged-/usr systems), resolved
inside the image's root: an absolute link in the image never reaches the host's files.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from imageswarm.agent.errors import InvalidInputError

Policy = Literal["auto", "never", "always", "hold"]
POLICIES: tuple[Policy, ...] = get_args(Policy)

RUNNING_KERNEL_ENV = "IMAGESWARM_RUNNING_KERNEL"
"""Environment variable that overrides the running kernel's release (for tests and labs)."""

_MODULE_DIRS = ("lib/modules", "usr/lib/modules")
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")  # as in imagefile: anything else ignored
_MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup


@dataclass(frozen=True)
class KernelFacts:
    """What the image and the live root hold for the kernel, next to the running release.

    `live_module_dirs` are the root-relative real directories holding the running release's
    modules on the live root ("usr/lib/modules/<r>" on merged /usr), after its symlinks.
    """

    running: str
    image_releases: tuple[str, ...]
    boot_differs: bool
    modules_present: bool
    live_module_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class RebootDecision:
    """What to do about the kernel after a swap.

    `hold` is True only when a reboot is due and the policy says to wait for an explicit go.
    `preserve` lists root-relative paths the swap must leave in place so that the running
    kernel keeps loading its modules (policies that keep it running: never, hold).
    """

    policy: Policy
    kernel_changed: bool
    reboot: bool
    hold: bool
    preserve: tuple[str, ...]
    summary: str


def running_release() -> str:
    """The running kernel's release, as in /lib/modules (`$IMAGESWARM_RUNNING_KERNEL` wins)."""
    return os.environ.get(RUNNING_KERNEL_ENV) or os.uname().release


def inspect(image_root: Path, live_root: Path, running: str) -> KernelFacts:
    """Read the kernel facts from a mounted image tree and the live root tree."""
    for what, root in (("image", image_root), ("live", live_root)):
        if not root.is_dir():
            raise InvalidInputError(f"The {what} root {root} is not a directory.")
    if not _RELEASE.fullmatch(running):
        raise InvalidInputError(f"{running!r} is not a kernel release.")
    releases: set[str] = set()
    for directory in _MODULE_DIRS:
        for name in _listdir(image_root, directory):
            if _is(image_root, f"{directory}/{name}", stat.S_ISDIR):
                releases.add(name)
    for name in _listdir(image_root, "boot"):
        if name.startswith("vmlinuz-") and _is(image_root, f"boot/{name}", stat.S_ISREG):
            releases.add(name.removeprefix("vmlinuz-"))
    boot = [f"boot/{n}" for n in (f"vmlinuz-{running}", f"initrd.img-{running}")]
    boot.append(f"boot/initramfs-{running}.img")  # the RHEL family's name for the initrd
    live_modules = {_resolve(live_root, f"{d}/{running}") for d in _MODULE_DIRS}
    return KernelFacts(
        running=running,
        image_releases=tuple(sorted(r for r in releases if _RELEASE.fullmatch(r))),
        boot_differs=any(_digest(image_root, f) != _digest(live_root, f) for f in boot),
        modules_present=any(_is(image_root, f"{d}/{running}", stat.S_ISDIR) for d in _MODULE_DIRS),
        live_module_dirs=tuple(
            sorted(d for d in live_modules if d is not None and _is(live_root, d, stat.S_ISDIR))
        ),
    )


def decide(facts: KernelFacts, policy: Policy) -> RebootDecision:
    """Apply the operator's reboot policy to the kernel facts."""
    if policy not in POLICIES:
        raise InvalidInputError(
            f"Unknown reboot policy {policy!r}; expected one of {', '.join(POLICIES)}."
        )
    running = facts.running
    why = _why_changed(facts)
    changed = why is not None
    if policy == "always":
        detail = why or f"kernel {running} is unchanged"
        summary = f"Rebooting because the policy is 'always' ({detail})."
        return RebootDecision(
            policy, changed, reboot=True, hold=False, preserve=(), summary=summary
        )
    if why is None:
        summary = f"Kernel {running} is unchanged; no reboot is needed."
        return RebootDecision(policy, False, reboot=False, hold=False, preserve=(), summary=summary)
    if policy == "auto":
        summary = f"Rebooting: {why}."
        return RebootDecision(policy, True, reboot=True, hold=False, preserve=(), summary=summary)
    keep = _preserve(facts)
    if policy == "hold":
        summary = (
            f"Reboot held until an explicit go: {why}; kernel {running} keeps running "
            "meanwhile and its files are kept."
        )
        return RebootDecision(policy, True, reboot=True, hold=True, preserve=keep, summary=summary)
    summary = (
        f"Kernel pending: {why}; the policy is 'never', so kernel {running} keeps running "
        "without a reboot and its files are kept."
    )
    return RebootDecision(policy, True, reboot=False, hold=False, preserve=keep, summary=summary)


def _why_changed(facts: KernelFacts) -> str | None:
    running = facts.running
    if running not in facts.image_releases:
        found = ", ".join(facts.image_releases) or "none"
        return f"the image has no kernel {running} (it has {found})"
    if not facts.modules_present:
        return f"the image has no modules for kernel {running}"
    if facts.boot_differs:
        return f"the image's boot files for kernel {running} differ from the running system's"
    return None


def _preserve(facts: KernelFacts) -> tuple[str, ...]:
    """The running kernel's files; initramfs-<r>.img is where RHEL-family systems put initrd."""
    r = facts.running
    modules = [f"lib/modules/{r}"]
    modules += [d for d in facts.live_module_dirs if d not in modules]
    boot = ["vmlinuz-", "initrd.img-", "initramfs-", "config-", "System.map-"]
    files = [f"boot/{b}{r}.img" if b == "initramfs-" else f"boot/{b}{r}" for b in boot]
    return (*modules, *files)


def _resolve(root: Path, relative: str) -> str | None:
    """The real root-relative path of `relative` inside `root`, or None when it does not exist.

    Symlinks are followed as if `root` were "/": absolute targets restart at `root`, and ".."
    stops at it, so nothing outside `root` is ever looked at.
    """
    todo = [p for p in relative.split("/") if p not in ("", ".")]
    todo.reverse()
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if done:
                done.pop()
            continue
        try:
            st = os.lstat(root.joinpath(*done, name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(root.joinpath(*done, name))
            if target.startswith("/"):
                done = []
            todo.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            return None
        done.append(name)
    return "/".join(done)


def _is(root: Path, relative: str, kind: Callable[[int], bool]) -> bool:
    """Whether `relative` exists inside `root` and its mode passes `kind` (stat.S_ISDIR...)."""
    resolved = _resolve(root, relative)
    if resolved is None:
        return False
    mode = os.lstat(root / resolved).st_mode if resolved else os.stat(root).st_mode
    return kind(mode)


def _listdir(root: Path, relative: str) -> list[str]:
    resolved = _resolve(root, relative)
    if resolved is None or not _is(root, resolved, stat.S_ISDIR):
        return []
    return sorted(os.listdir(root / resolved))


def _digest(root: Path, relative: str) -> str | None:
    """sha256 of a regular file inside `root`, or None when there is none."""
    resolved = _resolve(root, relative)
    if resolved is None or not _is(root, resolved, stat.S_ISREG):
        return None
    digest = hashlib.sha256()
    fd = os.open(root / resolved, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
