"""The status page in a real browser: headless Chromium driven over the DevTools protocol loads
the page from a running pointsman, renders every backend without a console error, and shows a
drain made through the API within a few seconds (the page polls once a second).

POINTSMAN_UPDATE_SCREENSHOT=1 also writes the screenshot to docs/status-page.png.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pointsman import __version__
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    refused_port,
    roundtrip,
    running,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "status-page.png"
TOKEN = "page-test-token"
BROWSER_START_TIMEOUT = 20.0  # a cold Chromium start on a loaded 2-core VM
COMMAND_TIMEOUT = 10.0
RENDER_TIMEOUT = 5.0  # first render: one fetch of api/v1/status
UPDATE_TIMEOUT = 4.0  # a change shows at the next poll, one second later
WINDOW = (1200, 700)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCREENSHOT_LOAD_SECONDS = 12.0


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (apt-get install chromium)")


class DevTools:
    """A minimal Chrome DevTools protocol client for one page: commands and collected events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data["id"], None) if "id" in data else None
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send_json({"id": self._next_id, "method": method, "params": params})
        async with asyncio.timeout(COMMAND_TIMEOUT):
            reply = await future
        assert "error" not in reply, f"{method}: {reply['error']}"
        return dict(reply["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_until(self, expression: str, timeout: float, what: str) -> None:
        """Evaluate `expression` in the page until it is truthy, at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.evaluate(expression):
            if loop.time() > deadline:
                raise AssertionError(f"page: not true after {timeout}s: {what}")
            await asyncio.sleep(0.05)

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and warnings, and browser-logged errors (failed
        loads) seen so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] in (
                    "error", "assert", "warning"):
                found.append(" ".join(str(arg.get("value", arg.get("description")))
                                      for arg in params["args"]))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        return found

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def browser_page(workdir: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium on a DevTools port of its choosing; yields a client for its one page,
    with Runtime, Log and Page events enabled."""
    binary = chromium_binary()
    profile = workdir / "chromium-profile"
    log = workdir / "chromium.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank",
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        port_file = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BROWSER_START_TIMEOUT
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.returncode is not None or loop.time() > deadline:
                raise AssertionError(f"chromium did not open its DevTools port:\n"
                                     f"{log.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"http://{LOOPBACK}:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            devtools = DevTools(ws)
            try:
                for domain in ("Runtime", "Log", "Page"):
                    await devtools.send(f"{domain}.enable")
                await devtools.send("Emulation.setDeviceMetricsOverride", width=WINDOW[0],
                                    height=WINDOW[1], deviceScaleFactor=1, mobile=False)
                yield devtools
            finally:
                await devtools.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def state_of(backend: str) -> str:
    selector = json.dumps(f'span.state[data-backend="{backend}"]')
    return f"document.querySelector({selector})?.textContent ?? null"


async def steady_load(listen: str, stop: asyncio.Event) -> None:
    """A connection every 50 ms until `stop` (for the screenshot's sparklines)."""
    while not stop.is_set():
        reader, writer = await connect(listen)
        await roundtrip(reader, writer, b"x" * 4000)
        await close_writer(writer)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def test_status_page_renders_and_shows_a_drain(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin = f"{LOOPBACK}:{free_port()}"
    listen = f"{LOOPBACK}:{free_port()}"
    check = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}
    async with echo_backend() as a, echo_backend() as b, echo_backend() as c:
        with refused_port() as dead:
            config = yaml.safe_dump({
                "listeners": [{"name": "web", "bind": listen, "pool": "app"}],
                "pools": [{"name": "app", "algorithm": "least_connections", "health_check": check,
                           "backends": [
                               {"address": a.address, "name": "app-1"},
                               {"address": b.address, "name": "app-2", "weight": 2},
                               {"address": c.address, "name": "app-3"},
                               {"address": f"{LOOPBACK}:{dead}", "name": "app-4"},
                           ]}],
                "admin": {"bind": admin, "token_file": str(token_file)},
            })
            async with running(config) as runtime, browser_page(tmp_path) as page:
                pool = runtime.pools["app"]
                await wait_for(lambda: pool.member("app-4").machine.state.value == "down",
                               RENDER_TIMEOUT, what="app-4 found down by its checks")
                # Some traffic, and one connection left open, so the tables have numbers in them.
                held = await connect(listen)
                await roundtrip(*held, b"hello")
                for _ in range(6):
                    reader, writer = await connect(listen)
                    await roundtrip(reader, writer, b"x" * 1000)
                    await close_writer(writer)

                await page.send("Page.navigate", url=f"http://{admin}/")
                await page.wait_until(
                    '(document.getElementById("updated")?.textContent ?? "never") !== "never"'
                    ' && document.querySelectorAll("#backends tbody tr").length === 4',
                    RENDER_TIMEOUT, "the first render")
                for backend, state in (("app-1", "up"), ("app-2", "up"), ("app-3", "up"),
                                       ("app-4", "down")):
                    assert await page.evaluate(state_of(backend)) == state, backend
                assert await page.evaluate('document.getElementById("version").textContent') \
                    == __version__
                listeners = await page.evaluate(
                    'document.querySelector("#listeners tbody").innerText')
                assert "web" in listeners and listen in listeners

                async with aiohttp.ClientSession() as http, http.post(
                        f"http://{admin}/api/v1/pools/app/backends/app-2/drain",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 200

                # No reload: the page's own polling picks the change up.
                await page.wait_until(f'{state_of("app-2")} === "draining"', UPDATE_TIMEOUT,
                                      "app-2 shown as draining")
                assert await page.evaluate(state_of("app-1")) == "up"
                await page.wait_until(
                    'document.querySelector("#transitions tbody").innerText'
                    '.includes("operator drain")', UPDATE_TIMEOUT, "the drain listed")
                # The event log: the transition and the admin call that caused it, newest first.
                await page.wait_until(
                    'document.querySelector("#events tbody").innerText'
                    '.includes("POST /api/v1/pools/app/backends/app-2/drain by token default")',
                    UPDATE_TIMEOUT, "the drain call listed in recent events")
                events = await page.evaluate(
                    '[...document.querySelectorAll("#events tbody tr")].map(r => r.innerText)')
                drain_call = next(i for i, e in enumerate(events) if "/app-2/drain" in e)
                drained = next(i for i, e in enumerate(events) if "app/app-2: up -> draining" in e)
                assert drain_call < drained, events  # newest first: the call was recorded last
                assert "admin" in events[drain_call] and "backend" in events[drained]
                assert await page.evaluate('document.getElementById("error").textContent') == ""
                assert page.problems() == []

                if os.environ.get("POINTSMAN_UPDATE_SCREENSHOT") == "1":
                    # Let the sparklines fill for a while under load (only when asked to).
                    stop = asyncio.Event()
                    loader = asyncio.create_task(steady_load(listen, stop))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(loader), SCREENSHOT_LOAD_SECONDS)
                    stop.set()
                    await loader
                shot = await page.send("Page.captureScreenshot", format="png")
                png = base64.b64decode(shot["data"])
                assert png.startswith(PNG_MAGIC)
                (tmp_path / "status-page.png").write_bytes(png)
                if os.environ.get("POINTSMAN_UPDATE_SCREENSHOT") == "1":
                    SCREENSHOT.write_bytes(png)
                assert page.problems() == []
                await close_writer(held[1])


async def test_the_page_reports_a_failed_update(tmp_path: Path) -> None:
    """When pointsman goes away the page says so instead of showing stale numbers silently;
    and the browser-side error collection is not blind (it sees the failed fetches)."""
    admin = f"{LOOPBACK}:{free_port()}"
    config = yaml.safe_dump({
        "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{free_port()}", "pool": "app"}],
        "pools": [{"name": "app", "backends": [{"address": f"{LOOPBACK}:9"}]}],
        "admin": {"bind": admin},
    })
    async with browser_page(tmp_path) as page:
        async with running(config):
            await page.send("Page.navigate", url=f"http://{admin}/")
            await page.wait_until('(document.getElementById("updated")?.textContent ?? "never") !== "never"',
                                  RENDER_TIMEOUT, "the first render")
            assert page.problems() == []
        await page.wait_until(
            'document.getElementById("error")?.textContent.includes("update failed")',
            UPDATE_TIMEOUT, "the page reports the failed update")
        assert page.problems(), "the failed fetch was not seen by the error collection"

        await page.send("Page.navigate",
                        url="data:text/html,<script>console.error('boom'); nosuch();</script>")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RENDER_TIMEOUT
        while not any("nosuch" in problem for problem in page.problems()):
            assert loop.time() < deadline, page.problems()
            await asyncio.sleep(0.05)
        assert any("boom" in problem for problem in page.problems())


async def test_the_page_asks_for_a_read_token_and_uses_one_from_its_fragment(tmp_path: Path) -> None:
    """With `admin.read_token_file` the page's own fetches need the token: without one the page
    shows its token form; with `#token=...` in its address it renders (and drops the fragment
    from the address bar, keeping the token for this tab only)."""
    (tmp_path / "write.token").write_text(TOKEN)
    (tmp_path / "read.token").write_text("page-read-token")
    admin = f"{LOOPBACK}:{free_port()}"
    config = yaml.safe_dump({
        "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{free_port()}", "pool": "app"}],
        "pools": [{"name": "app", "backends": [{"address": f"{LOOPBACK}:9", "name": "app-1"}]}],
        "admin": {"bind": admin, "token_file": str(tmp_path / "write.token"),
                  "read_token_file": str(tmp_path / "read.token")},
    })
    async with browser_page(tmp_path) as page, running(config):
        await page.send("Page.navigate", url=f"http://{admin}/")
        await page.wait_until('document.getElementById("login")?.style.display === "block"',
                              RENDER_TIMEOUT, "the token form shown")
        assert "status 401" in await page.evaluate('document.getElementById("error").textContent')

        await page.send("Page.navigate", url=f"http://{admin}/#token=page-read-token")
        await page.wait_until('document.querySelectorAll("#backends tbody tr").length === 1',
                              RENDER_TIMEOUT, "the render with the token")
        assert await page.evaluate(state_of("app-1")) == "up"
        assert await page.evaluate("location.hash") == ""
        assert await page.evaluate('document.getElementById("login").style.display') == "none"
        assert await page.evaluate('document.getElementById("error").textContent') == ""
