"""What the relay holds for sockets to read: shared frame bodies and the process-wide budget.

A frame fanned out to many sockets differs between them only in its ``sid``;
its :class:`Body` (everything after ``{"sid":"<sid>``, encoded once) is queued
by reference on each socket, and the socket's own prefix is put in front of it
when the frame is written. A queued body is counted once in the
:class:`SendBudget`, however many sockets hold it; a frame for one socket
alone (a reply) is counted as itself.

Each socket's queue has its own cap (frames and bytes, counting shared bodies
in full); the budget caps the sum over all sockets. When a frame would take
the sum over the budget, the sockets with the biggest queues are cut first
(close 4001, their queues dropped) until it fits.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import uuid
from typing import TYPE_CHECKING

from relay.protocol import CloseCode, with_sid

if TYPE_CHECKING:
    from relay.hub import Socket

log = logging.getLogger("relay.ws")

OVER_BUDGET = "slow consumer: the server's send buffers are full"


class Body:
    """One encoded frame tail (see :func:`relay.protocol.encode_tail`), shared by sockets.

    ``header`` is the WebSocket frame header of the whole frame: every socket's
    prefix has the same length (its sid is a UUID), so it is computed once.
    """

    __slots__ = ("data", "header", "refs", "written")

    def __init__(self, tail: str) -> None:
        self.data = tail.encode()
        self.header = frame_header(PREFIX_LENGTH + len(self.data))
        self.refs = 0  # how many socket queues hold it
        self.written = 0  # to how many sockets it was written (counted when the last lets go)


class SendBudget:
    """Bytes queued for all sockets of the process; ``limit`` None: no cap."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or None
        self.total = 0
        # Sockets with a non-empty queue: the candidates when the budget is exceeded.
        self.holders: set[Socket] = set()
        self.flusher = Flusher()

    def make_room(self, extra: int) -> None:
        """Cut the biggest queues until ``extra`` more bytes fit within the limit."""
        limit = self.limit
        if limit is None or self.total + extra <= limit:
            return
        for victim in sorted(self.holders, key=lambda s: s.queued_bytes, reverse=True):
            if self.total + extra <= limit:
                return
            log.warning(
                "send budget exceeded sid=%s queued=%d total=%d limit=%d",
                victim.id,
                victim.queued_bytes,
                self.total,
                limit,
            )
            victim.close(CloseCode.SLOW_CONSUMER, OVER_BUDGET)


# Every socket's frame prefix, ``{"sid":"<uuid>``, is this long.
PREFIX_LENGTH = len(with_sid(str(uuid.UUID(int=0)), ""))
# Bytes of frames joined into one transport write.
WRITE_CHUNK = 64 * 1024
_SMALL_HEADERS = [bytes((0x81, n)) for n in range(126)]


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final WebSocket text frame of ``length`` bytes."""
    if length < 126:
        return _SMALL_HEADERS[length]
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


class Flusher:
    """Sockets with frames queued in this loop turn, written together at its end.

    A fan-out only appends to queues; each socket is written once per turn,
    however many frames it got, so a burst of messages costs one transport
    write per socket rather than one per frame.
    """

    def __init__(self) -> None:
        self._pending: list[Socket] = []
        self._scheduled = False
        # Set when some queue got past half its cap (or the budget past half
        # its limit) in this turn: a long dispatch should let the flush run now.
        self.pressed = False

    def add(self, socket: Socket) -> None:
        self._pending.append(socket)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.pressed = False
        pending, self._pending = self._pending, []
        for socket in pending:
            socket.flush()
