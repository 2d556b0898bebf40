"""relay.client, the Python asyncio client, against a real relay and a real PostgreSQL.

The last test is the one that matters: live views of several users, each under
its own filter, kept through relay restarts, dropped TCP connections, expired
sessions and a pruned log while thousands of rows are inserted, updated, moved
between accounts and owners, and deleted; in the end each view equals the
query of that user's readable rows under that filter.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web

import relay.client
from relay.auth import mint_token
from relay.client import LiveView, Refused, ViewRefused
from relay.config import Settings
from relay.server import STATE, RelayState, create_app
from tests.conftest import JWT_SECRET, free_port, random_name

pytestmark = pytest.mark.timeout(300)


class Relay:
    """An in-process relay on a fixed port that can be stopped and started again."""

    def __init__(self, pg_url: str, **overrides: Any) -> None:
        self.pg_url = pg_url
        self.port = free_port()
        self.overrides = overrides
        self.runner: web.AppRunner | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def state(self) -> RelayState:
        assert self.runner is not None
        return self.runner.app[STATE]

    async def start(self) -> None:
        settings = Settings(jwt_secret=JWT_SECRET, database_url=self.pg_url, poll_seconds=0.5)
        for key, value in self.overrides.items():
            setattr(settings, key, value)
        app = create_app(settings, self.pg_url, settings.jwt_secret)
        self.runner = web.AppRunner(app, shutdown_timeout=2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def restart(self, while_down: Callable[[], Any] | None = None) -> None:
        await self.stop()
        if while_down is not None:
            await while_down()
        await self.start()
        self.restarts += 1

    def drop_connections(self) -> int:
        """Abort every client's TCP connection: no close frame, as when a network drops."""
        sockets = list(self.state.hub.sockets.values())
        for s in sockets:
            if s._transport is not None:
                s._transport.abort()
        return len(sockets)


@pytest.fixture
async def live_relay(pg_url: str) -> AsyncIterator[Relay]:
    r = Relay(pg_url)
    await r.start()
    yield r
    await r.stop()


class Tokens:
    """A token provider: fresh session tokens, with a lifetime and a gate the test sets."""

    def __init__(self, user: str, account: str) -> None:
        self.user, self.account = user, account
        self.ttl = 3600
        self.gate: asyncio.Event | None = None  # while set to an unset event, calls wait
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return mint_token(JWT_SECRET, self.user, self.account, ttl_seconds=self.ttl)


def fast(url: str, tokens: Tokens) -> relay.client.Client:
    return relay.client.connect(
        url, tokens, backoff_base=0.05, backoff_max=0.5, connect_timeout=2.0
    )


async def add_status(db: asyncpg.Connection, table: str) -> None:
    await db.execute(f"ALTER TABLE {table} ADD COLUMN status text")


def readable(user: str, account: str) -> str:
    # What a _760_ repository lets a user read: its own rows and its account's.
    return f"(owner_id = '{user}' OR account_id = '{account}')"


async def expected_rows(
    db: asyncpg.Connection, table: str, where: str
) -> dict[str, tuple[Any, ...]]:
    rows = await db.fetch(
        f"SELECT id::text, owner_id, account_id, status, data::text FROM {table} WHERE {where}"
    )
    return {r["id"]: (r["owner_id"], r["account_id"], r["status"], r["data"]) for r in rows}


def view_rows(view: LiveView) -> dict[str, tuple[Any, ...]]:
    return {
        key: (
            row["owner_id"],
            row["account_id"],
            row["status"],
            json.dumps(row["data"], separators=(", ", ": ")) if row["data"] is not None else None,
        )
        for key, row in view.rows.items()
    }


async def until_seen(view: LiveView, row_id: str, timeout: float = 30.0) -> None:
    """Wait for a row to be in the view (an event, not a poll)."""
    seen = asyncio.Event()
    stop = view.on_change(lambda kind, key, row: seen.set() if key == row_id else None)
    try:
        if row_id not in view.rows:
            await asyncio.wait_for(seen.wait(), timeout)
    finally:
        stop()


# --- the basics --------------------------------------------------------------------------


async def test_chat_join_publish_and_messages(live_relay):
    room = random_name()
    async with (
        fast(live_relay.url, Tokens("a", "1")) as a,
        fast(live_relay.url, Tokens("b", "1")) as b,
    ):
        await a.join(room)
        await b.join(room)
        heard = b.messages(room)
        await a.publish(room, "hello")
        msg = await asyncio.wait_for(anext(heard), 5)
        assert (msg.type, msg.channel, msg.data) == ("chan_out", room, "hello")
        with pytest.raises(ValueError, match="join"):
            await a.publish("elsewhere", "x")


async def test_publish_waits_out_a_restart_and_close_ends_the_wait(live_relay):
    room = random_name()
    async with fast(live_relay.url, Tokens("a", "1")) as a:
        await a.join(room)
        heard = a.messages(room)  # the sender gets its own chan_out too
        gone = asyncio.Event()
        a.on_state(lambda event, detail: gone.set() if event == "disconnected" else None)
        await live_relay.stop()
        await gone.wait()
        sending = asyncio.create_task(a.publish(room, "sent while down"))
        await live_relay.start()
        await asyncio.wait_for(sending, 10)  # held, then sent once a has rejoined
        assert (await asyncio.wait_for(anext(heard), 10)).data == "sent while down"

        gone.clear()
        await live_relay.stop()
        await gone.wait()
        stuck = asyncio.create_task(a.publish(room, "never"))
        await a.close()
        with pytest.raises(relay.client.Disconnected):
            await stuck
        await live_relay.start()


async def test_join_refused_and_view_refused(live_relay, repo):
    async with fast(live_relay.url, Tokens("a", "1")) as c:
        with pytest.raises(Refused, match="not a watched table"):
            await c.join("db-no_such_table")
        table = await repo("_760_")
        with pytest.raises(ViewRefused, match="filter"):
            await c.live_view("db-" + table, filter="nocolumn=eq.1")


async def test_live_view_snapshot_events_and_filter(live_relay, db, repo):
    table = await repo("_760_")
    await add_status(db, table)
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, status) VALUES"
        " ('a', '1', 'open'), ('b', '1', 'done'), ('c', '2', 'open'), ('b', '1', 'draft')"
    )
    async with fast(live_relay.url, Tokens("a", "1")) as c:
        everything = await c.live_view("db-" + table)
        assert everything.synced.is_set()
        assert view_rows(everything) == await expected_rows(db, table, readable("a", "1"))
        changes: list[tuple[str, str]] = []
        everything.on_change(lambda kind, key, row: changes.append((kind, key)))
        new = await db.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, status) VALUES ('b', '1', 'open')"
            " RETURNING id::text"
        )
        await until_seen(everything, new)
        assert changes == [("created", new)]
        await db.execute(f"UPDATE {table} SET account_id = '2' WHERE id = $1::uuid", new)
        gone = asyncio.Event()
        everything.on_change(lambda kind, key, row: gone.set() if kind == "deleted" else None)
        await asyncio.wait_for(gone.wait(), 10)  # moved out of sight: deleted from the view
        assert new not in everything.rows

    async with fast(live_relay.url, Tokens("a", "1")) as c:
        view = await c.live_view("db-" + table, filter="status=in.(open,done)")
        where = readable("a", "1") + " AND status IN ('open', 'done')"
        assert view_rows(view) == await expected_rows(db, table, where)
        draft = await db.fetchval(
            f"SELECT id::text FROM {table} WHERE status = 'draft' AND account_id = '1'"
        )
        await db.execute(f"UPDATE {table} SET status = 'open' WHERE id = $1::uuid", draft)
        await until_seen(view, draft)  # moved into the filter: created in the view
        assert view_rows(view) == await expected_rows(db, table, where)


async def test_session_renewed_before_expiry_and_after(live_relay, db, repo):
    """Short-lived tokens are renewed before they expire; a provider too slow for the
    expiry lets the session lapse, and the renewal resumes the view where it stopped."""
    table = await repo("_760_")
    await add_status(db, table)
    tokens = Tokens("a", "1")
    tokens.ttl = 2
    async with fast(live_relay.url, tokens) as c:
        room = random_name()
        await c.join(room)
        view = await c.live_view("db-" + table, filter="status=eq.open")
        events: asyncio.Queue[str] = asyncio.Queue()
        c.on_state(lambda event, detail: events.put_nowait(event))
        # Renewed before expiry, three times: the relay interrupts nothing, says nothing.
        for _ in range(3):
            assert await asyncio.wait_for(events.get(), 10) == "authenticated"
        assert c.stats.expiries == 0
        # Now the provider stalls past the token's exp: the session lapses.
        tokens.gate = asyncio.Event()
        while await asyncio.wait_for(events.get(), 10) != "expired":
            pass
        await db.execute(  # outside the filter, while paused
            f"INSERT INTO {table} (owner_id, account_id, status) VALUES ('a', '1', 'done')"
        )
        written = await db.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, status) VALUES ('a', '1', 'open')"
            " RETURNING id::text"
        )
        tokens.ttl = 3600
        tokens.gate.set()
        tokens.gate = None
        while await asyncio.wait_for(events.get(), 10) != "renewed":
            pass
        await until_seen(view, written)  # committed while paused, replayed on renewal
        for status in ("draft", "open"):  # after the renewal: outside the filter, then inside
            last = await db.fetchval(
                f"INSERT INTO {table} (owner_id, account_id, status) VALUES ('a', '1', $1)"
                " RETURNING id::text",
                status,
            )
        await until_seen(view, last)
        heard = c.messages(room)
        await c.publish(room, "still here")
        assert (await asyncio.wait_for(anext(heard), 5)).data == "still here"
        assert c.stats.connections == 1  # all on one socket
        where = readable("a", "1") + " AND status = 'open'"
        assert view_rows(view) == await expected_rows(db, table, where)


async def test_relay_keeps_a_filter_across_a_renewal(relay, client, db, repo):
    """The relay side of the renewal above, on the raw protocol: a fresh auth before
    expiry re-indexes the socket's db- subscriptions under the new identity, and must
    keep their filters (it used to drop them, so every row arrived)."""
    r = await relay()
    table = await repo("_760_")
    await add_status(db, table)
    c = await client(r)
    await c.auth(r.token("a", "1", ttl_seconds=600))
    await c.join("db-" + table, filter="status=eq.open")
    await c.auth(r.token("a", "1", ttl_seconds=1200))  # another exp: another identity
    for status in ("done", "open"):
        await db.execute(
            f"INSERT INTO {table} (owner_id, account_id, status) VALUES ('a', '1', $1)", status
        )
    frame = await c.expect("db_created")
    assert json.loads(frame["data"])["status"] == "open"
    await c.silent(0.3)


# --- never losing the place ------------------------------------------------------------------

USERS = [("alice", "1"), ("bob", "1"), ("carol", "2"), ("dave", "2")]
STATUSES = ["open", "done", "draft", None]
FILTERS = {
    "alice": "status=in.(open,done)",
    "bob": None,
    "carol": "status=neq.done",
    "dave": "status=eq.open",
}
FILTER_SQL = {
    "alice": "status IN ('open', 'done')",
    "bob": "true",
    "carol": "status <> 'done'",
    "dave": "status = 'open'",
}


class Writer:
    """Random writes: inserts, updates of status and data, moves between accounts and
    owners, deletes, some of several rows in one statement or transaction."""

    def __init__(self, db: asyncpg.Connection, table: str, seed: int) -> None:
        self.db, self.table = db, table
        self.rnd = random.Random(seed)
        self.writes = 0  # rows written
        self.statements = 0

    async def step(self) -> None:
        rnd, t = self.rnd, self.table
        owner, account = rnd.choice(USERS)
        op = rnd.random()
        if op < 0.35 or self.writes < 50:
            n = rnd.choice([1, 1, 1, 3])
            status = rnd.choice(STATUSES)
            done = await self.db.execute(
                f"INSERT INTO {t} (owner_id, account_id, status, data)"
                " SELECT $1, $2, $3, jsonb_build_object('n', g) FROM generate_series(1, $4) g",
                owner,
                account,
                status,
                n,
            )
        elif op < 0.6:
            done = await self.db.execute(
                f"UPDATE {t} SET status = $1, data = jsonb_build_object('u', $2::int)"
                f" WHERE id = (SELECT id FROM {t} ORDER BY random() LIMIT 1)",
                rnd.choice(STATUSES),
                rnd.randrange(1000),
            )
        elif op < 0.75:  # move between accounts (and so in and out of sight)
            done = await self.db.execute(
                f"UPDATE {t} SET account_id = $1 WHERE id IN"
                f" (SELECT id FROM {t} ORDER BY random() LIMIT $2)",
                rnd.choice(["1", "2", "3"]),
                rnd.choice([1, 1, 4]),
            )
        elif op < 0.85:
            done = await self.db.execute(
                f"UPDATE {t} SET owner_id = $1"
                f" WHERE id = (SELECT id FROM {t} ORDER BY random() LIMIT 1)",
                owner,
            )
        else:
            async with self.db.transaction():
                done = await self.db.execute(
                    f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT $1)",
                    rnd.choice([1, 1, 2]),
                )
        self.statements += 1
        self.writes += int(done.split()[-1])


class PythonViews:
    """The scenario's handle on Python clients: one client and one live view per user."""

    name = "python"

    def __init__(self, url: str) -> None:
        self.tokens = {user: Tokens(user, account) for user, account in USERS}
        self.clients = {user: fast(url, self.tokens[user]) for user, _ in USERS}
        self.views: dict[str, LiveView] = {}

    async def start(self, channel: str) -> None:
        for user, c in self.clients.items():
            await c.start()
            self.views[user] = await c.live_view(channel, filter=FILTERS[user])

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()

    async def reconnected(self) -> None:
        await asyncio.gather(*(c.connected.wait() for c in self.clients.values()))

    async def expire(self, user: str) -> None:
        """Let the user's session lapse: a 2 s token whose renewal stalls past its exp."""
        c, t = self.clients[user], self.tokens[user]
        events: asyncio.Queue[str] = asyncio.Queue()
        stop = c.on_state(lambda event, detail: events.put_nowait(event))
        t.ttl, t.gate = 2, None
        await c.renew()
        t.gate = asyncio.Event()
        while await asyncio.wait_for(events.get(), 10) != "expired":
            pass
        t.ttl = 3600
        t.gate.set()
        t.gate = None
        while await asyncio.wait_for(events.get(), 10) != "renewed":
            pass
        stop()

    async def rows(self, user: str, until_id: str) -> dict[str, tuple[Any, ...]]:
        view = self.views[user]
        await until_seen(view, until_id)
        assert view.synced.is_set()
        return view_rows(view)

    async def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for user, c in self.clients.items():
            st = c.stats
            out[user] = {
                "connections": st.connections,
                "expiries": st.expiries,
                "snapshots": self.views[user].snapshots,
                "resumes_asked": st.resumes_asked,
            }
        return out


async def run_scenario(live_relay: Relay, db, pg_url: str, views: Any, seed: int) -> None:
    """≥ 2,000 row writes while the relay restarts, connections drop, sessions expire
    and the log is pruned under disconnected clients; then each user's view must equal
    the query of what that user may read under its filter."""
    table = await (await _repo_factory(db))("_760_")
    await add_status(db, table)
    writer = Writer(db, table, seed=seed)
    for _ in range(60):
        await writer.step()  # rows before the views start: they arrive in the snapshot
    await views.start("db-" + table)
    disruptions: dict[str, int] = {"restart": 0, "drop": 0, "expiry": 0, "pruned": 0}

    async def prune_log() -> None:
        # Everything before now goes: clients resuming from before it must reload.
        conn = await asyncpg.connect(pg_url)  # the writer is busy with its own
        try:
            await conn.fetchval("SELECT relay.tick()")
            await conn.fetchval("SELECT relay.prune(interval '0')")
        finally:
            await conn.close()

    rnd = random.Random(seed)
    plan = ["restart", "drop", "expiry", "pruned"] * 3
    rnd.shuffle(plan)

    async def write() -> None:
        while writer.writes < 2000 or plan:
            await writer.step()
            await asyncio.sleep(0.002)  # pace: the writes span the disruptions

    async def disrupt() -> None:
        while plan:
            await asyncio.sleep(rnd.uniform(0.2, 0.6))
            kind = plan.pop()
            if kind == "restart":
                await live_relay.restart()
            elif kind == "drop":
                live_relay.drop_connections()
            elif kind == "pruned":
                await live_relay.restart(while_down=prune_log)
            else:
                await views.expire(rnd.choice([u for u, _ in USERS]))
            disruptions[kind] += 1
            await views.reconnected()

    await asyncio.gather(write(), disrupt())
    # A last row each view must show: once it is in, everything before it is too.
    for user, account in USERS:
        mark = await db.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, status) VALUES ($1, $2, 'open')"
            " RETURNING id::text",
            user,
            account,
        )
        where = f"{readable(user, account)} AND {FILTER_SQL[user]}"
        got, want = await views.rows(user, mark), await expected_rows(db, table, where)
        assert got == want, differences(user, got, want)
    counts = await views.counts()
    print(
        f"{views.name}: writes={writer.writes} statements={writer.statements}"
        f" {disruptions=} {counts=}"
    )
    assert writer.writes >= 2000
    cuts = disruptions["restart"] + disruptions["drop"] + disruptions["pruned"]
    assert all(c["connections"] >= 1 + cuts for c in counts.values())
    assert sum(c["expiries"] for c in counts.values()) >= disruptions["expiry"] == 3
    # The pruned log made every client reload at least once; the rest resumed.
    assert all(c["snapshots"] >= 2 for c in counts.values())
    assert all(c["resumes_asked"] >= 3 for c in counts.values())


def differences(user: str, got: dict[str, Any], want: dict[str, Any]) -> str:
    extra = {k: got[k] for k in got.keys() - want.keys()}
    missing = {k: want[k] for k in want.keys() - got.keys()}
    changed = {k: (got[k], want[k]) for k in got.keys() & want.keys() if got[k] != want[k]}
    return f"{user}: extra={extra} missing={missing} changed={changed}"


async def _repo_factory(db: asyncpg.Connection) -> Any:
    from tests.conftest import RepoFactory

    return RepoFactory(db)


async def test_views_never_lose_their_place(live_relay, db, pg_url):
    views = PythonViews(live_relay.url)
    try:
        await run_scenario(live_relay, db, pg_url, views, seed=1160)
    finally:
        await views.close()
