"""No event lost: positions in commit order, resume after a disconnect, pruning.

Real relay, real PostgreSQL, real WebSocket clients. Rows are written by
separate connections; the oracle is the table itself (what was committed) and
counters that only a correct commit order can show strictly increasing.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import asyncpg
import pytest

from tests.conftest import RepoFactory
from tests.helpers import collect, eventually, insert, wait_healthy


class SteadyWriter:
    """Inserts rows numbered 0, 1, 2, ... on its own connection until stopped."""

    def __init__(self, pg_url: str, name: str, pause: float = 0.002) -> None:
        self.pg_url, self.name, self.pause = pg_url, name, pause
        self.written: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> SteadyWriter:
        self._task = asyncio.create_task(self._run())
        return self

    async def wrote(self, count: int) -> None:
        """Wait until the writer has committed ``count`` rows."""
        await eventually(lambda: len(self.written) >= count, what=f"{count} rows written")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.pg_url)
        try:
            while not self._stop.is_set():
                n = len(self.written)
                await insert(conn, self.name, "A", "1", n)
                self.written.append(n)
                await asyncio.sleep(self.pause)
        finally:
            await conn.close()


async def subscribed(relay_handle, client, name: str, user="A", account="1", **extra: str):
    c = await client(relay_handle)
    await c.auth(relay_handle.token(user, account))
    joined = await c.join(f"db-{name}", **extra)
    return c, joined


async def test_events_carry_positions_and_joined_gives_one(relay, client, db, repo):
    r = await relay()
    name = await repo("_744_")
    c, joined = await subscribed(r, client, name)
    assert joined["pos"]
    await insert(db, name, "A", "1")
    await insert(db, name, "A", "1")
    a, b = await c.expect("db_created"), await c.expect("db_created")
    ta, sa = (int(x) for x in a["pos"].split("-"))
    tb, sb = (int(x) for x in b["pos"].split("-"))
    assert (ta, sa) < (tb, sb)


async def test_resume_gets_exactly_what_was_missed(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_760_")
    c, _ = await subscribed(r, client, name)
    first = await insert(db, name, "A", "1")
    seen = await c.expect("db_created")
    assert json.loads(seen["data"])["id"] == first
    await c.close()

    missed = [await insert(db, name, "A", "1", n) for n in range(5)]
    await insert(db, name, "C", "2")  # not readable by A: must not be replayed
    await db.execute(f"UPDATE {name} SET data = '{{\"n\": 99}}' WHERE id = $1", missed[0])
    await db.execute(f"DELETE FROM {name} WHERE id = $1", missed[1])

    c2, _ = await subscribed(r, client, name, after=seen["pos"])
    got = [(f["type"], json.loads(f["data"])["id"]) for f in await collect(c2, 7)]
    assert got == [
        *[("db_created", i) for i in missed],
        ("db_updated", missed[0]),
        ("db_deleted", missed[1]),
    ]
    # And then the live stream, with nothing twice at the seam.
    live = await insert(db, name, "B", "1")
    assert json.loads((await c2.expect("db_created"))["data"])["id"] == live
    await c2.silent()


async def test_resume_while_writers_keep_writing_has_no_gap_or_duplicate(
    relay, client, db, pg_url, repo: RepoFactory
):
    r = await relay()
    name = await repo("_744_")
    c, joined = await subscribed(r, client, name)
    await c.close()
    writer = SteadyWriter(pg_url, name).start()
    await writer.wrote(50)  # a backlog to replay
    c2, _ = await subscribed(r, client, name, after=joined["pos"])
    await writer.wrote(len(writer.written) + 50)  # and live rows while it replays
    await writer.stop()
    got = [json.loads(f["data"])["data"]["n"] for f in await collect(c2, len(writer.written))]
    assert got == writer.written
    await c2.silent()


async def test_late_committer_is_not_skipped_on_resume(relay, client, db, pg_url, repo):
    """The classic trap: a transaction that took its sequence number first but
    committed last must still be delivered after the position of the other one."""
    r = await relay()
    name = await repo("_744_")
    c, _ = await subscribed(r, client, name)
    slow = await asyncpg.connect(pg_url)
    try:
        tx = slow.transaction()
        await tx.start()
        early = await insert(slow, name, "A", "1")  # takes the lower seq, commits later
        late = await insert(db, name, "A", "1")  # commits first
        first = await c.expect("db_created")
        assert json.loads(first["data"])["id"] == late
        await c.close()
        await tx.commit()
    finally:
        await slow.close()
    c2, _ = await subscribed(r, client, name, after=first["pos"])
    frame = await c2.expect("db_created")
    assert json.loads(frame["data"])["id"] == early
    await c2.silent()


async def test_resume_from_pruned_position_says_reload(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_744_")
    c, _ = await subscribed(r, client, name)
    await insert(db, name, "A", "1")
    old = await c.expect("db_created")
    await c.close()
    for _ in range(3):
        await insert(db, name, "A", "1")
        await db.fetchval("SELECT relay.tick()")
    removed = await db.fetchval("SELECT relay.prune('0 seconds'::interval)")
    assert removed >= 1
    c2 = await client(r)
    await c2.auth(r.token("A", "1"))
    await c2.send(type="join", data=f"db-{name}", token=c2.token, after=old["pos"])
    error = await c2.expect("error")
    assert "reload" in error["data"]
    assert error["channel"] == f"db-{name}"


async def test_malformed_position_is_refused(relay, client, repo: RepoFactory):
    r = await relay()
    name = await repo("_744_")
    c = await client(r)
    await c.auth(r.token("A", "1"))
    await c.send(type="join", data=f"db-{name}", token=c.token, after="yesterday")
    assert "position" in (await c.expect("error"))["data"]


@pytest.mark.parametrize("seed", [1, 2])
async def test_interleaved_writers_and_random_resumes(
    relay, client, db, pg_url, repo: RepoFactory, seed: int
):
    """Writers commit interleaved transactions (some rolled back, some large);
    the subscriber drops and resumes at random moments. At the end it has seen
    every committed row it may read, exactly once, in commit order."""
    rng = random.Random(seed)
    r = await relay()
    name = await repo("_760_")
    counter = await insert(db, name, "A", "1", 0)  # a row every writer increments
    c, joined = await subscribed(r, client, name)
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        conn = await asyncpg.connect(pg_url)
        wrng = random.Random(seed * 100 + w)
        try:
            for _ in range(40):
                tx = conn.transaction()
                await tx.start()
                for _ in range(wrng.choice([1, 1, 2, 5, 30])):
                    account = wrng.choice(["1", "1", "2"])
                    await insert(conn, name, wrng.choice(["A", "B", "C"]), account)
                await conn.execute(
                    f"UPDATE {name} SET data = jsonb_build_object('n', (data->>'n')::int + 1)"
                    " WHERE id = $1",
                    counter,
                )
                if wrng.random() < 0.2:
                    await tx.rollback()
                else:
                    await tx.commit()
                await asyncio.sleep(wrng.random() * 0.01)
        finally:
            await conn.close()

    writers = [asyncio.create_task(writer(w)) for w in range(3)]
    received: list[dict[str, Any]] = []
    position = joined["pos"]

    async def consume(until: float) -> None:
        nonlocal position
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            try:
                frame = await c.recv(timeout=0.2)
            except TimeoutError:
                continue
            received.append(frame)
            position = frame["pos"]

    while not all(w.done() for w in writers):
        await consume(asyncio.get_running_loop().time() + rng.random() * 0.4)
        await c.close()
        await asyncio.sleep(rng.random() * 0.3)  # away: events pile up
        c, _ = await subscribed(r, client, name, after=position)
    stop.set()
    for w in writers:
        await w
    # A last row, committed after every writer's: once it arrives, all has.
    marker = await insert(db, name, "A", "1", -1)
    while not received or json.loads(received[-1]["data"])["id"] != marker:
        received.append(await c.recv())

    # Exactly once: every row A may read, once; nothing else.
    created = [json.loads(f["data"])["id"] for f in received if f["type"] == "db_created"]
    assert len(created) == len(set(created))
    readable = {
        row["id"]
        for row in await db.fetch(
            f"SELECT id::text FROM {name} WHERE account_id = '1' OR owner_id = 'A'"
        )
    } - {counter}
    # (The counter's own creation may be replayed too: joined's position can
    # precede it, since it was committed just before the join.)
    assert set(created) - {counter} == readable
    # Commit order: the shared counter's updates arrive as 1, 2, 3, ... with no gap.
    counts = [
        json.loads(f["data"])["data"]["n"]
        for f in received
        if f["type"] == "db_updated" and json.loads(f["data"])["id"] == counter
    ]
    final = await db.fetchval(f"SELECT (data->>'n')::int FROM {name} WHERE id = $1", counter)
    assert counts == list(range(1, final + 1))
    # Positions strictly increase.
    keys = [tuple(int(x) for x in f["pos"].split("-")) for f in received]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


async def test_prune_by_size_keeps_the_newest_events(relay, client, db, repo: RepoFactory):
    r = await relay()
    name = await repo("_744_")
    c, joined = await subscribed(r, client, name)
    for n in range(10):
        await insert(db, name, "A", "1", n)
        await db.fetchval("SELECT relay.tick()")
    frames = [await c.expect("db_created") for _ in range(10)]
    await db.fetchval("SELECT relay.prune('100 years'::interval, 3)")
    kept = await db.fetch(f"SELECT data::text FROM relay.events WHERE repo = '{name}'")
    assert [json.loads(k["data"])["data"]["n"] for k in kept][-3:] == [7, 8, 9]
    assert len(kept) < 10
    # A client that saw event 7 resumes; one that saw nothing since joining must reload.
    c2, _ = await subscribed(r, client, name, after=frames[7]["pos"])
    got = [json.loads(f["data"])["data"]["n"] for f in await collect(c2, 2)]
    assert got == [8, 9]
    await c2.send(type="join", data=f"db-{name}", token=c2.token, after=joined["pos"])
    assert "reload" in (await c2.expect("error"))["data"]


async def test_relay_prunes_by_itself(relay, client, db, repo: RepoFactory):
    r = await relay(prune_seconds=0.2, event_retention_seconds=0, event_retention_rows=None)
    name = await repo("_744_")
    c, joined = await subscribed(r, client, name)
    await insert(db, name, "A", "1")
    await c.expect("db_created")
    await insert(db, name, "A", "1")
    await c.expect("db_created")

    async def pruned() -> bool:
        count = await db.fetchval("SELECT count(*) FROM relay.events WHERE repo = $1", name)
        return bool(count == 0)

    await eventually(pruned, what="the log pruned")
    await c.send(type="join", data=f"db-{name}", token=c.token, after=joined["pos"])
    assert "reload" in (await c.expect("error"))["data"]


async def test_relay_killed_and_restarted_loses_nothing(client, db, pg_url, repo, tmp_path):
    """SIGKILL the relay process while a writer keeps writing; after a restart
    the subscriber resumes from its last position and sees every row."""
    import os
    import signal
    import subprocess
    import sys

    from relay.auth import mint_token
    from tests.conftest import JWT_SECRET, RelayHandle, free_port

    name = await repo("_744_")
    port = free_port()
    env = {
        **os.environ,
        "RELAY_JWT_SECRET": JWT_SECRET,
        "RELAY_DATA_DIR": str(tmp_path),
        "RELAY_PORT": str(port),
    }
    cmd = [sys.executable, "-m", "relay.cli", "serve", "--database-url", pg_url]

    async def start() -> subprocess.Popen[bytes]:
        # Popen only forks; the waiting below is asynchronous.
        proc = subprocess.Popen(  # noqa: ASYNC220
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            await wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, timeout=60)
        except AssertionError:
            proc.kill()
            raise
        return proc

    handle = RelayHandle(None, None, port, JWT_SECRET)  # type: ignore[arg-type]
    token = mint_token(JWT_SECRET, "A", "1")
    proc = await start()
    writer = SteadyWriter(pg_url, name, pause=0.005)
    try:
        c = await client(handle)
        await c.auth(token)
        position = (await c.join(f"db-{name}"))["pos"]
        received: list[int] = []
        writer.start()
        while len(received) < 20:
            frame = await c.recv()
            received.append(json.loads(frame["data"])["data"]["n"])
            position = frame["pos"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await writer.wrote(len(writer.written) + 20)  # the writer goes on while no relay runs
        proc = await start()
        c2 = await client(handle)
        await c2.auth(token)
        await c2.join(f"db-{name}", after=position)
        await writer.wrote(len(writer.written) + 20)
        await writer.stop()
        for frame in await collect(c2, len(writer.written) - len(received)):
            received.append(json.loads(frame["data"])["data"]["n"])
        assert received == writer.written
        await c2.silent()
    finally:
        await writer.stop()
        proc.kill()
        proc.wait(timeout=10)


async def new_listener(db: asyncpg.Connection, old: set[int]) -> int | None:
    """The pid of the relay's listening connection, if it is not one of ``old``."""
    pids = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'relay-listener'"
    )
    fresh = [r["pid"] for r in pids if r["pid"] not in old]
    return fresh[0] if len(pids) == 1 and fresh else None


async def test_listener_terminated_mid_stream_loses_nothing(relay, client, db, pg_url, repo):
    r = await relay()
    name = await repo("_744_")
    c, _ = await subscribed(r, client, name)
    writer = SteadyWriter(pg_url, name).start()
    received: list[int] = []
    pids = set()
    for _ in range(3):
        # Some rows flow through the current connection, then it is killed.
        for frame in await collect(c, 20):
            received.append(json.loads(frame["data"])["data"]["n"])
        pid = await eventually(lambda: new_listener(db, pids), what="a new listener connection")
        pids.add(pid)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    for frame in await collect(c, 20):  # rows through the fourth connection
        received.append(json.loads(frame["data"])["data"]["n"])
    await writer.stop()
    rest = await collect(c, len(writer.written) - len(received))
    received += [json.loads(f["data"])["data"]["n"] for f in rest]
    assert received == writer.written
    await c.silent()


async def test_resume_big_backlog_while_writes_continue(relay, client, db, pg_url, repo):
    """Replay and held-back live frames both go through flow control: a client
    with a small send queue catches up instead of being cut off."""
    r = await relay(send_queue_frames=1000)
    name = await repo("_744_")
    c, joined = await subscribed(r, client, name)
    await c.close()
    await db.execute(
        f"INSERT INTO {name} (owner_id, account_id, data)"
        " SELECT 'A', '1', jsonb_build_object('n', g) FROM generate_series(0, 9999) g"
    )
    written = list(range(10000))
    # The backlog must come from the log, not from live frames held back: wait
    # until the listener has dispatched it (events go out in commit order, so a
    # row committed after it, in another table, arrives after it).
    other = await repo("_744_")
    probe, _ = await subscribed(r, client, other)
    await insert(db, other, "A", "1")
    await probe.expect("db_created", timeout=30)
    stop = asyncio.Event()

    async def writer() -> None:
        conn = await asyncpg.connect(pg_url)
        n = 10000
        try:
            while not stop.is_set():
                await conn.execute(
                    f"INSERT INTO {name} (owner_id, account_id, data)"
                    " SELECT 'A', '1', jsonb_build_object('n', g)"
                    " FROM generate_series($1::int, $1::int + 4) g",
                    n,
                )
                written.extend(range(n, n + 5))
                n += 5
                await asyncio.sleep(0.02)  # ~250 rows/s: slower than the client reads
        finally:
            await conn.close()

    task = asyncio.create_task(writer())
    c2, _ = await subscribed(r, client, name, after=joined["pos"])
    got: list[int] = []
    while len(got) < 10000:
        got.append(json.loads((await c2.recv())["data"])["data"]["n"])
    stop.set()
    await task
    got += [json.loads(f["data"])["data"]["n"] for f in await collect(c2, len(written) - len(got))]
    assert got == written
    await c2.silent()


async def test_resume_across_a_gap_in_tick_ids(relay, client, db, repo: RepoFactory):
    """Tick ids can have gaps (a rolled-back tick, a crash); a tick after a gap
    must still be paired with its real predecessor."""
    r = await relay()
    name = await repo("_744_")
    c, _ = await subscribed(r, client, name)
    await db.fetchval("SELECT nextval(pg_get_serial_sequence('relay.ticks', 'id'))")
    async with db.transaction():
        await insert(db, name, "A", "1", 1)
        await insert(db, name, "A", "1", 2)
    first, second = await c.expect("db_created"), await c.expect("db_created")
    assert first["pos"].split("-")[0] == second["pos"].split("-")[0]
    c2, _ = await subscribed(r, client, name, after=first["pos"])
    frame = await c2.expect("db_created")
    assert frame["pos"] == second["pos"]
    await c2.silent()


async def test_pruning_while_a_writer_is_open_keeps_its_events(relay, client, db, pg_url, repo):
    """A transaction that wrote before the prune and commits after it: its
    event is neither lost live nor on resume, even with everything older pruned."""
    r = await relay()
    name = await repo("_744_")
    c, joined = await subscribed(r, client, name)
    await insert(db, name, "A", "1", 0)  # committed before: the prune may take it
    await c.expect("db_created")
    slow = await asyncpg.connect(pg_url)
    try:
        tx = slow.transaction()
        await tx.start()
        early = await insert(slow, name, "A", "1", 1)  # written first, committed last
        await db.fetchval("SELECT relay.tick()")
        # Retention zero: prune all it can, by age and by size.
        assert await db.fetchval("SELECT relay.prune('0 seconds'::interval)") >= 1
        await db.fetchval("SELECT relay.prune('0 seconds'::interval, 1)")
        late = await insert(db, name, "A", "1", 2)
        seen = await c.expect("db_created")
        assert json.loads(seen["data"])["id"] == late
        await tx.commit()
    finally:
        await slow.close()
    assert json.loads((await c.expect("db_created"))["data"])["id"] == early
    c2, _ = await subscribed(r, client, name, after=seen["pos"])
    assert json.loads((await c2.expect("db_created"))["data"])["id"] == early
    await c.silent()
    await c2.silent()
    # The prune did remove what was older: resuming from before it must reload.
    await c2.send(type="join", data=f"db-{name}", token=c2.token, after=joined["pos"])
    assert "reload" in (await c2.expect("error"))["data"]


async def test_resume_on_another_relay_with_a_position_from_the_first(relay, client, db, repo):
    """Positions belong to the shared log, not to a relay process: a client that
    reconnects through another relay resumes exactly where it left off."""
    one, two = await relay(), await relay()
    name = await repo("_760_")
    c, _ = await subscribed(one, client, name)
    watcher, _ = await subscribed(two, client, name, user="B")
    first = await insert(db, name, "A", "1")
    seen = await c.expect("db_created")
    assert json.loads(seen["data"])["id"] == first
    await c.close()
    missed = [await insert(db, name, "A", "1", n) for n in range(3)]
    await insert(db, name, "C", "2")  # not A's to read
    # Relay two has dispatched everything so far (its own subscriber saw it).
    assert [json.loads(f["data"])["id"] for f in await collect(watcher, 4)] == [first, *missed]
    c2, _ = await subscribed(two, client, name, after=seen["pos"])
    got = [json.loads(f["data"])["id"] for f in await collect(c2, 3)]
    assert got == missed
    live = await insert(db, name, "B", "1")
    assert json.loads((await c2.expect("db_created"))["data"])["id"] == live
    await c2.silent()


async def test_the_oldest_kept_tick_is_a_valid_position_and_nothing_before_it(
    relay, client, db, repo: RepoFactory
):
    """The edge of the log: a whole-tick position at the oldest kept tick resumes;
    an event inside that tick, or any earlier tick, must reload; a tick this relay
    has not reached is refused. Each refusal says exactly why."""
    r = await relay()
    name = await repo("_744_")
    c, _ = await subscribed(r, client, name)
    await insert(db, name, "A", "1", 0)
    await c.expect("db_created")
    await db.fetchval("SELECT relay.prune('0 seconds'::interval)")
    oldest = await db.fetchval("SELECT min(id) FROM relay.ticks")
    row = await insert(db, name, "A", "1", 1)
    await c.expect("db_created")

    c2, _ = await subscribed(r, client, name, after=str(oldest))
    assert json.loads((await c2.expect("db_created"))["data"])["id"] == row
    for too_old in (f"{oldest}-1", str(oldest - 1)):
        await c2.send(type="join", data=f"db-{name}", token=c2.token, after=too_old)
        error = await c2.expect("error")
        assert error["data"] == (
            f"position {too_old} is older than the event log keeps: "
            "reload the data, then join without 'after'"
        )
    ahead = str(oldest + 1_000_000)
    await c2.send(type="join", data=f"db-{name}", token=c2.token, after=ahead)
    assert (await c2.expect("error"))["data"] == f"position {ahead} is unknown to this relay"
    await c2.send(type="join", data="db-no_such_table_here", token=c2.token)
    assert (await c2.expect("error"))["data"] == (
        "cannot join db-no_such_table_here: 'no_such_table_here' is not a watched table"
    )


async def test_a_tick_lost_in_a_crash_means_reload_live_and_on_resume(
    relay, client, db, repo: RepoFactory
):
    """The listener's ticks are committed without waiting for the disk, so a
    crash can lose the newest one after its events were delivered. Deleting
    it stands in for the crash: the subscriber is told to reload (its rows
    may be cut differently now), a resume from a position in it is told to
    reload, neither gets the lost tick's event a second time, and what is
    written next arrives exactly once."""
    r = await relay()
    name = await repo("_744_")
    c, _ = await subscribed(r, client, name)
    await insert(db, name, "A", "1", 1)
    delivered = await c.expect("db_created")
    lost_tick = int(delivered["pos"].split("-")[0])
    assert await db.fetchval("SELECT max(id) FROM relay.ticks") == lost_tick
    await db.execute("DELETE FROM relay.ticks WHERE id = $1", lost_tick)
    notice = await c.expect("error")
    assert notice["reason"] == "pruned"
    assert "lost in a crash" in notice["data"] and "reload" in notice["data"]
    assert notice["channel"] == f"db-{name}"
    c2 = await client(r)
    await c2.auth(r.token("A", "1"))
    await c2.send(type="join", data=f"db-{name}", token=c2.token, after=delivered["pos"])
    refused = await c2.expect("error")
    assert refused["data"] == (
        f"position {delivered['pos']} is not in the event log: "
        "reload the data, then join without 'after'"
    )
    await c2.join(f"db-{name}")
    await insert(db, name, "A", "1", 2)
    for sub in (c, c2):
        after = await sub.expect("db_created")
        assert json.loads(after["data"])["data"]["n"] == 2
        assert int(after["pos"].split("-")[0]) > lost_tick
    await c.silent()
