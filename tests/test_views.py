"""Live views end to end: a snapshot then the stream, and row filters, on a real relay.

Each test keeps the client's view as a client would (rows by id from
db_created / db_updated, removed on db_deleted) and compares it with a query
of the table for that user and filter.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import asyncpg
import pytest

from relay.views import MAX_KNOWN, View
from tests.conftest import WsClient
from tests.helpers import collect

# (filter, the same in SQL, a value of n and of status that passes it)
FILTERS = [
    ("n=eq.3", "n = 3", 3, "late"),
    ("n=neq.3", "n <> 3", 4, "late"),
    ("n=lt.4", "n < 4", 1, "late"),
    ("n=lte.4", "n <= 4", 4, "late"),
    ("n=gt.5", "n > 5", 11, "late"),  # 11 > 5 as numbers, not as text
    ("n=gte.5", "n >= 5", 5, "late"),
    ("status=in.(open,done)", "status IN ('open', 'done')", 0, "done"),
    ("status=eq.open", "status = 'open'", 0, "open"),
]


async def make_table(db: asyncpg.Connection, suffix: str = "_760_") -> str:
    name = f"v{uuid.uuid4().hex[:10]}{suffix}"
    await db.execute(
        f"CREATE TABLE {name} (id serial PRIMARY KEY, owner_id text, account_id text,"
        " n int, status text, v int NOT NULL DEFAULT 0)"
    )
    await db.execute(f"SELECT relay.watch('{name}'::regclass, 'id', 'owner_id', 'account_id')")
    return name


class LiveView:
    def __init__(self, client: WsClient, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.rows: dict[int, dict[str, Any]] = {}
        self.synced = False
        self.versions: dict[int, int] = {}  # highest v seen per row: stale frames show up

    def state(self) -> dict[int, int]:
        return {k: row["v"] for k, row in self.rows.items()}

    def apply(self, frame: dict[str, Any]) -> None:
        assert frame["channel"] == self.channel, frame
        kind = frame["type"]
        if kind == "db_synced":
            self.synced = True
            return
        assert kind in ("db_created", "db_updated", "db_deleted"), frame
        row = json.loads(frame["data"])
        if kind == "db_deleted":
            self.rows.pop(row["id"], None)
            return
        assert row["v"] > self.versions.get(row["id"], -1), f"stale or repeated: {frame}"
        self.versions[row["id"]] = row["v"]
        self.rows[row["id"]] = row

    async def read_until_synced(self) -> None:
        while not self.synced:
            self.apply(await self.client.recv(10))

    async def read_until_row(self, row_id: int, timeout: float = 10.0) -> None:
        """Read until ``row_id`` is in the view: written last, every frame before it is in."""
        await self.read_until(lambda v: row_id in v.rows, timeout)

    async def read_until(self, done: Any, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self):
            self.apply(await self.client.recv(max(0.1, deadline - loop.time())))


async def join_view(relay, client, table: str, user: str, account: str, **extra: str) -> LiveView:
    c = await client(relay)
    await c.auth(relay.token(user, account))
    joined = await c.join("db-" + table, **extra)
    assert joined["pos"]
    return LiveView(c, "db-" + table)


async def expected_rows(
    db, table: str, user: str, account: str, where: str = "TRUE"
) -> dict[int, int]:
    """What the user may read and the filter passes: each row's id and version."""
    rows = await db.fetch(
        f"SELECT id, v FROM {table} WHERE (owner_id = $1 OR account_id = $2) AND ({where})",
        user,
        account,
    )
    return {r["id"]: r["v"] for r in rows}


async def test_snapshot_then_stream(relay, client, db) -> None:
    r = await relay()
    table = await make_table(db)
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, n) VALUES"
        " ('a', '1', 1), ('b', '1', 2), ('c', '2', 3), ('a', '2', 4)"
    )
    view = await join_view(r, client, table, "a", "1", snapshot="true")
    await view.read_until_synced()
    assert view.state() == await expected_rows(db, table, "a", "1")
    # Then the stream: a new row, a move out of sight, a delete.
    await db.execute(f"INSERT INTO {table} (owner_id, account_id, n, v) VALUES ('z', '1', 9, 1)")
    await db.execute(f"UPDATE {table} SET account_id = '3', v = v + 1 WHERE n = 2")
    await db.execute(f"DELETE FROM {table} WHERE n = 1")
    last = await db.fetchval(
        f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('a', '1', 10) RETURNING id"
    )
    await view.read_until_row(last)
    assert view.state() == await expected_rows(db, table, "a", "1")
    await view.client.silent(0.3)


async def test_snapshot_is_consistent_with_a_writer_committing_throughout(
    relay, client, db, pg_url
) -> None:
    """Rows inserted, updated (v increments) and deleted all through the snapshot:
    no gap (the final view is the query's) and no repeat (v only grows per row)."""
    r = await relay()
    table = await make_table(db, "_744_")
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, n) SELECT 'o', 'x', i"
        " FROM generate_series(1, 2000) i"
    )
    stop = asyncio.Event()

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        conn = await asyncpg.connect(pg_url)
        try:
            while not stop.is_set():
                pick = rng.randint(1, 2500)
                action = rng.random()
                if action < 0.4:
                    await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = $1", pick)
                elif action < 0.7:
                    await conn.execute(f"INSERT INTO {table} (owner_id, n) VALUES ('w', $1)", pick)
                else:
                    await conn.execute(f"DELETE FROM {table} WHERE id = $1", pick)
        finally:
            await conn.close()

    writers = [asyncio.create_task(writer(s)) for s in range(2)]
    try:
        await asyncio.sleep(0.2)  # writing before, during and after the join
        views = [await join_view(r, client, table, f"u{i}", "x", snapshot="true") for i in range(3)]
        for view in views:
            await view.read_until_synced()
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    last = await db.fetchval(f"INSERT INTO {table} (owner_id, n) VALUES ('w', 0) RETURNING id")
    final = {r["id"]: r["v"] for r in await db.fetch(f"SELECT id, v FROM {table}")}
    for view in views:
        await view.read_until_row(last)
        assert view.state() == final


async def test_snapshot_over_the_limit_is_refused(relay, client, db) -> None:
    r = await relay(snapshot_max_rows=5)
    table = await make_table(db, "_744_")
    await db.execute(f"INSERT INTO {table} (n) SELECT i FROM generate_series(1, 6) i")
    c = await client(r)
    await c.auth(r.token("a", "1"))
    await c.send(type="join", data="db-" + table, token=c.token, snapshot="true")
    assert (await c.expect("joined"))["channel"] == "db-" + table
    error = await c.expect("error")
    assert "snapshot too large" in error["data"] and "filter" in error["data"]
    await db.execute(f"INSERT INTO {table} (n) VALUES (7)")
    # Positive control on the same socket: a filtered snapshot within the limit works.
    await c.send(type="join", data="db-" + table, token=c.token, snapshot="true", filter="n=gt.4")
    await c.expect("joined")
    got = [await c.recv() for _ in range(4)]
    assert [f["type"] for f in got] == ["db_created"] * 3 + ["db_synced"]


@pytest.mark.parametrize(("text", "where", "n", "status"), FILTERS)
async def test_filters_with_moves_in_and_out(relay, client, db, text, where, n, status) -> None:
    r = await relay()
    table = await make_table(db)
    statuses = ["open", "done", "late"]
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, n, status)"
        " SELECT CASE WHEN i % 3 = 0 THEN 'a' ELSE 'b' END, (i % 2)::text, i % 13,"
        " ($1::text[])[1 + i % 3] FROM generate_series(1, 30) i",
        statuses,
    )
    snap = await join_view(r, client, table, "a", "1", snapshot="true", filter=text)
    plain = await join_view(r, client, table, "a", "1", filter=text)  # no snapshot
    everything = await join_view(r, client, table, "a", "1", snapshot="true")
    await snap.read_until_synced()
    await everything.read_until_synced()
    assert snap.state() == await expected_rows(db, table, "a", "1", where)
    rng = random.Random(text)
    touched: set[int] = set()  # rows written after the join
    for _ in range(60):  # values move rows in and out of the filter and of sight
        pick = rng.randint(1, 35)
        choice = rng.random()
        if choice < 0.65:
            touched.add(pick)  # updated (a delete needs no mention: the row is gone)
        if choice < 0.5:
            await db.execute(
                f"UPDATE {table} SET n = $2, status = $3, v = v + 1 WHERE id = $1",
                pick,
                rng.randint(0, 12),
                rng.choice(statuses),
            )
        elif choice < 0.65:
            await db.execute(
                f"UPDATE {table} SET account_id = $2, v = v + 1 WHERE id = $1",
                pick,
                rng.choice(["1", "2"]),
            )
        elif choice < 0.85:
            new_id = await db.fetchval(
                f"INSERT INTO {table} (owner_id, account_id, n, status) VALUES ($1, $2, $3, $4)"
                " RETURNING id",
                rng.choice(["a", "b"]),
                rng.choice(["1", "2"]),
                rng.randint(0, 12),
                rng.choice(statuses),
            )
            touched.add(new_id)
        else:
            await db.execute(f"DELETE FROM {table} WHERE id = $1", pick)
    last = await db.fetchval(
        f"INSERT INTO {table} (owner_id, account_id, n, status) VALUES ('a', '1', $1, $2)"
        " RETURNING id",
        n,
        status,
    )
    touched.add(last)
    for view in (snap, plain, everything):
        await view.read_until_row(last)
    wanted = await expected_rows(db, table, "a", "1", where)
    assert snap.state() == wanted
    assert everything.state() == await expected_rows(db, table, "a", "1")
    # Without a snapshot the view holds what passed the filter since the join.
    fresh = {k: v for k, v in wanted.items() if k in touched}
    assert plain.state().items() >= fresh.items() and plain.rows.keys() <= wanted.keys()
    await snap.client.silent(0.2)


async def test_a_filtered_resume_replays_through_the_filter(relay, client, db) -> None:
    r = await relay()
    table = await make_table(db, "_744_")
    first = await join_view(r, client, table, "a", "1", filter="n=gte.5")
    await db.execute(f"INSERT INTO {table} (n) VALUES (1), (5), (9)")
    await first.read_until(lambda v: len(v.rows) == 2)
    c = await client(r)
    await c.auth(r.token("a", "1"))
    joined = await c.join("db-" + table)
    joined_pos = joined["pos"]
    await db.execute(f"UPDATE {table} SET n = 2, v = 1 WHERE n = 9")  # out of the filter
    await db.execute(f"UPDATE {table} SET n = 7, v = 1 WHERE n = 1")  # into it
    resumed = await client(r)
    await resumed.auth(r.token("a", "1"))
    await resumed.join("db-" + table, after=joined_pos, filter="n=gte.5")
    got = [await resumed.recv() for _ in range(2)]
    assert [f["type"] for f in got] == ["db_deleted", "db_created"]
    assert json.loads(got[1]["data"])["n"] == 7
    await resumed.silent(0.2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"filter": "n=like.3"},
            "invalid filter: unknown filter operator 'like': use one of eq, neq, lt, lte, gt,"
            " gte, in",
        ),
        ({"filter": "nope=eq.1"}, "invalid filter: the table has no column 'nope'"),
        ({"filter": "n=eq.abc"}, "invalid filter: 'abc' is not a value of column 'n''s type"),
        (
            {"filter": "garbage"},
            "invalid filter: not a filter: 'garbage' (expected column=op.value,"
            " e.g. status=eq.open)",
        ),
        ({"snapshot": "yes"}, "'snapshot' must be \"true\" or absent"),
        ({"snapshot": "true", "after": "1"}, "a join takes 'after' or 'snapshot', not both"),
    ],
)
async def test_invalid_join_options_get_a_readable_error(relay, client, db, extra, message):
    r = await relay()
    table = await make_table(db)
    c = await client(r)
    await c.auth(r.token("a", "1"))
    await c.send(type="join", data="db-" + table, token=c.token, **extra)
    error = await c.expect("error")
    assert (error["data"], error["channel"]) == (message, "db-" + table)
    await c.join("db-" + table)  # the socket carries on


async def test_a_filtered_subscriber_outlives_the_last_plain_one(relay, client, db) -> None:
    """A filtered and a plain subscriber of one table; the plain one leaves: the
    filtered one still gets the rows that pass its filter, and only those."""
    r = await relay()
    table = await make_table(db)
    filtered = await join_view(r, client, table, "a", "1", filter="n=gt.5")
    plain = await join_view(r, client, table, "b", "1")
    await db.execute(f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('a', '1', 9)")
    assert json.loads((await plain.client.expect("db_created"))["data"])["n"] == 9
    assert json.loads((await filtered.client.expect("db_created"))["data"])["n"] == 9
    await plain.client.close()
    await db.execute(f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('a', '1', 1)")
    await db.execute(f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('a', '1', 7)")
    assert json.loads((await filtered.client.expect("db_created"))["data"])["n"] == 7
    await filtered.client.silent()


async def test_joining_again_without_the_filter_drops_it(relay, client, db) -> None:
    """A filtered subscriber joins the channel again without a filter: from then on
    it gets every row it may read, each once; another filtered subscriber is unaffected."""
    r = await relay()
    table = await make_table(db)
    view = await join_view(r, client, table, "a", "1", filter="n=gt.5")
    other = (await join_view(r, client, table, "b", "1", filter="n=gt.5")).client
    c = view.client
    await c.join("db-" + table)
    for n in (1, 9):
        await db.execute(f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('a', '1', $1)", n)
    got = [json.loads((await c.expect("db_created"))["data"])["n"] for _ in range(2)]
    assert got == [1, 9]
    assert json.loads((await other.expect("db_created"))["data"])["n"] == 9
    await asyncio.gather(c.silent(), other.silent())


async def test_a_filtered_subscriber_gets_updates_of_its_rows_and_no_word_of_others(
    relay, client, db
) -> None:
    """A row that comes into sight but fails the filter is not mentioned; a row in
    the filter is created, updated (db_updated, not a second db_created), then
    deleted when it moves out of it."""
    r = await relay()
    table = await make_table(db)
    view = await join_view(r, client, table, "a", "1", filter="n=gt.5")
    hidden = await db.fetchval(
        f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('b', '2', 9) RETURNING id"
    )
    # Now readable, but outside the filter: nothing to tell a client that never had it.
    await db.execute(f"UPDATE {table} SET account_id = '1', n = 1 WHERE id = $1", hidden)
    row = await db.fetchval(
        f"INSERT INTO {table} (owner_id, account_id, n) VALUES ('a', '1', 9) RETURNING id"
    )
    await db.execute(f"UPDATE {table} SET n = 8, v = 1 WHERE id = $1", row)
    await db.execute(f"UPDATE {table} SET n = 2, v = 2 WHERE id = $1", row)
    got = await collect(view.client, 3)
    assert [(f["type"], json.loads(f["data"])["id"]) for f in got] == [
        ("db_created", row),
        ("db_updated", row),
        ("db_deleted", row),
    ]
    assert json.loads(got[1]["data"])["n"] == 8
    await view.client.silent(0.2)


def test_a_view_past_its_memory_bound_tells_every_departure() -> None:
    """After a snapshot a view knows every row its client holds, and a row it
    never sent is not mentioned when it goes; past MAX_KNOWN remembered ids it
    forgets them and, no longer sure, tells every departure."""
    view = View(lambda row: True, source="n=gt.0", complete=True)
    for i in range(MAX_KNOWN):
        view.remember(str(i))
    assert view.frame_type("d", "never-sent", None, True, False) is None
    assert view.frame_type("d", "0", None, True, False) == "db_deleted"
    view.remember("0")
    view.remember("one too many")
    assert view.frame_type("d", "never-sent", None, True, False) == "db_deleted"
    assert view.frame_type("u", "one too many", {"n": 1}, True, True) == "db_updated"
