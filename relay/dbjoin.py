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

import logging
from collections.abc import Callable

import asyncpg

from relay import protocol
from relay.dbhub import DbHub, Position
from relay.hub import Socket
from relay.listener import Listener, event_from_record
from relay.pool import Database
from relay.protocol import RelayError

log = logging.getLogger("relay.ws")

# Events read from the log per page (one short query, its connection given
# back before the events are queued for the client).
REPLAY_PAGE = 500
PAGE_SQL = "SELECT * FROM relay.events_page($1, $2, $3, $4, $5, $6)"
# The SQLSTATE relay.events_page raises when the log was pruned under a replay.
PRUNED = "RL001"
RELOAD = "reload the data, then join without 'after'"


async def join_db(
    db: Database,
    listener: Listener,
    dbhub: DbHub,
    socket: Socket,
    name: str,
    after_text: str | None,
    admit: Callable[[], None],
    stall_seconds: float | None = None,
) -> None:
    """``admit`` re-checks the socket's right to join after the awaits (its
    session may have expired while the database answered); it raises to refuse."""
    repo = name[len(protocol.DB_CHANNEL_PREFIX) :]
    watched = await db.fetchval(
        "SELECT 1 FROM relay.watched WHERE app = $1 AND repo = $2", socket.app_id, repo
    )
    if not watched:
        raise RelayError(f"cannot join {name}: {repo!r} is not a watched table")
    after = await _check_position(db, listener, after_text) if after_text else None
    if socket.closing:
        return
    admit()
    # Subscribing and reading the listener's position happen in one step of
    # the event loop: whatever is dispatched from now on comes after `upto`.
    dbhub.subscribe(socket, repo, after=after)
    upto = listener.position
    socket.reply("joined", name, channel=name, pos=str(upto))
    if after is None:
        return
    try:
        sent = await _replay(db, dbhub, socket, repo, after, upto, stall_seconds)
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
    if sent is None:
        return  # gone, cut off, or re-joined meanwhile
    while not dbhub.release_some(socket, repo):
        if not await socket.wait_writable(stall_seconds):
            return
    log.info("replayed sid=%s channel=%s after=%s events=%d", socket.id, name, after, sent)


async def _check_position(db: Database, listener: Listener, text: str) -> Position:
    try:
        after = Position.parse(text)
    except ValueError as err:
        raise RelayError(str(err)) from None
    oldest = await db.fetchval("SELECT min(id) FROM relay.ticks")
    if oldest is None or after.tick < oldest or (after.tick == oldest and after.seq is not None):
        raise RelayError(f"position {after} is older than the event log keeps: {RELOAD}")
    if after.tick > listener.position.tick:
        raise RelayError(f"position {after} is unknown to this relay")
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
    """Send the events after ``after`` up to ``upto``; the frames sent, or None if cut short."""
    sent = 0
    cursor = after
    while True:
        rows = await db.fetch(
            PAGE_SQL, cursor.tick, cursor.seq, upto.tick, REPLAY_PAGE, socket.app_id, repo
        )
        for row in rows:
            event = event_from_record(row)
            if upto.before(event):
                return sent  # dispatched live after we subscribed: held back for us
            cursor = Position(event.tick, event.seq)
            # Room is checked per event, so a page of large rows never
            # overfills the send queue's byte cap.
            if not socket.has_room and not await socket.wait_writable(stall_seconds):
                return None
            count = dbhub.replay_event(socket, repo, event)
            if count is None:
                return None
            sent += count
        if len(rows) < REPLAY_PAGE:
            return sent
