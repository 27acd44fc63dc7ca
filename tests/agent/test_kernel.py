"""Kernel facts from image and live trees, and the reboot decision under each policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageswarm.agent.errors import InvalidInputError
from imageswarm.agent.kernel import (
    POLICIES,
    KernelFacts,
    Policy,
    RebootDecision,
    decide,
    inspect,
    running_release,
)

OLD = "6.1.0-18-amd64"
NEW = "6.1.0-21-amd64"


def _root(path: Path, releases: list[str], *, merged: bool = True, boot: bytes = b"k") -> Path:
    """A root tree with modules and boot files for each release; merged-/usr by default."""
    modules = path / ("usr/lib/modules" if merged else "lib/modules")
    if merged:
        (path / "usr/lib").mkdir(parents=True)
        (path / "lib").symlink_to("usr/lib")
    for release in releases:
        (modules / release / "kernel").mkdir(parents=True)
        (modules / release / "modules.dep").write_text("")
        (path / "boot").mkdir(exist_ok=True)
        (path / f"boot/vmlinuz-{release}").write_bytes(boot + release.encode())
        (path / f"boot/initrd.img-{release}").write_bytes(b"initrd" + release.encode())
        (path / f"boot/config-{release}").write_text("CONFIG_X=y\n")
    return path


def test_same_kernel_merged_usr(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [OLD])
    live = _root(tmp_path / "live", [OLD])
    facts = inspect(image, live, OLD)
    assert facts == KernelFacts(OLD, (OLD,), False, True, (f"usr/lib/modules/{OLD}",))


def test_new_kernel_in_image(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [NEW])
    live = _root(tmp_path / "live", [OLD])
    facts = inspect(image, live, OLD)
    # The live root's boot files for OLD exist, the image's do not.
    assert facts == KernelFacts(OLD, (NEW,), True, False, (f"usr/lib/modules/{OLD}",))


def test_split_usr_layout_and_both_kernels(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [OLD, NEW], merged=False)
    live = _root(tmp_path / "live", [OLD], merged=False)
    facts = inspect(image, live, OLD)
    assert facts == KernelFacts(OLD, (OLD, NEW), False, True, (f"lib/modules/{OLD}",))


def test_rebuilt_kernel_with_the_same_release_differs(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [OLD], boot=b"rebuilt")
    live = _root(tmp_path / "live", [OLD])
    assert inspect(image, live, OLD).boot_differs


def test_initrd_only_on_one_side_differs(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [OLD])
    live = _root(tmp_path / "live", [OLD])
    (image / f"boot/initrd.img-{OLD}").unlink()
    assert inspect(image, live, OLD).boot_differs
    (live / f"boot/initrd.img-{OLD}").unlink()
    assert not inspect(image, live, OLD).boot_differs
    (image / f"boot/initramfs-{OLD}.img").write_bytes(b"dracut")
    assert inspect(image, live, OLD).boot_differs


def test_kernel_only_in_boot_counts_as_a_release(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [])
    (image / "boot").mkdir()
    (image / f"boot/vmlinuz-{NEW}").write_bytes(b"k")
    (image / "boot/vmlinuz").symlink_to(f"vmlinuz-{NEW}")  # Debian's link names no release
    (image / "usr/lib/modules/not a release").mkdir(parents=True)
    (image / "usr/lib/modules/README").write_text("a file, not a release")
    facts = inspect(image, _root(tmp_path / "live", []), OLD)
    assert facts.image_releases == (NEW,)


def test_symlinks_resolve_inside_the_image_never_on_the_host(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "modules" / "9.9.9-host").mkdir(parents=True)
    (host / "boot").mkdir()
    (host / f"boot/vmlinuz-{OLD}").write_bytes(b"host kernel")
    image = tmp_path / "image"
    (image / "usr/lib/modules" / NEW).mkdir(parents=True)
    # Absolute links are read as the image would read them once booted: from the image root.
    (image / "lib").symlink_to("/usr/lib")
    climb = "../" * 40 + str(host / "modules/9.9.9-host").lstrip("/")
    (image / "usr/lib/modules/escape").symlink_to(climb)  # ".." stops at the image root
    (image / "usr/lib/modules/abs").symlink_to(str(host / "modules"))
    (image / "boot").symlink_to(str(host / "boot"))  # would be the host's /boot if followed
    (image / "loop").symlink_to("loop")
    live = _root(tmp_path / "live", [OLD])

    facts = inspect(image, live, OLD)
    assert (image / "usr/lib/modules/abs/9.9.9-host").is_dir()  # what the host would say
    assert facts.image_releases == (NEW,)
    assert not facts.modules_present
    assert facts.boot_differs  # the image has no boot files at all, the live root has


def test_invalid_inputs(tmp_path: Path) -> None:
    live = _root(tmp_path / "live", [OLD])
    with pytest.raises(InvalidInputError):
        inspect(tmp_path / "missing", live, OLD)
    with pytest.raises(InvalidInputError):
        inspect(live, live, "../../etc")
    with pytest.raises(InvalidInputError):
        decide(KernelFacts(OLD, (OLD,), False, True), "sometimes")  # type: ignore[arg-type]


SAME = KernelFacts(OLD, (OLD,), False, True, (f"usr/lib/modules/{OLD}",))
NEW_KERNEL = KernelFacts(OLD, (NEW,), True, False, (f"usr/lib/modules/{OLD}",))
REBUILT = KernelFacts(OLD, (OLD,), True, True, (f"lib/modules/{OLD}",))
NO_MODULES = KernelFacts(OLD, (OLD,), False, False)

KEEP_MERGED = (
    f"lib/modules/{OLD}",
    f"usr/lib/modules/{OLD}",
    f"boot/vmlinuz-{OLD}",
    f"boot/initrd.img-{OLD}",
    f"boot/initramfs-{OLD}.img",
    f"boot/config-{OLD}",
    f"boot/System.map-{OLD}",
)


@pytest.mark.parametrize("policy", POLICIES)
def test_unchanged_kernel_never_needs_a_reboot_unless_always(policy: Policy) -> None:
    decision = decide(SAME, policy)
    assert not decision.kernel_changed
    assert decision.reboot == (policy == "always")
    assert not decision.hold
    assert decision.preserve == ()
    assert "unchanged" in decision.summary


def test_auto_reboots_for_a_new_kernel() -> None:
    decision = decide(NEW_KERNEL, "auto")
    assert decision == RebootDecision(
        "auto",
        kernel_changed=True,
        reboot=True,
        hold=False,
        preserve=(),
        summary=f"Rebooting: the image has no kernel {OLD} (it has {NEW}).",
    )


def test_always_reboots() -> None:
    decision = decide(NEW_KERNEL, "always")
    assert (decision.kernel_changed, decision.reboot, decision.hold) == (True, True, False)
    assert decision.summary.startswith("Rebooting because the policy is 'always'")


def test_never_keeps_the_running_kernel_files() -> None:
    decision = decide(NEW_KERNEL, "never")
    assert (decision.kernel_changed, decision.reboot, decision.hold) == (True, False, False)
    assert decision.preserve == KEEP_MERGED
    assert decision.summary.startswith("Kernel pending: ")


def test_never_on_split_usr_keeps_only_lib_modules() -> None:
    decision = decide(REBUILT, "never")
    assert decision.kernel_changed and not decision.reboot
    assert decision.preserve[:2] == (f"lib/modules/{OLD}", f"boot/vmlinuz-{OLD}")
    assert "boot files" in decision.summary


def test_hold_reboots_only_after_a_go_and_keeps_the_files_meanwhile() -> None:
    decision = decide(NEW_KERNEL, "hold")
    assert (decision.kernel_changed, decision.reboot, decision.hold) == (True, True, True)
    assert decision.preserve == KEEP_MERGED
    assert decision.summary.startswith("Reboot held")


def test_missing_modules_alone_is_a_kernel_change() -> None:
    decision = decide(NO_MODULES, "auto")
    assert decision.reboot
    assert decision.summary == f"Rebooting: the image has no modules for kernel {OLD}."


@pytest.mark.parametrize("policy", POLICIES)
def test_every_summary_is_one_sentence(policy: Policy) -> None:
    for facts in (SAME, NEW_KERNEL, REBUILT, NO_MODULES):
        summary = decide(facts, policy).summary
        assert "\n" not in summary and summary.endswith(".") and summary[0].isupper()


def test_decisions_from_real_trees(tmp_path: Path) -> None:
    image = _root(tmp_path / "image", [NEW])
    live = _root(tmp_path / "live", [OLD])
    decision = decide(inspect(image, live, OLD), "never")
    assert decision.preserve == KEEP_MERGED
    kept_files = [p for p in decision.preserve if (live / p).is_file()]
    assert kept_files == [f"boot/vmlinuz-{OLD}", f"boot/initrd.img-{OLD}", f"boot/config-{OLD}"]


def test_running_release_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGESWARM_RUNNING_KERNEL", raising=False)
    assert running_release() == os.uname().release
    monkeypatch.setenv("IMAGESWARM_RUNNING_KERNEL", OLD)
    assert running_release() == OLD
