"""Joining a db- channel: check the table is watched, subscribe, and resume from a position.

A resuming subscriber is registered first (its live events are held back),
then the events it missed are read from the log page by page, up to exactly
what the listener had dispatched when it subscribed, then the held-back live
events are released: no gap and no duplicate at the seam, and memory bounded
whatever the backlog.

A replay waits on its client (flow control) only between pages, holding no
database connection and no transaction then; a client that reads nothing for
``stall_seconds`` is cut off as a slow consumer, and one that goes away ends
the replay at once. So no client can keep the pool's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import asyncpg

from relay import protocol
from relay.dbhub import DbHub, Event, Position, Snapshot
from relay.filters import Filter, FilterError
from relay.hub import Socket
from relay.listener import Listener
from relay.permissions import mode_of, sql_condition
from relay.pool import Database
from relay.protocol import RelayError
from relay.replay import COLUMNS
from relay.views import View

log = logging.getLogger("relay.ws")

# Events read from the log per page (one short query, its connection given
# back before the events are queued for the client): REPLAY_PAGE in the first;
# each next one sized by the last so that it holds about REPLAY_PAGE_CHARS of
# row text (a row counted ROW_CHARS more, for its other columns and objects),
# within REPLAY_PAGE_MIN..REPLAY_PAGE_MAX rows. A page of relay.events_page
# costs PostgreSQL a scan of the whole tick it starts in, so many small pages
# of one big tick cost it that tick many times over: pages are made as big as
# the memory a replay may hold allows.
REPLAY_PAGE = 500
REPLAY_PAGE_MIN = 20
REPLAY_PAGE_MAX = 5000
REPLAY_PAGE_CHARS = 1 << 20
ROW_CHARS = 200
PAGE_SQL = f"SELECT {', '.join(COLUMNS)} FROM relay.events_page($1, $2, $3, $4, $5, $6)"
POSITION_SQL = (
    "SELECT (SELECT min(id) FROM relay.ticks) AS oldest,"
    " EXISTS (SELECT 1 FROM relay.ticks WHERE id = $1) AS known"
)
# The SQLSTATE relay.events_page raises when the log was pruned under a replay.
PRUNED = "RL001"
RELOAD = "reload the data, then join without 'after'"
# The most rows a snapshot join sends (RELAY_SNAPSHOT_MAX_ROWS); over it the join is refused.
SNAPSHOT_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class JoinOptions:
    """What a db- join asks for besides the subscription (DESIGN.md's extensions)."""

    after: str | None = None  # resume after this position
    snapshot: bool = False  # the current rows first, then the stream
    filter: str | None = None  # column=op.value
    snapshot_limit: int = SNAPSHOT_LIMIT
    stall_seconds: float | None = None


async def join_db(
    db: Database,
    listener: Listener,
    dbhub: DbHub,
    socket: Socket,
    name: str,
    options: JoinOptions,
    admit: Callable[[], None],
) -> None:
    """``admit`` re-checks the socket's right to join after the awaits (its
    session may have expired while the database answered); it raises to refuse."""
    repo = name[len(protocol.DB_CHANNEL_PREFIX) :]
    table = await db.fetchrow(
        "SELECT table_oid::regclass::text AS tbl, id_column, owner_column, account_column"
        " FROM relay.watched WHERE app = $1 AND repo = $2",
        socket.app_id,
        repo,
    )
    if table is None:
        raise RelayError(f"cannot join {name}: {repo!r} is not a watched table")
    if options.after and options.snapshot:
        raise RelayError("a join takes 'after' or 'snapshot', not both")
    view, row_filter = (
        await _view(db, table["tbl"], options.filter)
        if options.filter
        else (
            None,
            None,
        )
    )
    after = await _check_position(db, listener, options.after) if options.after else None
    if socket.closing:
        return
    admit()
    # Subscribing and reading the listener's position happen in one step of
    # the event loop: whatever is dispatched from now on comes after `upto`.
    upto = listener.position
    catching_up = after if after is not None else (upto if options.snapshot else None)
    dbhub.subscribe(socket, repo, after=catching_up, view=view)
    socket.reply("joined", name, channel=name, pos=str(upto))
    if catching_up is None:
        return
    try:
        if options.snapshot:
            sent = await _snapshot(db, dbhub, socket, repo, table, row_filter, upto, options)
        else:
            assert after is not None
            sent = await _replay(db, dbhub, socket, repo, after, upto, options.stall_seconds)
    except asyncpg.PostgresError as err:
        dbhub.unsubscribe(socket, repo)
        if err.sqlstate == PRUNED:
            raise RelayError(
                f"position {after} is older than the event log keeps: {RELOAD}"
            ) from None
        log.warning("replay failed sid=%s channel=%s error=%s", socket.id, name, type(err).__name__)
        raise RelayError("could not read the event log; join again shortly") from err
    except (OSError, asyncpg.InterfaceError) as err:  # TimeoutError included
        dbhub.unsubscribe(socket, repo)
        log.warning("replay failed sid=%s channel=%s error=%s", socket.id, name, type(err).__name__)
        raise RelayError("could not read the event log; join again shortly") from err
    except RelayError:
        dbhub.unsubscribe(socket, repo)
        raise
    if sent is None:
        return  # gone, cut off, or re-joined meanwhile
    while not dbhub.release_some(socket, repo):
        if not await socket.wait_writable(options.stall_seconds):
            return
    what = "snapshot rows" if options.snapshot else "events"
    log.info("caught up sid=%s channel=%s %s=%d", socket.id, name, what.replace(" ", "_"), sent)


async def _view(db: Database, table: str, text: str) -> tuple[View, Filter]:
    """A filtered subscription's view, the filter checked against the table's columns."""
    try:
        row_filter = Filter.parse(text)
    except FilterError as err:
        raise RelayError(f"invalid filter: {err}") from None
    column = await db.fetchrow(
        "SELECT format_type(a.atttypid, a.atttypmod) AS type, t.typcategory::text AS category"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = $1::regclass AND a.attname = $2 AND a.attnum > 0"
        " AND NOT a.attisdropped",
        table,
        row_filter.column,
    )
    if column is None:
        raise RelayError(f"invalid filter: the table has no column {row_filter.column!r}")
    try:
        matches = row_filter.matcher(column["category"])
    except FilterError as err:
        raise RelayError(f"invalid filter: {err}") from None
    return View(matches, source=text), replace(row_filter, column_type=column["type"])


async def _snapshot(
    db: Database,
    dbhub: DbHub,
    socket: Socket,
    repo: str,
    table: asyncpg.Record,
    row_filter: Filter | None,
    upto: Position,
    options: JoinOptions,
) -> int | None:
    """Send the rows the user may read (and that pass the filter) as of one snapshot.

    The snapshot is taken after the subscription, so every transaction it
    does not see is dispatched later and arrives live; the held live frames
    of transactions it did see are dropped: no gap, no duplicate.
    """
    ident = socket.identity
    assert ident is not None
    condition, args = sql_condition(
        mode_of(repo),
        ident.user_id,
        ident.account_id,
        ident.is_root,
        table["owner_column"],
        table["account_column"],
        first_arg=1,
    )
    if row_filter is not None:
        clause, more = row_filter.sql(row_filter.column_type, first_arg=len(args) + 1)
        condition += " AND " + clause
        args += more
    ident_col = '"' + table["id_column"].replace('"', '""') + '"'
    query = (
        f"SELECT to_json(t.{ident_col})::text AS id, row_to_json(t.*)::text AS data"
        f" FROM {table['tbl']} t WHERE {condition} LIMIT {options.snapshot_limit + 1}"
    )
    async with db.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # The first statement fixes the transaction's snapshot: the rows are as of it.
            snapshot = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
            rows = await conn.fetch(query, *args)
        # A tick taken now holds (at or before it) every transaction the snapshot saw.
        tick = await conn.fetchval("SELECT relay.tick()")
    if len(rows) > options.snapshot_limit:
        raise RelayError(
            f"snapshot too large: more than {options.snapshot_limit} rows; "
            "narrow it with a filter, or join without 'snapshot'"
        )
    dbhub.snapshot_taken(socket, repo, snapshot, tick)
    for row in rows:
        if not socket.has_room and not await socket.wait_writable(options.stall_seconds):
            return None
        if not dbhub.snapshot_row(socket, repo, row["id"], row["data"], upto):
            return None
    dbhub.snapshot_done(socket, repo)
    name = protocol.DB_CHANNEL_PREFIX + repo
    socket.reply("db_synced", str(upto), channel=name)
    return len(rows)


async def _check_position(db: Database, listener: Listener, text: str) -> Position:
    try:
        after = Position.parse(text)
    except ValueError as err:
        raise RelayError(str(err)) from None
    ticks = await db.fetchrow(POSITION_SQL, after.tick)
    assert ticks is not None  # an aggregate: always one row
    oldest = ticks["oldest"]
    if oldest is None or after.tick < oldest or (after.tick == oldest and after.seq is not None):
        raise RelayError(f"position {after} is older than the event log keeps: {RELOAD}")
    if after.tick > listener.position.tick:
        raise RelayError(f"position {after} is unknown to this relay")
    if not ticks["known"]:
        # Every position a relay hands out names a tick; this one's is gone
        # though newer ones are kept: it was lost in a database crash.
        raise RelayError(f"position {after} is not in the event log: {RELOAD}")
    return after


async def _replay(
    db: Database,
    dbhub: DbHub,
    socket: Socket,
    repo: str,
    after: Position,
    upto: Position,
    stall_seconds: float | None,
) -> int | None:
    """Send the events after ``after`` up to ``upto``; the frames sent, or None if cut short.

    The next page is read while this one is sent: the query holds its pooled
    connection only while it runs, never while the replay waits on its client.
    """

    def page(cursor: Position, size: int) -> asyncio.Task[list[asyncpg.Record]]:
        return asyncio.ensure_future(
            db.fetch(PAGE_SQL, cursor.tick, cursor.seq, upto.tick, size, socket.app_id, repo)
        )

    sent = 0
    size = REPLAY_PAGE
    next_page: asyncio.Task[list[asyncpg.Record]] | None = page(after, size)
    try:
        while next_page is not None:
            rows = await next_page
            next_page = None
            # Rows dispatched live after we subscribed (in upto's tick, after its
            # seq) are held back for us: the replay ends before them.
            stop = len(rows)
            while stop and upto.before_row(rows[stop - 1]["tick"], rows[stop - 1]["seq"]):
                stop -= 1
            if stop == size:
                last = rows[-1]
                size = _page_size(rows)
                next_page = page(Position(last["tick"], last["seq"]), size)
            i = 0
            while i < stop:
                # Room is checked per event (within replay_rows), so a page of
                # large rows never overfills the send queue's byte cap.
                if not socket.has_room and not await socket.wait_writable(stall_seconds):
                    return None
                got = dbhub.replay_rows(socket, repo, rows, i, stop)
                if got is None:
                    return None
                end, count = got
                if end == i:  # a notice, or a filtered subscription: one event the long way
                    one = dbhub.replay_event(socket, repo, _event(rows[i], socket.app_id, repo))
                    if one is None:
                        return None
                    end, count = i + 1, one
                sent += count
                i = end
        return sent
    finally:
        if next_page is not None:
            next_page.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await next_page


def _page_size(rows: list[asyncpg.Record]) -> int:
    """The rows of the next page: about REPLAY_PAGE_CHARS, rows sized like these."""
    chars = sum(len(r["data"] or "") for r in rows) + ROW_CHARS * len(rows)
    wanted = REPLAY_PAGE_CHARS * len(rows) // max(chars, 1)
    return max(REPLAY_PAGE_MIN, min(REPLAY_PAGE_MAX, wanted))


def _event(row: asyncpg.Record, app: str, repo: str) -> Event:
    """A page's row (of :data:`relay.replay.COLUMNS`) as an :class:`Event`."""
    tick, seq, op, row_id, owner, account, old_owner, old_account, data = row
    return Event(
        tick=tick,
        seq=seq,
        repo=repo,
        op=op,
        row_id=row_id,
        owner_id=owner,
        account_id=account,
        old_owner_id=old_owner,
        old_account_id=old_account,
        data=data,
        app=app,
    )
