"""Headless Chromium for page tests, driven over the DevTools protocol with aiohttp's websocket.

Debian's `chromium` package (./dev installs it) is the browser; nothing is downloaded. The
browser runs as root, so without its sandbox, on a fresh profile, with everything that phones
home turned off. Two locks keep it off the network whatever it tries: every host name resolves
to nothing (`--host-resolver-rules`), and every non-loopback address goes to a proxy that is not
there. A test reaches its server by IP address, which neither lock touches.

`Page` is one tab: `goto`, `evaluate`, `wait_for` (polls a JavaScript expression), real mouse
clicks and typing (`Input.*` events, not `element.click()`), `screenshot`. It records every
request the page sends and every uncaught script error, so a test can assert on both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",  # root cannot use Chromium's sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-quic",
    "--no-pings",
    "--metrics-recording-only",
    "--mute-audio",
    "--password-store=basic",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.*",
    "--proxy-server=127.0.0.1:9",  # nothing listens there: any public address fails locally
    "--proxy-bypass-list=127.0.0.0/8",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1600,1000",
)
START_TIMEOUT = 30.0


def executable() -> str:
    """Chromium's binary (not Debian's wrapper script, which adds flags of its own)."""
    override = os.environ.get("IMAGESWARM_CHROMIUM")
    for candidate in (override,) if override else CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise AssertionError("no Chromium found: install Debian's 'chromium' package (./dev setup)")


class Page:
    """One tab over a flat DevTools session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session = ""
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("sessionId") == self.session:
                self._event(data["method"], data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the browser closed the DevTools socket"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Log.entryAdded":
            entry = params["entry"]  # an HTTP error status is the page's business, not an error
            if entry["level"] == "error" and entry.get("source") != "network":
                self.errors.append(f"{entry.get('url', '')}: {entry['text']}")

    async def send(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        future = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        await self.ws.send_json(message)
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # the browser may go before it answers
            await asyncio.wait_for(self.send("Browser.close", session=False), 5)
        self._reader.cancel()

    async def open(self) -> None:
        target = await self.send("Target.createTarget", session=False, url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", session=False, targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            await self.send(f"{domain}.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=1600,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details["text"]
            raise AssertionError(f"{expression!r} threw {text}")
        return answer["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", what=f"{url} loads")

    async def wait_for(self, expression: str, within: float = 10.0, what: str = "") -> Any:
        """Poll `expression` until it is truthy; its value. Fails with what the page shows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(
                    f"waited {within:g}s for {what or expression}; the page shows:\n{text}"
                )
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """A real left click (press and release) in the middle of the element."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
            " })()"
        )
        assert box, f"nothing on the page matches {selector!r}"
        x, y = box
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def type(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path, height: float | None = None) -> None:
        """A PNG of the viewport, or of its top `height` pixels."""
        clip = {"x": 0, "y": 0, "width": 1600, "height": height, "scale": 1} if height else None
        options: dict[str, Any] = {"clip": clip} if clip else {}
        shot = await self.send("Page.captureScreenshot", format="png", **options)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


def _active_port(profile: Path) -> str | None:
    """The browser's websocket URL once Chromium has written DevToolsActivePort, else None."""
    active = profile / "DevToolsActivePort"
    lines = active.read_text().splitlines() if active.exists() else []
    return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) >= 2 else None


async def _devtools_url(profile: Path, process: asyncio.subprocess.Process, log: Path) -> str:
    async with asyncio.timeout(START_TIMEOUT):
        while (url := await asyncio.to_thread(_active_port, profile)) is None:
            if process.returncode is not None:
                tail = (await asyncio.to_thread(log.read_text))[-3000:]
                raise AssertionError(f"Chromium exited at start:\n{tail}")
            await asyncio.sleep(0.05)
    return url


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Page]:
    """A headless Chromium with one open tab; the browser and its profile go away after."""
    with tempfile.TemporaryDirectory(prefix="imageswarm-chromium-") as tmp:
        profile, log = Path(tmp) / "profile", Path(tmp) / "chromium.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                executable(),
                *FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its helpers are one process group: ended together
            )
        try:
            url = await _devtools_url(profile, process, log)
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(url, max_msg_size=64 * 1024**2) as ws,
            ):
                page = Page(ws)
                await page.open()
                try:
                    yield page
                finally:
                    await page.close()
        finally:
            await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Wait for the browser to go (Browser.close asked it to), then end its process group."""
    for sig, wait in ((None, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        if sig is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), wait)
            break
    with contextlib.suppress(ProcessLookupError):  # a helper left behind by the browser
        os.killpg(process.pid, signal.SIGKILL)
