"""Prometheus text exposition (format 0.0.4) for `/metrics`, without a client library.

Counters and histograms are updated where things happen; gauges are computed when scraped by
collectors the fleet and the rollout engine register, so they can never drift from the state.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

from imageswarm.daemon.appkeys import METRICS
from imageswarm.daemon.problems import Handler

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Mapping[str, str], float]
Collector = Callable[[], Awaitable[Iterable[Sample]]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels | Mapping[str, str], extra: str = "") -> str:
    items = labels.items() if isinstance(labels, Mapping) else labels
    parts = [f'{k}="{_escape(v)}"' for k, v in items]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _header(name: str, help_: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "counter")
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = SECONDS_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        at = bisect.bisect_left(self.buckets, value)
        if at < len(self.buckets):
            self.counts[at] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "histogram")
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_number(self.total)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


@dataclass
class _Gauge:
    name: str
    help: str
    collect: Collector


class Metrics:
    """The controller's metrics: the instruments below plus gauges computed at scrape time."""

    def __init__(self) -> None:
        self.heartbeats = Counter("imageswarm_heartbeats_total", "Node heartbeats received.")
        self.http_requests = Counter(
            "imageswarm_http_requests_total", "HTTP requests answered, by method and status."
        )
        self.apply_seconds = Histogram(
            "imageswarm_apply_seconds", "Seconds nodes reported for finished apply actions."
        )
        self.fetch_seconds = Histogram(
            "imageswarm_fetch_seconds", "Seconds nodes took to fetch an image (finished fetches)."
        )
        self._gauges: list[_Gauge] = []

    def gauge(self, name: str, help_: str, collect: Collector) -> None:
        self._gauges.append(_Gauge(name, help_, collect))

    async def render(self) -> str:
        lines: list[str] = []
        for gauge in self._gauges:
            lines += _header(gauge.name, gauge.help, "gauge")
            samples = sorted(await gauge.collect(), key=lambda s: sorted(s[0].items()))
            lines += [f"{gauge.name}{_labels(lb)} {_number(v)}" for lb, v in samples]
        for instrument in (self.heartbeats, self.http_requests):
            lines += instrument.render()
        for histogram in (self.apply_seconds, self.fetch_seconds):
            lines += histogram.render()
        return "\n".join(lines) + "\n"

    def middleware(self) -> Middleware:
        """Counts every answered request by method and status (outermost middleware)."""

        @web.middleware
        async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                self.http_requests.inc(method=request.method, status=str(exc.status))
                raise
            except Exception:
                self.http_requests.inc(method=request.method, status="500")
                raise
            self.http_requests.inc(method=request.method, status=str(response.status))
            return response

        return count_requests


async def handle(request: web.Request) -> web.Response:
    """GET /metrics."""
    body = await request.app[METRICS].render()
    return web.Response(text=body, headers={"Content-Type": CONTENT_TYPE})
