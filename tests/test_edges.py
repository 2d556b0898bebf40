"""Delivery truth at the edges, staged against a real relay and a real PostgreSQL.

Each test keeps a client's view of a db- channel the way a client would (a
dict of rows by id, built from the frames it receives, emptied on a reload
notice) and compares it in the end with a query of the table for that user:
TRUNCATE, dropped and renamed tables and columns, a listener that fell behind
the log's retention, a session that paused and resumed, and a writer that
cannot write the log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from relay.auth import mint_token
from tests.conftest import JWT_SECRET, WsClient, free_port


class View:
    """A client's copy of a repository, kept from the frames it receives."""

    def __init__(self, client: WsClient, channel: str, id_column: str = "id") -> None:
        self.client = client
        self.channel = channel
        self.id_column = id_column
        self.rows: dict[str, dict[str, Any]] = {}
        self.notices: list[dict[str, Any]] = []
        self.last_pos = ""

    def apply(self, frame: dict[str, Any]) -> None:
        assert frame["channel"] == self.channel, frame
        if frame["type"] == "error":
            self.notices.append(frame)
            if frame.get("reason") in ("truncated", "pruned"):
                self.rows.clear()  # what "reload the data" means for a client
        elif frame["type"] in ("db_created", "db_updated"):
            row = json.loads(frame["data"])
            self.rows[str(row[self.id_column])] = row
        elif frame["type"] == "db_deleted":
            self.rows.pop(str(json.loads(frame["data"])["id"]), None)
        else:
            raise AssertionError(f"unexpected frame {frame}")
        self.last_pos = frame.get("pos", self.last_pos)

    async def take(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        frames = [await self.client.recv(timeout) for _ in range(n)]
        for frame in frames:
            self.apply(frame)
        return frames


async def insert(db: asyncpg.Connection, table: str, owner: str, n: int = 1) -> list[str]:
    rows = await db.fetch(
        f"INSERT INTO {table} (owner_id, account_id, data)"
        " SELECT $1, 'acct', jsonb_build_object('i', i) FROM generate_series(1, $2) i"
        " RETURNING id::text",
        owner,
        n,
    )
    return [r["id"] for r in rows]


async def table_ids(db: asyncpg.Connection, table: str) -> set[str]:
    return {r["id"] for r in await db.fetch(f"SELECT id::text FROM {table}")}


async def subscribe(relay, client, table: str, user: str = "u", **extra: str) -> View:
    c = await client(relay)
    await c.auth(relay.token(user, "acct"))
    joined = await c.join("db-" + table, **extra)
    view = View(c, "db-" + table)
    view.last_pos = joined["pos"]
    return view


# --- TRUNCATE ----------------------------------------------------------------------------


async def test_truncate_reaches_subscribers_and_resumes_in_order(relay, client, db, repo):
    r = await relay()
    table = await repo("_744_")
    live = await subscribe(r, client, table)
    start = live.last_pos
    await insert(db, table, "u", 3)
    await live.take(3)
    await db.execute(f"TRUNCATE {table}")
    (notice,) = await live.take(1)
    assert notice["type"] == "error" and notice["reason"] == "truncated"
    assert "TRUNCATE" in notice["data"] and "reload the data" in notice["data"]
    assert notice["pos"]
    after = await insert(db, table, "u", 2)
    await live.take(2)
    assert set(live.rows) == await table_ids(db, table) == set(after)

    # A client resuming from before it all crosses the same point, in order.
    resumed = await subscribe(r, client, table, user="v", after=start)
    frames = await resumed.take(6)
    assert [f["type"] for f in frames] == ["db_created"] * 3 + ["error"] + ["db_created"] * 2
    assert set(resumed.rows) == set(after)
    await resumed.client.silent(0.3)


# --- schema changes -------------------------------------------------------------------------


async def test_dropped_table_tells_subscribers_once_and_unregisters(relay, client, db, repo):
    r = await relay()
    table = await repo("_744_")
    live = await subscribe(r, client, table)
    await insert(db, table, "u")
    await live.take(1)  # positive control
    await db.execute(f"DROP TABLE {table}")
    (notice,) = await live.take(1)
    assert notice["reason"] == "dropped" and notice["channel"] == "db-" + table
    assert "no longer subscribed" in notice["data"]
    await live.client.silent(0.3)  # told once
    assert await db.fetchval("SELECT count(*) FROM relay.watched WHERE repo = $1", table) == 0
    await live.client.send(type="join", data="db-" + table, token=live.client.token)
    assert "not a watched table" in (await live.client.expect("error"))["data"]


async def test_a_resume_across_a_drop_of_its_table_says_so_and_stops_there(relay, client, db, repo):
    """The table was dropped and made again under its name after the client's
    position: the replay gives what came before the drop, then the drop notice,
    and nothing of the new table (the client is no longer subscribed)."""
    from relay.repos import create_repo

    r = await relay()
    table = await repo("_744_")
    live = await subscribe(r, client, table)
    start = live.last_pos
    before = await insert(db, table, "u", 2)
    await live.take(2)
    await db.execute(f"DROP TABLE {table}")
    (notice,) = await live.take(1)
    assert notice["reason"] == "dropped"
    await create_repo(db, table)
    await insert(db, table, "u")  # in the log after the drop: not for the resumed client
    resumed = await subscribe(r, client, table, after=start)
    frames = await resumed.take(3)
    assert [f["type"] for f in frames] == ["db_created", "db_created", "error"]
    assert [json.loads(f["data"])["id"] for f in frames[:2]] == before
    assert (frames[2]["reason"], frames[2]["data"]) == ("dropped", notice["data"])
    other = await subscribe(r, client, table)
    await insert(db, table, "u")
    await other.take(1)  # dispatched: the positive control for the resumed client's silence
    await resumed.client.silent(0.3)
    # It may join the new table again, from now on.
    await resumed.client.join("db-" + table)
    fresh = await insert(db, table, "u")
    (frame,) = await resumed.take(1)
    assert (frame["type"], json.loads(frame["data"])["id"]) == ("db_created", fresh[0])


async def test_renames_keep_the_channel_and_writes_working(relay, client, db, repo):
    """A renamed table keeps its db- name; renamed owner/id columns are followed."""
    r = await relay()
    table = await repo("_700_")
    owner_view = await subscribe(r, client, table, user="alice")
    other = await subscribe(r, client, table, user="bob")
    owner_view.id_column = other.id_column = "key"
    new_name = f"renamed_{uuid.uuid4().hex[:8]}"
    await db.execute(f"ALTER TABLE {table} RENAME TO {new_name}")
    await db.execute(f"ALTER TABLE {new_name} RENAME COLUMN owner_id TO author")
    await db.execute(f"ALTER TABLE {new_name} RENAME COLUMN id TO key")
    await db.execute(f"ALTER TABLE {new_name} ADD COLUMN priority int DEFAULT 7")
    row = await db.fetchval(
        f"INSERT INTO {new_name} (author, account_id) VALUES ('alice', 'x') RETURNING key::text"
    )
    (created,) = await owner_view.take(1)
    assert created["channel"] == "db-" + table  # the name clients joined
    data = json.loads(created["data"])
    assert data["key"] == row and data["author"] == "alice" and data["priority"] == 7
    await db.execute(f"UPDATE {new_name} SET author = 'bob' WHERE key = $1::uuid", row)
    (gone,) = await owner_view.take(1)
    assert gone["type"] == "db_deleted" and json.loads(gone["data"]) == {"id": row}
    (arrived,) = await other.take(1)
    assert arrived["type"] == "db_created"
    assert set(other.rows) == {
        r["key"] for r in await db.fetch(f"SELECT key::text FROM {new_name} WHERE author='bob'")
    }
    listed = await db.fetchrow(
        "SELECT id_column, owner_column FROM relay.watched WHERE repo = $1", table
    )
    assert tuple(listed) == ("key", "author")


async def test_dropping_a_column_relay_reads_drops_the_repository(relay, client, db, repo):
    r = await relay()
    table = await repo("_744_")
    live = await subscribe(r, client, table)
    await db.execute(f"ALTER TABLE {table} DROP COLUMN data")  # not one relay reads
    await db.execute(f"INSERT INTO {table} (owner_id, account_id) VALUES ('u', 'acct')")
    (created,) = await live.take(1)
    assert created["type"] == "db_created" and "data" not in json.loads(created["data"])
    await db.execute(f"ALTER TABLE {table} DROP COLUMN owner_id")
    (notice,) = await live.take(1)
    assert notice["reason"] == "dropped"
    # The table itself stays, writable, without relay's triggers.
    await db.execute(f"INSERT INTO {table} (account_id) VALUES ('acct')")
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2
    await live.client.silent(0.3)


# --- a writer that cannot write the log ---------------------------------------------------------


async def test_a_writer_that_cannot_log_fails_loudly_and_leaves_no_gap(
    relay, client, db, repo, pg_url
):
    """relay.events locked past the writer's lock_timeout: the write fails, nothing is lost."""
    r = await relay()
    table = await repo("_744_")
    live = await subscribe(r, client, table)
    locker = await asyncpg.connect(pg_url)
    writer = await asyncpg.connect(pg_url)
    try:
        await writer.execute("SET lock_timeout = '200ms'")
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE relay.events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(asyncpg.LockNotAvailableError):
            await writer.execute(f"INSERT INTO {table} (owner_id) VALUES ('lost')")
        await tx.rollback()
        await insert(writer, table, "u")
        (created,) = await live.take(1)
        assert json.loads(created["data"])["owner_id"] == "u"
        assert set(live.rows) == await table_ids(db, table)  # the failed row never existed
    finally:
        await locker.close()
        await writer.close()


# --- paused sessions ------------------------------------------------------------------------------


async def test_a_paused_session_resumes_each_db_channel_where_it_stopped(relay, client, db, repo):
    r = await relay()
    table = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("u", "acct", ttl_seconds=2))
    await c.join("db-" + table)
    view = View(c, "db-" + table)
    await insert(db, table, "u", 2)
    await view.take(2)
    expired = await c.expect("error", timeout=10)
    assert "session expired" in expired["data"]
    missed = await insert(db, table, "u", 3)  # committed while paused
    await c.silent(0.3)
    await c.auth(r.token("u", "acct", ttl_seconds=60))
    joined = await c.expect("joined")
    assert joined["channel"] == "db-" + table
    frames = await view.take(3)
    assert [json.loads(f["data"])["id"] for f in frames] == missed
    live = await insert(db, table, "u")
    (after,) = await view.take(1)
    assert json.loads(after["data"])["id"] == live[0]
    assert set(view.rows) == await table_ids(db, table)
    await c.silent(0.3)  # no duplicate


# --- a listener behind the retention window -----------------------------------------------


async def test_a_listener_behind_retention_tells_its_subscribers_to_reload(
    relay, client, db, repo, pg_url, tmp_path, caplog
):
    """Relay B is stopped (SIGSTOP) while relay A dispatches and prunes to 10 rows."""
    table = await repo("_744_")
    port = free_port()
    env = {
        **os.environ,
        "RELAY_DATABASE_URL": pg_url,
        "RELAY_PORT": str(port),
        "RELAY_JWT_SECRET": JWT_SECRET,
        "RELAY_DATA_DIR": str(tmp_path),
    }
    b = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli",
        "serve",
        "--no-migrate",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_healthy(port)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws")
            b_client = WsClient(http, ws)
            await b_client.expect("init")
            await b_client.auth(mint_token(JWT_SECRET, "u", "acct"))
            await b_client.join("db-" + table)
            b_view = View(b_client, "db-" + table)
            await insert(db, table, "u")
            await b_view.take(1)  # positive control: B delivers
            b.send_signal(signal.SIGSTOP)
            a = await relay(event_retention_rows=10, prune_seconds=0.2)
            a_view = await subscribe(a, client, table)
            for _ in range(10):  # many ticks, so the pruner has ticks to drop
                await insert(db, table, "u", 5)
                await a_view.take(5)
            oldest = await db.fetchval("SELECT min(id) FROM relay.ticks")
            for _ in range(400):  # the pruner runs every 0.2 s
                if await db.fetchval("SELECT min(id) FROM relay.ticks") != oldest:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("relay A never pruned")
            b.send_signal(signal.SIGCONT)
            frames = []
            while not any(f["type"] == "error" for f in frames):
                frames.append(await b_client.recv(10))
            notice = frames[-1]
            assert notice["reason"] == "pruned" and "reload the data" in notice["data"]
            # B carries on from the newest tick: a row written now reaches its subscriber.
            [row_id] = await insert(db, table, "u")
            frame = await b_client.expect("db_created", timeout=10)
            assert json.loads(frame["data"])["id"] == row_id
            await ws.close()
        assert any("pruned past" in rec.getMessage() for rec in caplog.records)
    finally:
        b.send_signal(signal.SIGCONT)
        b.terminate()
        await asyncio.wait_for(b.wait(), 20)


async def _wait_healthy(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("relay B did not start")


# --- everything at once -------------------------------------------------------------------------


async def test_randomized_edges_keep_a_view_equal_to_the_table(relay, client, db, repo, pg_url):
    """Writers insert, update, move and delete rows; now and then a TRUNCATE; the table
    is renamed midway; the subscriber's session expires every 2 s and is renewed. At
    the end the client's view (emptied on each 'truncated' notice) equals the query."""
    import random

    r = await relay()
    original = await repo("_760_")
    names = {"table": original}
    c = await client(r)
    await c.auth(r.token("u", "1", ttl_seconds=2))
    await c.join("db-" + original)
    view = View(c, "db-" + original)
    renewals = 0
    truncates = 0

    async def write(conn: asyncpg.Connection, sql: str, *args: object) -> None:
        for _ in range(100):  # renamed under us: retry once the renamer has said so
            try:
                await conn.execute(sql.format(t=names["table"]), *args)
                return
            except asyncpg.UndefinedTableError:
                await asyncio.sleep(0.01)
        raise AssertionError("the table vanished")

    async def writer(seed: int) -> None:
        nonlocal truncates
        rng = random.Random(seed)
        conn = await asyncpg.connect(pg_url)
        try:
            for step in range(150):
                action = rng.random()
                owner, account = rng.choice(["u", "x"]), rng.choice(["1", "2"])
                if action < 0.4:
                    await write(
                        conn,
                        "INSERT INTO {t} (owner_id, account_id) VALUES ($1, $2)",
                        owner,
                        account,
                    )
                elif action < 0.7:
                    await write(
                        conn,
                        "UPDATE {t} SET account_id = $1, data = jsonb_build_object('s', $2::int)"
                        " WHERE id = (SELECT id FROM {t} ORDER BY random() LIMIT 1)",
                        account,
                        step,
                    )
                elif action < 0.97:
                    await write(conn, "DELETE FROM {t} WHERE id = (SELECT id FROM {t} LIMIT 1)")
                else:
                    await write(conn, "TRUNCATE {t}")
                    truncates += 1
                if seed == 1 and step == 100:
                    for _ in range(1000):  # go on writing only once a session was renewed
                        if renewals:
                            break
                        await asyncio.sleep(0.01)
                if seed == 0 and step == 75:
                    renamed = f"renamed_{uuid.uuid4().hex[:8]}"
                    await conn.execute(f"ALTER TABLE {names['table']} RENAME TO {renamed}")
                    names["table"] = renamed
                await asyncio.sleep(rng.random() * 0.02)
        finally:
            await conn.close()

    async def consume(until: asyncio.Event) -> None:
        nonlocal renewals
        while True:
            try:
                frame = await c.recv(timeout=0.5)
            except TimeoutError:
                if until.is_set():
                    return
                continue
            if frame["type"] == "error" and "session expired" in frame["data"]:
                await c.send(type="auth", data=r.token("u", "1", ttl_seconds=2))
                renewals += 1
            elif frame["type"] == "token":
                c.token = frame["data"]
            elif frame["type"] != "joined":
                view.apply(frame)
                if frame["type"] == "db_created" and "sentinel" in frame["data"]:
                    return

    writers_done = asyncio.Event()
    reader = asyncio.create_task(consume(writers_done))
    await asyncio.gather(*(writer(s) for s in range(2)))
    await db.execute(
        f"INSERT INTO {names['table']} (owner_id, account_id, data)"
        """ VALUES ('u', '1', '{"sentinel": true}')"""
    )
    await asyncio.wait_for(reader, 30)
    expected = {
        row["id"]
        for row in await db.fetch(
            f"SELECT id::text FROM {names['table']} WHERE owner_id = 'u' OR account_id = '1'"
        )
    }
    assert set(view.rows) == expected
    assert renewals >= 1  # the session did expire and resume during the run
    assert truncates >= 1
    assert [n["reason"] for n in view.notices] == ["truncated"] * truncates  # each told once
