"""Joining a db- channel: check the table is watched, subscribe, and resume from a position.

A resuming subscriber is registered first (its live events are held back),
then the events it missed are streamed from the log through a server-side
cursor, up to exactly what the listener had dispatched when it subscribed,
then the held-back live events are released: no gap and no duplicate at the
seam, and memory bounded whatever the backlog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg

from relay import protocol
from relay.dbhub import DbHub, Event, Position
from relay.hub import Socket
from relay.listener import EVENTS_SQL, Listener, event_from_record
from relay.protocol import RelayError

log = logging.getLogger("relay.ws")

# Rows fetched from the log per round trip while replaying.
REPLAY_CHUNK = 500


async def join_db(
    pool: asyncpg.Pool,
    listener: Listener,
    dbhub: DbHub,
    socket: Socket,
    name: str,
    after_text: str | None,
    admit: Callable[[], None],
) -> None:
    """``admit`` re-checks the socket's right to join after the awaits (its
    session may have expired while the database answered); it raises to refuse."""
    repo = name[len(protocol.DB_CHANNEL_PREFIX) :]
    watched = await pool.fetchval("SELECT 1 FROM relay.watched WHERE repo = $1", repo)
    if not watched:
        raise RelayError(f"cannot join {name}: {repo!r} is not a watched table")
    after = await _check_position(pool, listener, after_text) if after_text else None
    if socket.closing:
        return
    admit()
    # Subscribing and reading the listener's position happen in one step of
    # the event loop: whatever is dispatched from now on comes after `upto`.
    dbhub.subscribe(socket, repo, catching_up=after is not None)
    upto = listener.position
    socket.reply("joined", name, channel=name, pos=str(upto))
    if after is None:
        return
    try:
        sent = await _replay(pool, dbhub, socket, repo, after, upto)
    except (asyncpg.PostgresError, OSError) as err:
        dbhub.unsubscribe(socket, repo)
        log.warning("replay failed sid=%s channel=%s error=%s", socket.id, name, type(err).__name__)
        raise RelayError("could not read the event log; join again shortly") from err
    while not dbhub.release_some(socket, repo, socket.batch_size):
        await socket.wait_writable()
        if socket.closing:
            return
    log.info("replayed sid=%s channel=%s after=%s events=%d", socket.id, name, after, sent)


async def _check_position(pool: asyncpg.Pool, listener: Listener, text: str) -> Position:
    try:
        after = Position.parse(text)
    except ValueError as err:
        raise RelayError(str(err)) from None
    oldest = await pool.fetchval("SELECT min(id) FROM relay.ticks")
    if oldest is None or after.tick < oldest or (after.tick == oldest and after.seq is not None):
        raise RelayError(
            f"position {after} is older than the event log keeps: "
            "reload the data, then join without 'after'"
        )
    if after.tick > listener.position.tick:
        raise RelayError(f"position {after} is unknown to this relay")
    return after


async def _replay(
    pool: asyncpg.Pool,
    dbhub: DbHub,
    socket: Socket,
    repo: str,
    after: Position,
    upto: Position,
) -> int:
    first = after.tick if after.seq is None else after.tick - 1
    sent = 0
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        chunk: list[Event] = []
        async for row in conn.cursor(EVENTS_SQL, first, upto.tick, prefetch=REPLAY_CHUNK):
            event = event_from_record(row)
            if upto.before(event):
                break  # dispatched live after we subscribed: held back for us
            chunk.append(event)
            if len(chunk) >= socket.batch_size:
                sent += await _send_chunk(dbhub, socket, repo, chunk, after)
                chunk = []
                if socket.closing:
                    return sent
        sent += await _send_chunk(dbhub, socket, repo, chunk, after)
    return sent


async def _send_chunk(
    dbhub: DbHub, socket: Socket, repo: str, chunk: list[Event], after: Position
) -> int:
    await socket.wait_writable()
    return dbhub.replay_chunk(socket, repo, chunk, after)
