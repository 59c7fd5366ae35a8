"""The status page in a real browser: headless Chromium driven over the DevTools protocol loads
the page from a running pointsman and checks what an operator reads at 3 a.m.: the node name,
each pool's availability and the not-ready banner, refusals and connect failures over the last
minute, ISO 8601 UTC times, workers, the events; and that the drain/maintenance/enable buttons
ask for the token and show the API's answer. No console error anywhere (the page polls once a
second, so every change shows within a few seconds).

POINTSMAN_UPDATE_SCREENSHOT=1 also writes the screenshot to docs/status-page.png.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pointsman import __version__
from pointsman.admin.auth import REQUIRED
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    refused_port,
    roundtrip,
    running,
    wait_closed,
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
    return f"(document.querySelector({selector})?.textContent ?? null)"


def text_of(selector: str) -> str:
    """A page expression (parenthesised, so it can be compared or called on): the rendered text
    of the first element `selector` matches, or null."""
    return f"(document.querySelector({json.dumps(selector)})?.innerText ?? null)"


def pool_line(pool: str) -> str:
    return text_of(f'#pools li[data-pool="{pool}"]')


def cell(table: str, key: str, column: int) -> str:
    """The text of one cell of a row (rows are keyed: listener name, or pool/backend)."""
    row = json.dumps(f'#{table} tbody tr[data-key="{key}"]')
    return f"(document.querySelector({row})?.cells[{column}]?.innerText ?? null)"


BANNER_SHOWN = '!document.getElementById("banner").hidden'
REFUSED_COLUMN = 9  # listeners: refused, last minute / total, then the reasons
FAILURES_COLUMN = 6  # backends: connect failures, last minute / total
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def api(admin: str, method: str, path: str, token: str | None = TOKEN
              ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://{admin}{path}", headers=headers) as r:
        return r.status, await r.json()


async def backend_state(admin: str, pool: str, backend: str) -> str:
    _, doc = await api(admin, "GET", "/api/v1/status")
    [found] = [b for p in doc["pools"] if p["name"] == pool for b in p["backends"]
               if b["id"] == backend]
    return str(found["state"])


async def steady_load(listen: str, stop: asyncio.Event) -> None:
    """A connection every 50 ms until `stop` (for the screenshot's sparklines)."""
    while not stop.is_set():
        reader, writer = await connect(listen)
        await roundtrip(reader, writer, b"x" * 4000)
        await close_writer(writer)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def served(address: str) -> bool:
    """One connection to an echo pool: True when it was served, False when it was refused."""
    reader, writer = await connect(address)
    try:
        writer.write(b"x")
        async with asyncio.timeout(UPDATE_TIMEOUT):
            data = await reader.read(1)
    except ConnectionError:
        data = b""
    finally:
        await close_writer(writer)
    return data == b"x"


async def full_page_png(page: DevTools) -> bytes:
    """The whole page, not only the window: the screenshot in the docs shows every section."""
    size = (await page.send("Page.getLayoutMetrics"))["cssContentSize"]
    shot = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                           clip={"x": 0, "y": 0, "width": size["width"],
                                 "height": size["height"], "scale": 1})
    png = base64.b64decode(shot["data"])
    assert png.startswith(PNG_MAGIC)
    return png


async def test_status_page_renders_and_shows_a_drain(tmp_path: Path) -> None:
    """Two pools, one degraded (a backend down, one drained through the API): the page shows
    the node name, each pool's availability line, every backend's state and how long it has held
    it, ISO 8601 UTC times, the process, and the drain in transitions and events."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin = f"{LOOPBACK}:{free_port()}"
    listen, cache = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    check = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}
    async with echo_backend() as a, echo_backend() as b, echo_backend() as c:
        with refused_port() as dead:
            config = yaml.safe_dump({
                "node": {"name": "lb-test-1"},
                "listeners": [{"name": "web", "bind": listen, "pool": "app"},
                              # One new connection per 5 s (a burst of one): the rest refused.
                              {"name": "cache", "bind": cache, "pool": "cache",
                               "limits": {"new_connections_per_second": 0.2}}],
                "pools": [{"name": "app", "algorithm": "least_connections", "health_check": check,
                           "backends": [
                               {"address": a.address, "name": "app-1"},
                               {"address": b.address, "name": "app-2", "weight": 2},
                               {"address": c.address, "name": "app-3"},
                               {"address": f"{LOOPBACK}:{dead}", "name": "app-4"},
                           ]},
                          {"name": "cache", "backends": [{"address": a.address, "name": "cache-1"},
                                                        {"address": b.address, "name": "cache-2"}]}],
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
                    ' && document.querySelectorAll("#backends tbody tr").length === 6',
                    RENDER_TIMEOUT, "the first render")
                for backend, state in (("app-1", "up"), ("app-2", "up"), ("app-3", "up"),
                                       ("app-4", "down")):
                    assert await page.evaluate(state_of(backend)) == state, backend
                assert await page.evaluate('document.getElementById("version").textContent') \
                    == __version__
                assert await page.evaluate('document.getElementById("node").textContent') \
                    == "lb-test-1"
                assert "lb-test-1" in await page.evaluate("document.title")
                assert await page.evaluate(pool_line("app")) == \
                    "app: 3 of 4 available (1 down) least_connections"
                assert (await page.evaluate(pool_line("cache"))).startswith(
                    "cache: 2 of 2 available")
                assert not await page.evaluate(BANNER_SHOWN)
                listeners = await page.evaluate(text_of("#listeners tbody"))
                assert "web" in listeners and listen in listeners
                # Times: ISO 8601 in UTC with the date; local time in the tooltip; durations.
                updated = await page.evaluate(text_of("#updated time"))
                assert ISO_UTC.match(updated), updated
                assert (await page.evaluate('document.querySelector("#updated time").title')
                        ).startswith("local time: ")
                assert re.fullmatch(r"down\nfor (\d+m )?\d+s",
                                    await page.evaluate(cell("backends", "app/app-4", 2)))
                # One process, no workers.
                assert await page.evaluate(
                    '[...document.querySelectorAll("#processes tbody tr")]'
                    '.map(r => r.cells[0].innerText)') == ["single"]
                assert await page.evaluate('!document.getElementById("no-workers").hidden')

                status, answer = await api(admin, "POST", "/api/v1/pools/app/backends/app-2/drain")
                assert status == 200 and answer["state"] == "draining"

                # No reload: the page's own polling picks the change up.
                await page.wait_until(f'{state_of("app-2")} === "draining"', UPDATE_TIMEOUT,
                                      "app-2 shown as draining")
                assert await page.evaluate(state_of("app-1")) == "up"
                assert await page.evaluate(pool_line("app")) == \
                    "app: 2 of 4 available (1 draining, 1 down) least_connections"
                assert not await page.evaluate(BANNER_SHOWN)  # degraded, still ready
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
                assert ISO_UTC.match(events[drain_call].split("\t")[0]), events[drain_call]
                # Refusals by the rate limit, counted over the last minute and by reason.
                refused = [not await served(cache) for _ in range(4)].count(True)
                assert refused >= 3
                await page.wait_until(f'{cell("listeners", "cache", REFUSED_COLUMN)} === '
                                      f'"{refused} / {refused}\\nrate_limited {refused}"',
                                      UPDATE_TIMEOUT, "the rate-limited connections counted")
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
                png = await full_page_png(page)
                (tmp_path / "status-page.png").write_bytes(png)
                if os.environ.get("POINTSMAN_UPDATE_SCREENSHOT") == "1":
                    SCREENSHOT.write_bytes(png)
                assert page.problems() == []
                await close_writer(held[1])


async def test_a_pool_without_backends_raises_the_banner_and_refusals_show_as_a_rate(
        tmp_path: Path) -> None:
    """Both backends of a pool drained: the banner says the node is not ready and why, the pool
    line says 0 of 2; five connections refused for no_backend show in the listener's refusals of
    the last minute, by reason; a dead backend's connect failures show on its row. Enabling the
    backends again clears the banner."""
    (tmp_path / "token").write_text(TOKEN)
    admin = f"{LOOPBACK}:{free_port()}"
    front, back = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as w1, echo_backend() as w2, echo_backend() as live:
        with refused_port() as dead:
            config = yaml.safe_dump({
                "listeners": [{"name": "front", "bind": front, "pool": "web"},
                              {"name": "back", "bind": back, "pool": "api"}],
                "pools": [{"name": "web", "backends": [{"address": w1.address, "name": "web-1"},
                                                       {"address": w2.address, "name": "web-2"}]},
                          # No health check and no passive ejection: the dead one stays up and
                          # every connection tried on it first is retried on the live one.
                          {"name": "api", "passive": {"consecutive_failures": 0},
                           "backends": [{"address": live.address, "name": "api-1"},
                                        {"address": f"{LOOPBACK}:{dead}", "name": "api-2"}]}],
                "admin": {"bind": admin, "token_file": str(tmp_path / "token")},
            })
            async with running(config), browser_page(tmp_path) as page:
                await page.send("Page.navigate", url=f"http://{admin}/")
                await page.wait_until('document.querySelectorAll("#pools li").length === 2',
                                      RENDER_TIMEOUT, "the first render")
                assert (await page.evaluate(pool_line("web"))).startswith("web: 2 of 2 available")
                assert not await page.evaluate(BANNER_SHOWN)

                for backend in ("web-1", "web-2"):
                    status, _ = await api(admin, "POST", f"/api/v1/pools/web/backends/{backend}/drain")
                    assert status == 200
                await page.wait_until(BANNER_SHOWN, UPDATE_TIMEOUT, "the banner shown")
                banner = await page.evaluate(text_of("#banner"))
                assert banner.startswith("NOT READY: /readyz answers 503"), banner
                assert "no backend available in pool web" in banner and "api" not in banner
                assert (await page.evaluate(pool_line("web"))).startswith(
                    "web: 0 of 2 available (2 draining)")
                assert "NOT READY" in await page.evaluate("document.title")
                async with aiohttp.ClientSession() as http, http.get(f"http://{admin}/readyz") as r:
                    assert r.status == 503  # what the banner says

                for _ in range(5):
                    reader, writer = await connect(front)
                    await wait_closed(reader, UPDATE_TIMEOUT)
                    await close_writer(writer)
                await page.wait_until(f'{cell("listeners", "front", REFUSED_COLUMN)}'
                                      '?.startsWith("5 / 5")', UPDATE_TIMEOUT,
                                      "five refusals in the last minute")
                assert await page.evaluate(cell("listeners", "front", REFUSED_COLUMN)) == \
                    "5 / 5\nno_backend 5"
                assert await page.evaluate(cell("listeners", "back", REFUSED_COLUMN)) == "0 / 0"

                for _ in range(4):
                    reader, writer = await connect(back)
                    await roundtrip(reader, writer, b"ping")
                    await close_writer(writer)
                _, doc = await api(admin, "GET", "/api/v1/status")
                [failures] = [b["connect_failures"] for p in doc["pools"] for b in p["backends"]
                              if b["id"] == "api-2"]
                assert failures >= 1
                await page.wait_until(f'{cell("backends", "api/api-2", FAILURES_COLUMN)}'
                                      f' === "{failures} / {failures}"', UPDATE_TIMEOUT,
                                      "the dead backend's connect failures")
                assert await page.evaluate(cell("backends", "api/api-1", FAILURES_COLUMN)) == "0 / 0"

                await api(admin, "POST", "/api/v1/pools/web/backends/web-1/enable")
                await page.wait_until(f"!({BANNER_SHOWN})", UPDATE_TIMEOUT, "the banner gone")
                assert (await page.evaluate(pool_line("web"))).startswith(
                    "web: 1 of 2 available (1 draining)")
                await api(admin, "POST", "/api/v1/pools/web/backends/web-2/enable")
                await page.wait_until(f'{pool_line("web")}.startsWith("web: 2 of 2 available")',
                                      UPDATE_TIMEOUT, "the pool whole again")
                assert page.problems() == []


async def test_the_operator_buttons_ask_for_the_token_and_show_the_answer(tmp_path: Path) -> None:
    """Drain with no token: the API's 401 is shown and nothing changes. With the token: the
    backend drains (as the API says), the answer shows its state and active connections, and the
    token is kept for the tab (never in the address) for maintenance and enable. Without `node`
    in the config the header shows the host name."""
    (tmp_path / "token").write_text(TOKEN)
    admin = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as a, echo_backend() as b:
        config = yaml.safe_dump({
            "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{free_port()}", "pool": "app"}],
            "pools": [{"name": "app", "backends": [{"address": a.address, "name": "app-1"},
                                                   {"address": b.address}]}],
            "admin": {"bind": admin, "token_file": str(tmp_path / "token")},
        })
        async with running(config), browser_page(tmp_path) as page:
            await page.send("Page.navigate", url=f"http://{admin}/")
            await page.wait_until('document.querySelectorAll("#backends tbody tr").length === 2',
                                  RENDER_TIMEOUT, "the first render")
            assert await page.evaluate('document.getElementById("node").textContent') \
                == socket.gethostname()

            async def press(action: str, backend: str, token: str | None) -> str:
                """Click the button, fill the form, submit; the answer shown."""
                await page.evaluate('document.getElementById("answer").hidden = true')
                button = json.dumps(f'button[data-action="{action}"][data-backend="{backend}"]')
                await page.evaluate(f"document.querySelector({button}).click()")
                assert not await page.evaluate('document.getElementById("action").hidden')
                assert await page.evaluate(text_of("#action-what")) == f"{action} app/{backend}?"
                if token is not None:
                    await page.evaluate(
                        f'document.getElementById("action-token").value = {json.dumps(token)}')
                await page.evaluate('document.getElementById("action-go").click()')
                await page.wait_until('!document.getElementById("answer").hidden',
                                      UPDATE_TIMEOUT, f"the answer to {action}")
                return str(await page.evaluate(text_of("#answer")))

            answer = await press("drain", "app-1", None)
            assert answer.endswith(f"drain app/app-1 refused: HTTP 401: {REQUIRED}"), answer
            assert ISO_UTC.match(answer.split(" ")[0]), answer
            assert await page.evaluate('document.getElementById("answer").className') == "fail"
            assert await backend_state(admin, "app", "app-1") == "up"

            answer = await press("drain", "app-1", TOKEN)
            assert answer.endswith("drain app/app-1: 200 OK: now draining, 0 active connections")
            assert await backend_state(admin, "app", "app-1") == "draining"
            await page.wait_until(f'{state_of("app-1")} === "draining"', UPDATE_TIMEOUT,
                                  "app-1 shown as draining")
            assert await page.evaluate(
                'document.querySelector(\'button[data-action="drain"][data-backend="app-1"]\')'
                '.disabled')
            assert await page.evaluate('sessionStorage.getItem("pointsman-write-token")') == TOKEN
            assert TOKEN not in await page.evaluate("location.href")

            # The token is offered again; a backend named by its address works too.
            other = b.address
            await page.evaluate(
                f'document.querySelector(\'button[data-action="maintenance"]'
                f'[data-backend="{other}"]\').click()')
            assert await page.evaluate('document.getElementById("action-token").value') == TOKEN
            await page.evaluate('document.getElementById("action-cancel").click()')
            assert await page.evaluate('document.getElementById("action").hidden')
            answer = await press("maintenance", other, None)
            assert answer.endswith(f"maintenance app/{other}: 200 OK: now maintenance, "
                                   "0 active connections"), answer
            assert await backend_state(admin, "app", other) == "maintenance"
            answer = await press("enable", "app-1", None)
            assert answer.endswith("enable app/app-1: 200 OK: now up, 0 active connections")
            assert await backend_state(admin, "app", "app-1") == "up"
            await page.wait_until('document.querySelector("#events tbody").innerText.includes('
                                  '"POST /api/v1/pools/app/backends/app-1/enable by token default")',
                                  UPDATE_TIMEOUT, "the enable call in recent events")
            # The one problem the browser saw is the refused POST (logged as a failed load).
            problems = page.problems()
            assert len(problems) == 1 and "401" in problems[0], problems
            assert "/api/v1/pools/app/backends/app-1/drain" in problems[0], problems


async def test_the_page_lists_the_workers_and_their_processes(tmp_path: Path) -> None:
    """A control process with two workers: one row per worker (running, its pid, no restarts)
    and one per process (control and both workers)."""
    admin = f"{LOOPBACK}:{free_port()}"
    config = yaml.safe_dump({
        "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{free_port()}", "pool": "app"}],
        "pools": [{"name": "app", "backends": [{"address": f"{LOOPBACK}:9", "name": "app-1"}]}],
        "admin": {"bind": admin},
    })
    async with running(config, workers=2) as node, browser_page(tmp_path) as page:
        pids = {w.index: w.pid for w in node.workers()}
        await page.send("Page.navigate", url=f"http://{admin}/")
        await page.wait_until('document.querySelectorAll("#workers tbody tr").length === 2',
                              RENDER_TIMEOUT, "the workers listed")
        rows = await page.evaluate('[...document.querySelectorAll("#workers tbody tr")]'
                                   '.map(r => [...r.cells].map(c => c.innerText))')
        for index, row in enumerate(rows):
            assert row[:3] == [f"worker {index}", "running", str(pids[index])], row
            assert ISO_UTC.match(row[3]) and row[5] == "0", row
        await page.wait_until('document.querySelectorAll("#processes tbody tr").length === 3',
                              RENDER_TIMEOUT, "every process listed")
        names = await page.evaluate('[...document.querySelectorAll("#processes tbody tr")]'
                                    '.map(r => r.cells[0].innerText)')
        assert sorted(names) == ["control", "worker-0", "worker-1"]
        assert await page.evaluate('document.getElementById("no-workers").hidden')
        assert page.problems() == []


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
