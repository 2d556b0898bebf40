"""The same-run baselines: bare aiohttp WebSocket servers in their own process.

``chat``  every connection to ``/ws`` is a member of one channel (no auth, no protocol);
          each text message received from any member is sent to every member with
          ``for ws in members: await ws.send_str(msg)``, one ``send_str`` per member.
``db``    an asyncpg connection LISTENs to a per-row ``pg_notify(row_to_json(NEW))``
          trigger's channel (:func:`_common.create_notify_table`); every connection to
          ``/ws?account=A`` is a subscriber of account A; for every notification the
          server decodes the row and loops over all its subscribers, checking each
          one's account naively, and sends one frame to each that matches.

Both use aiohttp's defaults for ``web.WebSocketResponse()``: no heartbeat and
``compress=True``, so permessage-deflate is negotiated whenever a client offers it
(and every frame is then compressed once per member).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
from typing import Any

from _common import free_port, quiet_logs, raise_fd_limit

NOTIFY_CHANNEL = "bench_db_rows"


def _server_main(mode: str, port: int, pg_url: str, repo: str, conn: Any) -> None:
    quiet_logs()
    raise_fd_limit()
    import orjson
    from aiohttp import WSMsgType, web

    members: list[web.WebSocketResponse] = []
    subscribers: list[tuple[web.WebSocketResponse, str]] = []

    async def chat(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        members.append(ws)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    for m in tuple(members):
                        with contextlib.suppress(ConnectionError, RuntimeError):
                            await m.send_str(msg.data)
        finally:
            members.remove(ws)
        return ws

    async def db(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        entry = (ws, request.query.get("account", ""))
        subscribers.append(entry)
        try:
            async for _ in ws:
                pass
        finally:
            subscribers.remove(entry)
        return ws

    async def fan_out(queue: asyncio.Queue[str]) -> None:
        channel = f"db-{repo}"
        while True:
            payload = await queue.get()
            account = orjson.loads(payload)["account_id"]
            frame = orjson.dumps(
                {"sid": "", "type": "db_created", "data": payload, "channel": channel, "token": ""}
            ).decode()
            for ws, acct in tuple(subscribers):
                if acct == account:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_str(frame)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/ws", chat if mode == "chat" else db)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        task = None
        pg = None
        if mode == "db":
            import asyncpg

            queue: asyncio.Queue[str] = asyncio.Queue()
            pg = await asyncpg.connect(pg_url)
            await pg.add_listener(NOTIFY_CHANNEL, lambda *a: queue.put_nowait(a[3]))
            task = asyncio.create_task(fan_out(queue))
        conn.send("ready")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)
        await stop.wait()
        if task is not None:
            task.cancel()
        if pg is not None:
            await pg.close()
        for ws in [*members, *(s for s, _ in subscribers)]:
            with contextlib.suppress(Exception):
                await ws.close()
        await runner.cleanup()

    asyncio.run(main())


class BaselineProcess:
    """A bare aiohttp server (``mode`` chat or db) on 127.0.0.1:<free port>, spawned."""

    def __init__(self, mode: str, pg_url: str = "", repo: str = "") -> None:
        self.mode = mode
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_server_main, args=(mode, self.port, pg_url, repo, child), daemon=True
        )

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> None:
        self.proc.start()
        if not self._conn.poll(timeout):
            raise RuntimeError("baseline server did not start")
        self._conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
