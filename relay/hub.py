"""The hub: connected sockets, the channels they joined, and fan-out.

Each :class:`Socket` owns a bounded outgoing queue drained by one writer task,
so a fan-out never awaits a slow client: it appends and moves on. A socket
whose queue overflows is a slow consumer and is closed, so it can neither grow
the server's memory nor hold up the rest of its channel.

Channel messages travel through the broker (``relay.broker``) so that members
connected to other relay processes receive them too; the hub delivers what
the broker hands back to its own local members.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from relay import protocol
from relay.auth import Identity
from relay.broker.base import BrokerError
from relay.heartbeat import PING_FRAME
from relay.limits import SocketLimits
from relay.logsafe import clean
from relay.metrics import Counts
from relay.outbox import PREFIX_LENGTH, WRITE_CHUNK, Body, SendBudget, frame_header
from relay.protocol import CloseCode

if TYPE_CHECKING:
    from relay.broker.base import Broker

log = logging.getLogger("relay.ws")

ChannelKey = tuple[str, str]  # (app id, channel name)
# A slow consumer's time to read its backlog and the close frame before the
# connection is dropped outright.
SLOW_CLOSE_SECONDS = 10.0


class Channels(list[str]):
    """The channels one socket has joined: a set's methods on a list.

    A socket joins a few channels (at most ``max_channels_per_socket``), and an
    empty ``set`` alone is 216 bytes on every idle socket; a list is 56.
    """

    __slots__ = ()

    def add(self, name: str) -> None:
        if name not in self:
            self.append(name)

    def discard(self, name: str) -> None:
        if name in self:
            self.remove(name)


class Socket:
    """One client connection: its identity, its channels and its send queue.

    Frames are written by the loop turn, not one by one: queueing a frame marks
    the socket in the :class:`~relay.outbox.Flusher`, which at the end of the
    turn writes everything each marked socket holds in as few transport writes
    as it can (still one JSON object per WebSocket frame). Only a socket whose
    peer does not keep up gets a task of its own, waiting for its transport to
    drain.
    """

    __slots__ = (
        "__weakref__",
        "_budget",
        "_close_reason",
        "_closing",
        "_marked",
        "_protocol",
        "_queue",
        "_queue_bytes",
        "_queue_limit",
        "_queued_bytes",
        "_room",
        "_started",
        "_transport",
        "_writer",
        "app_id",
        "channels",
        "counts",
        "id",
        "identity",
        "limits",
        "pinged",
        "token",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        app_id: str,
        queue_limit: int,
        queue_bytes: int | None = None,
        transport: asyncio.Transport | None = None,
        limits: SocketLimits | None = None,
        budget: SendBudget | None = None,
        transport_protocol: BaseProtocol | None = None,
    ) -> None:
        self.id = str(uuid.uuid4())
        # Where frames written and closes are counted (the relay sets its own).
        self.counts = UNCOUNTED
        self.app_id = app_id
        self.ws = ws
        self.identity: Identity | None = None
        self.token: str | None = None
        self.channels = Channels()
        # What the relay meters on this socket (unmetered but for the error budget by default).
        self.limits = limits or SocketLimits(None)
        # A frame for this socket alone (str), or a body shared with others.
        # A list, not a deque: it is emptied a write at a time; and no list at
        # all (the shared empty tuple) while there is nothing to send.
        self._queue: list[str | Body] | tuple[()] = ()
        self._queue_limit = queue_limit
        # Counted in characters of the queued JSON text (bytes, for ASCII).
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._budget = budget or SendBudget(None)
        self._transport = transport
        # aiohttp's protocol of the connection: it knows when the transport has drained.
        self._protocol = transport_protocol
        self._started = False
        self._marked = False  # waiting in the flusher for the end of the loop turn
        self._room: asyncio.Event | None = None  # made by the first wait_writable
        self._closing: CloseCode | None = None
        self._close_reason = ""
        # Pinged by the heartbeat's last round, no data seen since (relay.heartbeat).
        self.pinged = False
        # Writes what the transport would not take yet, then closes, if asked to.
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin writing (frames queued before this wait for it)."""
        if self._transport is None or self._protocol is None:
            raise RuntimeError("a socket needs its transport and protocol to write")
        self._started = True
        if self._queue:
            self._mark()

    def send(self, text: str) -> None:
        """Queue one encoded frame; never blocks. Overflow closes the socket."""
        if self._admit(len(text), len(text)):
            self._budget.total += len(text)
            self._enqueue(text, len(text))

    def send_shared(self, body: Body) -> None:
        """Queue a frame whose body other sockets share; counted once in the budget."""
        size = PREFIX_LENGTH + len(body.data)
        if self._admit(size, 0 if body.refs else len(body.data)):
            body.refs += 1
            if body.refs == 1:
                self._budget.total += len(body.data)
            self._enqueue(body, size)

    def send_many(self, texts: list[str], size: int) -> None:
        """Queue encoded frames for this socket alone, in order, as that many :meth:`send`
        calls would (``size``: their total length); the caps are checked once for all."""
        if texts and self._admit(size, size, len(texts)):
            self._budget.total += size
            queue = self._queue
            if isinstance(queue, list):
                queue += texts
            else:
                fresh: list[str | Body] = [*texts]
                self._queue = fresh
            self._queued(size)

    def _admit(self, size: int, new_bytes: int, frames: int = 1) -> bool:
        """Room for ``frames`` more frames of ``size`` in all, ``new_bytes`` of it new
        to the budget?"""
        if self._closing is not None:
            return False
        if len(self._queue) + frames > self._queue_limit or (
            self._queue_bytes is not None and self._queued_bytes + size > self._queue_bytes
        ):
            log.warning(
                "slow consumer closed sid=%s queued=%d bytes=%d",
                self.id,
                len(self._queue),
                self._queued_bytes,
            )
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: too many frames queued")
            return False
        self._budget.make_room(new_bytes)
        return self._closing is None

    def _enqueue(self, item: str | Body, size: int) -> None:
        queue = self._queue
        if isinstance(queue, list):
            queue.append(item)
        else:
            self._queue = [item]
        self._queued(size)

    def _queued(self, size: int) -> None:
        """``size`` more characters were queued: count them, and have them written."""
        self._queued_bytes += size
        budget = self._budget
        budget.holders.add(self)
        if not self._marked and self._writer is None and self._started:
            self._mark()
        if not self.has_room or (budget.limit is not None and budget.total > budget.limit >> 1):
            budget.flusher.pressed = True

    def _mark(self) -> None:
        self._marked = True
        self._budget.flusher.add(self)

    def _account_out(self, item: str | Body) -> None:
        """``item`` left the queue (written or dropped): uncount it."""
        if isinstance(item, str):
            self._queued_bytes -= len(item)
            self._budget.total -= len(item)
        else:
            self._queued_bytes -= PREFIX_LENGTH + len(item.data)
            item.refs -= 1
            if not item.refs:
                self._budget.total -= len(item.data)
                if item.written:
                    self.counts.sent_body(item.data, item.written)
        if not self._queue:
            self._budget.holders.discard(self)

    def _drop_queue(self) -> None:
        queue, self._queue = self._queue, ()
        for item in queue:
            self._account_out(item)

    def flush(self) -> None:
        """Write what is queued (called by the flusher at the end of a loop turn)."""
        self._marked = False
        if self._writer is not None or not self._queue:
            return
        try:
            if self._write_some():
                return
        except RuntimeError:  # the transport was shut for writing
            self._lost()
            return
        # The peer is behind: wait for its transport to drain, in a task of its own.
        self._writer = asyncio.create_task(self._write_rest(), name=f"writer-{self.id}")

    def _write_some(self) -> bool:
        """Write queued frames while the transport takes them; True once the queue is empty."""
        transport, proto, queue = self._transport, self._protocol, self._queue
        assert transport is not None and proto is not None
        if transport.is_closing():
            self._lost()
            return True
        if not isinstance(queue, list):
            queue = []  # nothing queued (flush does not call for that; _write_rest may)
        prefix = self.prefix
        plen = len(prefix)
        assert plen == PREFIX_LENGTH  # what each Body's header counts on
        counts, budget = self.counts, self._budget
        while queue and not proto._paused:
            parts: list[bytes] = []
            texts: list[str] = []  # counted together, once written
            taken = freed = unqueued = 0
            # The accounting of _account_out, inlined: this loop runs once per frame written.
            for item in queue:
                taken += 1
                if type(item) is str:
                    data = item.encode()
                    parts += (frame_header(len(data)), data)
                    freed += len(item)
                    unqueued += len(item)
                    texts.append(item)
                else:
                    assert isinstance(item, Body)
                    parts += (item.header, prefix, item.data)
                    unqueued += plen + len(item.data)
                    item.written += 1
                    item.refs -= 1
                    if not item.refs:
                        freed += len(item.data)
                        counts.sent_body(item.data, item.written)
                if unqueued >= WRITE_CHUNK:
                    break
            del queue[:taken]
            self._queued_bytes -= unqueued
            budget.total -= freed
            transport.write(b"".join(parts))
            if texts:
                counts.sent_all(texts)
        if not queue:
            self._queue = ()
            budget.holders.discard(self)
        if self._room is not None and self.has_room:
            self._room.set()
        return not queue

    async def _write_rest(self) -> None:
        """Write the rest as the peer reads it, then close if the socket is closing."""
        proto = self._protocol
        assert proto is not None
        try:
            while not self._write_some():
                await proto._drain_helper()
            if self._closing is not None:
                await self.ws.close(code=self._closing, message=self._close_reason.encode())
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            # The peer went away or we are shutting down: nothing left to write to.
            self._lost()
        finally:
            self._writer = None
            if self._queue and self._closing is None:
                self._mark()

    @property
    def queued_bytes(self) -> int:
        """What this socket's queue holds (shared bodies in full)."""
        return self._queued_bytes

    def reply(
        self, type: str, data: str = "", channel: str = "", token: str = "", **extra: Any
    ) -> None:
        self.send(protocol.encode(self.id, type, data, channel, token, **extra))

    @property
    def queue_bytes(self) -> int | None:
        """The send queue's size cap (characters of JSON text), if any."""
        return self._queue_bytes

    @property
    def has_room(self) -> bool:
        """True while the queue is at most half full, in frames and in bytes."""
        if len(self._queue) > self._queue_limit // 2:
            return False
        return self._queue_bytes is None or self._queued_bytes <= self._queue_bytes // 2

    def room(self) -> tuple[int, int | None]:
        """How much more may be queued with :attr:`has_room` staying True: frames, and
        characters (None: no byte cap); negative once it is False."""
        frames = self._queue_limit // 2 - len(self._queue)
        if self._queue_bytes is None:
            return frames, None
        return frames, self._queue_bytes // 2 - self._queued_bytes

    async def wait_writable(self, stall_seconds: float | None = None) -> bool:
        """Wait until the queue is at most half full (flow control for bulk sends).

        Returns False, at once, when the socket is closing or its connection is
        gone. A peer that has not read enough to free the room within
        ``stall_seconds`` is closed as a slow consumer (False as well).
        """
        while not self.has_room and self._closing is None:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), stall_seconds)
            except TimeoutError:
                log.warning(
                    "slow consumer closed sid=%s reason=stalled seconds=%s queued=%d",
                    self.id,
                    stall_seconds,
                    len(self._queue),
                )
                self.close(CloseCode.SLOW_CONSUMER, "slow consumer: stopped reading")
        return self._closing is None

    def close(self, code: CloseCode, reason: str) -> None:
        """Close after the frames already queued (a slow consumer's are dropped)."""
        if self._closing is not None:
            return
        self.counts.closed(code)
        self._closing = code
        self._close_reason = reason
        if self._room is not None:
            self._room.set()
        if code is CloseCode.SLOW_CONSUMER:
            self._drop_queue()
            self._cut_off()
            return
        if self._started and self._writer is None:
            self._writer = asyncio.create_task(self._write_rest(), name=f"closer-{self.id}")

    def _cut_off(self) -> None:
        """Close a slow consumer now, even if the writer waits for it to read.

        The writer is replaced by a task that queues the close frame behind the
        bytes already in the transport, and drops the connection if the peer
        has not read them within SLOW_CLOSE_SECONDS.
        """
        if self._writer is not None:
            self._writer.cancel()
        self._writer = asyncio.create_task(self._close_slow(), name=f"cut-off-{self.id}")

    async def _close_slow(self) -> None:
        transport = self._transport
        if transport is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(SLOW_CLOSE_SECONDS, _drop_if_unread, transport, self.id)
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            await asyncio.wait_for(
                self.ws.close(
                    code=CloseCode.SLOW_CONSUMER, message=self._close_reason.encode(), drain=False
                ),
                SLOW_CLOSE_SECONDS,
            )

    @property
    def prefix(self) -> bytes:
        """What goes in front of a shared body: ``{"sid":"<id>``. Made per write, not
        kept: a few bytes less on every idle socket."""
        return protocol.with_sid(self.id, "").encode()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def ping(self) -> bool:
        """Write a WebSocket ping (behind what is already written); False if it cannot be."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._closing is not None:
            return False
        transport.write(PING_FRAME)
        return True

    def abort(self) -> None:
        """Drop the connection at once (its peer is dead): nothing queued is kept."""
        self._lost()
        if self._transport is not None:
            self._transport.abort()

    @property
    def closing(self) -> bool:
        return self._closing is not None

    @property
    def close_code(self) -> CloseCode | None:
        return self._closing

    def _lost(self) -> None:
        """The connection is gone: drop what is queued and end every wait on this socket."""
        if self._closing is None:
            self._closing = CloseCode.GOING_AWAY
            self._close_reason = "connection lost"
        self._drop_queue()
        if self._room is not None:
            self._room.set()

    async def finished(self, within: float) -> None:
        """Wait at most ``within`` seconds for the writer (or a slow consumer's cut-off)."""
        if self._writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._writer), within)

    async def flush_and_close(self, code: CloseCode, reason: str) -> None:
        self.close(code, reason)
        if self._writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout=2)


UNCOUNTED = Counts()


def _drop_if_unread(transport: asyncio.Transport, sid: str) -> None:
    if transport.get_write_buffer_size():
        log.info("slow consumer dropped sid=%s unread=%d", sid, transport.get_write_buffer_size())
        transport.abort()


class Hub:
    """Local registry of sockets and chat channels, fed by the broker."""

    def __init__(self, broker: Broker, budget: SendBudget | None = None) -> None:
        self.broker = broker
        self.budget = budget or SendBudget(None)
        self.sockets: dict[str, Socket] = {}
        # Each channel's members: a dict used as a set (at 10,000 members a set's
        # table is about twice a dict's, per member).
        self._members: dict[ChannelKey, dict[Socket, None]] = {}
        # Serializes broker (un)subscriptions so a join and the last leave of
        # one channel cannot interleave and leave it silently unsubscribed.
        self._subscriptions = asyncio.Lock()

    def add(self, socket: Socket) -> None:
        self.sockets[socket.id] = socket

    async def remove(self, socket: Socket) -> None:
        self.sockets.pop(socket.id, None)
        for name in list(socket.channels):
            if not protocol.is_db_channel(name):
                await self.leave(socket, name)
        socket.channels.clear()

    async def join(
        self, socket: Socket, name: str, admit: Callable[[], None] | None = None
    ) -> None:
        """Add a member, subscribing the broker first if the channel is new here.

        ``admit`` re-checks the socket's right to join after the broker round
        trip (its session may have expired meanwhile); it raises to refuse.
        Invariant: a channel key exists exactly while the broker is subscribed.
        """
        key = (socket.app_id, name)
        if key not in self._members:
            async with self._subscriptions:
                if key not in self._members:
                    await self.broker.subscribe(socket.app_id, name)
                    self._members[key] = {}
        try:
            if admit is not None:
                admit()
        except Exception:
            await self._drop_if_empty(key)
            raise
        self._members[key][socket] = None
        # One string for the name however many sockets join it.
        socket.channels.add(sys.intern(name))

    async def leave(self, socket: Socket, name: str) -> None:
        key = (socket.app_id, name)
        socket.channels.discard(name)
        members = self._members.get(key)
        if members is not None:
            members.pop(socket, None)
            await self._drop_if_empty(key)

    async def _drop_if_empty(self, key: ChannelKey) -> None:
        if self._members.get(key):
            return
        async with self._subscriptions:
            if key in self._members and not self._members[key]:
                del self._members[key]
                try:
                    await self.broker.unsubscribe(*key)
                except BrokerError as err:
                    # Messages for a channel without members are dropped on delivery.
                    log.warning(
                        "broker unsubscribe failed channel=%s error=%s", clean(key[1]), clean(err)
                    )

    async def publish(self, app_id: str, channel: str, data: str) -> None:
        await self.broker.publish(app_id, channel, data)

    def deliver(self, app_id: str, channel: str, data: str) -> None:
        """Called by the broker for every message on a channel this process follows."""
        members = self._members.get((app_id, channel))
        if members:
            tail = protocol.encode_tail("chan_out", data, channel)
            send_to(members, tail)

    async def close_all(self, code: CloseCode, reason: str) -> None:
        sockets = list(self.sockets.values())
        await asyncio.gather(*(s.flush_and_close(code, reason) for s in sockets))


def send_to(sockets: Iterable[Socket], tail: str) -> None:
    """Queue one shared frame on each socket: one encoded body, each socket's sid in front."""
    body = Body(tail)
    for s in sockets:
        s.send_shared(body)
