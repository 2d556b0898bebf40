"""Database events end to end: writes by plain SQL reach exactly the readers of each row.

A real relay, real PostgreSQL, real WebSocket clients; rows are written on a
separate asyncpg connection, never through the relay.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from tests.conftest import RepoFactory, WsClient

# The contract's example: A and B in account 1, C alone in account 2.
USERS = {"A": "1", "B": "1", "C": "2"}


def may_read(
    mode: str, user: str, account: str, owner: str | None, row_account: str | None
) -> bool:
    """The rule of DESIGN.md, written out independently of relay.permissions."""
    o, g, e = (int(d) for d in mode)
    return bool(e & 4 or (g & 4 and account == row_account) or (o & 4 and user == owner))


async def drain(c: WsClient, window: float = 0.6) -> list[dict[str, Any]]:
    """Every frame that arrives until the socket has been quiet for ``window`` seconds."""
    frames = []
    while True:
        try:
            frames.append(await c.recv(timeout=window))
        except TimeoutError:
            return frames


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


async def subscribers(relay_handle, client, name: str) -> dict[str, WsClient]:
    clients = {}
    for user, account in USERS.items():
        c = await client(relay_handle)
        await c.auth(relay_handle.token(user, account))
        await c.join(f"db-{name}")
        clients[user] = c
    return clients


async def insert(db: asyncpg.Connection, name: str, owner: str | None, account: str | None) -> str:
    row_id: str = await db.fetchval(
        f"INSERT INTO {name} (owner_id, account_id, data) VALUES ($1, $2, '{{}}')"
        " RETURNING id::text",
        owner,
        account,
    )
    return row_id


@pytest.mark.parametrize("suffix", ["_760_", "_700_", "_744_", "_770_", ""])
async def test_permission_suffixes(relay, client, db, repo: RepoFactory, suffix: str):
    r = await relay()
    name = await repo(suffix)
    mode = suffix.strip("_") or "740"
    clients = await subscribers(r, client, name)
    rows = [("A", "1"), ("B", "1"), ("C", "2"), ("Z", "1"), ("Z", "2"), ("A", "2")]
    written = {await insert(db, name, owner, account): (owner, account) for owner, account in rows}
    for user, c in clients.items():
        got = {json.loads(f["data"])["id"] for f in await drain(c) if f["type"] == "db_created"}
        expected = {
            row_id
            for row_id, (owner, account) in written.items()
            if may_read(mode, user, USERS[user], owner, account)
        }
        assert got == expected, f"user {user} on {name}"


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


async def test_one_statement_of_2500_rows_arrives_whole_and_in_order(relay, client, db, repo):
    r = await relay(send_queue_frames=5000)
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.join(f"db-{name}")
    await db.execute(
        f"INSERT INTO {name} (owner_id, account_id, data)"
        " SELECT 'A', '1', jsonb_build_object('n', g) FROM generate_series(1, 2500) g"
        " ORDER BY g"
    )
    frames = [await c.expect("db_created") for _ in range(2500)]
    assert sorted(json.loads(f["data"])["data"]["n"] for f in frames) == list(range(1, 2501))
    positions = [tuple(int(x) for x in f["pos"].split("-")) for f in frames]
    assert positions == sorted(set(positions))
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
