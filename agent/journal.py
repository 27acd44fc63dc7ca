"""The agent's state dir: the one place that knows its layout.

    <state>/lock               flock: one agent run at a time
    <state>/status.json        current and previous image, last operation's report
    <state>/journal.json       the operation in progress and its phase (absent when idle)
    <state>/images/<id>.<fmt>  the images kept for rollback (current and previous)
    <state>/work/<op>/         mount points, extracted trees, rsync filter, change list

Every write is atomic (temp, fsync, rename), so after a crash the journal names the last
phase that began, and recovery knows whether the root may have been touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageswarm.agent.errors import StateError
from imageswarm.agent.fsutil import atomic_write

#: Phases at or after which the root may differ from the old image.
TOUCHING = ("swap", "configure", "post-configure", "health", "commit")


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    path: Path
    format: str  # "raw" or "tar"

    def to_json(self) -> dict[str, str]:
        return {"image_id": self.image_id, "path": str(self.path), "format": self.format}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ImageRef | None:
        if not data:
            return None
        return cls(str(data["image_id"]), Path(data["path"]), str(data["format"]))


@dataclass
class Phase:
    name: str
    started: float
    ended: float | None = None
    ok: bool | None = None
    detail: str = ""

    @property
    def seconds(self) -> float:
        return (self.ended or time.time()) - self.started


@dataclass
class Operation:
    op_id: str
    kind: str  # "apply" or "rollback"
    image: ImageRef
    old: ImageRef | None
    policy: str
    phases: list[Phase] = field(default_factory=list)
    remounted: bool = False
    plan: dict[str, Any] | None = None
    reboot: dict[str, Any] | None = None
    hooks: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    result: str | None = None  # applied, rolled-back, aborted, failed
    error: str | None = None
    recovered: bool = False
    undoes: str | None = None  # a restore: the failed operation whose backup dir it puts back

    @property
    def phase(self) -> str | None:
        return self.phases[-1].name if self.phases else None

    @property
    def touched_root(self) -> bool:
        # A restore exists only because the operation it undoes had already changed the root.
        return self.kind == "restore" or any(p.name in TOUCHING for p in self.phases)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["image"] = self.image.to_json()
        data["old"] = self.old.to_json() if self.old else None
        for p in data["phases"]:
            p["seconds"] = round((p["ended"] or time.time()) - p["started"], 3)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Operation:
        image = ImageRef.from_json(data["image"])
        assert image is not None
        phases = [
            Phase(p["name"], p["started"], p["ended"], p["ok"], p.get("detail", ""))
            for p in data["phases"]
        ]
        fields = {k: v for k, v in data.items() if k not in ("image", "old", "phases")}
        return cls(image=image, old=ImageRef.from_json(data["old"]), phases=phases, **fields)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("images", "work"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateError(f"another agent run holds {self.path / 'lock'}") from None
                raise
            yield
        finally:
            os.close(fd)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path / name).read_bytes())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.path / name} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise StateError(f"{self.path / name} is not a JSON object")
        return data

    def _write(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=1).encode() + b"\n")

    # --- journal -----------------------------------------------------------------------------
    def journal(self) -> Operation | None:
        data = self._read("journal.json")
        return Operation.from_json(data) if data else None

    def record(self, op: Operation) -> None:
        self._write("journal.json", op.to_json())

    def clear_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / "journal.json").unlink()

    def workdir(self, op: Operation) -> Path:
        path = self.path / "work" / op.op_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_workdir(self, op: Operation) -> None:
        shutil.rmtree(self.path / "work" / op.op_id, ignore_errors=True)

    # --- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._read("status.json") or {"current": None, "previous": None, "last": None}

    def current(self) -> ImageRef | None:
        return ImageRef.from_json(self.status().get("current"))

    def report(self) -> dict[str, Any]:
        """The status plus the pending operation, as `imageswarm agent status --json` prints it."""
        status = self.status()
        pending = self.journal()
        status["pending"] = pending.to_json() if pending else None
        return status

    def previous(self) -> ImageRef | None:
        return ImageRef.from_json(self.status().get("previous"))

    def save_status(self, **changes: Any) -> None:
        status = self.status()
        status.update(changes)
        self._write("status.json", status)

    # --- kept images -------------------------------------------------------------------------
    def keep_image(self, image_id: str, source: Path, fmt: str) -> ImageRef:
        """Keep a copy of the image for rollback (a hard link when on the same filesystem)."""
        dest = self.path / "images" / f"{image_id}.{'tar' if fmt == 'tar' else 'img'}"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        return ImageRef(image_id, dest, fmt)

    def prune_images(self) -> None:
        """Drop kept images that are neither current nor previous."""
        keep = {ref.path.name for ref in (self.current(), self.previous()) if ref}
        for path in (self.path / "images").iterdir():
            if path.name not in keep:
                path.unlink()
