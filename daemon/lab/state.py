"""`<workdir>/lab.json`: what one lab created, written before anything is created and updated
as it goes, so `lab down`, `lab exec` and `lab status` work from it (and `lab down` still works
from the `isw<subnet>-` prefix alone when it is gone)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.lab.plan import LabPlan

STATE_FILE = "lab.json"
VERSION = 1


@dataclass
class HostState:
    name: str
    role: str
    ip: str
    netns: str
    link: str
    workdir: str
    #: The daemon's pid: for a node also the holder of its mount namespace (its root).
    pid: int | None = None
    #: A node's root: where its disk is mounted inside its own mount namespace.
    root: str | None = None
    disk: str | None = None


@dataclass
class LabState:
    workdir: Path
    subnet: int
    rate: int
    loss: float
    token: str
    hosts: list[HostState]
    #: building (objects may exist, daemons not all up yet) | up
    phase: str = "building"
    created: float = field(default_factory=time.time)

    @property
    def plan(self) -> LabPlan:
        return LabPlan(self.subnet, len(self.hosts) - 1)

    @property
    def path(self) -> Path:
        return self.workdir / STATE_FILE

    def host(self, name: str) -> HostState:
        wanted = self.plan.host(name)  # accepts a host or namespace name; says which exist
        return next(h for h in self.hosts if h.name == wanted.name)

    def save(self) -> None:
        data = {"version": VERSION, **asdict(self), "workdir": str(self.workdir)}
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)


def load(workdir: Path) -> LabState | None:
    path = workdir / STATE_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"{path}: unreadable lab state ({exc}); `lab down` still works") from None
    if data.pop("version", None) != VERSION:
        raise LabError(f"{path}: written by another version of imageswarm")
    try:
        hosts = [HostState(**h) for h in data.pop("hosts")]
        return LabState(workdir=Path(data.pop("workdir")), hosts=hosts, **data)
    except (KeyError, TypeError) as exc:
        raise LabError(f"{path}: malformed lab state ({exc})") from None


def forget(workdir: Path) -> None:
    (workdir / STATE_FILE).unlink(missing_ok=True)
