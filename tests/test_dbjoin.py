"""Resuming a db- channel against a real relay: clients that vanish, stall or read big rows.

A resume (``join`` with ``after``) streams a backlog from the event log while
the client reads it. These tests stage what phones do (read part of the
replay, then drop off the network, or stop reading with the connection
open) and check that the relay's database pool stays free for everyone else,
and that a fast reader can resume over rows too large to queue many at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import RelayHandle
from tests.helpers import eventually

BACKLOG = 3000
# A session that outlasts the setup of a test (under load too), then expires.
EXPIRY_SECONDS = 10
FILLER = "x" * 4000  # ~12 MB of backlog: more than loopback socket buffers absorb


class Phone:
    """A raw WebSocket client with a tiny receive buffer, which reads only when told to.

    It is what a phone in a tunnel looks like to the relay: a connection whose
    reads stop, and which then vanishes with a reset (``vanish``).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.token = ""

    @classmethod
    async def connect(cls, port: int) -> Phone:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connecting, so the kernel cannot grow it: the relay's
        # writes back up as soon as this client stops reading.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=raw, limit=2**16)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        phone = cls(reader, writer)
        assert (await phone.recv())["type"] == "init"
        return phone

    def send(self, **fields: Any) -> None:
        payload = json.dumps(fields).encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        else:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame's opcode and payload (the relay never fragments)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text frame as a dict (control frames are skipped)."""
        while True:
            opcode, body = await self.read_frame(timeout)
            if opcode == 0x1:
                frame: dict[str, Any] = json.loads(body)
                return frame

    async def close_code(self, timeout: float = 20.0) -> int:
        """Read on until the relay's close frame; its code."""
        while True:
            opcode, body = await self.read_frame(timeout)
            if opcode == 0x8:
                code: int = struct.unpack("!H", body[:2])[0]
                return code

    async def auth_and_resume(self, session_token: str, channel: str, after: str) -> None:
        self.send(type="auth", data=session_token)
        self.token = token = (await self.recv())["data"]
        self.send(type="join", data=channel, token=token, after=after)
        joined = await self.recv()
        assert joined["type"] == "joined", joined

    def vanish(self) -> None:
        """Drop off the network: close with unread data, so the kernel sends a reset."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def _backlog(
    db: asyncpg.Connection, table: str, rows: int, filler: str, relay: RelayHandle | None = None
) -> None:
    """Write ``rows`` rows in one transaction; with ``relay``, wait until it dispatched them
    (so that a resume from before them replays them from the log)."""
    before = relay.state.listener.position if relay and relay.state.listener else None
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, data)"
        " SELECT 'owner', 'acct', jsonb_build_object('n', i, 'filler', $1::text)"
        " FROM generate_series(1, $2) i",
        filler,
        rows,
    )
    if relay is not None and before is not None:
        listener = relay.state.listener
        assert listener is not None

        async def dispatched() -> bool:
            return listener.position > before and listener.position.seq is None

        await _eventually(dispatched, "the listener dispatched the backlog")


async def _position(relay: RelayHandle, client: Any, table: str) -> str:
    """The position of ``table``'s stream now (before the backlog is written)."""
    reader = await client(relay)
    await reader.auth(relay.token("reader", "acct"))
    joined = await reader.join("db-" + table)
    await reader.close()
    pos: str = joined["pos"]
    return pos


async def _idle_in_transaction(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
    )
    return count


async def _eventually(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def test_resumes_that_drop_off_leave_the_pool_free(relay, client, db, repo) -> None:
    """Twelve phones resume over a backlog, read a little, vanish: the relay still serves."""
    handle = await relay()
    table = await repo("_744_")
    pos = await _position(handle, client, table)
    await _backlog(db, table, BACKLOG, FILLER, handle)

    phones = [await Phone.connect(handle.port) for _ in range(12)]
    for i, phone in enumerate(phones):
        await phone.auth_and_resume(handle.token(f"phone{i}", "acct"), "db-" + table, pos)
    for i, phone in enumerate(phones):
        for _ in range(i * 3):  # some read part of the replay, the first reads nothing
            assert (await phone.recv())["type"] == "db_created"
    state = handle.state
    assert state.db is not None

    async def replays_waiting() -> bool:
        # Every phone's replay is blocked on its full send queue, and waiting on
        # a client holds no database connection.
        subs = state.dbhub.subscribers("default", table)
        return (
            subs is not None
            and len(subs.catching_up) == len(phones)
            and not any(s.has_room for s in subs.catching_up)
            and state.db is not None
            and state.db.stats()["in_use"] == 0
        )

    await _eventually(replays_waiting, "all replays waiting on their clients")
    assert await _idle_in_transaction(db) == 0  # nor a transaction

    for phone in phones:
        phone.vanish()

    async def all_gone() -> bool:
        return not state.hub.sockets and state.dbhub.subscribers("default", table) is None

    await _eventually(all_gone, "the relay forgot every vanished phone")
    assert state.db.stats()["in_use"] == 0

    # Everything that needs the pool still works: a new connection, a db join
    # with and without 'after', a live event, and the health check.
    fresh = await client(handle)
    await fresh.auth(handle.token("fresh", "acct"))
    await fresh.send(type="join", data="db-" + table, token=fresh.token, after=pos)
    assert (await fresh.expect("joined", timeout=10))["channel"] == "db-" + table
    for n in range(1, BACKLOG + 1):
        frame = await fresh.expect("db_created")
        assert json.loads(frame["data"])["data"]["n"] == n
    await _backlog(db, table, 1, "live")
    live = await fresh.expect("db_created")
    assert json.loads(live["data"])["data"]["filler"] == "live"
    async with aiohttp.ClientSession() as http, http.get(handle.http_url + "/healthz") as resp:
        assert resp.status == 200


async def test_a_resume_that_stops_reading_is_cut_off(relay, client, db, repo) -> None:
    """A client that reads nothing of its replay (connection open) is closed 4001."""
    handle = await relay(replay_stall_seconds=1.0)
    table = await repo("_744_")
    pos = await _position(handle, client, table)
    await _backlog(db, table, BACKLOG, FILLER, handle)
    phone = await Phone.connect(handle.port)
    await phone.auth_and_resume(handle.token("stuck", "acct"), "db-" + table, pos)
    state = handle.state

    async def cut_off() -> bool:
        return state.dbhub.subscribers("default", table) is None

    await _eventually(cut_off, "the stalled replay was given up")
    assert state.db is not None and state.db.stats()["in_use"] == 0
    assert await _idle_in_transaction(db) == 0
    # What the kernel held still arrives, then the close frame says why.
    assert await phone.close_code() == 4001
    phone.writer.close()


async def test_resume_over_large_rows(relay, client, db, repo) -> None:
    """600 rows of 40 KB after the position (24 MB, over the 16 MiB queue cap) all arrive."""
    handle = await relay()
    table = await repo("_744_")
    pos = await _position(handle, client, table)
    await _backlog(db, table, 600, "y" * 40_000, handle)
    resumer = await client(handle)
    await resumer.auth(handle.token("big", "acct"))
    await resumer.join("db-" + table, after=pos)
    for n in range(1, 601):
        frame = await resumer.expect("db_created", timeout=20)
        assert json.loads(frame["data"])["data"]["n"] == n
    await _backlog(db, table, 1, "after")
    live = await resumer.expect("db_created")
    assert json.loads(live["data"])["data"]["filler"] == "after"


async def test_a_wedged_pool_fails_the_health_check(relay, client) -> None:
    """Liveness: /healthz answers 503 while every pool connection is stuck, 200 after."""
    handle = await relay()
    state = handle.state
    assert state.db is not None
    state.db.stuck_seconds = 0.2
    waiter = await client(handle)
    await waiter.auth(handle.token("w", "acct"))
    holders = [state.db.acquire() for _ in range(state.db.max_size)]
    for holder in holders:
        await holder.__aenter__()
    try:
        await asyncio.sleep(0.3)  # longer than stuck_seconds: the holders are stuck now
        async with aiohttp.ClientSession() as http:
            async with http.get(handle.http_url + "/healthz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "wedged"
            # Work that needs the pool fails in bounded time instead of hanging.
            await waiter.send(type="join", data="db-anything", token=waiter.token)
            error = await waiter.expect("error", timeout=state.db.acquire_timeout + 5)
            assert "try again shortly" in error["data"]
    finally:
        for holder in holders:
            await holder.__aexit__(None, None, None)
    async with aiohttp.ClientSession() as http, http.get(handle.http_url + "/healthz") as resp:
        assert resp.status == 200


CANNOT_READ = "could not read the event log; join again shortly"


async def _replay_waiting_on_its_client(handle: RelayHandle, client: Any, db, repo) -> Any:
    """A phone resuming over BACKLOG rows, its replay paused between two reads of the log
    (its send queue full, no pool connection held): (phone, table, position resumed from)."""
    table = await repo("_744_")
    pos = await _position(handle, client, table)
    await _backlog(db, table, BACKLOG, FILLER, handle)
    phone = await Phone.connect(handle.port)
    await phone.auth_and_resume(handle.token("phone", "acct"), "db-" + table, pos)
    state = handle.state
    assert state.db is not None

    def waiting() -> bool:
        subs = state.dbhub.subscribers("default", table)
        return (
            subs is not None
            and len(subs.catching_up) == 1
            and not any(s.has_room for s in subs.catching_up)
            and state.db is not None
            and state.db.stats()["in_use"] == 0
        )

    await eventually(waiting, 20, what="the replay waiting on its client")
    return phone, table, pos


async def _read_to_error(phone: Phone) -> list[dict[str, Any]]:
    frames = []
    while not frames or frames[-1]["type"] != "error":
        frames.append(await phone.recv(timeout=20))
    return frames


async def _told_and_resumable(
    handle: RelayHandle, db, phone: Phone, table: str, frames: list[dict[str, Any]]
) -> None:
    """The replay stopped with CANNOT_READ after rows 1..k, unsubscribed; joining again
    after row k (as the text says) gives k+1.. and the live stream, once each."""
    *replayed, error = frames
    assert (error["type"], error["data"], error["channel"]) == ("error", CANNOT_READ, "db-" + table)
    got = [json.loads(f["data"])["data"]["n"] for f in replayed]
    assert 0 < len(got) < BACKLOG and got == list(range(1, len(got) + 1))
    assert handle.state.dbhub.subscribers("default", table) is None
    await _backlog(db, table, 1, "live")  # written while the phone follows nothing
    phone.send(type="join", data="db-" + table, token=phone.token, after=replayed[-1]["pos"])
    assert (await phone.recv())["type"] == "joined"
    rest = [await phone.recv(timeout=20) for _ in range(BACKLOG + 1 - len(got))]
    assert [json.loads(f["data"])["data"]["n"] for f in rest] == [
        *range(len(got) + 1, BACKLOG + 1),
        1,
    ]
    assert json.loads(rest[-1]["data"])["data"]["filler"] == "live"
    phone.send(type="echo", data="done")  # nothing else was queued before its answer
    assert (await phone.recv())["data"] == "echo: done"
    phone.writer.close()


async def test_a_replay_whose_next_page_fails_says_so(relay, client, db, pg_url, repo) -> None:
    """The log's next page cannot be read (the query is cancelled while it waits on a
    lock): the client is told, its subscription ends, and it can resume where it stopped."""
    handle = await relay()
    phone, table, _ = await _replay_waiting_on_its_client(handle, client, db, repo)
    locker = await asyncpg.connect(pg_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE relay.events IN ACCESS EXCLUSIVE MODE")
            reading = asyncio.create_task(_read_to_error(phone))

            async def page_query_waiting() -> int | None:
                pid: int | None = await db.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%relay.events_page%'"
                )
                return pid

            pid = await eventually(page_query_waiting, 20, what="the next page waiting")
            assert await db.fetchval("SELECT pg_cancel_backend($1)", pid)
            frames = await reading
    finally:
        await locker.close()
    await _told_and_resumable(handle, db, phone, table, frames)


async def test_a_replay_without_a_connection_for_its_next_page_says_so(
    relay, client, db, repo
) -> None:
    """No pool connection frees up for the next page (TimeoutError): told the same way."""
    handle = await relay()
    phone, table, _ = await _replay_waiting_on_its_client(handle, client, db, repo)
    state = handle.state
    assert state.db is not None
    state.db.acquire_timeout = 0.5
    holders = [state.db.acquire() for _ in range(state.db.max_size)]
    for holder in holders:
        await holder.__aenter__()
    try:
        frames = await _read_to_error(phone)
    finally:
        for holder in holders:
            await holder.__aexit__(None, None, None)
    await _told_and_resumable(handle, db, phone, table, frames)


async def test_a_replay_whose_log_is_pruned_under_it_says_reload(relay, client, db, repo) -> None:
    """The log is pruned past where a paused replay has got: the client is told to
    reload (not to retry), and its subscription ends."""
    handle = await relay()
    phone, table, pos = await _replay_waiting_on_its_client(handle, client, db, repo)
    await db.fetchval("SELECT relay.tick()")
    assert await db.fetchval("SELECT relay.prune('0 seconds'::interval)") >= BACKLOG
    *replayed, error = await _read_to_error(phone)
    reload = (
        f"position {pos} is older than the event log keeps:"
        " reload the data, then join without 'after'"
    )
    assert (error["data"], error["channel"]) == (reload, "db-" + table)
    got = [json.loads(f["data"])["data"]["n"] for f in replayed]
    assert 0 < len(got) < BACKLOG and got == list(range(1, len(got) + 1))
    assert handle.state.dbhub.subscribers("default", table) is None
    phone.writer.close()


async def test_live_rows_held_during_a_paused_replay_all_follow_it(relay, client, db, repo) -> None:
    """Rows committed while a replay waits on its reader are held back, then released
    a few at a time as the reader makes room (a queue of 20 frames): all of them
    arrive, after the backlog and in order."""
    handle = await relay(send_queue_frames=20)
    table = await repo("_744_")
    pos = await _position(handle, client, table)
    await _backlog(db, table, BACKLOG, FILLER, handle)
    phone = await Phone.connect(handle.port)
    await phone.auth_and_resume(handle.token("phone", "acct"), "db-" + table, pos)
    # The phone reads nothing yet: its replay (12 MB) cannot have ended, so these
    # rows, dispatched now, are held for it.
    await _backlog(db, table, 100, "live", handle)
    subs = handle.state.dbhub.subscribers("default", table)
    assert subs is not None and [len(h.frames) for h in subs.catching_up.values()] == [100]
    frames = [await phone.recv(timeout=20) for _ in range(BACKLOG + 100)]
    assert [json.loads(f["data"])["data"]["n"] for f in frames] == [
        *range(1, BACKLOG + 1),
        *range(1, 101),
    ]
    assert {json.loads(f["data"])["data"]["filler"] for f in frames[BACKLOG:]} == {"live"}
    phone.send(type="echo", data="done")  # nothing else was queued before its answer
    assert (await phone.recv())["data"] == "echo: done"
    phone.writer.close()


@pytest.mark.parametrize("stage", ["replaying", "releasing"])
async def test_a_session_expiring_mid_resume_resumes_where_it_stopped(
    relay, client, db, repo, stage
) -> None:
    """A phone's session ends while its resume waits on it: mid-replay, or once the
    replay is over and the rows held for it meanwhile are being released a few
    at a time. The channel pauses where its stream stopped; a fresh auth resumes
    it from there: every row once, in order."""
    handle = await relay(send_queue_frames=20)
    table = await repo("_744_")
    pos = await _position(handle, client, table)
    await _backlog(db, table, BACKLOG, FILLER, handle)
    phone = await Phone.connect(handle.port)
    # A session long enough for what follows (seconds), that then ends on its own:
    # a socket's frames are handled one at a time, so no renewal could reach the
    # relay while its join is busy.
    token = handle.token("phone", "acct", ttl_seconds=EXPIRY_SECONDS)
    await phone.auth_and_resume(token, "db-" + table, pos)
    live = BACKLOG if stage == "releasing" else 0
    if live:
        # Held for it (the replay cannot have ended): more than the kernel's buffers take.
        await _backlog(db, table, live, "L" * 4000, handle)
    subs = handle.state.dbhub.subscribers("default", table)
    assert subs is not None and [len(h.frames) for h in subs.catching_up.values()] == [live]
    (socket,) = subs.catching_up
    frames = [await phone.recv(timeout=20) for _ in range(100 + (BACKLOG if live else 0))]

    async def waiting() -> bool:
        held = subs.catching_up.get(socket)
        if held is None or socket.has_room:
            return False
        # Releasing: some held rows out, the rest waiting; replaying: none held.
        return 0 < len(held.frames) < live if live else not held.frames

    await _eventually(waiting, f"{stage}, waiting on the phone")

    async def paused() -> bool:
        return handle.state.dbhub.subscribers("default", table) is None

    # The phone reads nothing more until its session has ended.
    await _eventually(paused, "the session expired", timeout=EXPIRY_SECONDS + 10)
    while (frame := await phone.recv(timeout=20))["type"] != "error":
        frames.append(frame)
    assert "session expired" in frame["data"]
    phone.send(type="auth", data=handle.token("phone", "acct"))
    assert (await phone.recv())["type"] == "token"
    assert (await phone.recv())["type"] == "joined"
    while len(frames) < BACKLOG + live:
        frames.append(await phone.recv(timeout=20))
    rows = [json.loads(f["data"]) for f in frames]
    assert [(r["data"]["filler"][0], r["data"]["n"]) for r in rows] == [
        *(("x", n) for n in range(1, BACKLOG + 1)),
        *(("L", n) for n in range(1, live + 1)),
    ]
    assert {f["type"] for f in frames} == {"db_created"}
    phone.send(type="echo", data="done")  # nothing else was queued before its answer
    assert (await phone.recv())["data"] == "echo: done"
    phone.writer.close()
