"""The operator's dashboard in a real headless Chromium against a real controller.

The controller runs in-process on a loopback address; nodes are the control-plane kit's
simulated heartbeats over real HTTP. The browser is Debian's Chromium driven over the DevTools
protocol (tests/daemon/browser.py): the test types the token, clicks the page's buttons with
real mouse events and reads the DOM. Every change the page shows after it loaded comes from the
event stream; a marker set on the page proves it was never reloaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from imageswarm.daemon.app import create_app
from imageswarm.daemon.appkeys import EVENT_STREAMS
from imageswarm.daemon.dashboard import CSP, FILES
from tests.daemon.browser import Page, chromium
from tests.daemon.controlkit import (
    TOKEN,
    Client,
    ClientFactory,
    ServerFactory,
    SimNode,
    app_of,
    controller_config,
    get,
    problem,
    publish,
    rollout,
    tiny_image,
    wait_state,
)

#: Set to a path to save a screenshot of a running rollout there (how docs/dashboard.png is made).
SCREENSHOT = os.environ.get("IMAGESWARM_DASHBOARD_SCREENSHOT")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("tiny")
    return tiny_image(work, 1), tiny_image(work, 2)


async def _controller(
    tmp_path: Path, ip: str, server: ServerFactory, client: ClientFactory
) -> tuple[Client, str]:
    app = create_app(controller_config(tmp_path, ip))
    ctl = await client(await server(app, host=ip, port=0))
    return ctl, str(ctl.make_url("/")).rstrip("/")


class Node(SimNode):
    """A simulated node that also reports fetch progress and the agent's current phase."""

    pending: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        return {**super().body(), "agent": {"pending": self.pending, "last": None, "drift": None}}


def fetch(done: int, total: int, **by_source: int) -> dict[str, Any]:
    sources = dict.fromkeys(("local", "controller", "peers", "web_seed", "unattributed"), 0)
    return {
        "state": "done" if done == total else "downloading",
        "done_bytes": done,
        "total_bytes": total,
        "bytes_by_source": sources | by_source,
        "duration": 1.5,
        "error": None,
    }


def text(selector: str) -> str:
    """A JavaScript expression: the text of the first element matching `selector`, or ''."""
    return f"(document.querySelector({json.dumps(selector)})?.innerText ?? '')"


def includes(selector: str, *parts: str) -> str:
    return " && ".join(f"{text(selector)}.includes({json.dumps(p)})" for p in parts)


async def _sign_in(page: Page, base: str) -> None:
    await page.goto(f"{base}/")
    await page.wait_for("!document.querySelector('#login').hidden", what="the token form")
    await page.type("#token", TOKEN)
    await page.click("#connect")
    await page.wait_for(includes("#conn", "live"), what="the event stream to connect")
    await page.wait_for("!document.querySelector('#board').hidden", what="the board")


def _external(urls: list[str], base: str) -> list[str]:
    return [u for u in urls if not u.startswith((f"{base}/", "data:", "about:"))]


async def test_the_page_is_public_static_and_self_contained(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl, _ = await _controller(tmp_path, "127.0.0.140", aiohttp_server, aiohttp_client)
    page = await ctl.get("/")  # no token: the page holds no secret
    assert page.status == 200 and page.content_type == "text/html"
    assert page.headers["Content-Security-Policy"] == CSP
    html = await page.text()
    assert '<script src="/dashboard/app.js"' in html and TOKEN not in html
    alias = await ctl.get("/dashboard")
    assert alias.status == 200 and await alias.text() == html
    for name, media in FILES.items():
        if name == "index.html":
            continue
        resp = await ctl.get(f"/dashboard/{name}")
        assert resp.status == 200 and resp.content_type == media, name
        body = await resp.text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", body), f"{name} links out"
        again = await ctl.get(f"/dashboard/{name}", headers={"If-None-Match": resp.headers["ETag"]})
        assert again.status == 304
    await problem(await ctl.get("/dashboard/..%2Fapp.py"), 404)
    await problem(await ctl.get("/dashboard/openapi.py"), 404)


async def test_a_wrong_token_is_refused_with_a_clear_error(
    tmp_path: Path, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    ctl, base = await _controller(tmp_path, "127.0.0.141", aiohttp_server, aiohttp_client)
    await SimNode.enroll(ctl, "n1")
    async with chromium() as page:
        await page.goto(f"{base}/#token=not-the-token")
        error = await page.wait_for(text("#login-error"), what="an error under the token form")
        assert "rejected this token" in error and "401" in error, error
        assert await page.evaluate("document.querySelector('#board').hidden")
        assert await page.evaluate(text("#conn")) == "token rejected"
        assert await page.evaluate("location.hash") == ""  # the token left the address bar
        assert await page.evaluate("sessionStorage.length") == 0  # a wrong token is not kept

        await page.type("#token", TOKEN)
        await page.click("#connect")
        await page.wait_for(includes("#fleet tbody", "n1"), what="the fleet")
        assert await page.evaluate(text("#login-error")) == ""
        assert await page.evaluate("sessionStorage.getItem('imageswarm.token')") == TOKEN
        assert not page.errors, page.errors
        assert not _external(page.requests, base)


async def test_the_dashboard_follows_a_rollout_live_and_drives_it(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    images: tuple[Path, Path],
) -> None:
    ctl, base = await _controller(tmp_path, "127.0.0.142", aiohttp_server, aiohttp_client)
    v1 = await publish(ctl, images[0], "base-v1")
    v2 = await publish(ctl, images[1], "base-v2")
    nodes = []
    for i in (1, 2, 3):
        sim = await SimNode.enroll(ctl, f"n{i}", role="compute", zone="ab"[i % 2])
        nodes.append(Node(ctl, sim.name, sim.token))
    for node in nodes:
        node.current = v1
        await node.beat()
    await SimNode.enroll(ctl, "n4", role="storage")  # enrolled, never heard from: offline

    async with chromium() as page:
        await _sign_in(page, base)
        await page.wait_for(
            includes('#fleet tr[data-node="n1"]', "online", "base-v1", "role=compute")
            + " && "
            + includes('#fleet tr[data-node="n4"]', "offline", "role=storage"),
            what="the fleet with online and offline nodes",
        )
        await page.wait_for(includes("#images", "base-v1", v1, "base-v2", v2), what="the images")
        await page.evaluate("window.sameDocument = true")

        body = {
            "image_id": v2,
            "nodes": ["n1", "n2", "n3"],
            "strategy": {"canary": 1, "batch": 1, "reboot": "never"},
        }
        rid = (await rollout(ctl, body))["id"]
        card = f'[data-rollout="{rid}"]'
        await page.wait_for(includes(card, "PREFETCHING", "batch 1 of 3", "base-v2"))

        # Fetch progress arrives as node.progress events and is drawn in place.
        n1, n2, n3 = nodes
        actions = {node.name: await node.beat() for node in nodes}
        assert {a["kind"] for a in actions.values()} == {"prefetch"}
        n1.fetches = {v2: fetch(MiB, 4 * MiB, controller=MiB // 2, peers=MiB // 2)}
        row = '#fleet tr[data-node="n1"]'
        async with asyncio.timeout(10):  # progress is rate-limited to one event per second
            while not await page.evaluate(includes(row, "25%", "ctl 512.0 KiB", "peers")):
                await n1.beat()
                await asyncio.sleep(0.3)
        share = await page.evaluate(
            f"(() => {{ const bar = document.querySelector('{row} .fetch .bar');"
            " return bar.firstElementChild.offsetWidth / bar.offsetWidth; })()"
        )
        assert 0.2 < share < 0.3, f"the progress bar is {share:.0%} full, not 25%"

        for node in nodes:
            node.fetches = {v2: fetch(4 * MiB, 4 * MiB, controller=MiB, peers=3 * MiB)}
            await node.finish(actions[node.name])
        await page.wait_for(includes(card, "APPLYING", "batch 1 of 3", "3 prefetched"))

        apply = await n1.beat()
        assert apply["kind"] == "apply"
        n1.pending = {"kind": "apply", "image_id": v2, "phase": "swap"}
        n1.report = {"id": apply["id"], "status": "running", "detail": "swap", "seconds": 0.4}
        async with asyncio.timeout(10):
            while not await page.evaluate(includes(row, "apply swap")):
                await n1.beat()
                await asyncio.sleep(0.3)
        if SCREENSHOT:
            bottom = await page.evaluate("document.querySelector('main').offsetHeight + 60")
            await page.screenshot(Path(SCREENSHOT), height=bottom)

        # Pause with the page's button: the controller says paused, and so does the page.
        await page.click(f'{card} button[data-verb="pause"]')
        await wait_state(ctl, rid, "paused")
        await page.wait_for(includes(card, "PAUSED", "paused by the operator"))
        buttons = f"document.querySelector('{card} [data-verb=%s]').disabled"
        await page.wait_for(f"{buttons % 'pause'} && !{buttons % 'resume'}", what="resume only")
        n1.pending = None
        await n1.finish(apply)  # a node mid-apply finishes while paused
        await page.wait_for(includes(card, "1 applied"))

        # The stream drops: the page reconnects on its own, from the last event it saw (since=).
        await page.evaluate(
            "(() => { const c = document.querySelector('#conn'); window.seen = [];"
            " new MutationObserver(() => seen.push(c.dataset.state))"
            ".observe(c, {attributes: true}); })()"
        )
        streams: set[asyncio.Task[Any]] = app_of(ctl)[EVENT_STREAMS]
        for task in list(streams):
            task.cancel()  # the connection drops as if a proxy had cut it
        await page.wait_for("seen.includes('retrying')", what="the page to notice the drop")
        await page.click(f'{card} button[data-verb="resume"]')
        await wait_state(ctl, rid, "applying")
        await page.wait_for(includes("#conn", "live"), within=15, what="the page to reconnect")
        for node in (n2, n3):
            await node.run()
        await wait_state(ctl, rid, "done")
        await page.wait_for(includes(card, "DONE", "3 applied"))
        for node in nodes:
            await node.beat()
        await page.wait_for(
            " && ".join(
                includes(f'#fleet tr[data-node="{n.name}"]', "base-v2", "base-v1") for n in nodes
            ),
            what="every node on base-v2 with base-v1 as its previous image",
        )
        events = await page.evaluate(text("#events"))
        assert f"{rid} done" in events and "rollout.created" in events, events

        # Abort asks for a second click; the first changes nothing.
        rid2 = (await rollout(ctl, {"image_id": v1, "nodes": ["n1"]}))["id"]
        card2 = f'[data-rollout="{rid2}"]'
        await page.wait_for(includes(card2, "PREFETCHING"))
        await page.click(f'{card2} button[data-verb="abort"]')
        await page.wait_for(includes(f"{card2} button[data-verb=abort]", "confirm abort?"))
        assert (await get(ctl, f"/api/v1/rollouts/{rid2}"))["state"] == "prefetching"
        await page.click(f'{card2} button[data-verb="abort"]')
        await wait_state(ctl, rid2, "aborted")
        await page.wait_for(includes(card2, "ABORTED"))

        assert await page.evaluate("window.sameDocument === true"), "the page was reloaded"
        assert not page.errors, page.errors
        assert not _external(page.requests, base), _external(page.requests, base)
        connects = [u for u in page.requests if "/api/v1/events" in u]
        assert len(connects) >= 2 and "?since=" in connects[-1], connects
