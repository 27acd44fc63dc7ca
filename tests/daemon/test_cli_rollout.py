"""`imageswarm rollout ...`, `nodes ...` and `image delete` against a fake controller.

The fake speaks the contract (docs/control-plane.md) on a real loopback server and checks every
body it receives and every document it answers with against the OpenAPI document, so the CLI,
the fake and the document cannot drift apart. The CLI runs in-process (`main([...])`) on a
worker thread, since it starts its own event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from imageswarm.daemon.cli import watch
from imageswarm.daemon.cli.main import main
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.openapi import EVENT_KINDS
from tests.daemon.test_openapi import violation

TOKEN = "op-token"
IMAGE = "5f0c3a9e1b2d4c6e"
RID = "r-1"
MiB = 1024 * 1024
ServerFactory = Callable[..., Awaitable[TestServer]]
Script = list[tuple[str, dict[str, Any]]]


def node_doc(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "labels": {"role": "compute"},
        "last_seen": "2025-01-01T00:00:00Z",
        "online": True,
        "current_image": "0ld1mage00000000",
        "previous_image": None,
        "kernel": "6.1.0-18-amd64",
        "agent": {"pending": None, "last": None, "drift": {"clean": True}},
        "fetches": {},
        "action": None,
        "rollout": RID,
        **extra,
    }


def rollout_doc(state: str = "pending") -> dict[str, Any]:
    nodes = [
        {"name": n, "batch": b, "status": "pending", "detail": None, "started": None}
        | {"finished": None}
        for n, b in (("n1", 0), ("n2", 1), ("n3", 1))
    ]
    strategy = {
        "prefetch": True,
        "canary": 1,
        "batch": 2,
        "max_failures": 0,
        "reboot": "auto",
        "health": None,
    }
    return {
        "id": RID,
        "image_id": IMAGE,
        "strategy": strategy,
        "state": state,
        "batch": 0,
        "batches": 2,
        "created": "2025-01-01T00:00:00Z",
        "updated": "2025-01-01T00:00:00Z",
        "reason": None,
        "nodes": nodes,
        "counts": _counts(nodes),
    }


def _counts(nodes: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(watch.STATUSES, 0)
    for node in nodes:
        counts[node["status"]] += 1
    return counts


def fetch(done: int, duration: float, state: str = "downloading") -> dict[str, Any]:
    sources = {"local": 0, "controller": done // 5, "peers": done - done // 5, "web_seed": 0}
    return {
        "state": state,
        "done_bytes": done,
        "total_bytes": 100 * MiB,
        "bytes_by_source": sources | {"unattributed": 0},
        "duration": duration,
        "error": None,
    }


def state(value: str, batch: int, reason: str | None = None) -> tuple[str, dict[str, Any]]:
    return "rollout.state", {"id": RID, "state": value, "batch": batch, "reason": reason}


def status(node: str, value: str, detail: str | None = None) -> tuple[str, dict[str, Any]]:
    return "rollout.node", {"id": RID, "node": node, "status": value, "detail": detail}


def progress(node: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return "node.progress", {"node": node, "agent": None, "action": None, "fetches": {}, **data}


PREFETCH: Script = [
    state("prefetching", 0),
    status("n1", "prefetching"),
    progress("n1", fetches={IMAGE: fetch(50 * MiB, 2.0)}),
    progress("elsewhere", fetches={IMAGE: fetch(MiB, 1.0)}),  # not in this rollout
    ("rollout.state", {"id": "r-9", "state": "halted", "batch": 0, "reason": "other"}),
    progress("n1", fetches={IMAGE: fetch(100 * MiB, 3.0, "done")}),
    status("n1", "prefetched"),
    status("n2", "prefetched"),
    ("node.offline", {"node": "n3"}),
    ("node.online", {"node": "n3"}),
    status("n3", "prefetched"),
    state("applying", 0),
    status("n1", "applying"),
    progress("n1", agent={"pending": {"kind": "apply", "image_id": IMAGE, "phase": "swap"}}),
    status("n1", "applied"),
    state("applying", 1),
    status("n2", "applying"),
    status("n3", "applying"),
]
DONE: Script = [*PREFETCH, status("n2", "applied"), status("n3", "applied"), state("done", 1)]
HALTED: Script = [
    *PREFETCH,
    status("n2", "failed", "health check failed"),
    status("n3", "applied"),
    state("halted", 1, "1 failure > max_failures 0"),
]


@dataclass
class Fake:
    rollout: dict[str, Any] = field(default_factory=rollout_doc)
    nodes: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {n: node_doc(n) for n in ("n1", "n2", "n3", "elsewhere")}
    )
    script: Script = field(default_factory=list)
    drop_after: set[int] = field(default_factory=set)  # close the connection abruptly, once
    stale: set[int] = field(default_factory=set)  # events that do not change the state
    log: list[str] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    url: str = ""

    def check(self, schema: str, instance: Any) -> None:
        if (why := violation(schema, instance)) is not None:
            self.violations.append(why)

    def apply(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "rollout.state" and data["id"] == RID:
            self.rollout.update(state=data["state"], batch=data["batch"], reason=data["reason"])
        elif kind == "rollout.node" and data["id"] == RID:
            node = next(n for n in self.rollout["nodes"] if n["name"] == data["node"])
            node.update(status=data["status"], detail=data["detail"])
            self.rollout["counts"] = _counts(self.rollout["nodes"])
        elif kind == "node.progress":
            self.nodes[data["node"]]["fetches"].update(data["fetches"])
        elif kind in ("node.online", "node.offline"):
            self.nodes[data["node"]]["online"] = kind == "node.online"


FAKE = web.AppKey("fake", Fake)
#: The states each action is allowed from (control-plane.md, engine rules 4 and 5).
ALLOWED = {
    "pause": {"pending", "prefetching", "applying"},
    "resume": {"paused", "halted"},
    "abort": {"pending", "prefetching", "applying", "paused", "halted"},
    "rollback": {"applying", "paused", "done", "halted", "aborted"},
}
routes = web.RouteTableDef()


def problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/problem+json"
    )


def unauthorized(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") == f"Bearer {TOKEN}":
        return None
    return problem(
        401, "Unauthorized", "a valid 'Authorization: Bearer <token>' header is required"
    )


def answer(request: web.Request, schema: str, body: Any, status: int = 200) -> web.Response:
    request.app[FAKE].check(schema, body)
    return web.json_response(body, status=status)


@routes.post("/api/v1/rollouts")
async def start_rollout(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    if refused := unauthorized(request):
        return refused
    body = await request.json()
    fake.bodies.append(body)
    if (why := violation("RolloutRequest", body)) is not None:
        return problem(400, "Bad Request", why)
    if body["image_id"] != IMAGE:
        return problem(404, "Not Found", f"image {body['image_id']} is not published")
    if body["nodes"] == ["busy"]:
        return problem(409, "Conflict", "node busy is already in rollout r-0 (applying)")
    return answer(request, "Rollout", fake.rollout, 201)


@routes.get("/api/v1/rollouts")
async def list_rollouts(request: web.Request) -> web.Response:
    return answer(request, "RolloutList", {"rollouts": [request.app[FAKE].rollout]})


@routes.get("/api/v1/rollouts/{id}")
async def get_rollout(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    fake.log.append(f"get {request.match_info['id']}")
    if request.match_info["id"] != RID:
        return problem(404, "Not Found", f"no rollout {request.match_info['id']}")
    return answer(request, "Rollout", fake.rollout)


@routes.post("/api/v1/rollouts/{id}/{verb}")
async def rollout_action(request: web.Request) -> web.Response:
    fake, verb = request.app[FAKE], request.match_info["verb"]
    if refused := unauthorized(request):
        return refused
    if fake.rollout["state"] not in ALLOWED[verb]:
        return problem(409, "Conflict", f"cannot {verb} a rollout that is {fake.rollout['state']}")
    new = {"pause": "paused", "resume": "applying", "abort": "aborted"}
    fake.rollout["state"] = new.get(verb, "rolling-back")
    return answer(request, "Rollout", fake.rollout)


@routes.get("/api/v1/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    return answer(request, "NodeList", {"nodes": list(request.app[FAKE].nodes.values())})


@routes.get("/api/v1/nodes/{name}")
async def get_node(request: web.Request) -> web.Response:
    node = request.app[FAKE].nodes.get(request.match_info["name"])
    if node is None:
        return problem(404, "Not Found", f"no node {request.match_info['name']}")
    return answer(request, "Node", node)


@routes.put("/api/v1/nodes/{name}/labels")
async def put_labels(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    if refused := unauthorized(request):
        return refused
    body = await request.json()
    fake.bodies.append(body)
    fake.check("LabelsRequest", body)
    node = fake.nodes[request.match_info["name"]]
    node["labels"] = body["labels"]
    return answer(request, "Node", node)


@routes.delete("/api/v1/images/{image_id}")
async def delete_image(request: web.Request) -> web.Response:
    if refused := unauthorized(request):
        return refused
    if request.match_info["image_id"] == IMAGE:
        return problem(409, "Conflict", f"image {IMAGE} is the target of active rollout {RID}")
    return web.Response(status=204)


@routes.get("/api/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    if refused := unauthorized(request):
        return refused
    since = request.headers.get("Last-Event-ID") or request.query.get("since")
    fake.log.append(f"events since={since}")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b": keepalive\n\n")
    for seq, (kind, data) in enumerate(fake.script, 1):
        if seq <= int(since or 0):
            continue
        await asyncio.sleep(0.005)
        fake.check(EVENT_KINDS[kind], data)
        if seq not in fake.stale:
            fake.apply(kind, data)
        await resp.write(f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        if seq in fake.drop_after and request.transport is not None:
            fake.drop_after.discard(seq)
            request.transport.abort()
            return resp
    for _ in range(400):  # a live stream stays open until the client leaves
        if request.transport is None or request.transport.is_closing():
            break
        await asyncio.sleep(0.025)
    return resp


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGESWARM_TOKEN", raising=False)
    monkeypatch.delenv("IMAGESWARM_CONTROLLER", raising=False)


@pytest.fixture
async def fake(aiohttp_server: ServerFactory) -> AsyncIterator[Fake]:
    app = web.Application()
    app.add_routes(routes)
    state = Fake()
    app[FAKE] = state
    server = await aiohttp_server(app)
    state.url = str(server.make_url("")).rstrip("/")
    yield state
    assert not state.violations, state.violations


async def cli(fake: Fake, *argv: str, token: str | None = TOKEN) -> int:
    args = [*argv, "--controller", fake.url, *(["--token", token] if token else [])]
    return await asyncio.to_thread(main, args)


FULL = {"prefetch": False, "canary": 1, "batch": "25%", "max_failures": 2, "reboot": "hold"}


@pytest.mark.parametrize(
    ("flags", "nodes", "strategy"),
    [
        ([], "all", {}),
        (
            ["--nodes", "n1,n2", "--canary", "1", "--batch", "2"],
            ["n1", "n2"],
            {"canary": 1} | {"batch": 2},
        ),
        (
            ["--nodes", "role=compute,zone=a", "--batch", "25%"],
            {"labels": {"role": "compute", "zone": "a"}},
            {"batch": "25%"},
        ),
        (
            [
                "--no-prefetch",
                "--canary",
                "1",
                "--batch",
                "25%",
                "--max-failures",
                "2",
                "--reboot",
                "hold",
            ],
            "all",
            FULL,
        ),
        (
            ["--health-cmd", "curl -fsS localhost:8080/health"],
            "all",
            {"health": {"command": "curl -fsS localhost:8080/health"}},
        ),
        (
            ["--health-url", "http://127.0.0.1:8080/health"],
            "all",
            {"health": {"url": "http://127.0.0.1:8080/health"}},
        ),
    ],
)
async def test_start_builds_the_contract_body_from_flags(
    fake: Fake,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    nodes: Any,
    strategy: dict[str, Any],
) -> None:
    assert await cli(fake, "rollout", "start", IMAGE, *flags) == 0
    assert fake.bodies == [{"image_id": IMAGE, "nodes": nodes, "strategy": strategy}]
    out, err = capsys.readouterr()
    assert out == f"{RID}\n"
    assert f"rollout {RID} started: image {IMAGE} on 3 nodes in 2 batches" in err


async def test_start_json_prints_the_rollout(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(fake, "rollout", "start", IMAGE, "--json") == 0
    assert json.loads(capsys.readouterr().out) == fake.rollout


@pytest.mark.parametrize(
    ("flags", "token", "expected"),
    [
        (["0000000000000000"], TOKEN, "HTTP 404: image 0000000000000000 is not published"),
        (
            [IMAGE, "--batch", "0"],
            TOKEN,
            "HTTP 400: RolloutRequest: 0 is less than the minimum of 1",
        ),
        (
            [IMAGE, "--batch", "101%"],
            TOKEN,
            "HTTP 400: RolloutRequest: '101%' does not match",
        ),
        ([IMAGE, "--nodes", "busy"], TOKEN, "HTTP 409: node busy is already in rollout r-0"),
        ([IMAGE], None, "HTTP 401: a valid 'Authorization: Bearer <token>' header is required"),
    ],
)
async def test_start_refused_prints_one_line_and_exits_1(
    fake: Fake,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    token: str | None,
    expected: str,
) -> None:
    assert await cli(fake, "rollout", "start", *flags, token=token) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"imageswarm: error: {expected}"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "flags",
    [["--nodes", "n1,role=x"], ["--nodes", "n1,,n2"], ["--batch", "half"], ["--reboot", "now"]],
)
async def test_start_usage_errors_exit_2_without_a_request(
    fake: Fake, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        await cli(fake, "rollout", "start", IMAGE, *flags)
    assert exited.value.code == 2 and fake.bodies == []
    assert "imageswarm rollout start: error:" in capsys.readouterr().err


async def test_watch_exits_0_when_done_with_plain_lines(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.script = DONE
    assert await cli(fake, "rollout", "watch", RID) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d rollout r-1: image 5f0c3a9e1b2d4c6e, 3 nodes, .*", lines[0]
    )
    assert re.search(
        r"node n1: fetch +50% +50\.0 MiB/100\.0 MiB +25\.0 MiB/s +peers 40\.0 MiB", out
    )
    assert re.search(r"node n1: fetch 100%", out)
    for text in (
        "rollout r-1: prefetching, batch 1/2",
        "node n1: apply phase swap",
        "node n3: offline",
        "node n3: online",
        "rollout r-1: applying, batch 2/2",
        "node n3: applied",
        "rollout r-1: done, batch 2/2",
    ):
        assert text in out, text
    assert "elsewhere" not in out and "r-9" not in out
    assert lines[-1] == "rollout r-1 done: 3/3 applied"


async def test_watch_exits_2_when_halted(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = HALTED
    assert await cli(fake, "rollout", "watch", RID) == 2
    out = capsys.readouterr().out
    assert "node n2: failed (health check failed)" in out
    assert "rollout r-1: halted, batch 2/2 (1 failure > max_failures 0)" in out
    assert out.splitlines()[-1] == "rollout r-1 halted: 2/3 applied, 1 failed"


async def test_watch_reconnects_with_last_event_id_and_refetches_the_rollout(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.script, fake.drop_after = DONE, {4, 12}
    assert await cli(fake, "rollout", "watch", RID) == 0
    streams = [entry for entry in fake.log if entry.startswith("events")]
    assert streams == ["events since=None", "events since=4", "events since=12"]
    # every (re)connect is followed by a full snapshot, and `done` is confirmed by one more
    assert fake.log.count(f"get {RID}") == 4
    assert fake.log.index("events since=12") + 1 == fake.log.index(f"get {RID}", 4)
    out = capsys.readouterr().out
    assert out.count("reconnecting") == 2
    assert out.splitlines()[-1] == "rollout r-1 done: 3/3 applied"


async def test_watch_confirms_a_terminal_state_before_exiting(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replayed `halted` that a resume has since undone does not end the watch."""
    fake.script = [state("halted", 1, "old news"), *DONE]
    fake.stale = {1}
    assert await cli(fake, "rollout", "watch", RID) == 0
    out = capsys.readouterr().out
    assert "halted, batch 2/2 (old news)" in out
    assert out.splitlines()[-1] == "rollout r-1 done: 3/3 applied"


async def test_watch_of_a_finished_rollout_exits_at_once(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.rollout["state"] = "aborted"
    assert await cli(fake, "rollout", "watch", RID) == 2
    assert capsys.readouterr().out.splitlines()[-1] == "rollout r-1 aborted: 0/3 applied, 3 pending"


async def test_watch_refusals_are_not_retried(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(fake, "rollout", "watch", RID, token=None) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert await cli(fake, "rollout", "watch", "r-404") == 1
    assert "HTTP 404: no rollout r-404" in capsys.readouterr().err
    assert [e for e in fake.log if e.startswith("events")] == ["events since=None"]


async def test_watch_of_an_unreachable_controller_fails_at_once(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    argv = ["rollout", "watch", RID, "--controller", url]
    assert await asyncio.wait_for(asyncio.to_thread(main, argv), 10) == 1
    assert f"HTTP 0: cannot reach {url}" in capsys.readouterr().err


async def test_start_watch_and_rollback_watch(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.script = DONE
    assert await cli(fake, "rollout", "start", IMAGE, "--watch") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == RID and out[-1] == "rollout r-1 done: 3/3 applied"
    fake.script = [
        state("rolling-back", 1),
        *(status(n, "rolling-back") for n in ("n1", "n2", "n3")),
        *(status(n, "rolled-back") for n in ("n1", "n2", "n3")),
        state("rolled-back", 1),
    ]
    assert await cli(fake, "rollout", "rollback", RID, "--watch") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rollout r-1: rolling-back"
    assert out[-1] == "rollout r-1 rolled-back: 0/3 applied, 3 rolled-back"


async def test_watch_json_prints_each_event_of_the_rollout(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.script = DONE
    assert await cli(fake, "rollout", "watch", RID, "--json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    relevant = [(i, k, d) for i, (k, d) in enumerate(DONE, 1) if "elsewhere" not in str(d)]
    relevant = [(i, k, d) for i, k, d in relevant if d.get("id") != "r-9"]
    assert events == [{"id": i, "event": k, "data": d} for i, k, d in relevant]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_watch_on_a_terminal_redraws_one_block(fake: Fake) -> None:
    fake.script = DONE
    screen = Terminal()
    display = watch.TtyDisplay(screen, size=lambda: os.terminal_size((140, 30)), interval=0)
    async with ApiClient(fake.url, token=TOKEN) as api:
        assert await watch.watch(api, RID, display) == 0
    text = screen.getvalue()
    frames = text.split("\x1b[J")
    assert len(frames) > 10 and "\x1b[5F" in text  # cursor back to the block's first line
    last = frames[-2].rsplit("\x1b[5F", 1)[-1].replace("\x1b[K", "").splitlines()
    assert last[0] == "rollout r-1  image 5f0c3a9e1b2d4c6e  done  batch 2/2"
    assert last[1] == "[" + "#" * 30 + "]  3/3 applied"
    assert re.fullmatch(
        r"  n1  applied +fetch \[#{10}\] 100%  100\.0 MiB/100\.0 MiB  "
        r"peers 80\.0 MiB, controller 20\.0 MiB",
        last[2],
    )
    assert re.match(r"  n2  applied$", last[3]) and len(last) == 5
    assert frames[-1] == "rollout r-1 done: 3/3 applied\n"


async def test_watch_block_fits_a_small_terminal() -> None:
    view = watch.RolloutView(RID)
    rollout = rollout_doc("applying")
    rollout["nodes"] = [
        {"name": f"node{i:03}", "batch": i // 10, "status": "applying" if i == 57 else "pending"}
        for i in range(100)
    ]
    view.load(rollout)
    lines = view.render(40, 8)
    assert len(lines) == 7 and all(len(line) < 40 for line in lines)
    assert lines[2].startswith("  node057  applying")
    assert lines[-1] == "  ... 96 more nodes"


async def test_rollout_list_show_and_actions(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(fake, "rollout", "list") == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["ID", "IMAGE", "STATE", "BATCH", "APPLIED", "FAILED", "CREATED"]
    assert rows[1].split() == [RID, IMAGE, "pending", "1/2", "0/3", "0", "2025-01-01T00:00:00Z"]
    assert await cli(fake, "rollout", "show", RID) == 0
    out = capsys.readouterr().out
    assert "strategy  prefetch, canary 1, batch 2, max failures 0, reboot auto" in out
    assert re.search(r"^n2 +1 +pending", out, re.M)
    fake.rollout["state"] = "applying"
    assert await cli(fake, "rollout", "pause", RID) == 0
    assert capsys.readouterr().out == "rollout r-1: paused\n"
    assert await cli(fake, "rollout", "pause", RID) == 1
    assert "HTTP 409: cannot pause a rollout that is paused" in capsys.readouterr().err
    assert await cli(fake, "rollout", "resume", RID) == 0
    assert capsys.readouterr().out == "rollout r-1: applying\n"
    assert await cli(fake, "rollout", "abort", RID) == 0
    assert capsys.readouterr().out == "rollout r-1: aborted\n"
    assert await cli(fake, "rollout", "rollback", RID, "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "rolling-back"


async def test_nodes_list_table_and_json(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    fake.nodes["n2"].update(
        online=False, previous_image="0lder000", labels={"zone": "a", "role": "c"}
    )
    fake.nodes["elsewhere"]["rollout"] = None
    assert await cli(fake, "nodes", "list") == 0
    out = capsys.readouterr().out.splitlines()
    header = ["NAME", "ONLINE", "CURRENT", "PREVIOUS", "KERNEL", "LABELS", "ROLLOUT"]
    assert out[0].split() == header
    row = ["n2", "no", "0ld1mage00000000", "0lder000", "6.1.0-18-amd64", "role=c,zone=a", RID]
    assert out[2].split() == row
    assert out[4].split()[-1] == "-" and len(out) == 5
    assert len({line.index("KERNEL") for line in out[:1]}) == 1
    assert all(line[out[0].index("KERNEL") :].startswith("6.1") for line in out[1:])
    assert await cli(fake, "nodes", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == list(fake.nodes.values())


async def test_nodes_show_and_label(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    fake.nodes["n1"]["fetches"] = {IMAGE: fetch(50 * MiB, 2.0)}
    assert await cli(fake, "nodes", "show", "n1") == 0
    out = capsys.readouterr().out
    assert "labels    role=compute" in out
    assert f"fetch     {IMAGE} downloading 50.0 MiB/100.0 MiB (controller 10.0 MiB, peers" in out
    assert await cli(fake, "nodes", "label", "n1", "zone=b", "tier=gold", "--remove", "role") == 0
    assert fake.bodies == [{"labels": {"zone": "b", "tier": "gold"}}]
    assert capsys.readouterr().out == "n1: tier=gold,zone=b\n"
    assert await cli(fake, "nodes", "show", "nope") == 1
    assert "HTTP 404: no node nope" in capsys.readouterr().err


async def test_image_delete(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli(fake, "image", "delete", "0ld1mage00000000") == 0
    assert capsys.readouterr().out == "deleted 0ld1mage00000000\n"
    assert await cli(fake, "image", "delete", IMAGE) == 1
    err = capsys.readouterr().err
    assert (
        err == f"imageswarm: error: HTTP 409: image {IMAGE} is the target of active rollout {RID}\n"
    )


def test_sse_parser_handles_split_lines_crlf_comments_and_multiline_data() -> None:
    from imageswarm.daemon.client import SseParser

    parser = SseParser()
    stream = b': keepalive\r\n\r\nid: 7\r\nevent: rollout.state\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
    stream += b"event: x\ndata: not json\n\nid: 8\n: c\nevent: y\n\n"
    events = [e for i in range(len(stream)) for e in parser.feed(stream[i : i + 1])]
    assert [(e.id, e.kind, e.data) for e in events] == [
        (7, "rollout.state", {"a": 1}),
        (7, "x", "not json"),
    ]
