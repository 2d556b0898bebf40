"""Shared fixtures: a real PostgreSQL, a real relay on a free port, real WebSocket clients.

- ``pg_url``: one embedded PostgreSQL for the test session; each test module
  gets a fresh database of its own, copied by pytest-postgresql's janitor
  from a template migrated once.
- ``relay``: a factory that starts the relay app in this event loop on a free
  port (``await relay(max_connections=2)``) and returns a :class:`RelayHandle`.
- ``client``: a factory for :class:`WsClient`, a WebSocket client that reads
  frames as dicts and can assert silence.
- ``repo``: a fresh watched table name with a given permission suffix.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from pytest_postgresql.janitor import DatabaseJanitor

from relay.auth import mint_token
from relay.config import Settings
from relay.db import EmbeddedPostgres, run_migrations
from relay.server import STATE, RelayState, create_app

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="relay-xdg-"))

JWT_SECRET = "test-secret-" + "x" * 32


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    base = Path(tempfile.mkdtemp(prefix="relay-test-pg-"))
    server = EmbeddedPostgres(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def _janitor(server_url: str, dbname: str, **kw: Any) -> DatabaseJanitor:
    """pytest-postgresql's janitor for a database on the embedded server (a Unix socket)."""
    parts = urlsplit(server_url)
    socket_dir = parse_qs(parts.query)["host"][0]
    return DatabaseJanitor(
        user=parts.username or "postgres", host=socket_dir, port=5432, dbname=dbname, **kw
    )


def _url_of(server_url: str, dbname: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def pg_template(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """A database migrated once, that every test module's database is copied from."""
    url = pg_server.start()  # already running: returns its URL
    janitor = _janitor(url, "relay_template", as_template=True)
    janitor.init()
    run_migrations(_url_of(url, "relay_template"))
    yield "relay_template"
    janitor.drop()


@pytest.fixture(scope="module")
def pg_url(pg_server: EmbeddedPostgres, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for this test module (a copy of the template)."""
    url = pg_server.start()
    name = f"relay_{uuid.uuid4().hex[:12]}"
    janitor = _janitor(url, name, template_dbname=pg_template)
    janitor.init()
    yield _url_of(url, name)
    janitor.drop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RelayHandle:
    app: web.Application
    runner: web.AppRunner
    port: int
    secret: str

    @property
    def state(self) -> RelayState:
        return self.app[STATE]

    @property
    def ws_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, account: str | None = None, **kw: Any) -> str:
        return mint_token(self.secret, user, account or "", **kw)

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def relay(pg_url: str) -> AsyncIterator[Callable[..., Awaitable[RelayHandle]]]:
    started: list[RelayHandle] = []

    async def start(**overrides: Any) -> RelayHandle:
        settings = Settings(jwt_secret=JWT_SECRET, database_url=pg_url, poll_seconds=0.5)
        for key, value in overrides.items():
            setattr(settings, key, value)
        app = create_app(settings, pg_url, settings.jwt_secret)
        runner = web.AppRunner(app, shutdown_timeout=2)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        handle = RelayHandle(app, runner, port, settings.jwt_secret or "")
        started.append(handle)
        return handle

    yield start
    for handle in reversed(started):
        await handle.stop()


class WsClient:
    """A real WebSocket client speaking the relay's JSON frames."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.sid = ""
        self.token = ""

    async def send(self, **fields: Any) -> None:
        await self.ws.send_str(json.dumps(fields))

    async def send_raw(self, text: str) -> None:
        await self.ws.send_str(text)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, (
            f"expected a text frame, got {msg.type} {msg.data!r}"
        )
        frame: dict[str, Any] = json.loads(msg.data)
        return frame

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == type_, f"expected {type_}, got {frame}"
        return frame

    async def silent(self, window: float = 0.3) -> None:
        """Assert that nothing arrives for ``window`` seconds."""
        try:
            msg = await asyncio.wait_for(self.ws.receive(), window)
        except TimeoutError:
            return
        raise AssertionError(f"expected silence, got {msg.type} {msg.data!r}")

    async def auth(self, session_token: str) -> str:
        await self.send(type="auth", data=session_token, token=None)
        frame = await self.expect("token")
        self.token = frame["data"]
        return self.token

    async def join(self, channel: str, **extra: str) -> dict[str, Any]:
        await self.send(type="join", data=channel, token=self.token, **extra)
        return await self.expect("joined")

    async def publish(self, channel: str, data: str) -> None:
        await self.send(type="chan_in", channel=channel, data=data, token=self.token)
        await self.expect("ok")

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture
async def client() -> AsyncIterator[Callable[..., Awaitable[WsClient]]]:
    session = aiohttp.ClientSession()
    opened: list[WsClient] = []

    async def connect(
        handle: RelayHandle,
        *,
        init: bool = True,
        headers: dict[str, str] | None = None,
        pk: str | None = None,
    ) -> WsClient:
        url = handle.ws_url + (f"?pk={pk}" if pk is not None else "")
        ws = await session.ws_connect(url, headers=headers or {}, heartbeat=None)
        c = WsClient(session, ws)
        opened.append(c)
        if init:
            frame = await c.expect("init")
            c.sid = frame["data"]
        return c

    yield connect
    for c in opened:
        await c.ws.close()
    await session.close()


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain SQL connection, separate from the relay's, for writing rows."""
    conn = await asyncpg.connect(pg_url)
    yield conn
    await conn.close()


@dataclass
class RepoFactory:
    conn: asyncpg.Connection
    created: list[str] = field(default_factory=list)

    async def __call__(self, suffix: str = "_760_") -> str:
        from relay.repos import create_repo

        name = f"t{uuid.uuid4().hex[:10]}{suffix}"
        await create_repo(self.conn, name)
        self.created.append(name)
        return name


@pytest.fixture
async def repo(db: asyncpg.Connection) -> RepoFactory:
    return RepoFactory(db)


def app_token(app: Any, user: str, account: str | None = None, **kw: Any) -> str:
    """A session token of an app made with ``relay.plans.create_app`` (its own secret)."""
    return mint_token(app.jwt_secret, user, account or "", audience=app.id, **kw)


def random_name(prefix: str = "room") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def start_redis(port: int, workdir: str) -> Any:
    """A real redis-server on ``port``, ready to serve (skips if not installed)."""
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (apt-get install redis-server); .ci/run installs it"
        )
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free port, for the Redis broker tests."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="relay-test-redis-")
    proc = start_redis(port, workdir)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)
