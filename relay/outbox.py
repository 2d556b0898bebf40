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

import logging
from typing import TYPE_CHECKING

from relay.protocol import CloseCode

if TYPE_CHECKING:
    from relay.hub import Socket

log = logging.getLogger("relay.ws")

OVER_BUDGET = "slow consumer: the server's send buffers are full"


class Body:
    """One encoded frame tail (see :func:`relay.protocol.encode_tail`), shared by sockets."""

    __slots__ = ("data", "refs")

    def __init__(self, tail: str) -> None:
        self.data = tail.encode()
        self.refs = 0  # how many socket queues hold it


class SendBudget:
    """Bytes queued for all sockets of the process; ``limit`` None: no cap."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or None
        self.total = 0
        # Sockets with a non-empty queue: the candidates when the budget is exceeded.
        self.holders: set[Socket] = set()

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
