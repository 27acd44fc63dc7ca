"""`imageswarm rollout watch`: one rollout's live progress from the controller's event stream.

The controller's `GET /rollouts/{id}` is the truth; events move the view between snapshots.
A snapshot is taken on every (re)connect, and a terminal state seen in an event is confirmed
with one before the watch exits: events replayed after a reconnect can be older than the
snapshot (a `halted` that a `resume` already undid must not end the watch).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from imageswarm.daemon.cli.progress import human
from imageswarm.daemon.client import ApiClient, Event
from imageswarm.daemon.errors import ControllerError

EVENTS = "/api/v1/events"
#: Exit code of `rollout watch` per final rollout state.
EXIT = {"done": 0, "rolled-back": 0, "halted": 2, "aborted": 2}
STATUSES = (
    "applied",
    "failed",
    "applying",
    "prefetching",
    "prefetched",
    "pending",
    "rolling-back",
    "rolled-back",
)
_BUSY = ("failed", "applying", "rolling-back", "prefetching")


def bar(frac: float, width: int) -> str:
    filled = int(max(0.0, min(1.0, frac)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


@dataclass
class FetchView:
    state: str = ""
    done: int = 0
    total: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    rate: float = 0.0

    def update(self, data: Mapping[str, Any]) -> None:
        """Take a node's fetch report; the rate comes from the node's own clock (`duration`),
        so events replayed in a burst after a reconnect do not look like a fast download."""
        done, duration = int(data.get("done_bytes") or 0), float(data.get("duration") or 0.0)
        if duration > self.duration and done >= self.done and self.duration > 0:
            self.rate = (done - self.done) / (duration - self.duration)
        elif duration > 0 and self.rate == 0.0:
            self.rate = done / duration
        self.state = str(data.get("state") or self.state)
        self.done, self.duration = done, max(duration, self.duration)
        self.total = int(data.get("total_bytes") or self.total)
        self.sources = {k: int(v) for k, v in (data.get("bytes_by_source") or {}).items()}

    @property
    def frac(self) -> float:
        return 1.0 if self.state == "done" else self.done / self.total if self.total else 0.0

    def text(self, width: int = 10) -> str:
        """`fetch [###---] 50%  1.0 GiB/2.0 GiB  12.0 MiB/s  peers 900 MiB, ...` (no bar at 0)."""
        sources = ", ".join(
            f"{k} {human(v)}" for k, v in sorted(self.sources.items(), key=lambda i: -i[1]) if v
        )
        shown = f"{bar(self.frac, width)} " if width else ""
        parts = [f"fetch {shown}{self.frac * 100:3.0f}%"]
        parts.append(f"{human(self.done)}/{human(self.total)}" if self.total else self.state)
        if self.state not in ("done", "failed") and self.rate > 0:
            parts.append(f"{human(self.rate)}/s")
        if sources:
            parts.append(sources)
        return "  ".join(parts)


@dataclass
class NodeView:
    name: str
    batch: int | None = None
    status: str = "pending"
    detail: str = ""
    online: bool | None = None
    phase: str = ""
    fetch: FetchView | None = None
    quarter: int = -1  # last fetch quarter reported as a plain line


def _node_name(data: Mapping[str, Any]) -> str:
    return str(data.get("node") or data.get("name") or "")  # events say node, GET /nodes name


class RolloutView:
    """What the watch knows about one rollout; every update returns the changes as lines."""

    def __init__(self, rollout_id: str) -> None:
        self.id = rollout_id
        self.image_id = ""
        self.state = ""
        self.batch = 0
        self.batches = 0
        self.reason = ""
        self.nodes: dict[str, NodeView] = {}

    def exit_code(self) -> int | None:
        return EXIT.get(self.state)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for node in self.nodes.values():
            counts[node.status] = counts.get(node.status, 0) + 1
        return counts

    def batch_text(self) -> str:
        return f"batch {self.batch + 1}/{self.batches}" if self.batches else "no batches"

    def _state(self, state: str, batch: int, reason: str) -> list[str]:
        if (state, batch, reason) == (self.state, self.batch, self.reason):
            return []
        self.state, self.batch, self.reason = state, batch, reason
        why = f" ({reason})" if reason else ""
        return [f"rollout {self.id}: {state}, {self.batch_text()}{why}"]

    def _node(self, name: str) -> NodeView:
        return self.nodes.setdefault(name, NodeView(name))

    def _status(self, name: str, status: str, detail: str) -> list[str]:
        node = self._node(name)
        if (status, detail) == (node.status, node.detail):
            return []
        node.status, node.detail = status, detail
        return [f"node {name}: {status}" + (f" ({detail})" if detail else "")]

    def load(self, rollout: Mapping[str, Any]) -> list[str]:
        """Take a full `GET /rollouts/{id}` document."""
        self.image_id = str(rollout.get("image_id") or "")
        self.batches = int(rollout.get("batches") or 0)
        lines = self._state(
            str(rollout["state"]), int(rollout.get("batch") or 0), rollout.get("reason") or ""
        )
        for node in rollout.get("nodes", []):
            self._node(node["name"]).batch = node.get("batch")
            lines += self._status(node["name"], node["status"], node.get("detail") or "")
        return lines

    def load_nodes(self, nodes: list[Mapping[str, Any]]) -> list[str]:
        """Take `GET /nodes` for the online flags and fetch progress of this rollout's nodes."""
        lines: list[str] = []
        for node in nodes:
            if node.get("name") in self.nodes:
                lines += self._progress(node)
                lines += self._online(str(node["name"]), bool(node.get("online")))
        return lines

    def _online(self, name: str, online: bool) -> list[str]:
        node = self._node(name)
        before, node.online = node.online, online
        return [] if before is None or before == online else [f"node {name}: {_onoff(online)}"]

    def _progress(self, data: Mapping[str, Any]) -> list[str]:
        node = self._node(_node_name(data))
        lines: list[str] = []
        fetches = data.get("fetches")
        report = fetches.get(self.image_id) if isinstance(fetches, Mapping) else None
        if isinstance(report, Mapping):
            node.fetch = node.fetch or FetchView()
            node.fetch.update(report)
            quarter = 4 if node.fetch.state == "done" else int(node.fetch.frac * 4)
            if quarter != node.quarter:
                node.quarter = quarter
                lines.append(f"node {node.name}: {node.fetch.text(0)}")
        agent = data.get("agent")
        pending = agent.get("pending") if isinstance(agent, Mapping) else None
        phase = str(pending.get("phase") or "") if isinstance(pending, Mapping) else ""
        if phase and phase != node.phase:
            lines.append(f"node {node.name}: apply phase {phase}")
        node.phase = phase
        return lines

    def apply(self, event: Event) -> list[str] | None:
        """Take one event; None when it is not about this rollout or its nodes."""
        data = event.data if isinstance(event.data, Mapping) else {}
        if event.kind == "rollout.state" and data.get("id") == self.id:
            batch = data.get("batch")
            batch = self.batch if batch is None else int(batch)
            return self._state(
                str(data.get("state") or self.state), batch, data.get("reason") or ""
            )
        if event.kind == "rollout.node" and data.get("id") == self.id and data.get("node"):
            node = self._node(str(data["node"]))
            status = str(data.get("status") or node.status)
            return self._status(node.name, status, data.get("detail") or "")
        name = _node_name(data)
        if name not in self.nodes:
            return None
        if event.kind == "node.progress":
            return self._progress(data)
        if event.kind in ("node.online", "node.offline"):
            return self._online(name, event.kind == "node.online")
        return None

    def summary(self) -> str:
        counts = self.counts()
        total = len(self.nodes)
        parts = [f"{counts['applied']}/{total} applied"]
        parts += [f"{n} {s}" for s, n in counts.items() if n and s != "applied"]
        return ", ".join(parts)

    def render(self, width: int, height: int) -> list[str]:
        counts = self.counts()
        total = max(len(self.nodes), 1)
        head = f"rollout {self.id}  image {self.image_id}  {self.state}  {self.batch_text()}"
        lines = [head + (f"  ({self.reason})" if self.reason else "")]
        lines.append(f"{bar(counts['applied'] / total, 30)}  {self.summary()}")
        nodes = sorted(self.nodes.values(), key=lambda n: (n.batch or 0, n.name))
        room = max(height - len(lines) - 1, 1)
        if len(nodes) > room:
            busy = [n for n in nodes if n.status in _BUSY]
            nodes = (busy + [n for n in nodes if n.status not in _BUSY])[: room - 1]
        wide = max((len(n.name) for n in nodes), default=4)
        for node in nodes:
            status = node.status + ("" if node.online is not False else " (offline)")
            what = node.phase if node.status == "applying" else node.detail
            fetch = node.fetch.text() if node.fetch else ""
            lines.append(f"  {node.name:<{wide}}  {status:<13} {what:<14} {fetch}".rstrip())
        if len(nodes) < len(self.nodes):
            lines.append(f"  ... {len(self.nodes) - len(nodes)} more nodes")
        return [line[: width - 1] for line in lines]


def _onoff(online: bool) -> str:
    return "online" if online else "offline"


class Display(Protocol):
    def update(self, view: RolloutView, lines: list[str], event: Event | None) -> None: ...

    def notice(self, text: str) -> None: ...

    def close(self, view: RolloutView) -> None: ...


class PlainDisplay:
    """One timestamped line per change: for logs and pipes."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.started = out, False

    def update(self, view: RolloutView, lines: list[str], event: Event | None) -> None:
        if not self.started:
            self.started = True
            lines = [
                f"rollout {view.id}: image {view.image_id}, {len(view.nodes)} nodes, "
                f"{view.state}, {view.batch_text()}"
            ]
        for line in lines:
            self.notice(line)

    def notice(self, text: str) -> None:
        self.out.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.out.flush()

    def close(self, view: RolloutView) -> None:
        self.out.write(f"rollout {view.id} {view.state}: {view.summary()}\n")
        self.out.flush()


class JsonDisplay:
    """Each event about the rollout as one JSON line; nothing else on stdout."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def update(self, view: RolloutView, lines: list[str], event: Event | None) -> None:
        if event is not None:
            self.out.write(json.dumps(event.to_json()) + "\n")
            self.out.flush()

    def notice(self, text: str) -> None:
        print(text, file=sys.stderr)

    def close(self, view: RolloutView) -> None:
        print(f"rollout {view.id} {view.state}: {view.summary()}", file=sys.stderr)


class TtyDisplay:
    """A block redrawn in place, at most every `interval` seconds."""

    def __init__(
        self,
        out: TextIO,
        size: Callable[[], os.terminal_size] = shutil.get_terminal_size,
        interval: float = 0.1,
    ) -> None:
        self.out, self.size, self.interval = out, size, interval
        self._drawn, self._last, self._notice = 0, 0.0, ""
        self._view: RolloutView | None = None
        self._later: asyncio.TimerHandle | None = None

    def update(self, view: RolloutView, lines: list[str], event: Event | None) -> None:
        self._view = view
        if event is not None:
            self._notice = ""
        wait = self.interval - (time.monotonic() - self._last)
        if wait <= 0:
            self.draw()
        elif self._later is None:
            self._later = asyncio.get_running_loop().call_later(wait, self.draw)

    def notice(self, text: str) -> None:
        self._notice = text
        self.draw()

    def draw(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._view is None:
            return
        cols, rows = self.size()
        lines = self._view.render(cols, rows - 1)
        if self._notice:
            lines.append(self._notice[: cols - 1])
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.out.write(up + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        self.out.flush()
        self._drawn, self._last = len(lines), time.monotonic()

    def close(self, view: RolloutView) -> None:
        self._view, self._notice = view, ""
        self.draw()
        self.out.write(f"rollout {view.id} {view.state}: {view.summary()}\n")
        self.out.flush()


def display_for(out: TextIO, as_json: bool) -> Display:
    if as_json:
        return JsonDisplay(out)
    return TtyDisplay(out) if out.isatty() else PlainDisplay(out)


@dataclass
class Reconnect:
    """Backoff between reconnects, and how long the stream may stay lost before giving up."""

    first: float = 0.25
    most: float = 5.0
    give_up: float = 120.0


async def watch(
    api: ApiClient, rollout_id: str, display: Display, reconnect: Reconnect | None = None
) -> int:
    """Follow a rollout until it is done, rolled back, halted or aborted; return the exit code."""
    policy = reconnect or Reconnect()
    view = RolloutView(rollout_id)
    last_id: int | None = None
    delay, lost_since = policy.first, 0.0
    while True:
        try:
            async with api.event_stream(EVENTS, since=last_id) as stream:
                if lost_since:
                    display.notice(f"reconnected after event {last_id}")
                lost_since = 0.0
                display.update(view, await _refresh(api, view), None)
                if view.exit_code() is not None:
                    return _finish(display, view)
                async for event in stream:
                    delay = policy.first
                    last_id = event.id if event.id is not None else last_id
                    lines = view.apply(event)
                    if lines is None:
                        continue
                    display.update(view, lines, event)
                    if view.exit_code() is not None:
                        display.update(view, await _refresh(api, view), None)
                        if view.exit_code() is not None:
                            return _finish(display, view)
            reason = "the controller closed the event stream"
        except ControllerError as err:
            if (err.status != 0 and err.status < 500) or not view.state:
                raise  # a refusal, or a controller that was never there: retrying cannot help
            reason = err.detail
        now = time.monotonic()
        lost_since = lost_since or now
        if now - lost_since > policy.give_up:
            raise ControllerError(0, f"lost the event stream for {policy.give_up:.0f} s: {reason}")
        display.notice(f"{reason}; reconnecting in {delay:.1f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, policy.most)


async def _refresh(api: ApiClient, view: RolloutView) -> list[str]:
    lines = view.load(await api.get_json(f"/api/v1/rollouts/{view.id}"))
    return lines + view.load_nodes((await api.get_json("/api/v1/nodes"))["nodes"])


def _finish(display: Display, view: RolloutView) -> int:
    display.close(view)
    code = view.exit_code()
    assert code is not None
    return code
