"""A minimal WebSocket client on ``asyncio.Protocol``, cheap enough to be a load generator.

aiohttp's client costs some 10-20 us per received frame; on a 2-core machine that
makes the load generator, not the server, the bottleneck. This client does only
what a benchmark needs:

- the HTTP/1.1 upgrade (optionally offering permessage-deflate exactly as browsers do:
  ``Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits``);
- masked client frames (a zero mask key: valid, and free to apply);
- unmasked server frames with 2/4/10-byte headers, several frames per read and frames
  split across reads, fragmented messages, compressed messages (RSV1) inflated with
  ``zlib.decompressobj(-15)`` when deflate was negotiated (context takeover honoured);
- pings answered with pongs, close frames noted.

Received text/binary messages go to :attr:`WsClient.handler` (``handler(payload, now)``,
``now`` = ``time.monotonic()`` when the read that completed the frame arrived), or, while
no handler is set, to a queue read by :meth:`WsClient.recv`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, cast

Handler = Callable[[bytes, float], None]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_TAIL = b"\x00\x00\xff\xff"
_ZERO_MASK = b"\x00\x00\x00\x00"


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame (zero mask key)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


class WsClient(asyncio.Protocol):
    def __init__(self, host: str, port: int, path: str, deflate: bool) -> None:
        self.host, self.port, self.path, self.offer_deflate = host, port, path, deflate
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.handler: Handler | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.deflate = False  # negotiated
        self.close_code = 0
        self._inflater: zlib._Decompress | None = None
        self._reset_inflater = False  # server_no_context_takeover
        self._head = b""
        self._buf = b""
        self._frag: list[bytes] = []
        self._frag_rsv1 = False

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str = "/ws",
        *,
        deflate: bool = False,
        within: float = 30.0,
    ) -> WsClient:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: cls(host, port, path, deflate), host, port), within
        )
        await asyncio.wait_for(proto.upgraded, within)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if self.offer_deflate:
            head += f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n"
        self.transport.write((head + "\r\n").encode())

    def _handshake(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, rest = self._head[:end].decode("latin-1"), self._head[end + 4 :]
        self._head = b""
        lines = head.split("\r\n")
        if " 101 " not in lines[0] + " ":
            self.upgraded.set_exception(ConnectionError(f"upgrade refused: {lines[0]}"))
            assert self.transport is not None
            self.transport.close()
            return b""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                self.deflate = True
                self._inflater = zlib.decompressobj(-15)
                self._reset_inflater = "server_no_context_takeover" in value
        self.upgraded.set_result(None)
        return rest

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.upgraded.done():
            data = self._handshake(data)
            if not data:
                return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos, size = 0, len(data)
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + n
            if end > size:
                break
            self._frame(b0, data[start:end], now)
            pos = end
        if pos < size:
            self._buf = data[pos:]

    def _frame(self, b0: int, payload: bytes, now: float) -> None:
        opcode = b0 & 0x0F
        if opcode >= OP_CLOSE:
            if opcode == OP_PING:
                self.send(payload, OP_PONG)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close()
            return
        fin = b0 & 0x80
        if opcode == OP_CONT or not fin:
            if opcode != OP_CONT:
                self._frag_rsv1 = bool(b0 & 0x40)
            self._frag.append(payload)
            if not fin:
                return
            payload, self._frag = b"".join(self._frag), []
            compressed = self._frag_rsv1
        else:
            compressed = bool(b0 & 0x40)
        if compressed and self._inflater is not None:
            payload = self._inflater.decompress(payload + _TAIL)
            if self._reset_inflater:
                self._inflater = zlib.decompressobj(-15)
        handler = self.handler
        if handler is not None:
            handler(payload, now)
        else:
            self.queue.put_nowait(payload)

    async def recv(self, within: float = 30.0) -> bytes:
        """The next message (only while no handler is set)."""
        get = asyncio.ensure_future(self.queue.get())
        waiting: set[asyncio.Future[Any]] = {get, self.closed}
        done, _ = await asyncio.wait(waiting, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self.closed.done():
            raise ConnectionError(f"socket closed (code {self.close_code})")
        raise TimeoutError(f"no message within {within} s")

    # ------------------------------------------------------------------ writing, closing

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(payload, opcode))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(struct.pack("!H", 1000), OP_CLOSE))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code or 1006)
