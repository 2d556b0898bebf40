"""Session expiry: when a session token's ``exp`` passes, the socket's channels pause.

The socket gets one ``error`` frame, leaves its chat channels and ``db-``
channels, and refuses ``join`` and ``chan_in`` until a fresh ``auth`` on the
same socket; that ``auth`` rejoins the paused channels (a ``joined`` frame
for each follows the ``token`` frame). Chat messages sent while paused are
not delivered. Each ``db-`` channel remembers exactly how far its stream had
gone when it paused, and resumes from there: the events committed while
paused are replayed from the log, then the live stream follows, with no gap
and no duplicate (within the log's retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from relay import protocol
from relay.auth import Identity
from relay.dbhub import DbHub, Position
from relay.hub import Hub, Socket
from relay.logsafe import clean

log = logging.getLogger("relay.ws")

SESSION_EXPIRED = (
    "session expired: your channels are paused; send auth with a fresh session token to rejoin them"
)


def arm(hub: Hub, dbhub: DbHub, socket: Socket, position: Callable[[], Position]) -> None:
    """(Re)start the socket's one expiry timer for its current identity.

    ``position`` is the listener's: what a live db- subscription has received.
    """
    limits = socket.limits
    ident = socket.identity
    if ident is None:
        limits.disarm()
        return

    # A plain function and its arguments, not a closure: one per idle socket adds up.
    limits.arm_expiry(ident.expires_at, _expired, hub, dbhub, socket, ident, position)


def _expired(
    hub: Hub, dbhub: DbHub, socket: Socket, ident: Identity, position: Callable[[], Position]
) -> None:
    socket.limits.expiring = asyncio.create_task(
        _suspend(hub, dbhub, socket, ident, position), name=f"expire-{socket.id}"
    )


async def _suspend(
    hub: Hub, dbhub: DbHub, socket: Socket, ident: Identity, position: Callable[[], Position]
) -> None:
    if socket.closing or socket.identity is not ident:
        return  # gone, or renewed by an auth in the meantime
    names = sorted(socket.channels)
    socket.limits.suspended = names
    live = position()
    for name in names:
        if protocol.is_db_channel(name):
            repo = name[len(protocol.DB_CHANNEL_PREFIX) :]
            # In the same step as the unsubscribe: nothing is dispatched in between.
            socket.limits.paused_at[name] = dbhub.delivered(socket, repo, live)
            dbhub.unsubscribe(socket, repo)
    socket.reply("error", SESSION_EXPIRED)
    log.info(
        "session expired sid=%s user=%s channels=%d", socket.id, clean(ident.user_id), len(names)
    )
    for name in names:
        if not protocol.is_db_channel(name):
            await hub.leave(socket, name)


async def resume(
    hub: Hub, socket: Socket
) -> tuple[list[str], dict[str, tuple[Position, str | None]]]:
    """After a successful auth: rejoin the chat channels paused by expiry.

    Returns their names, and each paused db- channel with the position its
    stream stopped at (and its filter), for the caller to join again from there.
    """
    limits = socket.limits
    task, limits.expiring = limits.expiring, None
    if task is not None and not task.done():
        with contextlib.suppress(Exception):
            await task
    names, limits.suspended = limits.suspended, []
    paused, limits.paused_at = limits.paused_at, {}
    chat = [name for name in names if not protocol.is_db_channel(name)]
    for name in chat:
        await hub.join(socket, name)
    if names:
        log.info("session renewed sid=%s channels=%d", socket.id, len(names))
    return chat, paused


def forget(socket: Socket) -> None:
    """The socket is gone: stop its timer and any suspension in progress."""
    limits = socket.limits
    limits.disarm()
    if limits.expiring is not None and not limits.expiring.done():
        limits.expiring.cancel()
