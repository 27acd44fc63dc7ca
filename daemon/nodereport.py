"""A node's heartbeat body (docs/control-plane.md), validated into typed reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imageswarm.daemon.errors import BadRequest
from imageswarm.daemon.jsonfields import IMAGE_ID, Fields


@dataclass(frozen=True)
class ActionReport:
    id: str
    status: str  # running, done, failed
    detail: str | None
    seconds: float | None


@dataclass(frozen=True)
class FetchReport:
    state: str
    done_bytes: int
    total_bytes: int
    bytes_by_source: Mapping[str, int]
    duration: float | None
    error: str | None
    torrent: str | None = None  # "chunks" (a delta) or "image" (the whole image)


@dataclass(frozen=True)
class Heartbeat:
    """One validated heartbeat body; `raw` holds exactly the known fields, as received."""

    current_image: str | None
    previous_image: str | None
    kernel: str
    agent: Mapping[str, Any] | None
    fetches: Mapping[str, FetchReport]
    action: ActionReport | None
    raw: Mapping[str, Any]

    @classmethod
    def parse(cls, body: Any) -> Heartbeat:
        """Validate a heartbeat (docs/control-plane.md). Unknown fields are ignored, so either
        side can add one without breaking the other; the known ones are checked strictly."""
        f = Fields(body)
        f.required("current_image", "previous_image", "kernel")
        current = f.opt_text("current_image", IMAGE_ID)
        previous = f.opt_text("previous_image", IMAGE_ID)
        kernel = f.text("kernel", limit=256)
        agent = f.sub("agent")
        if agent is not None:
            _check_agent(agent)
        fetches: dict[str, FetchReport] = {}
        raw_fetches = f.sub("fetches")
        for image_id in raw_fetches.data if raw_fetches else {}:
            assert raw_fetches is not None
            if not IMAGE_ID.fullmatch(image_id):
                raise BadRequest(f"field 'fetches': {image_id!r} is not an image id")
            fetches[image_id] = _fetch(Fields(raw_fetches.data[image_id], f"fetches.{image_id}"))
        action = None
        if (a := f.sub("action")) is not None:
            status = a.text("status")
            if status not in ("running", "done", "failed"):
                raise a.fail("status", "'running', 'done' or 'failed'")
            detail = a.opt_text("detail", limit=1 << 16)
            action = ActionReport(a.text("id", limit=256), status, detail, a.number("seconds"))
        raw = {k: body.get(k) for k in ("current_image", "previous_image", "kernel", "agent")}
        raw["fetches"] = body.get("fetches") or {}
        raw["action"] = body.get("action")
        return cls(current, previous, kernel, agent.data if agent else None, fetches, action, raw)


def _fetch(f: Fields) -> FetchReport:
    sources = f.sub("bytes_by_source")
    by_source = {}
    for source in sources.data if sources else {}:
        assert sources is not None
        by_source[source] = sources.integer(source)
    return FetchReport(
        f.text("state", limit=64),
        f.integer("done_bytes"),
        f.integer("total_bytes"),
        by_source,
        f.number("duration"),
        f.opt_text("error"),
        f.opt_text("torrent", limit=16),
    )


def _check_agent(agent: Fields) -> None:
    for part in ("pending", "last", "drift"):
        sub = agent.sub(part)
        if sub is None:
            continue
        for key in ("kind", "phase", "result"):
            sub.opt_text(key, limit=256)
        sub.opt_text("error", limit=1 << 16)
        sub.opt_text("image_id", IMAGE_ID)
        sub.boolean("clean")
        phases = sub.get("phases") or []
        if not isinstance(phases, list):
            raise sub.fail("phases", "a list")
        for i, phase in enumerate(phases):
            p = Fields(phase, f"{sub.name('phases')}[{i}]")
            p.opt_text("name")
            p.number("seconds")
            p.boolean("ok")
