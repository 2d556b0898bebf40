"""The inspector page at ``/``, driven in headless Chromium like a person would use it.

Mint a development token, connect, join a chat channel and send a message,
then watch a ``db-`` channel as a live table while rows are written with SQL:
a row appears, changes and vanishes on the page. The admin view shows the
live status. A screenshot is saved in the test's tmp dir.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the Python
``playwright`` package (no browser download: it drives /usr/bin/chromium).
Without them the test skips, saying so; with ``CI`` set it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import RelayHandle

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        found = None
        why = "the playwright Python package is not installed (pip install playwright)"
    else:
        why = "no Chromium on this machine (apt-get install chromium)"
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the browser test cannot run: {why}")
        pytest.skip(why)
    return found


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Any]:
    executable = _chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        # A fresh profile per test (Playwright passes it as --user-data-dir).
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield await context.new_page()
        finally:
            await context.close()


async def test_the_inspector_follows_rows_and_chat(
    relay, repo, db: asyncpg.Connection, page: Any, tmp_path: Path
):
    from playwright.async_api import expect

    admin = "admin-token-" + "q" * 20
    r: RelayHandle = await relay(dev_tokens=True, admin_token=admin)
    table = await repo("_760_")

    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/") as resp:
        assert resp.status == 200 and "script-src 'self'" in resp.headers["Content-Security-Policy"]

    await page.goto(r.http_url + "/")
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#mint")).to_be_visible()
    await page.fill("#mint-user", "alice")
    await page.fill("#mint-account", "acme")
    await page.click("#mint-button")
    await expect(page.locator("#session-token")).not_to_have_value("")
    await page.click("#connect")
    await expect(page.locator("#state")).to_have_text("authenticated")

    # Chat: join, send, see our own message come back.
    await page.fill("#join-name", "lobby")
    await page.click("#join")
    await expect(page.locator("#joined li[data-channel='lobby']")).to_be_visible()
    await page.fill("#send-data", "hello from the inspector")
    await page.click("#send")
    await expect(page.locator("#log")).to_contain_text('"type":"chan_out"')
    await expect(page.locator("#log")).to_contain_text("hello from the inspector")

    # The live table.
    channel = f"db-{table}"
    await page.fill("#join-name", channel)
    await page.click("#join")
    await expect(page.locator("#live-channel")).to_have_text(channel)
    row_id = await db.fetchval(
        f"INSERT INTO {table} (owner_id, account_id, data) VALUES ('alice', 'acme', $1)"
        " RETURNING id::text",
        json.dumps({"title": "first draft"}),
    )
    row = page.locator(f"#rows tbody tr[data-id='{json.dumps(row_id)}']")
    await expect(row).to_contain_text("first draft")
    await expect(page.locator("#rows thead")).to_contain_text("owner_id")

    await db.execute(
        f"UPDATE {table} SET data = $1 WHERE id = $2", json.dumps({"title": "final"}), row_id
    )
    await expect(row).to_contain_text("final")
    await expect(row).not_to_contain_text("first draft")
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, data) VALUES ('bob', 'other', '{{}}')"
    )  # another account's row: not for alice's eyes (suffix _760_)

    # The admin view, while the row is on screen.
    await page.fill("#admin-token", admin)
    await page.click("#admin-watch")
    await expect(page.locator("#admin-status")).to_contain_text("ready")
    await expect(page.locator("#admin-sockets tbody")).to_contain_text("default")
    await expect(page.locator("#admin-channels tbody")).to_contain_text(channel)
    await page.screenshot(path=str(tmp_path / "inspector.png"), full_page=True)
    assert (tmp_path / "inspector.png").stat().st_size > 0

    await db.execute(f"DELETE FROM {table} WHERE id = $1", row_id)
    await expect(row).to_have_count(0)
    await expect(page.locator("#rows tbody tr")).to_have_count(0)

    # A live view: the rows already there come first (snapshot), filtered.
    for title in ("kept", "filtered out"):
        await db.execute(
            f"INSERT INTO {table} (owner_id, account_id, data) VALUES ('alice', 'acme', $1)",
            json.dumps({"title": title}),
        )
    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await page.fill("#mint-user", "alice")
    await page.click("#mint-button")
    await expect(page.locator("#session-token")).not_to_have_value("")
    await page.click("#connect")
    await expect(page.locator("#state")).to_have_text("authenticated")
    await page.fill("#join-name", channel)
    await page.fill("#join-filter", "data=eq." + json.dumps({"title": "kept"}))
    await page.check("#join-snapshot")
    await page.click("#join")
    await expect(page.locator("#live-note")).to_contain_text("snapshot loaded (1 rows)")
    await expect(page.locator("#rows tbody tr")).to_have_count(1)
    await expect(page.locator("#rows tbody")).to_contain_text("kept")


async def test_dev_tokens_are_off_unless_asked_for(relay):
    r = await relay()
    async with aiohttp.ClientSession() as http:
        async with http.get(r.http_url + "/inspector/config") as resp:
            assert (await resp.json()) == {"dev_tokens": False}
        async with http.post(r.http_url + "/dev/token", json={"user": "mallory"}) as resp:
            assert resp.status == 403
        async with http.get(r.http_url + "/inspector/../server.py") as resp:
            assert resp.status == 404
