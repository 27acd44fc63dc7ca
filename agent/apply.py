"""The in-place swap, phase by phase, journaled so that a crash at any point is recoverable.

    prepare -> pre-configure -> swap -> configure -> post-configure -> health -> commit

Before `swap` the root is untouched: a failure (or a crash, found by the next run) aborts and
the node keeps running the old image. From `swap` on, the root may be a mix of two images, so
the journal always says so: a crash resumes the operation from `swap` (rsync converges the
root to the image whatever state it was left in), and a failure restores the previous image
the same way. The image id file is written last, so it never names an image the root does not
fully hold. `prepare` refuses a swap the root's filesystem has no room for (agent/space.py),
and a restore first puts back by renames what the failed swap replaced (agent/undo.py), so it
needs no space even when the disk filled up half-way.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from imageswarm.agent import health, hooks, kernel, mounts, preserve, rsync, services, space, undo
from imageswarm.agent.errors import (
    ApplyError,
    HookError,
    ImageSwarmError,
    InvalidInputError,
    StateError,
)
from imageswarm.agent.fsutil import atomic_write
from imageswarm.agent.journal import ImageRef, Operation, Phase, StateDir
from imageswarm.agent.source import image_tree

FAILPOINT_ENV = "IMAGESWARM_FAILPOINT"


@dataclass(frozen=True)
class Options:
    root: Path
    state_dir: Path
    hooks: Path | None = None
    hook_timeout: float = 300.0
    preserve: tuple[str, ...] = preserve.DEFAULTS
    policy: kernel.Policy = "auto"
    health: health.HealthCheck | None = None
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    restart_services: bool = False
    image_id_file: str = "etc/image_id"
    running_kernel: str = field(default_factory=kernel.running_release)
    allow_no_rollback: bool = False


def _failpoint(name: str, child: subprocess.Popen[str] | None = None) -> None:
    """Crash here (SIGKILL) when the tests ask for it: the only way to prove recovery."""
    if os.environ.get(FAILPOINT_ENV) == name:
        if child is not None:
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)


class Agent:
    def __init__(self, options: Options) -> None:
        self.opts = options
        self.root = options.root
        self.state = StateDir(options.state_dir)
        hooks.check_hooks_dir(options.hooks)
        if not self.root.is_dir():
            raise InvalidInputError(f"root {self.root} is not a directory")

    # --- public operations -------------------------------------------------------------------
    def plan(self, image: ImageRef) -> rsync.Plan:
        with self.state.locked():
            op = self._new_op("plan", image)
            try:
                with image_tree(image, self.state.workdir(op)) as tree:
                    return self._prepare(op, tree)
            finally:
                self.state.drop_workdir(op)

    def apply(self, image: ImageRef, *, kind: str = "apply") -> Operation:
        with self.state.locked():
            recovered = self._recover()
            current = self.state.current()
            if current is not None and current.image_id == image.image_id:
                if recovered is not None and recovered.image.image_id == image.image_id:
                    return recovered  # the interrupted apply of this very image, now finished
                op = self._new_op(kind, image)
                op.result = "already-applied"
                return op
            if current is None and not self.opts.allow_no_rollback:
                raise InvalidInputError(
                    f"no previous image is known for {self.root}, so a failed apply could not be "
                    "rolled back; record the running image with `imageswarm agent adopt` first "
                    "(or pass --allow-no-rollback)"
                )
            op = self._new_op(kind, image)
            self.state.record(op)
            return self._run(op)

    def rollback(self) -> Operation:
        previous = self.state.previous()
        if previous is None:
            raise InvalidInputError(f"no previous image is recorded for {self.root}")
        return self.apply(previous, kind="rollback")

    def recover(self) -> Operation | None:
        with self.state.locked():
            return self._recover()

    def adopt(self, image: ImageRef) -> None:
        """Record `image` as what the root runs now (after provisioning), without touching it."""
        with self.state.locked():
            self._recover()
            self.state.save_status(current=image.to_json(), previous=None)
            self._write_image_id(image.image_id)

    # --- the phases --------------------------------------------------------------------------
    def _new_op(self, kind: str, image: ImageRef) -> Operation:
        old = self.state.current()
        return Operation(secrets.token_hex(6), kind, image, old, self.opts.policy)

    @contextmanager
    def _phase(self, op: Operation, name: str) -> Iterator[Phase]:
        phase = Phase(name, time.time())
        op.phases.append(phase)
        self.state.record(op)
        _failpoint(f"phase:{name}")
        try:
            yield phase
        except BaseException as exc:
            phase.ended, phase.ok, phase.detail = time.time(), False, str(exc)
            self.state.record(op)
            raise
        phase.ended, phase.ok = time.time(), True
        self.state.record(op)

    def _env(self, op: Operation, tree: Path | None = None) -> dict[str, str]:
        work = self.state.workdir(op)
        reboot = (op.reboot or {}).get("summary_word", "no-reboot")
        return {
            "IMAGESWARM_OPERATION": op.kind,
            "IMAGESWARM_OLD_IMAGE": op.old.image_id if op.old else "",
            "IMAGESWARM_NEW_IMAGE": op.image.image_id,
            "IMAGESWARM_ROOT": str(self.root),
            "IMAGESWARM_CHANGES": str(work / "changes"),
            "IMAGESWARM_REBOOT": reboot,
            "IMAGESWARM_IMAGE_TREE": str(tree or ""),
        }

    def _hooks(self, op: Operation, phase: str, tree: Path | None = None) -> None:
        try:
            runs = hooks.run_phase(
                self.opts.hooks, phase, self._env(op, tree), timeout=self.opts.hook_timeout
            )
        except HookError as exc:
            op.hooks += [r.to_json() for r in exc.runs if isinstance(r, hooks.HookRun)]
            if op.kind != "restore":
                raise
            # Restoring the previous image must not hinge on hooks: the root is already back to
            # a known image after the swap, so a failing hook is reported, not fatal.
            op.error = f"{op.error or ''}; {phase} hook failed during restore: {exc}".lstrip("; ")
            return
        op.hooks += [r.to_json() for r in runs]

    def _filter_file(self, op: Operation, decision: kernel.RebootDecision) -> Path:
        keep = [*self.opts.preserve, *decision.preserve, services.REPLACED_DIR + "/"]
        inside = preserve.under_root(self.state.path, self.root)
        if inside and inside != ".":
            keep.append(inside + "/")
        path = self.state.workdir(op) / "filter"
        path.write_text("\n".join(preserve.rsync_filters(keep)) + "\n")
        return path

    def _decide(self, op: Operation, tree: Path) -> kernel.RebootDecision:
        facts = kernel.inspect(tree, self.root, self.opts.running_kernel)
        decision = kernel.decide(facts, cast(kernel.Policy, op.policy))
        word = "hold" if decision.hold else "reboot" if decision.reboot else "no-reboot"
        if decision.policy == "never" and decision.kernel_changed:
            word = "kernel-pending"
        op.reboot = {
            "policy": decision.policy,
            "kernel_changed": decision.kernel_changed,
            "reboot": decision.reboot,
            "hold": decision.hold,
            "summary": decision.summary,
            "summary_word": word,
            "running": facts.running,
            "image_kernels": list(facts.image_releases),
        }
        return decision

    def _prepare(self, op: Operation, tree: Path) -> rsync.Plan:
        decision = self._decide(op, tree)
        plan = rsync.run(tree, self.root, self._filter_file(op, decision), dry_run=True)
        op.plan = plan.to_json()
        (self.state.workdir(op) / "changes").write_text(plan.change_list())
        return plan

    def _check_space(self, op: Operation, plan: rsync.Plan, tree: Path) -> None:
        """Refuse, before any hook runs or the root is remounted, a swap it has no room for."""
        backup = f"{services.REPLACED_DIR}/{op.op_id}"
        need = space.check(plan, tree, self.root, backup, keep=op.op_id)
        if op.plan is not None:
            op.plan["space"] = need.to_json()

    def _run(self, op: Operation, *, resume: bool = False) -> Operation:
        try:
            with image_tree(op.image, self.state.workdir(op)) as tree:
                if not resume:
                    with self._phase(op, "prepare"):
                        self._check_space(op, self._prepare(op, tree), tree)
                    with self._phase(op, "pre-configure"):
                        self._hooks(op, "pre-configure", tree)
                else:
                    self._decide(op, tree)
                with self._phase(op, "swap"):
                    self._swap(op, tree)
                with self._phase(op, "configure"):
                    self._hooks(op, "configure", tree)
                with self._phase(op, "post-configure"):
                    self._hooks(op, "post-configure", tree)
                if self.opts.health is not None and op.kind != "restore":
                    with self._phase(op, "health"):
                        result = health.run_health_check(self.opts.health, self._env(op, tree))
                        if not result.ok:
                            raise ApplyError(f"health check failed: {result.detail}")
            with self._phase(op, "commit"):
                self._write_image_id(op.image.image_id)
        except (ImageSwarmError, OSError) as exc:
            return self._failed(op, exc)
        return self._finish(op)

    def _swap(self, op: Operation, tree: Path) -> None:
        if not op.remounted and self._read_only_root():
            op.remounted = True
            self.state.record(op)
        try:
            if op.remounted:
                mounts.remount(self.root, writable=True)
            filters = self.state.workdir(op) / "filter"
            if not filters.exists():
                self._filter_file(op, self._decide(op, tree))
            replaced = self.root / services.REPLACED_DIR
            backup = replaced / op.op_id
            if op.undoes is not None:
                undo.undo_swap(replaced / op.undoes, tree, self.root, filters)
            # Before the rsync, so that their space is there for it (space.check counted it).
            self._prune_replaced(replaced, keep=op.op_id)
            hidden = self._hidden_changes(op, tree)
            done = rsync.run(
                tree,
                self.root,
                filters,
                checksum=hidden is None,
                backup_dir=backup,
                on_line=self._midway(),
            )
            if hidden:
                only = self.state.workdir(op) / "same-size-and-mtime"
                only.write_text("".join(f"{path}\n" for path in hidden))
                rsync.run(tree, self.root, filters, only=only, backup_dir=backup)
            preserve.merge_accounts(tree, self.root)
            if op.plan is None:
                op.plan = done.to_json()
        finally:
            if op.remounted:
                mounts.remount(self.root, writable=False)

    def _hidden_changes(self, op: Operation, tree: Path) -> list[str] | None:
        """The planned content changes that rsync's quick check (size + mtime) would miss.

        None when the plan is not at hand or a path cannot be checked: then the swap itself
        compares checksums, which is always right, only slower."""
        try:
            lines = (self.state.workdir(op) / "changes").read_text().splitlines()
        except FileNotFoundError:
            return None
        hidden = []
        for line in lines:
            if not line.startswith("~ "):
                continue
            rel = line[2:]
            try:
                new, old = os.lstat(tree / rel), os.lstat(self.root / rel)
            except OSError:
                return None
            if new.st_size == old.st_size and int(new.st_mtime) == int(old.st_mtime):
                hidden.append(rel)
        return hidden

    @staticmethod
    def _prune_replaced(replaced: Path, keep: str) -> None:
        """Delete files earlier swaps moved aside, once no process runs them any more."""
        if not replaced.is_dir():
            return
        for old in replaced.iterdir():
            if old.name != keep and not services.dir_in_use(old):
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _midway() -> rsync.LineHook:
        seen = [0]

        def hook(proc: subprocess.Popen[str]) -> None:
            seen[0] += 1
            if seen[0] == 20:
                _failpoint("rsync", proc)

        return hook

    def _read_only_root(self) -> bool:
        """True when the root is a read-only mount point, so writing needs a remount.

        Only a root that is itself a mount point is ever remounted: remounting the mount that
        merely contains a directory root would flip a whole other filesystem (the host's /)."""
        entry = mounts.mount_of(self.root)
        if not entry.readonly:
            return False
        if entry.mount_point != self.root.resolve():
            raise ApplyError(
                f"{self.root} lies on the read-only mount {entry.mount_point}; the agent "
                "remounts only a root that is itself a mount point"
            )
        return True

    def _write_image_id(self, image_id: str) -> None:
        path = self.root / self.opts.image_id_file
        if self._read_only_root():
            mounts.remount(self.root, writable=True)
            try:
                atomic_write(path, f"{image_id}\n".encode())
            finally:
                mounts.remount(self.root, writable=False)
        else:
            atomic_write(path, f"{image_id}\n".encode())

    # --- endings -----------------------------------------------------------------------------
    def _finish(self, op: Operation) -> Operation:
        stale = services.find_stale(self.root)
        restarted: dict[str, tuple[bool, str]] = {}
        if self.opts.restart_services:
            units = services.units_to_restart(stale)
            restarted = {unit: (ok, out) for unit, ok, out in services.restart_units(units)}
        op.services = [
            {
                "pid": s.pid,
                "comm": s.comm,
                "unit": s.unit,
                "files": list(s.files[:10]),
                "restarted": restarted[s.unit][0] if s.unit in restarted else False,
                "restart_output": restarted[s.unit][1] if s.unit in restarted else "",
            }
            for s in stale
        ]
        if op.kind == "restore":
            op.result = "rolled-back"
        else:
            op.result = "applied"
            self.state.save_status(current=op.image.to_json(), previous=op.old and op.old.to_json())
            self.state.prune_images()
            self._reboot(op)
        return self._close(op)

    def _reboot(self, op: Operation) -> None:
        reboot = op.reboot or {}
        if reboot.get("hold") and reboot.get("kernel_changed"):
            self.state.save_status(reboot_held=True)
        elif reboot.get("reboot"):
            subprocess.run(list(self.opts.reboot_command), check=False)
            reboot["rebooted"] = True

    def release_hold(self) -> bool:
        """The operator's explicit go after `hold`: reboot now. False if nothing was held."""
        with self.state.locked():
            if not self.state.status().get("reboot_held"):
                return False
            self.state.save_status(reboot_held=False)
            subprocess.run(list(self.opts.reboot_command), check=False)
            return True

    def _close(self, op: Operation) -> Operation:
        self.state.save_status(last=op.to_json())
        self.state.clear_journal()
        self.state.drop_workdir(op)
        return op

    def _failed(self, op: Operation, exc: BaseException) -> Operation:
        op.error = str(exc)
        try:
            self._hooks(op, "error")
        except ImageSwarmError as hook_exc:
            op.error += f"; error hook failed too: {hook_exc}"
        if not op.touched_root:
            op.result = "aborted"
            self._close(op)
            raise ApplyError(f"{op.kind} of {op.image.image_id} failed: {exc}; root unchanged")
        if op.kind == "restore" or op.old is None:
            op.result = "failed"
            self.state.save_status(last=op.to_json())
            raise ApplyError(
                f"{op.kind} of {op.image.image_id} failed after the root was changed and it cannot "
                f"be restored: {exc}; the journal in {self.state.path} keeps the operation pending"
            )
        op.result = "rolled-back"
        self.state.save_status(last=op.to_json())
        restore = Operation(secrets.token_hex(6), "restore", op.old, op.image, op.policy)
        restore.remounted = op.remounted
        restore.undoes = op.op_id
        restore.error = f"restoring after: {exc}"
        self.state.record(restore)
        self.state.drop_workdir(op)
        self._run(restore, resume=True)
        raise ApplyError(
            f"{op.kind} of {op.image.image_id} failed: {exc}; rolled back to {op.old.image_id}"
        )

    def _recover(self) -> Operation | None:
        op = self.state.journal()
        if op is None:
            return None
        work = self.state.workdir(op)
        if (work / "image").exists() and mounts.is_mount_point(work / "image"):
            mounts.unmount(work / "image")
        op.recovered = True
        if not op.touched_root:
            op.result, op.error = "aborted", f"interrupted during {op.phase}; root unchanged"
            try:
                self._hooks(op, "error")
            except ImageSwarmError as exc:
                op.error += f"; error hook failed: {exc}"
            return self._close(op)
        try:
            return self._run(op, resume=True)
        except ApplyError as exc:
            if self.state.journal() is not None:
                raise StateError(
                    f"the interrupted {op.kind} of {op.image.image_id} could not be finished or "
                    f"rolled back ({exc}); {self.root} may hold parts of two images; fix the "
                    "cause and run `imageswarm agent recover`"
                ) from None
            last = self.state.status().get("last")
            return Operation.from_json(last) if last else op
