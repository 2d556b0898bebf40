"""relay.js, the JavaScript client, as the relay serves it at GET /relay.js, under Node.

tests/js/relay_views.mjs fetches the module from a real relay, imports it
unchanged and keeps one live view per user; this test drives it through the
same scenario as the Python client's (tests/test_client.py): relay restarts,
dropped TCP connections, lapsed sessions and a pruned log during 2,000+ writes,
then compares each view with the database. Node 20 has a WebSocket behind
--experimental-websocket (newer ones by default). The same driver
(tests/js/views_driver.mjs) then runs in headless Chromium, importing
/relay.js cross-origin as a web page would. Skipped only where node, or
chromium and the playwright package, are missing (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.auth import mint_token
from tests.conftest import JWT_SECRET, random_name
from tests.test_client import FILTERS, USERS, Relay, run_scenario

pytestmark = pytest.mark.timeout(300)
SCRIPT = Path(__file__).parent / "js" / "relay_views.mjs"


@pytest.fixture
async def live_relay(pg_url: str) -> AsyncIterator[Relay]:
    r = Relay(pg_url)
    await r.start()
    yield r
    await r.stop()


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is needed to run relay.js")
    for command in ([node], [node, "--experimental-websocket"]):
        if subprocess.run([*command, "-e", "WebSocket"], capture_output=True).returncode == 0:
            return command
    pytest.skip("this node has no WebSocket (Node 20.10 or newer has one)")


class NodeViews:
    """The scenario's handle on relay.js clients running in one Node process."""

    name = "javascript"

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.proc: asyncio.subprocess.Process | None = None
        self.ids = itertools.count()
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ready: asyncio.Future[dict[str, Any]] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.stderr = b""

    async def start(self, channel: str) -> None:
        spec = [{"user": u, "account": a, "filter": FILTERS[u]} for u, a in USERS]
        self.proc = await asyncio.create_subprocess_exec(
            *node_command(),
            str(SCRIPT),
            f"http://127.0.0.1:{self.relay.port}",
            JWT_SECRET,
            channel,
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # a view's rows come back as one line
        )
        self.ready = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())
        ready = await asyncio.wait_for(self.ready, 30)
        assert ready["contentType"].startswith("text/javascript"), ready

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            msg = json.loads(line)
            if msg["ev"] == "ready" and self.ready is not None:
                self.ready.set_result(msg)
            elif msg["ev"] == "done":
                self.waiting.pop(msg["id"]).set_result(msg)
        self.stderr = await self.proc.stderr.read() if self.proc.stderr else b""
        err = AssertionError(f"node exited: {self.stderr.decode()[-3000:]}")
        for future in [self.ready, *self.waiting.values()]:
            if future is not None and not future.done():
                future.set_exception(err)

    async def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        key = next(self.ids)
        future = self.waiting[key] = asyncio.get_running_loop().create_future()
        self.proc.stdin.write(json.dumps({"cmd": cmd, "id": key, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(future, timeout)
        assert "error" not in reply, reply["error"]
        return reply

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("close", timeout=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            await self.reader

    async def reconnected(self) -> None:
        await self.call("connected")

    async def expire(self, user: str) -> None:
        await self.call("expire", user=user)

    async def rows(self, user: str, until_id: str) -> dict[str, tuple[Any, ...]]:
        reply = await self.call("rows", user=user, until=until_id)
        assert reply["synced"]
        return {
            key: (
                row["owner_id"],
                row["account_id"],
                row["status"],
                json.dumps(row["data"], separators=(", ", ": "))
                if row["data"] is not None
                else None,
            )
            for key, row in reply["rows"].items()
        }

    async def counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = (await self.call("counts"))["counts"]
        return counts


async def test_relay_js_is_served_as_an_es_module(live_relay):
    url = f"http://127.0.0.1:{live_relay.port}/relay.js"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/javascript")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"  # module scripts use CORS
        body = await resp.text()
    assert "export function connect" in body and "export class LiveView" in body
    shipped = Path(__file__).parent.parent / "relay" / "static"
    assert (shipped / "relay.d.ts").read_text().count("export function connect") == 1


async def test_js_client_chats_and_views_rows(live_relay, db, repo):
    table = await repo("_760_")
    await db.execute(f"ALTER TABLE {table} ADD COLUMN status text")
    views = NodeViews(live_relay)
    try:
        await views.start("db-" + table)
        room = random_name()
        heard = (await views.call("chat", user="alice", room=room, text="hi from js"))["heard"]
        assert (heard["type"], heard["channel"], heard["data"]) == ("chan_out", room, "hi from js")
        row = await db.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, status) VALUES ('bob', '1', 'open')"
            " RETURNING id::text"
        )
        assert set(await views.rows("bob", row)) == {row}
    finally:
        await views.close()


async def test_js_views_never_lose_their_place(live_relay, db, pg_url):
    views = NodeViews(live_relay)
    try:
        await run_scenario(live_relay, db, pg_url, views, seed=2026)
    finally:
        await views.close()


# --- headless Chromium ------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DRIVER = Path(__file__).parent / "js" / "views_driver.mjs"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
DRIVER_SOURCE = DRIVER.read_text()


class BrowserViews(NodeViews):
    """The same driver in a page of headless Chromium: relay.js imported from the
    relay's /relay.js (cross-origin, as a site would), tokens signed by Python."""

    name = "chromium"

    async def start(self, channel: str) -> None:
        try:
            from playwright.async_api import async_playwright
        except ImportError:
            pytest.skip("the playwright package is needed for the browser test (pip)")
        if not HAVE_CHROMIUM:
            pytest.skip("chromium is needed for the browser test (apt-get install chromium)")
        self.pw = await async_playwright().start()
        self.browser = await self.pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = await self.browser.new_page()
        await self.page.expose_function(
            "mint", lambda user, account, ttl: mint_token(JWT_SECRET, user, account, ttl)
        )
        spec = [{"user": u, "account": a, "filter": FILTERS[u]} for u, a in USERS]
        base = f"http://127.0.0.1:{self.relay.port}"
        await self.page.evaluate(
            """async ([base, driverSource, users, channel]) => {
                const relay = await import(base + "/relay.js");
                const driver = await import(
                    "data:text/javascript;base64," + btoa(driverSource));
                window.driver = await driver.createDriver({
                    relay, mint: window.mint, wsUrl: base.replace(/^http/, "ws") + "/ws",
                    users, channel,
                });
            }""",
            [base, DRIVER_SOURCE, spec, channel],
        )

    async def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        reply: dict[str, Any] = await asyncio.wait_for(
            self.page.evaluate("cmd => window.driver.run(cmd)", {"cmd": cmd, **args}), timeout
        )
        return reply

    async def close(self) -> None:
        if getattr(self, "browser", None) is not None:
            with contextlib.suppress(Exception):
                await self.call("close", timeout=5)
            await self.browser.close()
            await self.pw.stop()


async def test_browser_views_never_lose_their_place(live_relay, db, pg_url):
    views = BrowserViews(live_relay)
    try:
        await run_scenario(live_relay, db, pg_url, views, seed=4242)
    finally:
        await views.close()
