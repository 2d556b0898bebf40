"""One helper per job, shared by the test modules.

- ``insert``: one row into a repository table, returning its id.
- ``collect``: exactly N frames (a known count, never "until quiet").
- ``read_until_closed``: every text frame up to the close, and the close code.
- ``eventually``: poll a check (sync or async) until it holds, with a deadline.
- ``sockets_open`` / ``wait_for_sockets``: what ``/healthz`` reports.
- ``readyz``: what ``/readyz`` answers (status and body).
- ``wait_healthy``: a relay started as a process answers ``/healthz``.
- ``assert_echoes``: a socket still serves.
- ``new_app``: an app (tenant) with a fresh plan, through ``relay.plans``.
- ``run_cli`` / ``relay_cli``: the ``relay`` command as a subprocess (blocking / async).
- ``listener_sleeping``: the relay's listener has gone to sleep (asks writers for NOTIFY).
- ``redis_subscribers``: how many relay processes follow a chat channel on Redis.
- ``redis_clients``: how many connections Redis has open.
- ``require``: skip where a tool is missing, but fail under CI.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import WSMsgType

from relay import plans

CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
CLI = [sys.executable, "-m", "relay.cli"]


async def insert(
    db: asyncpg.Connection,
    name: str,
    owner: str | None,
    account: str | None,
    n: int = 0,
    **data: Any,
) -> str:
    """Insert one row (``data`` = ``{"n": n, **data}``) and return its id as text."""
    row_id: str = await db.fetchval(
        f"INSERT INTO {name} (owner_id, account_id, data) VALUES ($1, $2, $3::jsonb)"
        " RETURNING id::text",
        owner,
        account,
        json.dumps({"n": n, **data}),
    )
    return row_id


async def collect(c: Any, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Exactly ``count`` frames from a WsClient (each within ``timeout`` seconds)."""
    return [await c.recv(timeout=timeout) for _ in range(count)]


def ids_of(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(type, row id) of database frames."""
    return [(f["type"], json.loads(f["data"])["id"]) for f in frames]


async def read_until_closed(
    c: Any, timeout: float = 20.0, limit: int = 100_000
) -> tuple[list[dict[str, Any]], int | None]:
    """Every text frame up to the close, and the close code (a WsClient or a raw aiohttp ws)."""
    ws = getattr(c, "ws", c)
    frames: list[dict[str, Any]] = []
    for _ in range(limit):
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type is WSMsgType.TEXT:
            frames.append(json.loads(msg.data))
        elif msg.type in CLOSED:
            code = msg.data if msg.type is WSMsgType.CLOSE else ws.close_code
            return frames, code
    raise AssertionError(f"no close after {limit} frames")


async def eventually(
    check: Callable[[], Any], timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Poll ``check`` (a function, sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.05)


async def healthz(http_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(http_url + "/healthz") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def readyz(r: Any) -> tuple[int, dict[str, Any]]:
    """What ``/readyz`` answers: its status and its body."""
    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def sockets_open(r: Any) -> int:
    count: int = (await healthz(r.http_url))["sockets"]
    return count


async def wait_for_sockets(r: Any, count: int, timeout: float = 15.0) -> None:
    """Poll /healthz until the relay reports ``count`` connected sockets."""

    async def check() -> bool:
        return await sockets_open(r) == count

    await eventually(check, timeout, what=f"{count} sockets open")


async def wait_healthy(
    url: str, proc: Any = None, timeout: float = 120.0, log: Callable[[], str] | None = None
) -> None:
    """Poll ``url`` (a /healthz) until it answers 200; fail at once if ``proc`` exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            code = proc.returncode if hasattr(proc, "returncode") else None
            if proc is not None and hasattr(proc, "poll"):
                code = proc.poll()
            assert code is None, f"relay exited early ({code}):\n{log() if log else ''}"
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() > deadline:
                raise AssertionError(f"no answer from {url} in {timeout}s:\n{log() if log else ''}")
            await asyncio.sleep(0.1)


async def assert_echoes(c: Any, text: str = "still here") -> None:
    await c.send(type="echo", data=text)
    assert (await c.expect("echo"))["data"] == "echo: " + text


async def new_app(
    db: asyncpg.Connection, origins: tuple[str, ...] = (), **plan_caps: int | None
) -> plans.AppRecord:
    """An app with its own fresh plan (``max_connections=None`` etc. for the plan's caps)."""
    suffix = secrets.token_hex(4)
    plan_caps.setdefault("max_connections", None)
    plan = await plans.create_plan(db, f"plan-{suffix}", **plan_caps)
    return await plans.create_app(db, f"app-{suffix}", plan=plan.name, origins=origins)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a ``relay`` subprocess: this one without RELAY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.pop("DATABASE_URL", None)
    return env | extra


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``relay ARGS`` to completion (blocking; see ``relay_cli`` in async tests)."""
    return subprocess.run(
        [*CLI, *args],
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def relay_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``run_cli`` in a thread, so the event loop (and any relay in it) keeps serving."""
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


async def listener_sleeping(db: asyncpg.Connection, timeout: float = 15.0) -> None:
    """Wait until every relay listener has gone to sleep: from now on only a
    NOTIFY (or the safety poll) wakes it."""

    async def check() -> bool:
        rows = await db.fetch(
            # Flagged asleep, and its last statement was the final poll before the
            # wait (the handshake's other statements come before that poll).
            "SELECT l.sleeping AND a.state = 'idle' AND a.query LIKE '%relay.poll%' AS waiting"
            " FROM relay.listeners l JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name = 'relay-listener'"
        )
        return bool(rows) and all(r["waiting"] for r in rows)

    await eventually(check, timeout, what="the listener asleep")


async def redis_subscribers(redis_url: str, channel: str) -> int:
    """How many connections (relay processes) are subscribed to chat ``channel`` on Redis."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    try:
        names = [
            n.decode() for n in await r.pubsub_channels("relay:chan:*") if channel.encode() in n
        ]
        total = 0
        for name in names:
            if json.loads(name[len("relay:chan:") :])[1] == channel:
                total += dict(await r.pubsub_numsub(name)).get(name.encode(), 0)
        return total
    finally:
        await r.aclose()


async def redis_clients(redis_url: str) -> int:
    """How many client connections Redis has open, this one asking not counted."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    try:
        info = await r.info("clients")
        return int(info["connected_clients"]) - 1
    finally:
        await r.aclose()


def require(tool: str, why: str) -> str:
    """The path of ``tool``; skip where it is missing, but fail when CI is set."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed ({why})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return path
