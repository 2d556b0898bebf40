"""Session expiry: when a session token's ``exp`` passes, the socket's channels pause.

The socket gets one ``error`` frame, leaves its chat channels and ``db-``
channels, and refuses ``join`` and ``chan_in`` until a fresh ``auth`` on the
same socket; that ``auth`` rejoins the paused channels (a ``joined`` frame
for each follows the ``token`` frame). Messages and events sent while paused
are not delivered; a ``db-`` channel can be caught up by joining it again
with ``after`` set to the last position seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relay import protocol
from relay.auth import Identity
from relay.dbhub import DbHub
from relay.hub import Hub, Socket
from relay.logsafe import clean

log = logging.getLogger("relay.ws")

SESSION_EXPIRED = (
    "session expired: your channels are paused; send auth with a fresh session token to rejoin them"
)


def arm(hub: Hub, dbhub: DbHub, socket: Socket) -> None:
    """(Re)start the socket's one expiry timer for its current identity."""
    limits = socket.limits
    ident = socket.identity
    if ident is None:
        limits.disarm()
        return

    def expired() -> None:
        limits.expiring = asyncio.create_task(
            _suspend(hub, dbhub, socket, ident), name=f"expire-{socket.id}"
        )

    limits.arm_expiry(ident.expires_at, expired)


async def _suspend(hub: Hub, dbhub: DbHub, socket: Socket, ident: Identity) -> None:
    if socket.closing or socket.identity is not ident:
        return  # gone, or renewed by an auth in the meantime
    names = sorted(socket.channels)
    socket.limits.suspended = names
    for name in names:
        if protocol.is_db_channel(name):
            dbhub.unsubscribe(socket, name[len(protocol.DB_CHANNEL_PREFIX) :])
    socket.reply("error", SESSION_EXPIRED)
    log.info(
        "session expired sid=%s user=%s channels=%d", socket.id, clean(ident.user_id), len(names)
    )
    for name in names:
        if not protocol.is_db_channel(name):
            await hub.leave(socket, name)


async def resume(hub: Hub, dbhub: DbHub, socket: Socket) -> list[str]:
    """After a successful auth: rejoin the channels paused by expiry; returns their names."""
    limits = socket.limits
    task, limits.expiring = limits.expiring, None
    if task is not None and not task.done():
        with contextlib.suppress(Exception):
            await task
    names, limits.suspended = limits.suspended, []
    for name in names:
        if not protocol.is_db_channel(name):
            await hub.join(socket, name)
    # Last and with no await after: the caller reads the listener's position
    # in the same step, so the ``pos`` it reports matches the subscription.
    for name in names:
        if protocol.is_db_channel(name):
            dbhub.subscribe(socket, name[len(protocol.DB_CHANNEL_PREFIX) :])
    if names:
        log.info("session renewed sid=%s channels=%d", socket.id, len(names))
    return names


def forget(socket: Socket) -> None:
    """The socket is gone: stop its timer and any suspension in progress."""
    limits = socket.limits
    limits.disarm()
    if limits.expiring is not None and not limits.expiring.done():
        limits.expiring.cancel()
