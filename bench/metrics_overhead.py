"""What counting costs per frame: relay's plain counters vs prometheus-client's.

    python bench/metrics_overhead.py

Prints nanoseconds per frame for the write path's count (``Counts.sent``,
which reads the frame type in place), the receive path's (``Counts.received``)
and, for comparison, a prometheus-client ``Counter`` with a ``type`` label.

Then the relay's own write path end to end (``Socket.send`` -> queue -> the
writer task), into a sink that costs nothing, with counting and without: an
upper bound on the share counting takes (a real socket write costs far more).
"""

from __future__ import annotations

import asyncio
import time
import timeit
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from relay import protocol
from relay.hub import Socket
from relay.metrics import Counts

N = 1_000_000
SID = "6f1c2a4e-8d7b-4c1e-9a55-0c3e2b1d9f00"


def per_call_ns(stmt: object, number: int = N) -> float:
    best = min(timeit.repeat(stmt, number=number, repeat=5))  # type: ignore[arg-type]
    return best / number * 1e9


def main() -> None:
    counts = Counts()
    frame = protocol.encode(SID, "chan_out", "hello", "lobby")
    labelled = Counter("frames", "frames", ["type"], registry=CollectorRegistry())
    child = labelled.labels("x")
    baseline = per_call_ns(lambda: None)
    rows = [
        ("Counts.sent(frame)  [write path]", per_call_ns(lambda: counts.sent(frame))),
        ("Counts.received(type)  [read path]", per_call_ns(lambda: counts.received("chan_in"))),
        ("prometheus Counter.labels(t).inc()", per_call_ns(lambda: labelled.labels("x").inc())),
        ("prometheus child.inc() (pre-bound)", per_call_ns(lambda: child.inc())),
    ]
    print(f"empty call: {baseline:.0f} ns (subtracted below)")
    for name, ns in rows:
        print(f"{name:40s} {ns - baseline:6.0f} ns/frame")


class Sink:
    """Stands in for the WebSocket: accepts every frame at no cost."""

    async def send_str(self, text: str) -> None:
        return None

    async def close(self, **_: Any) -> None:
        return None


class NoCounts(Counts):
    def sent(self, text: str) -> None:
        return None


async def write_path(counts: Counts, frames: int = 200_000, batch: int = 500) -> float:
    """Seconds per frame through Socket.send and its writer task."""
    socket = Socket(Sink(), "default", queue_limit=batch * 2)  # type: ignore[arg-type]
    socket.counts = counts
    socket.start()
    frame = protocol.encode(socket.id, "chan_out", "hello", "lobby")
    started = time.perf_counter()
    for _ in range(frames // batch):
        for _ in range(batch):
            socket.send(frame)
        socket._drained.clear()
        await socket._drained.wait()
    elapsed = time.perf_counter() - started
    await socket.flush_and_close(protocol.CloseCode.GOING_AWAY, "")
    return elapsed / frames


async def end_to_end() -> None:
    with_counts, without = [], []
    for _ in range(5):  # interleaved, best of five each
        with_counts.append(await write_path(Counts()))
        without.append(await write_path(NoCounts()))
    a, b = min(with_counts) * 1e9, min(without) * 1e9
    print(f"write path, counted      {a:6.0f} ns/frame")
    share = f"{a - b:+.0f} ns, {100 * (a - b) / b:+.1f}%"
    print(f"write path, not counted  {b:6.0f} ns/frame  (counting: {share})")
    real = await real_send_str()
    print(f"for scale: one aiohttp send_str to a loopback client {real:6.0f} ns/frame")


async def real_send_str(frames: int = 20_000) -> float:
    """Nanoseconds one ``WebSocketResponse.send_str`` takes on loopback (server side)."""
    import aiohttp
    from aiohttp import web

    timing: list[float] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frame = protocol.encode(SID, "chan_out", "hello", "lobby")
        started = time.perf_counter()
        for _ in range(frames):
            await ws.send_str(frame)
        timing.append(time.perf_counter() - started)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/") as ws:
        async for _ in ws:
            pass
    await runner.cleanup()
    return timing[0] / frames * 1e9


if __name__ == "__main__":
    main()
    asyncio.run(end_to_end())
