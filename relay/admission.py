"""Admission: what a connection may cost the relay before it authenticates.

Anyone who knows an app's public key (it is public) can open sockets. Until a
socket authenticates it is *pending*, and a pending socket

- must send ``auth`` within ``auth_timeout_seconds``, or gets an ``error``
  frame and a close (1008);
- may send at most ``preauth_max_bytes`` in all (frames and their headers), or
  gets an ``error`` frame and a close (1009): so no frame before ``auth`` can
  make the relay buffer more than that, whatever the connection-wide frame limit;
- counts against three caps of pending sockets: per process, per app and per
  remote address; and, like every connection, against its plan's connection cap.

When a cap is full, the oldest pending socket of that scope that has had
``auth_grace_seconds`` to authenticate is closed to make room (1008), so
sockets that never authenticate cannot keep real users out; when none has,
the newcomer is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.protocol import CloseCode

if TYPE_CHECKING:
    from relay.hub import Socket

log = logging.getLogger("relay.ws")

AUTH_TIMEOUT = "authentication timeout: send auth with a session token within {:g} seconds"
TOO_MUCH_BEFORE_AUTH = (
    "too much data before auth: a socket may send {} bytes before it authenticates"
)
REPLACED = (
    "unauthenticated socket closed to admit a new connection: send auth right after connecting"
)


# After a socket's pre-auth budget is spent: how long its peer must pause before
# the error and close frames go out, and how long it may keep sending at most.
TRIP_QUIET = 0.1
TRIP_LINGER = 2.0
# The event loop may run a timer a hair before its time: deadlines this close count as reached.
EARLY = 0.001


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Refusal:
    text: str
    code: CloseCode


class PreAuthGuard(asyncio.Protocol):
    """Sits between a connection's transport and aiohttp's protocol until ``auth``.

    It counts the bytes received and passes them on; past ``limit`` it drops
    everything that comes and, once the peer has paused for ``TRIP_QUIET``
    seconds (or after ``TRIP_LINGER`` at most), calls ``on_trip``. It keeps
    reading meanwhile: a socket closed with unread input is reset, and the peer
    would lose the error and close frames. :meth:`remove` puts aiohttp's protocol
    back (``Transport.set_protocol``), so authenticated sockets pay nothing for it.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        inner: asyncio.Protocol,
        limit: int,
        on_trip: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._inner = inner
        self._left = limit
        self._on_trip = on_trip
        self._tripped_at: float | None = None
        self._quiet: asyncio.TimerHandle | None = None

    @classmethod
    def install(
        cls, transport: asyncio.BaseTransport | None, limit: int, on_trip: Callable[[], None]
    ) -> PreAuthGuard | None:
        if not isinstance(transport, asyncio.Transport) or limit <= 0:
            return None
        inner = transport.get_protocol()
        if not isinstance(inner, asyncio.Protocol) or isinstance(inner, PreAuthGuard):
            return None
        guard = cls(transport, inner, limit, on_trip)
        transport.set_protocol(guard)
        return guard

    def remove(self) -> None:
        if self._transport.get_protocol() is self:
            self._transport.set_protocol(self._inner)

    def disarm(self) -> None:
        """Never call ``on_trip`` (nor keep what it refers to alive)."""
        self._on_trip = _nothing

    def data_received(self, data: bytes) -> None:
        if self._tripped_at is None:
            self._left -= len(data)
            if self._left >= 0:
                self._inner.data_received(data)
                return
            self._tripped_at = time.monotonic()
        # Tripped: nothing more reaches aiohttp's buffers.
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        if time.monotonic() - self._tripped_at >= TRIP_LINGER:
            self._trip()
        else:
            self._quiet = asyncio.get_running_loop().call_later(TRIP_QUIET, self._trip)

    def _trip(self) -> None:
        self._quiet = None
        on_trip, self._on_trip = self._on_trip, _nothing
        on_trip()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._quiet is not None:
            self._quiet.cancel()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


@dataclass(eq=False, slots=True)
class _Pending:
    socket: Socket
    app_id: str
    address: str
    since: float  # loop time
    guard: PreAuthGuard | None = None


class Admission:
    """The pending (unauthenticated) sockets of one relay process, oldest first.

    Every pending socket has the same time to authenticate, so the oldest is
    always the next to run out of it: one timer for the process, set for the
    oldest's deadline, rather than one per socket (a timer cancelled by an
    ``auth`` would stay in the event loop's heap, with its context, until its
    deadline came).
    """

    def __init__(
        self,
        *,
        timeout: float,
        preauth_bytes: int,
        total: int,
        per_app: int,
        per_address: int,
        grace: float,
    ) -> None:
        self.timeout = timeout
        self.preauth_bytes = preauth_bytes
        self.total = total
        self.per_app = per_app
        self.per_address = per_address
        self.grace = grace
        # Dicts keep insertion order: the first entry of each is its oldest.
        self._all: dict[str, _Pending] = {}
        self._by_app: dict[str, dict[str, _Pending]] = {}
        self._by_address: dict[str, dict[str, _Pending]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def pending(self, app_id: str | None = None) -> int:
        """How many sockets are unauthenticated (in one app, or in all)."""
        if app_id is None:
            return len(self._all)
        return len(self._by_app.get(app_id, ()))

    def make_room(
        self, app_id: str, address: str, plan_cap: int | None, connections: int
    ) -> Refusal | None:
        """Make room for one more pending socket; a :class:`Refusal` when there is none.

        ``connections`` is the app's open connections, against its ``plan_cap``.
        """
        full = plan_cap is not None and connections >= plan_cap
        if full and not self._evict_oldest(self._by_app.get(app_id, {})):
            text = f"connection limit reached: this app allows {plan_cap}"
            return Refusal(text, CloseCode.POLICY)
        scopes = (
            (self.per_address, self._by_address.get(address, {}), "from your address"),
            (self.per_app, self._by_app.get(app_id, {}), "for this app"),
            (self.total, self._all, "on this server"),
        )
        for cap, scope, where in scopes:
            if cap and len(scope) >= cap and not self._evict_oldest(scope):
                return Refusal(
                    f"too many unauthenticated connections {where}: try again shortly",
                    CloseCode.TRY_AGAIN_LATER,
                )
        return None

    def add(self, socket: Socket, address: str, transport: asyncio.BaseTransport | None) -> None:
        """Track a new socket until it authenticates; arm its deadline and byte budget."""
        loop = asyncio.get_running_loop()
        entry = _Pending(socket, socket.app_id, address, loop.time())
        if self.timeout > 0 and self._timer is None:
            self._timer = loop.call_at(entry.since + self.timeout, self._expire_due)
        entry.guard = PreAuthGuard.install(
            transport, self.preauth_bytes, lambda: self._too_much(entry)
        )
        self._all[socket.id] = entry
        self._by_app.setdefault(entry.app_id, {})[socket.id] = entry
        self._by_address.setdefault(address, {})[socket.id] = entry

    def authenticated(self, socket: Socket) -> None:
        """The socket has authenticated: no deadline, no byte budget, no pending cap."""
        entry = self._forget(socket.id)
        if entry is not None and entry.guard is not None:
            entry.guard.remove()

    def discard(self, socket: Socket) -> None:
        """The socket is gone."""
        self._forget(socket.id)

    def _forget(self, sid: str) -> _Pending | None:
        entry = self._all.pop(sid, None)
        if entry is None:
            return None
        if entry.guard is not None:
            entry.guard.disarm()  # it refers to the entry: no cycle left for the GC
        for index, key in ((self._by_app, entry.app_id), (self._by_address, entry.address)):
            scope = index.get(key)
            if scope is not None:
                scope.pop(sid, None)
                if not scope:
                    del index[key]
        return entry

    def _evict_oldest(self, scope: dict[str, _Pending]) -> bool:
        """Close the oldest socket of ``scope`` if it has had its grace; True if one was."""
        oldest = next(iter(scope.values()), None)
        now = asyncio.get_running_loop().time()
        if oldest is None or now - oldest.since < self.grace:
            return False
        self._forget(oldest.socket.id)
        log.info("unauthenticated socket replaced sid=%s app=%s", oldest.socket.id, oldest.app_id)
        self._end(oldest, REPLACED, CloseCode.POLICY, "replaced by a new connection")
        return True

    def close(self) -> None:
        """Stop the deadline timer (the relay is shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire_due(self) -> None:
        """Close every socket past its deadline; set the timer for the next one."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + EARLY
        while self._all:
            entry = next(iter(self._all.values()))
            deadline = entry.since + self.timeout
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire_due)
                return
            self._forget(entry.socket.id)
            log.info("authentication timeout sid=%s app=%s", entry.socket.id, entry.app_id)
            self._end(
                entry, AUTH_TIMEOUT.format(self.timeout), CloseCode.POLICY, "authentication timeout"
            )

    def _too_much(self, entry: _Pending) -> None:
        self._forget(entry.socket.id)
        log.info("too much before auth sid=%s app=%s", entry.socket.id, entry.app_id)
        text = TOO_MUCH_BEFORE_AUTH.format(self.preauth_bytes)
        self._end(entry, text, CloseCode.TOO_BIG, "too much data before auth")

    @staticmethod
    def _end(entry: _Pending, text: str, code: CloseCode, reason: str) -> None:
        entry.socket.reply("error", text)
        entry.socket.close(code, reason)
