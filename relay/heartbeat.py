"""The heartbeat: one loop for the process finds the peers that have gone silent.

aiohttp's own heartbeat (``WebSocketResponse(heartbeat=...)``) keeps a timer
per socket, re-armed after every read, with its context and two bound methods:
some four hundred bytes on every idle socket. The kernel already knows when
each TCP connection last received data (``TCP_INFO``'s ``last_data_recv``), so
on Linux one round every ``interval / 2`` seconds does the same for all sockets:

- a socket pinged in the previous round that has received nothing since is
  dead: its connection is aborted (as aiohttp's heartbeat does, without a close
  handshake that nobody would answer);
- a socket that has received nothing for ``interval`` seconds gets a ping
  (any data counts as a sign of life, the pong or a frame).

A silent peer is found between 1.5 and 2 intervals after its last data
(aiohttp's: 1.5). Where ``TCP_INFO`` is not available (another OS, a socket
that is not TCP), the socket gets aiohttp's per-socket heartbeat instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket as _socket
import struct
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.hub import Socket

log = logging.getLogger("relay.ws")

# An unmasked WebSocket ping frame with no payload.
PING_FRAME = b"\x89\x00"
# struct tcp_info (linux/tcp.h): __u32 tcpi_last_data_recv, in milliseconds, at byte 52.
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_AT = 52
_TCP_INFO_SIZE = 104
_TCP_INFO: int | None = getattr(_socket, "TCP_INFO", None) if sys.platform == "linux" else None
# Sockets looked at between two yields to the event loop within one round.
ROUND_SLICE = 2000


def idle_seconds(transport: asyncio.BaseTransport | None) -> float | None:
    """Seconds since the connection last received data; None if the kernel cannot say."""
    if _TCP_INFO is None or transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(_socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _LAST_DATA_RECV_AT + 4:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)[0]) / 1000.0


def watches(transport: asyncio.BaseTransport | None) -> bool:
    """Whether :class:`Heartbeat` can watch this connection (else: aiohttp's heartbeat)."""
    return idle_seconds(transport) is not None


class Heartbeat:
    """Pings the quiet sockets among ``sockets()``, every ``interval / 2`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last_round: float | None = None

    async def run(self, sockets: Iterable[Socket]) -> None:
        """Run rounds for ever over ``sockets`` (re-read every round: the hub's dict values)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval / 2)
            await self.round(list(sockets), loop.time())

    async def round(self, sockets: list[Socket], now: float) -> None:
        """One round: abort the sockets that stayed silent since their ping, ping the quiet."""
        since_last = now - self._last_round if self._last_round is not None else None
        self._last_round = now
        for start in range(0, len(sockets), ROUND_SLICE):
            if start:
                await asyncio.sleep(0)
            for s in sockets[start : start + ROUND_SLICE]:
                self._check(s, since_last)

    def _check(self, s: Socket, since_last: float | None) -> None:
        if s.closing:
            return
        idle = idle_seconds(s.transport)
        if idle is None:
            return  # not ours (aiohttp's heartbeat), or already gone
        if s.pinged:
            s.pinged = False
            # Data after the ping would make idle at most since_last (give or take
            # the kernel's clock tick); none since means at least interval more.
            if since_last is not None and idle > since_last + self.interval / 2:
                log.info("heartbeat timeout sid=%s idle=%.1f", s.id, idle)
                s.abort()
                return
        if idle >= self.interval:
            s.pinged = s.ping()
