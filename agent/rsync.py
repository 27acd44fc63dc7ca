"""The swap itself and its dry run: one rsync invocation shape, and its itemized output parsed.

    rsync -aHAX --numeric-ids --one-file-system --omit-dir-times --delete [--checksum]
          --filter=merge FILE [--backup --backup-dir=DIR] SRC/ ROOT/

Never --inplace: rsync writes each new file beside the old one and renames it over, so running
binaries and mapped libraries keep their old inodes. The plan (a dry run) uses --checksum, so a
file changed with the same size and mtime is never missed. Reading both trees once is enough:
the swap itself uses the quick check, plus a second pass over exactly the files the plan found
changed behind an unchanged size and mtime (see agent/apply.py).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imageswarm.agent.errors import ToolError

BASE = [
    "rsync",
    "-aHAX",
    "--numeric-ids",
    "--one-file-system",
    # Directory mtimes change whenever a preserved or merged file inside is written (hostname,
    # passwd, image_id); they are no part of what an image is, and would show as drift forever.
    "--omit-dir-times",
]
_FORMAT = "--out-format=%i %l %n%L"
LineHook = Callable[[subprocess.Popen[str]], None]


@dataclass
class Plan:
    """What a swap will change (or did change), from rsync's itemized list."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    bytes: int = 0

    @property
    def files_touched(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed) + len(self.attributes)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
            f"{len(self.attributes)} attribute-only; {self.bytes} bytes to write"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "added": len(self.added),
            "changed": len(self.changed),
            "removed": len(self.removed),
            "attributes": len(self.attributes),
            "bytes": self.bytes,
        }

    def change_list(self) -> str:
        """One line per path: '+' added, '~' changed, '-' removed, '.' attributes."""
        lines = [f"+ {p}" for p in self.added] + [f"~ {p}" for p in self.changed]
        lines += [f"- {p}" for p in self.removed] + [f". {p}" for p in self.attributes]
        return "\n".join(lines) + ("\n" if lines else "")


def parse_itemized(output: str) -> Plan:
    plan = Plan()
    for line in output.splitlines():
        if line.startswith("*deleting"):
            fields = line.split(None, 2)
            if len(fields) == 3:
                plan.removed.append(fields[2])
            continue
        parts = line.split(" ", 2)
        if len(parts) < 3 or len(parts[0]) < 11:
            continue
        flags, length, name = parts
        name = name.split(" -> ", 1)[0].split(" => ", 1)[0]
        kind, ftype, attrs = flags[0], flags[1], flags[2:]
        if "+++++++" in attrs:
            plan.added.append(name)
            if ftype == "f" and length.isdigit():
                plan.bytes += int(length)
        elif kind in "<>" or (kind == "c" and ftype != "d"):
            plan.changed.append(name)
            if ftype == "f" and length.isdigit():
                plan.bytes += int(length)
        elif kind == "h":
            plan.changed.append(name)
        elif attrs.strip("."):
            plan.attributes.append(name)
    return plan


def run(
    source: Path,
    root: Path,
    filter_file: Path,
    *,
    dry_run: bool = False,
    checksum: bool = True,
    only: Path | None = None,
    backup_dir: Path | None = None,
    on_line: LineHook | None = None,
) -> Plan:
    """Make `root` equal `source` (minus filtered paths); returns what changed.

    Without `checksum`, files are compared by size and mtime (rsync's quick check). With `only`
    (a file listing root-relative paths), just those paths are copied, unconditionally and
    without --delete. With `backup_dir` (on the root's filesystem), every file rsync replaces
    or deletes is moved there instead of unlinked. `on_line` is called with the running rsync
    process after each itemized line (the crash tests use it to kill the swap half-way)."""
    argv = [*BASE, f"--filter=merge {filter_file}", _FORMAT]
    if only is not None:
        argv += [f"--files-from={only}", "--ignore-times"]
    else:
        argv.append("--delete")
        if checksum:
            argv.append("--checksum")
    if dry_run:
        argv.append("--dry-run")
    if backup_dir is not None:
        argv += ["--backup", f"--backup-dir={backup_dir}"]
    argv += [f"{source}/", f"{root}/"]
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True) as proc,
    ):
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(proc)
        code = proc.wait()
        errors.seek(0)
        stderr = errors.read()
    if code != 0:
        detail = " | ".join(stderr.strip().splitlines()[-4:])
        raise ToolError(f"rsync from {source} to {root} failed (exit {code}): {detail}")
    return parse_itemized("".join(lines))
