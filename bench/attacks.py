"""Hostile clients against a relay process: what they cost it (issue 8's figures).

Each attack gets a fresh relay (relay.server.create_app in its own process on
an embedded PostgreSQL, loopback only, bounded in time) and is measured from
/proc/<relay pid>/status (VmRSS now, VmHWM the peak) and the relay process's
CPU seconds:

  preauth   N unauthenticated connections each send the head of a 4 MiB text frame
            and all of it but the last byte, then wait (``--hold`` seconds). Reported:
            the relay's RSS before, its peak, and at the end of the hold; how many
            connections the relay closed or refused.
  deflate   ``--senders`` clients offer permessage-deflate and send frames of ~4 KB
            that inflate to ~4 MiB, one at a time (each waits for the reply), for
            ``--seconds``, reconnecting when refused; meanwhile an innocent client
            times echo round trips. Reported: connections that got deflate, bytes
            sent, frames the relay accepted (and what they inflated to), relay CPU
            seconds (in all and per MB sent), and the innocent echo's p50/p90/max.
  slow      ``--stalled`` sockets join a channel and never read again; a sender
            publishes ``--messages`` chat messages of 200 KB. Reported: the relay's
            RSS before, its peak, and after the hold.

Run it on two checkouts to compare (the figures in CHANGELOG.md came from it):

    . .venv/bin/activate
    python bench/attacks.py                      # all three, about two minutes
    python bench/attacks.py --only deflate --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import struct
import time
import zlib
from pathlib import Path

import aiohttp
from _common import (
    RelayProcess,
    embedded_pg,
    machine_header,
    percentile,
    pg_version,
    print_table,
    quiet_logs,
    token,
)

MIB = 1024 * 1024
FRAME = 4 * MIB  # the relay's connection-wide frame limit


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


class Raw:
    """A hand-written WebSocket client (masked frames, any header bits)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.head = ""

    @classmethod
    async def connect(cls, port: int, extensions: str = "") -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if extensions:
            head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        writer.write((head + "\r\n").encode())
        c = cls(reader, writer)
        c.head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        return c

    @staticmethod
    def frame(payload: bytes, length: int = -1, rsv1: bool = False) -> bytes:
        n = len(payload) if length < 0 else length
        first = 0x80 | (0x40 if rsv1 else 0) | 0x1
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        # A zero mask is a valid mask (and spares masking megabytes in Python).
        return head + b"\0\0\0\0" + payload

    async def read(self, within: float = 10) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), within)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), within)

    async def send_json(self, **fields: str) -> None:
        self.writer.write(self.frame(json.dumps(fields).encode()))
        await self.writer.drain()

    async def json(self) -> dict[str, str]:
        while True:
            opcode, payload = await self.read()
            if opcode == 1:
                frame: dict[str, str] = json.loads(payload)
                return frame
            if opcode == 8:
                raise ConnectionError("closed")

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- preauth


async def preauth(relay: RelayProcess, count: int, hold: float) -> list[str]:
    pid = relay.proc.pid
    assert pid is not None
    before = proc_status(pid)
    clients: list[Raw] = []
    refused = 0
    for _ in range(count):
        try:
            c = await Raw.connect(relay.port)
            _, payload = await c.read()
            if b'"init"' not in payload:
                refused += 1
                c.close()
                continue
            clients.append(c)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            refused += 1
    chunk = b"x" * (256 * 1024)

    async def feed(c: Raw) -> bool:
        """All but the last byte of a 4 MiB frame; False if the relay hung up."""
        try:
            c.writer.write(c.frame(b"", length=FRAME - 64))
            left = FRAME - 64 - 1
            while left > 0:
                c.writer.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
                await asyncio.wait_for(c.writer.drain(), 30)
            return True
        except (OSError, TimeoutError):
            return False

    fed = await asyncio.gather(*(feed(c) for c in clients))
    sent = proc_status(pid)
    await asyncio.sleep(hold)  # the attack: holding what was sent
    after = proc_status(pid)
    open_at_end = 0
    for c in clients:
        # A connection the relay closed has a close frame or EOF waiting.
        try:
            await asyncio.wait_for(c.reader.read(1), 0.05)
        except TimeoutError:
            open_at_end += 1
        except OSError:
            pass
        c.close()
    return [
        f"preauth x{count}",
        mib(before["VmRSS"]),
        mib(sent["VmRSS"]),
        mib(after["VmHWM"]),
        mib(after["VmRSS"]),
        f"{sum(fed)}/{len(clients)}",
        str(refused),
        str(open_at_end),
    ]


# --------------------------------------------------------------------------- deflate


def deflated_echo() -> tuple[bytes, int]:
    """A masked, compressed text frame inflating to ~4 MiB of echo JSON; and its size inflated."""
    text = json.dumps({"type": "echo", "data": "x" * (FRAME - 100)}).encode()
    z = zlib.compressobj(wbits=-15)
    body = z.compress(text) + z.flush(zlib.Z_SYNC_FLUSH)
    body = body[:-4] if body.endswith(b"\x00\x00\xff\xff") else body
    return Raw.frame(body, rsv1=True), len(text)


async def deflate(relay: RelayProcess, senders: int, seconds: float) -> list[str]:
    frame, inflated = deflated_echo()
    stop = time.monotonic() + seconds
    stats = {"sent": 0, "accepted": 0, "connections": 0, "negotiated": 0}

    async def attacker() -> None:
        while time.monotonic() < stop:
            try:
                c = await Raw.connect(relay.port, "permessage-deflate")
                stats["connections"] += 1
                stats["negotiated"] += "permessage-deflate" in c.head.lower()
                await c.read()  # init (compressed, where deflate was negotiated)
                while time.monotonic() < stop:
                    c.writer.write(frame)
                    await c.writer.drain()
                    stats["sent"] += len(frame)
                    opcode, _ = await c.read()
                    if opcode == 8:  # refused
                        break
                    stats["accepted"] += 1  # an answer: the relay inflated the frame to read it
                c.close()
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass

    rtts: list[float] = []

    async def innocent() -> None:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(relay.ws_url, heartbeat=None)
            await ws.receive()
            while time.monotonic() < stop:
                t0 = time.monotonic()
                await ws.send_str(json.dumps({"type": "echo", "data": "ping"}))
                await ws.receive(timeout=30)
                rtts.append((time.monotonic() - t0) * 1000)
                await asyncio.sleep(0.02)
            await ws.close()

    cpu0 = relay.cpu()
    await asyncio.gather(innocent(), *(attacker() for _ in range(senders)))
    cpu = relay.cpu() - cpu0
    rtts.sort()
    return [
        f"deflate x{senders} {seconds:g}s",
        f"{stats['negotiated']}/{stats['connections']}",
        f"{stats['sent'] / 1e6:.1f} MB",
        f"{stats['accepted']} ({stats['accepted'] * inflated / MIB:.0f} MiB)",
        f"{cpu:.1f} s",
        f"{cpu / max(stats['sent'] / 1e6, 1e-9):.2f} s",
        f"{percentile(rtts, 50):.1f}",
        f"{percentile(rtts, 90):.1f}",
        f"{rtts[-1]:.1f}" if rtts else "-",
    ]


# --------------------------------------------------------------------------- slow consumers


async def slow(relay: RelayProcess, stalled: int, messages: int, hold: float) -> list[str]:
    pid = relay.proc.pid
    assert pid is not None
    before = proc_status(pid)
    room = "bench-room"
    quiet: list[Raw] = []
    for i in range(stalled):
        c = await Raw.connect(relay.port)
        await c.json()  # init
        await c.send_json(type="auth", data=token(f"s{i}", "1"))
        socket_token = (await c.json())["data"]
        await c.send_json(type="join", data=room, token=socket_token)
        await c.json()  # joined; from here on this one never reads
        quiet.append(c)
    payload = "y" * (200 * 1000)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(relay.ws_url, heartbeat=None, max_msg_size=0)
        await ws.receive()
        await ws.send_str(json.dumps({"type": "auth", "data": token("sender", "1")}))
        sender_token = json.loads((await ws.receive()).data)["data"]
        await ws.send_str(json.dumps({"type": "join", "data": room, "token": sender_token}))
        await ws.receive()
        t0 = time.monotonic()
        for i in range(messages):
            frame = {"type": "chan_in", "channel": room, "token": sender_token}
            await ws.send_str(json.dumps({**frame, "data": f"{i}-{payload}"}))
            kinds = set()
            while "chan_out" not in kinds:  # its "ok" and its own copy
                kinds.add(json.loads((await ws.receive(timeout=30)).data)["type"])
        published = time.monotonic() - t0
        sent = proc_status(pid)
        await asyncio.sleep(hold)
        after = proc_status(pid)
        await ws.close()
    for c in quiet:
        c.close()
    return [
        f"slow x{stalled}, {messages} x 200 KB",
        mib(before["VmRSS"]),
        mib(sent["VmRSS"]),
        mib(after["VmHWM"]),
        mib(after["VmRSS"]),
        f"{published:.1f} s",
    ]


# --------------------------------------------------------------------------- main


async def run_attack(name: str, url: str, args: argparse.Namespace) -> list[list[str]]:
    rows = []
    sizes = args.preauth if name == "preauth" else [0]
    for size in sizes:
        relay = RelayProcess(url)
        relay.start()
        try:
            if name == "preauth":
                rows.append(await preauth(relay, size, args.hold))
            elif name == "deflate":
                rows.append(await deflate(relay, args.senders, args.seconds))
            else:
                rows.append(await slow(relay, args.stalled, args.messages, args.slow_hold))
        finally:
            relay.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["preauth", "deflate", "slow"], action="append")
    parser.add_argument("--preauth", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--hold", type=float, default=15.0, help="preauth: seconds held")
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stalled", type=int, default=50)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--slow-hold", type=float, default=5.0)
    args = parser.parse_args()
    quiet_logs()
    attacks = args.only or ["preauth", "deflate", "slow"]
    with embedded_pg() as pg:
        print(machine_header("attacks", asyncio.run(pg_version(pg.url))))
        results = {name: asyncio.run(run_attack(name, pg.url, args)) for name in attacks}
    print()
    if "preauth" in results:
        print(f"pre-auth memory (hold {args.hold:g} s):")
        print_table(
            ["attack", "RSS before", "RSS sent", "peak", "RSS end", "sent all", "refused", "open"],
            results["preauth"],
        )
        print()
    if "deflate" in results:
        print("permessage-deflate (innocent echo RTT in ms):")
        print_table(
            [
                "attack",
                "negotiated",
                "sent",
                "inflated",
                "relay CPU",
                "per MB",
                "p50",
                "p90",
                "max",
            ],
            results["deflate"],
        )
        print()
    if "slow" in results:
        print(f"slow consumers (hold {args.slow_hold:g} s):")
        print_table(
            ["attack", "RSS before", "RSS sent", "peak", "RSS end", "publish"], results["slow"]
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
