"""The capture triggers (sql/relay.sql) against a real PostgreSQL and a real relay.

Writers need no privilege of relay's: the capture functions run as the relay's
role, so a writer with rights on its own table only can write, and cannot
forge an event by writing the log itself. Column names are quoted, whatever
they hold.
"""

from __future__ import annotations

import json
import secrets

import asyncpg
import pytest

from relay.repos import watch


@pytest.fixture
async def writer_url(db: asyncpg.Connection, pg_url: str):
    """A login role that may only read and write the tables we grant it."""
    role = f"writer_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    await db.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    base = pg_url.split("://", 1)[1].split("@", 1)[-1]
    yield role, f"postgresql://{role}:{password}@{base}"
    await db.execute(f"DROP OWNED BY {role}")
    await db.execute(f"DROP ROLE {role}")


async def test_a_writer_with_table_rights_only_writes_but_cannot_forge(
    relay, client, db, repo, writer_url
) -> None:
    role, url = writer_url
    table = await repo("_744_")
    await db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}")
    r = await relay()
    c = await client(r)
    await c.auth(r.token("reader", "acct"))
    await c.join("db-" + table)

    writer = await asyncpg.connect(url)
    try:
        row_id = await writer.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, data) VALUES ('w', 'acct', '{{}}')"
            " RETURNING id"
        )
        created = await c.expect("db_created")
        assert json.loads(created["data"])["id"] == str(row_id)
        await writer.execute(f"DELETE FROM {table} WHERE id = $1", row_id)
        assert json.loads((await c.expect("db_deleted"))["data"]) == {"id": str(row_id)}
        # Writing the log directly, as the red team's forged db_created did, is refused.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute(
                "INSERT INTO relay.events (xid, repo, op, row_id, data)"
                " VALUES (pg_current_xact_id(), $1, 'c', '\"forged\"', '{}')",
                table,
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.fetchval("SELECT count(*) FROM relay.events")
    finally:
        await writer.close()


async def test_column_names_with_dots_and_quotes_are_quoted(relay, client, db) -> None:
    """--owner-column domain.owner once broke every UPDATE ("o.domaio.owner")."""
    table = f"odd_{secrets.token_hex(4)}_700_"
    await db.execute(
        f'CREATE TABLE {table} (id int PRIMARY KEY, "domain.owner" text, "acc""t" text, v int)'
    )
    await watch(db, table, "id", "domain.owner", 'acc"t')
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acct"))
    await c.join("db-" + table)
    await db.execute(f"""INSERT INTO {table} VALUES (1, 'alice', 'acct', 1)""")
    assert json.loads((await c.expect("db_created"))["data"])["v"] == 1
    await db.execute(f"UPDATE {table} SET v = 2 WHERE id = 1")
    assert json.loads((await c.expect("db_updated"))["data"])["v"] == 2
    await db.execute(f'UPDATE {table} SET "domain.owner" = $1 WHERE id = 1', "bob")
    assert (await c.expect("db_deleted"))["data"] == '{"id":1}'  # out of alice's sight
    await db.execute(f"DELETE FROM {table} WHERE id = 1")
    await db.execute(f"INSERT INTO {table} VALUES (2, 'alice', 'x', 3)")
    assert json.loads((await c.expect("db_created"))["data"])["id"] == 2  # still flowing


async def test_columns_named_like_the_capture_functions_aliases(relay, client, db) -> None:
    """A column "n" made row_to_json(n) mean that column, not the row: every INSERT failed."""
    table = f"alias_{secrets.token_hex(4)}_777_"
    await db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int, o int)")
    await watch(db, table, "id", None, None)
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acct"))
    await c.join("db-" + table)
    await db.execute(f"INSERT INTO {table} VALUES (1, 10, 20)")
    assert json.loads((await c.expect("db_created"))["data"]) == {"id": 1, "n": 10, "o": 20}
    await db.execute(f"UPDATE {table} SET n = 11, o = 21 WHERE id = 1")
    assert json.loads((await c.expect("db_updated"))["data"]) == {"id": 1, "n": 11, "o": 21}
    await db.execute(f"DELETE FROM {table} WHERE id = 1")
    assert (await c.expect("db_deleted"))["data"] == '{"id":1}'
