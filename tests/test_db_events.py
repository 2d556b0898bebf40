"""Database events end to end: writes by plain SQL reach exactly the readers of each row."""

from __future__ import annotations

import json

from tests.conftest import RepoFactory


async def test_insert_by_plain_sql_reaches_subscriber(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_760_")
    c = await client(r)
    await c.auth(r.token("alice", "1"))
    await c.join(f"db-{name}")
    await db.execute(f"INSERT INTO {name} (account_id, owner_id, data) VALUES ('1', 'bob', '{{}}')")
    frame = await c.expect("db_created")
    row = json.loads(frame["data"])
    assert row["account_id"] == "1" and row["owner_id"] == "bob"
    assert frame["channel"] == f"db-{name}" and frame["sid"] == c.sid
