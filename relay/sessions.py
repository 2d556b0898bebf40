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
import heapq
import logging
import math
import time
from collections.abc import Callable

from relay import protocol
from relay.auth import Identity
from relay.dbhub import DbHub, Position
from relay.hub import Hub, Socket
from relay.logsafe import clean

log = logging.getLogger("relay.ws")

# Fewer stale heap entries than this are never worth a rebuild.
COMPACT_MIN = 64
# How far ahead of the wall clock a deadline counts as reached when the timer runs.
EARLY = 0.005

SESSION_EXPIRED = (
    "session expired: your channels are paused; send auth with a fresh session token to rejoin them"
)


class Expiry:
    """Every socket's session deadline, in one heap, behind one timer for the whole process.

    A timer per socket (a ``TimerHandle``, its context and arguments) is a few
    hundred bytes on every idle socket; here a socket costs one heap entry.
    Each entry is ``(expires_at, socket id, socket)``; it counts only while the
    socket is still armed for that deadline (a later ``auth`` re-arms it, the
    socket's end disarms it), so stale entries are skipped when they come up,
    and the heap is rebuilt without them once they are the majority.

    ``position`` is the listener's: what a live db- subscription has received.
    """

    def __init__(self, hub: Hub, dbhub: DbHub, position: Callable[[], Position]) -> None:
        self.hub = hub
        self.dbhub = dbhub
        self.position = position
        self._heap: list[tuple[float, str, Socket]] = []
        self._stale = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # the deadline the timer is set for

    def __len__(self) -> int:
        """Sockets armed (entries that still count)."""
        return len(self._heap) - self._stale

    def arm(self, socket: Socket) -> None:
        """(Re)start the socket's expiry for its current identity."""
        limits = socket.limits
        if limits.armed is not None:
            self._stale += 1
        ident = socket.identity
        if ident is None or ident.expires_at is None:
            limits.armed = None
            return
        limits.armed = ident
        heapq.heappush(self._heap, (ident.expires_at, socket.id, socket))
        self._compact()
        if ident.expires_at < self._timer_at:
            self._schedule()

    def forget(self, socket: Socket) -> None:
        """The socket is gone: stop its expiry and any suspension in progress."""
        limits = socket.limits
        if limits.armed is not None:
            limits.armed = None
            self._stale += 1
            self._compact()
        if limits.expiring is not None and not limits.expiring.done():
            limits.expiring.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    @staticmethod
    def _counts(when: float, socket: Socket) -> bool:
        armed = socket.limits.armed
        return armed is not None and armed.expires_at == when

    def _compact(self) -> None:
        if self._stale <= COMPACT_MIN or self._stale * 2 <= len(self._heap):
            return
        seen: set[str] = set()
        live = []
        for when, sid, socket in self._heap:
            if sid not in seen and self._counts(when, socket):
                seen.add(sid)
                live.append((when, sid, socket))
        heapq.heapify(live)
        self._heap = live
        self._stale = 0

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf
        if not self._heap:
            return
        when = self._heap[0][0]
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        self._timer = loop.call_at(loop.time() + delay, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        heap = self._heap
        # A monotonic timer may run a hair before the wall clock reads the deadline.
        now = time.time() + EARLY
        while heap and heap[0][0] <= now:
            when, _, socket = heapq.heappop(heap)
            if not self._counts(when, socket):
                self._stale -= 1
                continue
            ident = socket.identity
            socket.limits.armed = None
            if ident is not None and ident.expires_at == when:
                socket.limits.expiring = asyncio.create_task(
                    _suspend(self.hub, self.dbhub, socket, ident, self.position),
                    name=f"expire-{socket.id}",
                )
        self._schedule()


async def _suspend(
    hub: Hub, dbhub: DbHub, socket: Socket, ident: Identity, position: Callable[[], Position]
) -> None:
    if socket.closing or socket.identity is not ident:
        return  # gone, or renewed by an auth in the meantime
    names = sorted(socket.channels)
    socket.limits.suspended = names
    live = position()
    paused = socket.limits.paused_at
    for name in names:
        if protocol.is_db_channel(name):
            repo = name[len(protocol.DB_CHANNEL_PREFIX) :]
            if paused is None:
                paused = socket.limits.paused_at = {}
            # In the same step as the unsubscribe: nothing is dispatched in between.
            paused[name] = dbhub.delivered(socket, repo, live)
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
    names, limits.suspended = limits.suspended, ()
    paused, limits.paused_at = limits.paused_at or {}, None
    chat = [name for name in names if not protocol.is_db_channel(name)]
    for name in chat:
        await hub.join(socket, name)
    if names:
        log.info("session renewed sid=%s channels=%d", socket.id, len(names))
    return chat, paused
