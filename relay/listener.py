"""The listener: follows relay.events and hands each committed event to the DbHub.

It owns one dedicated asyncpg connection (a pool would ``UNLISTEN *`` on
reset). While events flow it long-polls: relay.poll_wait() waits inside
PostgreSQL, checking every millisecond for a commit, and returns the new
events as soon as there are any. When the log has been quiet for
``idle_after_seconds`` it tells the writers (relay.listeners.sleeping) to
NOTIFY ``relay_events`` and sleeps until one does, or until the safety poll
timer fires, so a lost wake-up costs latency, never an event (the handshake
is explained in sql/relay.sql). Each round asks PostgreSQL for a new tick and
reads the events of the ticks not seen yet, in commit order.

Its ticks are committed without waiting for the disk (``synchronous_commit =
off`` on its connection): the flush is off the commit-to-frame path. A crash
of PostgreSQL may then lose the newest ticks; relay.tick() makes sure their
ids are never used again, and a listener whose last tick is gone tells its
subscribers to reload, as when it falls behind the log's retention.

If the connection drops it reconnects with jittered exponential backoff and
carries on from the last tick it dispatched, so nothing committed in between
is skipped and nothing is dispatched twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from relay.dbhub import LOST, PRUNED, DbHub, Event, Position
from relay.outbox import Flusher

log = logging.getLogger("relay.listener")

CHANNEL = "relay_events"
# Shown in pg_stat_activity, so operators (and tests) can find the listening connection.
APPLICATION_NAME = "relay-listener"
EVENTS_SQL = "SELECT * FROM relay.events_between($1, $2)"
POLL_SQL = "SELECT * FROM relay.poll($1, $2)"
POLL_WAIT_SQL = "SELECT * FROM relay.poll_wait($1, $2, $3, $4)"
POLL_ROWS = 1000
QUERY_TIMEOUT = 10.0
# How often the sleep handshake checks whether earlier writers have finished.
HANDSHAKE_POLL_SECONDS = 0.02
# Rows of listeners whose backend is gone (a relay killed rather than
# stopped). A stale row flagged asleep would make every writer NOTIFY for
# nobody, which serializes their commits (sql/relay.sql, "Wake-ups").
FORGET_DEAD_SQL = "DELETE FROM relay.listeners WHERE pid NOT IN (SELECT pid FROM pg_stat_activity)"
# How often a busy listener forgets them (asleep, it makes writers notify anyway).
FORGET_DEAD_SECONDS = 30.0
# Register this connection (and forget listeners whose backend is gone).
REGISTER_SQL = f"""
{FORGET_DEAD_SQL};
INSERT INTO relay.listeners (pid, sleeping) VALUES (pg_backend_pid(), false)
ON CONFLICT (pid) DO UPDATE SET sleeping = false, since = now();
"""
UNREGISTER_SQL = "DELETE FROM relay.listeners WHERE pid = pg_backend_pid()"
UNREGISTER_TIMEOUT = 1.0
# A big tick is dispatched in slices of this much loop time; between slices
# the socket writers flush. Each socket's frames of one slice leave in one
# write, so the slices are long enough to gather several frames per socket
# under load, and short enough not to stall other sockets' reads and pings.
# A slice ends sooner when some send queue is half full (Flusher.pressed),
# so a reader with a small queue is written before it would overflow.
DISPATCH_SLICE_SECONDS = 0.02
# How often the listener records its position in relay.listeners (for the pruner).
PROGRESS_SECONDS = 1.0
RUNNING_SQL = """
SELECT EXISTS (
    SELECT 1 FROM pg_snapshot_xip($1::text::pg_snapshot) AS x
    WHERE pg_xact_status(x) = 'in progress'
)
"""


def event_from_record(r: Any) -> Event:
    return Event(
        tick=r["tick"],
        seq=r["seq"],
        app=r["app"],
        repo=r["repo"],
        op=r["op"],
        row_id=r["row_id"],
        owner_id=r["owner_id"],
        account_id=r["account_id"],
        old_owner_id=r["old_owner_id"],
        old_account_id=r["old_account_id"],
        data=r["data"],
        xid=r.get("xid"),
    )


class Listener:
    def __init__(
        self,
        url: str,
        dbhub: DbHub,
        poll_seconds: float = 1.0,
        busy_poll_seconds: float = 0.001,
        idle_after_seconds: float = 0.2,
        on_state: Callable[[bool], None] | None = None,
        on_events: Callable[[int, float], None] | None = None,
        flusher: Flusher | None = None,
    ) -> None:
        """``flusher``: the sockets' (relay.outbox); a dispatch slice ends early
        when it says some send queue is half full, so that one is written now."""
        self.url = url
        self.dbhub = dbhub
        self._flusher = flusher or Flusher()
        self.poll_seconds = poll_seconds
        self.busy_poll_seconds = busy_poll_seconds
        # relay.poll_wait()'s check interval, in its unit.
        self._check_ms = max(1, round(busy_poll_seconds * 1000))
        self.idle_after_seconds = idle_after_seconds
        self.last_tick: int | None = None
        # The last event dispatched, or the last tick dispatched whole: what a
        # new subscriber follows, and where a replay must stop.
        self.position = Position(0)
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._on_state = on_state
        self._progress_at = -PROGRESS_SECONDS
        self._forgot_dead_at = 0.0
        self._slice_started = 0.0
        # Metrics: told (events, seconds since they were committed at the latest)
        # after each poll that found events. A commit found by a poll happened
        # after the previous poll began, or before the NOTIFY that woke us.
        self._on_events = on_events
        self._since = 0.0
        # True once a poll since the last (re)connect found no more to read.
        self.caught_up = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay-listener")
        # The first connection must work, so a misconfigured relay fails fast.
        await asyncio.wait_for(self.connected.wait(), timeout=30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()  # a cancelled query may still own the connection

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(
                    self.url,
                    server_settings={
                        "application_name": APPLICATION_NAME,
                        # Ticks need not wait for the disk (relay.tick() guards the ids).
                        "synchronous_commit": "off",
                    },
                    timeout=QUERY_TIMEOUT,
                    # A silent network partition surfaces as a timeout, then a reconnect.
                    command_timeout=QUERY_TIMEOUT,
                )
                self._conn = conn
                await conn.add_listener(CHANNEL, self._on_notify)
                conn.add_termination_listener(lambda _c: self._wake.set())
                await conn.execute(REGISTER_SQL)
                if self.last_tick is None:
                    self.last_tick = await conn.fetchval("SELECT relay.tick()")
                    self.position = Position(self.last_tick)
                else:
                    log.info("listener reconnected; catching up after tick %s", self.last_tick)
                self._progress_at = -PROGRESS_SECONDS
                self._forgot_dead_at = asyncio.get_running_loop().time()
                self._since = asyncio.get_running_loop().time()
                self.connected.set()
                if self._on_state:
                    self._on_state(True)
                delay = 0.1
                await self._follow(conn)
                raise ConnectionError("listening connection closed")
            except asyncio.CancelledError:
                await self._unregister()
                raise
            except Exception as exc:
                # Whatever broke (network, server, a protocol state asyncpg
                # could not recover from), the listener must not die: start over
                # on a new connection from the last dispatched tick.
                self.connected.clear()
                self.caught_up = False
                if self._on_state:
                    self._on_state(False)
                wait = delay * (0.5 + random.random())
                log.warning(
                    "listener connection lost error=%s detail=%s reconnect_in=%.2fs",
                    type(exc).__name__,
                    str(exc)[:200],
                    wait,
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, 5.0)
            finally:
                conn_ = self._conn
                if conn_ is not None and not conn_.is_closed():
                    conn_.terminate()

    async def _follow(self, conn: asyncpg.Connection) -> None:
        """Long-poll while events flow; when the log goes quiet, hand over to NOTIFY and sleep."""
        wait_ms = max(1, round(self.idle_after_seconds * 1000))
        # First a poll that does not wait: caught up (and ready) at once.
        await self._drain(conn)
        while not conn.is_closed():
            if not await self._drain(conn, wait_ms):
                # Nothing for idle_after_seconds.
                await self._sleep(conn)

    async def _sleep(self, conn: asyncpg.Connection) -> None:
        """The sleep handshake of sql/relay.sql, then sleep until a NOTIFY or new events.

        While asleep only the safety poll (every ``poll_seconds``) touches the
        database. The handshake waits for in-progress transactions at most
        ``poll_seconds``: a long transaction elsewhere in the cluster then
        costs at most one safety-poll interval of latency, never busy polling.
        """
        await conn.execute(
            "UPDATE relay.listeners SET sleeping = true WHERE pid = pg_backend_pid()"
        )
        loop = asyncio.get_running_loop()
        snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
        deadline = loop.time() + self.poll_seconds
        # Writers that read sleeping = false are among these in-progress transactions.
        while loop.time() < deadline and await conn.fetchval(RUNNING_SQL, snapshot):
            if await self._drain(conn):
                break
            await asyncio.sleep(HANDSHAKE_POLL_SECONDS)
        while True:
            self._wake.clear()
            if await self._drain(conn):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            if self._wake.is_set():
                self._since = loop.time()  # the commit came before its NOTIFY
                break  # a NOTIFY (or a lost connection): poll busily again
        await conn.execute(
            "UPDATE relay.listeners SET sleeping = false WHERE pid = pg_backend_pid()"
        )

    async def _drain(self, conn: asyncpg.Connection, wait_ms: int = 0) -> int:
        """Dispatch the events committed since the last tick; return how many.

        One round trip (relay.poll, or relay.poll_wait waiting up to
        ``wait_ms`` for something new) in the common case. A tick with more than
        POLL_ROWS events streams the rest through a server-side cursor, so a
        huge transaction never sits in memory whole. ``position`` moves with
        every event dispatched, so a resuming subscriber knows exactly where
        its replay must stop, and a tick interrupted by a lost connection is
        never dispatched twice.
        """
        assert self.last_tick is not None
        started = asyncio.get_running_loop().time()
        if wait_ms:
            check_ms = self._check_ms
            rows = await conn.fetch(POLL_WAIT_SQL, self.last_tick, POLL_ROWS, wait_ms, check_ms)
            # What it found was committed after its last check that saw nothing.
            self._since = max(self._since, started + (rows[0]["waited_ms"] - check_ms) / 1000)
        else:
            rows = await conn.fetch(POLL_SQL, self.last_tick, POLL_ROWS)
        newest: int = rows[0]["upto"]
        if rows[0]["pruned"]:
            # The tick this listener had read up to is gone: the log was pruned
            # past it (it lagged beyond the retention window), or PostgreSQL
            # crashed before the tick reached the disk. What it missed cannot
            # be delivered exactly: its subscribers are told to reload.
            oldest = await conn.fetchval("SELECT min(id) FROM relay.ticks")
            crashed = oldest is not None and oldest < self.last_tick
            log.error(
                "listener's position is gone from the event log (%s) after_tick=%s newest=%s",
                "lost in a database crash" if crashed else "pruned past it",
                self.last_tick,
                newest,
            )
            self.dbhub.announce_lost(LOST if crashed else PRUNED)
            self.last_tick = newest
            self.position = Position(newest)
            return 1
        await self._record_progress(conn)
        if newest <= self.last_tick:
            self.caught_up = True
            self._since = started
            return 0
        dispatched = 0
        self._slice_started = time.monotonic()
        for row in rows:
            if row["tick"] is not None:
                dispatched += await self._dispatch(row)
        if len(rows) >= POLL_ROWS:
            async with conn.transaction(readonly=True):
                cursor = conn.cursor(EVENTS_SQL, self.last_tick, newest, prefetch=POLL_ROWS)
                async for row in cursor:
                    dispatched += await self._dispatch(row)
        self.last_tick = newest
        self.position = Position(newest)
        self.caught_up = True
        if self._on_events is not None and dispatched:
            self._on_events(dispatched, asyncio.get_running_loop().time() - self._since)
        self._since = started
        return dispatched

    async def _record_progress(self, conn: asyncpg.Connection) -> None:
        """Tell the pruner, now and then, how far this listener has read."""
        now = asyncio.get_running_loop().time()
        if now - self._progress_at < PROGRESS_SECONDS:
            return
        self._progress_at = now
        await conn.execute(
            "UPDATE relay.listeners SET last_tick = $1 WHERE pid = pg_backend_pid()",
            self.last_tick,
        )
        if now - self._forgot_dead_at >= FORGET_DEAD_SECONDS:
            self._forgot_dead_at = now
            await conn.execute(FORGET_DEAD_SQL)

    async def _unregister(self) -> None:
        """On stop, remove this listener's row: writers stop notifying for it at once.

        Best effort: if the connection is gone or stuck, the next listener to
        register, or a busy one within FORGET_DEAD_SECONDS, forgets the row."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.execute(UNREGISTER_SQL), UNREGISTER_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            log.info("listener row left for the next listener error=%s", type(err).__name__)

    async def _dispatch(self, row: Any) -> int:
        event = event_from_record(row)
        if not self.position.before(event):
            return 0  # dispatched already, before the connection broke mid-tick
        self.position = Position(event.tick, event.seq)
        try:
            self.dbhub.dispatch(event)
        except Exception:
            log.exception("dispatch failed repo=%s pos=%s", event.repo, event.pos)
        if (
            self._flusher.pressed
            or time.monotonic() - self._slice_started >= DISPATCH_SLICE_SECONDS
        ):
            await asyncio.sleep(0)
            self._slice_started = time.monotonic()
        return 1
