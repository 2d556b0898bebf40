"""Database events end to end: writes by plain SQL reach exactly the readers of each row.

A real relay, real PostgreSQL, real WebSocket clients; rows are written on a
separate asyncpg connection, never through the relay.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from relay import listener as listener_module
from relay.server import DB_DELAYED
from tests.conftest import RepoFactory, WsClient, _url_of
from tests.helpers import collect, eventually, ids_of, insert, listener_sleeping
from tests.test_metrics import scrape, value

# The contract's example: A and B in account 1, C alone in account 2.
USERS = {"A": "1", "B": "1", "C": "2"}


def may_read(
    mode: str, user: str, account: str, owner: str | None, row_account: str | None
) -> bool:
    """The rule of DESIGN.md, written out independently of relay.permissions."""
    o, g, e = (int(d) for d in mode)
    return bool(e & 4 or (g & 4 and account == row_account) or (o & 4 and user == owner))


async def settled(relay_handle, client, db, name: str, owner: str, account: str) -> str:
    """Insert a row and wait until the relay has dispatched it, so that clients
    subscribing afterwards follow from a position after its creation."""
    probe = await client(relay_handle)
    await probe.auth(relay_handle.token("probe", "probe", root=True))
    await probe.join(f"db-{name}")
    row_id = await insert(db, name, owner, account)
    assert json.loads((await probe.expect("db_created"))["data"])["id"] == row_id
    await probe.close()
    return row_id


async def subscribers(
    relay_handle, client, name: str, with_root: bool = False, **extra: str
) -> dict[str, WsClient]:
    """A, B and C (USERS), and with ``with_root`` a root token ("root"), each joined to db-NAME."""
    clients = {}
    everyone = [*USERS.items(), *([("root", "none")] if with_root else [])]
    for user, account in everyone:
        c = await client(relay_handle)
        await c.auth(relay_handle.token(user, account, root=user == "root"))
        await c.join(f"db-{name}", **extra)
        clients[user] = c
    return clients


async def receive_expected(clients: dict[str, WsClient], expected: dict[str, list[Any]]) -> None:
    """Each client gets exactly its expected (type, id) frames, in order, then nothing.

    The root client reads everything and its last frame is the last event: once
    it has arrived, every other client's frames were queued too (one dispatch
    serves every socket), so the silence checks run after a positive control.
    """
    order = ["root", *(user for user in clients if user != "root")]
    for user in order:
        frames = await collect(clients[user], len(expected[user]))
        assert ids_of(frames) == expected[user], user
        for f in frames:
            if f["type"] == "db_deleted":  # the id, nothing of where the row went
                assert json.loads(f["data"]) == {"id": json.loads(f["data"])["id"]}
    await asyncio.gather(*(c.silent(0.3) for c in clients.values()))


# Every permission digit that matters, alone and together: a mode without the
# owner bit, one without the group bit, everyone, nobody, and no suffix (740).
SUFFIXES = ["_760_", "_700_", "_744_", "_770_", "_070_", "_404_", "_004_", "_000_", ""]


def verdict(mode: str, user: str, old: tuple[str, str], new: tuple[str, str]) -> str | None:
    """What an update from ``old`` (owner, account) to ``new`` looks like to ``user``."""
    before = may_read(mode, user, USERS.get(user, ""), *old) or user == "root"
    now = may_read(mode, user, USERS.get(user, ""), *new) or user == "root"
    if before and now:
        return "db_updated"
    if before:
        return "db_deleted"
    return "db_created" if now else None


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_permission_suffixes(relay, client, db, repo: RepoFactory, suffix: str):
    r = await relay()
    name = await repo(suffix)
    mode = suffix.strip("_") or "740"
    clients = await subscribers(r, client, name, with_root=True)
    rows = [("A", "1"), ("B", "1"), ("C", "2"), ("Z", "1"), ("Z", "2"), ("A", "2")]
    written = [(await insert(db, name, owner, account), owner, account) for owner, account in rows]
    expected = {
        user: [
            ("db_created", row_id)
            for row_id, owner, account in written
            if user == "root" or may_read(mode, user, USERS[user], owner, account)
        ]
        for user in clients
    }
    await receive_expected(clients, expected)


# Updates that keep a row in place or move it between owners and accounts.
MOVES = [
    (("A", "1"), ("A", "1")),  # data only
    (("A", "1"), ("A", "2")),  # A's own row leaves account 1
    (("Z", "1"), ("Z", "2")),  # someone else's row leaves account 1 for account 2
    (("Z", "2"), ("A", "2")),  # a row of account 2 is handed to A
    (("A", "1"), ("C", "1")),  # A hands a row to C, the account stays
    (("Z", "2"), ("Z", "2")),  # invisible to account 1 before and after
]


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_updates_and_deletes_reach_old_and_new_readers_live_and_on_resume(
    relay, client, db, repo: RepoFactory, suffix: str
):
    """The same oracle for both filters: live delivery (RepoSubscribers.readers)
    and replay on resume (audience_of). Losing sight of a row is db_deleted,
    gaining it db_created, keeping it db_updated; a delete goes to the readers
    of the deleted row; a root token reads everything."""
    r = await relay()
    name = await repo(suffix)
    mode = suffix.strip("_") or "740"
    probe = await client(r)
    await probe.auth(r.token("probe", "none", root=True))
    await probe.join(f"db-{name}")
    ids = [await insert(db, name, *old) for old, _ in MOVES]
    start = (await collect(probe, len(ids)))[-1]["pos"]
    live = await subscribers(r, client, name, with_root=True)

    for row_id, (_, (owner, account)) in zip(ids, MOVES, strict=True):
        await db.execute(
            f"UPDATE {name} SET owner_id = $2, account_id = $3, data = '{{\"moved\": 1}}'"
            " WHERE id = $1",
            row_id,
            owner,
            account,
        )
    gone = ids[1]  # deleted where it was moved to: ("A", "2")
    await db.execute(f"DELETE FROM {name} WHERE id = $1", gone)

    expected: dict[str, list[tuple[str, str]]] = {}
    for user in live:
        frames = []
        for row_id, (old, new) in zip(ids, MOVES, strict=True):
            seen = verdict(mode, user, old, new)
            if seen is not None:
                frames.append((seen, row_id))
        if verdict(mode, user, MOVES[1][1], MOVES[1][1]) is not None:
            frames.append(("db_deleted", gone))
        expected[user] = frames
    await receive_expected(live, expected)

    resumed = await subscribers(r, client, name, with_root=True, after=start)
    await receive_expected(resumed, expected)


async def test_contract_example_tasks_760(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_760_")
    clients = await subscribers(r, client, name)
    one = await insert(db, name, "A", "1")
    two = await insert(db, name, "C", "2")
    for user in ("A", "B"):
        frame = await clients[user].expect("db_created")
        assert json.loads(frame["data"])["id"] == one
        await clients[user].silent()
    frame = await clients["C"].expect("db_created")
    assert json.loads(frame["data"])["id"] == two
    await clients["C"].silent()


async def test_update_and_delete_frames(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_760_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    row_id = await insert(db, name, "A", "1")
    await c.expect("db_created")
    await db.execute(f"UPDATE {name} SET data = '{{\"done\": true}}' WHERE id = $1", row_id)
    updated = await c.expect("db_updated")
    assert json.loads(updated["data"])["data"] == {"done": True}
    await db.execute(f"DELETE FROM {name} WHERE id = $1", row_id)
    deleted = await c.expect("db_deleted")
    assert json.loads(deleted["data"]) == {"id": row_id}
    assert deleted["channel"] == f"db-{name}"


async def test_delete_reaches_exactly_the_old_readers(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_760_")
    row_id = await settled(r, client, db, name, "A", "1")
    clients = await subscribers(r, client, name)
    await db.execute(f"DELETE FROM {name} WHERE id = $1", row_id)
    for user in ("A", "B"):
        assert json.loads((await clients[user].expect("db_deleted"))["data"]) == {"id": row_id}
    await clients["C"].silent()


async def test_update_moving_account(relay, client, db, repo: RepoFactory):
    """Old readers learn the row is gone; new readers see it appear."""
    r = await relay()
    name = await repo("_760_")
    row_id = await settled(r, client, db, name, "Z", "1")
    clients = await subscribers(r, client, name)
    await db.execute(f"UPDATE {name} SET account_id = '2' WHERE id = $1", row_id)
    for user in ("A", "B"):
        frame = await clients[user].expect("db_deleted")
        assert json.loads(frame["data"]) == {"id": row_id}
    frame = await clients["C"].expect("db_created")
    assert json.loads(frame["data"])["account_id"] == "2"
    for c in clients.values():
        await c.silent()


async def test_a_sleeping_listener_is_woken_by_the_writer(relay, client, db, repo):
    """With the safety poll an hour away, only the writer's NOTIFY can wake the
    listener: each row arrives although the listener was asleep when it was written."""
    name, c = await subscribed_with_the_safety_poll_an_hour_away(relay, client, repo)
    await listener_sleeping(db)
    connection = await listener_pid(db)
    for n in range(3):
        await listener_sleeping(db)
        row_id = await insert(db, name, "A", "1", n)
        frame = await c.expect("db_created", timeout=20)
        assert json.loads(frame["data"])["id"] == row_id
    await listener_sleeping(db)
    assert await listener_pid(db) == connection  # woken three times, never reconnected


async def test_reauth_as_another_user_follows_the_new_identity(relay, client, db, repo):
    """A db- subscription re-authenticated as another user reads what that user may read."""
    r = await relay()
    name = await repo("_760_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    mine = await insert(db, name, "A", "1")
    assert ids_of([await c.expect("db_created")]) == [("db_created", mine)]
    await c.auth(r.token("C", "2"))
    hidden = await insert(db, name, "A", "1")  # A's: no longer readable on this socket
    visible = await insert(db, name, "C", "2")
    assert ids_of([await c.expect("db_created")]) == [("db_created", visible)]
    await db.execute(f"DELETE FROM {name} WHERE id = $1", hidden)
    await db.execute(f"UPDATE {name} SET data = '{{}}' WHERE id = $1", visible)
    assert ids_of([await c.expect("db_updated")]) == [("db_updated", visible)]
    await c.silent()


async def subscribed_with_the_safety_poll_an_hour_away(relay, client, repo):
    """A relay whose listener only a NOTIFY (or a lost connection) can wake, and user
    A of account 1 joined to a new ``_744_`` repository on it: (repo, client)."""
    r = await relay(poll_seconds=3600)
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    return name, c


async def listener_pid(db) -> int | None:
    pid: int | None = await db.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'relay-listener'"
    )
    return pid


async def test_listener_connection_lost_in_the_middle_of_a_large_tick(relay, client, db, repo):
    """The listener's connection breaks while it streams one 2,500-row tick
    (after it dispatched row 1,500): after the reconnect the rest arrives, and
    nothing of that tick twice."""
    r = await relay(send_queue_frames=10_000)
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    before = await listener_pid(db)
    listener, dbhub = r.state.listener, r.state.dbhub
    assert listener is not None and before is not None
    dispatch = dbhub.dispatch

    def dispatch_then_cut(event) -> None:
        dispatch(event)
        if event.repo == name and json.loads(event.data)["data"]["n"] == 1500:
            listener._conn.terminate()  # the connection dies under the cursor

    dbhub.dispatch = dispatch_then_cut  # type: ignore[method-assign]
    await db.execute(
        f"INSERT INTO {name} (owner_id, account_id, data)"
        " SELECT 'A', '1', jsonb_build_object('n', g) FROM generate_series(1, 2500) g ORDER BY g"
    )
    got = [json.loads(f["data"])["data"]["n"] for f in await collect(c, 2500, timeout=20)]
    assert got == list(range(1, 2501))
    await c.silent()
    after = await listener_pid(db)
    assert after is not None and after != before, "the listener did not reconnect"


async def test_large_row_arrives_whole(relay, client, db, repo: RepoFactory):
    r = await relay(max_frame_bytes=1024 * 1024)
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    blob = "x" * 100_000
    await db.execute(
        f"INSERT INTO {name} (owner_id, account_id, data) VALUES ('Z', '9', $1::jsonb)",
        json.dumps({"blob": blob}),
    )
    frame = await c.expect("db_created")
    assert json.loads(frame["data"])["data"]["blob"] == blob


async def test_rollback_produces_no_event(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    tx = db.transaction()
    await tx.start()
    await insert(db, name, "A", "1")
    await tx.rollback()
    kept = await insert(db, name, "A", "1")
    frame = await c.expect("db_created")
    assert json.loads(frame["data"])["id"] == kept
    await c.silent()


async def test_thousand_rows_in_one_transaction_arrive_in_order(relay, client, db, repo):
    r = await relay()
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    async with db.transaction():
        for i in range(1000):
            await db.execute(
                f"INSERT INTO {name} (owner_id, account_id, data) VALUES ('A', '1', $1::jsonb)",
                json.dumps({"n": i}),
            )
    seen = [json.loads((await c.expect("db_created"))["data"])["data"]["n"] for _ in range(1000)]
    assert seen == list(range(1000))
    await c.silent()


async def test_row_written_right_after_joined_arrives(relay, client, db, repo: RepoFactory):
    """`joined` means subscribed: nothing committed after it may be missed."""
    r = await relay()
    name = await repo("_744_")
    for attempt in range(30):
        c = await client(r)
        await c.auth(r.token("A", "1"))
        await c.join(f"db-{name}")
        row_id = await insert(db, name, "A", "1")
        frame = await c.expect("db_created")
        assert json.loads(frame["data"])["id"] == row_id, f"attempt {attempt}"
        await c.close()


async def test_unwatched_table_is_refused_and_a_new_watch_is_joinable_at_once(relay, client, db):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("A", "1"))
    table = "late_" + uuid.uuid4().hex[:8]
    await db.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, owner text, acct text)")
    await c.send(type="join", data=f"db-{table}", token=c.token)
    error = await c.expect("error")
    assert "not a watched table" in error["data"]
    await db.execute(f"SELECT relay.watch('{table}', 'id', 'owner', 'acct')")
    await c.join(f"db-{table}")
    await db.execute(f"INSERT INTO {table} (owner, acct) VALUES ('Z', '1')")
    frame = await c.expect("db_created")
    assert json.loads(frame["data"]) == {"id": 1, "owner": "Z", "acct": "1"}


async def test_root_token_receives_every_event(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_700_")
    root = await client(r)
    await root.auth(r.token("service", "none", root=True))
    await root.join(f"db-{name}")
    ids = [await insert(db, name, owner, account) for owner, account in [("A", "1"), ("C", "2")]]
    got = [json.loads((await root.expect("db_created"))["data"])["id"] for _ in ids]
    assert got == ids


async def test_column_types_and_null_columns(relay, client, db):
    """uuid, timestamptz, numeric, jsonb, arrays and NULL all arrive as PostgreSQL renders them."""
    r = await relay()
    table = "typed_" + uuid.uuid4().hex[:8] + "_744_"
    await db.execute(
        f"""CREATE TABLE {table} (
            pk bigint PRIMARY KEY, who uuid, at timestamptz, amount numeric(12, 3),
            doc jsonb, tags text[], maybe text, owner text, acct text)"""
    )
    await db.execute(f"SELECT relay.watch('{table}', 'pk', 'owner', 'acct')")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{table}")
    await db.execute(
        f"""INSERT INTO {table} VALUES (7, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2026-01-02 03:04:05+00', 12.5, '{{"k": [1, null]}}', ARRAY['x', 'y'],
            NULL, NULL, NULL)"""
    )
    row = json.loads((await c.expect("db_created"))["data"])
    assert row == {
        "pk": 7,
        "who": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "at": "2026-01-02T03:04:05+00:00",
        "amount": 12.500,
        "doc": {"k": [1, None]},
        "tags": ["x", "y"],
        "maybe": None,
        "owner": None,
        "acct": None,
    }
    await db.execute(f"DELETE FROM {table} WHERE pk = 7")
    assert json.loads((await c.expect("db_deleted"))["data"]) == {"id": 7}


async def test_null_owner_and_account_never_fail_the_write(relay, client, db, repo):
    r = await relay()
    name = await repo("_770_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    await insert(db, name, None, None)  # readable by nobody under 770, but written
    visible = await insert(db, name, "A", None)
    frame = await c.expect("db_created")
    assert json.loads(frame["data"])["id"] == visible
    await c.silent()


async def test_listener_survives_terminated_connection(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    first = await insert(db, name, "A", "1")
    assert json.loads((await c.expect("db_created"))["data"])["id"] == first
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'relay-listener'"
    )
    assert killed >= 1
    during = await insert(db, name, "A", "1")  # committed while the listener is down
    after = []
    for _ in range(5):
        after.append(await insert(db, name, "A", "1"))
    got = [json.loads((await c.expect("db_created", timeout=15))["data"])["id"] for _ in range(6)]
    assert got == [during, *after]
    await c.silent()


async def test_a_sleeping_listener_whose_connection_dies_reconnects_at_once(
    relay, client, db, repo
):
    """With the safety poll an hour away, a listener asleep when its connection is
    killed does not wait for it: it reconnects, and a row written meanwhile arrives."""
    name, c = await subscribed_with_the_safety_poll_an_hour_away(relay, client, repo)
    await listener_sleeping(db)
    before = await listener_pid(db)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", before)
    row_id = await insert(db, name, "A", "1")
    frame = await c.expect("db_created", timeout=20)
    assert json.loads(frame["data"])["id"] == row_id
    assert await listener_pid(db) not in (None, before)


async def test_a_writer_that_saw_the_listener_awake_is_waited_for_before_it_sleeps(
    relay, client, db, pg_url, repo
):
    """The sleep handshake: a transaction whose trigger read sleeping = false sends no
    NOTIFY, so the listener, going to sleep, must wait for it to end and read its rows.
    With the safety poll an hour away, the row arrives only if it did."""
    name, c = await subscribed_with_the_safety_poll_an_hour_away(relay, client, repo)
    writer = await asyncpg.connect(pg_url)
    try:
        for _ in range(20):
            awake = await insert(db, name, "A", "1")  # the listener is busy right after it
            assert ids_of([await c.expect("db_created", timeout=20)]) == [("db_created", awake)]
            tx = writer.transaction()
            await tx.start()
            late = await insert(writer, name, "A", "1")
            # Read after the trigger's read: if awake now, it was awake then (only a
            # NOTIFY, or events found, wakes a sleeping listener).
            if not await writer.fetchval("SELECT bool_or(sleeping) FROM relay.listeners"):
                break
            await tx.rollback()
        else:
            raise AssertionError("the listener was never caught awake")
        await listener_sleeping(db)
        await tx.commit()
        assert ids_of([await c.expect("db_created", timeout=20)]) == [("db_created", late)]
    finally:
        await writer.close()


async def notified_by_a_write(db, pg_url: str, name: str) -> bool:
    """Whether a committed insert into ``name`` sends relay's wake-up NOTIFY."""
    heard: list[str] = []
    ear = await asyncpg.connect(pg_url)
    try:
        await ear.add_listener("relay_events", lambda *args: heard.append(args[2]))
        await insert(db, name, "A", "1")
        # A listening backend hands pending notifications over before it answers a
        # command, so after this round trip every NOTIFY of that commit is here.
        await ear.execute("SELECT 1")
        return bool(heard)
    finally:
        await ear.close()


async def test_a_stopped_relay_takes_its_listener_row_so_writers_stop_notifying(
    relay, db, pg_url, repo
):
    """Writers NOTIFY while some listener sleeps; once the only relay has stopped,
    nobody is left to wake, and a NOTIFY would only serialize their commits."""
    r = await relay(poll_seconds=3600)
    name = await repo("_744_")
    pid = await listener_pid(db)
    await listener_sleeping(db)
    assert await notified_by_a_write(db, pg_url, name)
    await r.stop()
    assert await db.fetchval("SELECT count(*) FROM relay.listeners WHERE pid = $1", pid) == 0
    assert not await notified_by_a_write(db, pg_url, name)


async def test_a_busy_listener_forgets_the_row_of_a_killed_one(
    relay, db, pg_url, repo, monkeypatch
):
    """A relay killed while asleep leaves its row flagged asleep, and writers would
    NOTIFY for it forever; a running listener forgets it while it works."""
    monkeypatch.setattr(listener_module, "FORGET_DEAD_SECONDS", 0.0)
    await relay()
    name = await repo("_744_")
    await insert(db, name, "A", "1")
    dead = await db.fetchval(
        "INSERT INTO relay.listeners (pid, sleeping)"
        " SELECT max(pid) + 100000, true FROM pg_stat_activity RETURNING pid"
    )

    async def forgotten() -> bool:
        await insert(db, name, "A", "1")  # keeps the listener busy
        rows = await db.fetchval("SELECT count(*) FROM relay.listeners WHERE pid = $1", dead)
        return rows == 0

    await eventually(forgotten, 15, what="the dead listener's row forgotten")


async def test_a_listener_locked_out_says_so_then_delivers_and_counts_what_it_missed(
    relay, client, db, pg_url, repo
):
    """The listener's connection is killed and the database refuses new ones: the
    subscriber is told its events are delayed, /readyz says why; once the database
    lets it back in, the rows written meanwhile arrive, each counted once in /metrics."""
    r = await relay()
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    first = await insert(db, name, "A", "1")
    assert ids_of([await c.expect("db_created")]) == [("db_created", first)]
    ingested = value(await scrape(r), "relay_db_events_ingested_total")
    database = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(_url_of(pg_url, "postgres"))  # not the current database
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        assert await db.fetchval("SELECT pg_terminate_backend($1)", await listener_pid(db))
        missed = [await insert(db, name, "A", "1", n) for n in range(3)]
        delayed = await c.expect("error", timeout=15)
        assert (delayed["data"], delayed["channel"]) == (DB_DELAYED, f"db-{name}")

        async def not_ready() -> Any:
            async with aiohttp.ClientSession() as http, http.get(r.http_url + "/readyz") as resp:
                return (
                    resp.status == 503
                    and "listener not connected" in (await resp.json())["problems"]
                )

        await eventually(not_ready, what="/readyz: listener not connected")
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    frames = await collect(c, 3, timeout=20)
    assert ids_of(frames) == [("db_created", row_id) for row_id in missed]
    assert value(await scrape(r), "relay_db_events_ingested_total") == ingested + 3

    async def ready() -> Any:
        async with aiohttp.ClientSession() as http, http.get(r.http_url + "/readyz") as resp:
            return resp.status == 200 and await resp.json() == {"status": "ready"}

    await eventually(ready, what="/readyz: ready again")
    await c.silent()


async def test_a_stream_of_commits_is_read_on_one_connection_and_each_counted_once(
    relay, client, db, repo
):
    """Thirty commits in a row, while the listener polls busily between them: one
    connection throughout, each event counted once in /metrics, and each within
    ten seconds of its commit in the latency histogram."""
    r = await relay()
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    connection = await listener_pid(db)
    before = await scrape(r)
    rows = [await insert(db, name, "A", "1", n) for n in range(30)]
    assert ids_of(await collect(c, 30)) == [("db_created", row_id) for row_id in rows]
    after = await scrape(r)
    for metric, labels in (
        ("relay_db_events_ingested_total", {}),
        ("relay_db_commit_to_delivery_seconds_count", {}),
        ("relay_db_commit_to_delivery_seconds_bucket", {"le": "10.0"}),
    ):
        assert value(after, metric, **labels) - value(before, metric, **labels) == 30, metric
    assert await listener_pid(db) == connection


async def test_one_statement_of_2500_rows_arrives_whole_and_in_order(relay, client, db, repo):
    r = await relay(send_queue_frames=5000)
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    ingested = value(await scrape(r), "relay_db_events_ingested_total")
    await db.execute(
        f"INSERT INTO {name} (owner_id, account_id, data)"
        " SELECT 'A', '1', jsonb_build_object('n', g) FROM generate_series(1, 2500) g"
        " ORDER BY g"
    )
    frames = [await c.expect("db_created") for _ in range(2500)]
    # Read in one poll and then a cursor (more than 1,000 rows): each counted once.
    assert value(await scrape(r), "relay_db_events_ingested_total") == ingested + 2500
    assert sorted(json.loads(f["data"])["data"]["n"] for f in frames) == list(range(1, 2501))
    positions = [tuple(int(x) for x in f["pos"].split("-")) for f in frames]
    assert positions == sorted(set(positions))
    await c.silent()


async def test_a_big_tick_reaches_a_reader_whose_send_queue_holds_50_frames(
    relay, client, db, repo
):
    """The listener dispatches a big tick in slices and the sockets are written between
    slices; a slice ends as soon as some queue is half full. So a client that reads,
    with a queue of 50 frames, gets all 2,000 rows of one statement, in order, and is
    not cut off as a slow consumer."""
    r = await relay(send_queue_frames=50)
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    await db.execute(
        f"INSERT INTO {name} (owner_id, account_id, data)"
        " SELECT 'A', '1', jsonb_build_object('n', g) FROM generate_series(1, 2000) g"
        " ORDER BY g"
    )
    got = [json.loads(f["data"])["data"]["n"] for f in await collect(c, 2000, timeout=20)]
    assert got == list(range(1, 2001))
    await c.silent()


async def test_same_table_name_in_two_schemas_is_refused(db):
    from relay.repos import RepoError, watch

    name = "dup_" + uuid.uuid4().hex[:8] + "_744_"
    schemas = ["s" + uuid.uuid4().hex[:6] for _ in range(2)]
    for schema in schemas:
        await db.execute(f"CREATE SCHEMA {schema}")
        await db.execute(f"CREATE TABLE {schema}.{name} (id int PRIMARY KEY, o text, a text)")
    assert await watch(db, f"{schemas[0]}.{name}", "id", "o", "a") == name
    with pytest.raises(RepoError, match="already watched"):
        await watch(db, f"{schemas[1]}.{name}", "id", "o", "a")
    # The first one is untouched, and watching it again is still fine.
    assert await watch(db, f"{schemas[0]}.{name}", "id", "o", "a") == name
    owner = await db.fetchval("SELECT table_oid::text FROM relay.watched WHERE repo = $1", name)
    assert owner == f"{schemas[0]}.{name}"


async def test_id_column_must_be_unique(db):
    from relay.repos import RepoError, watch

    table = "loose_" + uuid.uuid4().hex[:8]
    await db.execute(f"CREATE TABLE {table} (id int, o text, a text)")
    with pytest.raises(RepoError, match="not unique"):
        await watch(db, table, "id", "o", "a")
