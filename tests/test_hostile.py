"""Hostile clients, staged against a real relay (issue 8's red-team findings).

Each test plays one attack over real sockets and checks what a user or an
operator would: the attacker is cut off or refused with a readable reason,
what it made the relay hold is released, and everyone else carries on.

- pre-auth memory: a socket may send only ``preauth_max_bytes`` before
  ``auth``, must authenticate within ``auth_timeout_seconds``, and
  unauthenticated sockets are capped per address (and per app, per process);
- squatting: unauthenticated sockets give up their plan slots to newcomers;
- permessage-deflate is never negotiated, compressed frames are refused;
- slow consumers in aggregate: a process-wide budget of queued bytes cuts the
  biggest queues; a frame fanned out is queued once, not once per socket;
- incomplete request heads time out; dead peers are aborted, and an app's
  connection count equals its open transports;
- validation regexes match whole strings; client text cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import WSMsgType

from relay import plans
from relay.config import ConfigError, Settings
from relay.permissions import Mode, mode_of
from relay.plans import PlanError
from relay.protocol import CloseCode
from relay.repos import RepoError, create_repo, quote_table
from relay.schema import DEFAULT_APP
from tests.conftest import RelayHandle, WsClient, app_token, random_name

CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)


# --- helpers -----------------------------------------------------------------------------------


class RawWs:
    """A WebSocket client written by hand, to send what a polite client would not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.response_head = ""
        self.sid = ""

    @classmethod
    async def connect(cls, r: RelayHandle, extensions: str | None = None) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{r.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if extensions:
            head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        writer.write((head + "\r\n").encode())
        c = cls(reader, writer)
        c.response_head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert c.response_head.startswith("HTTP/1.1 101"), c.response_head
        return c

    def frame(
        self, payload: bytes, *, opcode: int = 1, rsv1: bool = False, length: int = -1
    ) -> bytes:
        """A masked client frame; ``length`` may claim more payload than follows."""
        n = len(payload) if length < 0 else length
        first = 0x80 | (0x40 if rsv1 else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + masked

    async def session(self, r: RelayHandle, user: str, room: str) -> None:
        """Read init, authenticate and join ``room``; then a caller may stop reading."""
        init = await self.json()
        assert init["type"] == "init"
        self.sid = init["data"]
        await self.send(type="auth", data=r.token(user, "1"))
        token = await self.json()
        assert token["type"] == "token", token
        await self.send(type="join", data=room, token=token["data"])
        assert (await self.json())["type"] == "joined"

    async def send(self, **fields: Any) -> None:
        self.writer.write(self.frame(json.dumps(fields).encode()))
        await self.writer.drain()

    async def read(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """One server frame: (opcode, payload)."""
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def json(self) -> dict[str, Any]:
        opcode, payload = await self.read()
        assert opcode == 1, (opcode, payload)
        frame: dict[str, Any] = json.loads(payload)
        return frame

    async def until_closed(self, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int | None]:
        """Text frames up to the server's close frame (or the end of the stream)."""
        frames: list[dict[str, Any]] = []
        while True:
            try:
                opcode, payload = await self.read(timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                return frames, None
            if opcode == 1:
                frames.append(json.loads(payload))
            elif opcode == 8:
                return frames, struct.unpack("!H", payload[:2])[0] if payload else None

    def close(self) -> None:
        self.writer.close()


def open_transports(port: int) -> int:
    """TCP connections of this process whose local end is ``port``: the relay's transports.

    Read from /proc: a descriptor still open is a socket with an inode; the
    listening socket (state 0A) is left out.
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A" and fields[9] != "0":
                count += 1
    return count


async def eventually(check: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def echoes(c: WsClient, text: str = "still here") -> None:
    await c.send(type="echo", data=text)
    assert (await c.expect("echo"))["data"] == "echo: " + text


async def read_until_closed(
    c: WsClient, timeout: float = 10.0
) -> tuple[list[dict[str, Any]], int | None]:
    frames: list[dict[str, Any]] = []
    while True:
        msg = await asyncio.wait_for(c.ws.receive(), timeout)
        if msg.type is WSMsgType.TEXT:
            frames.append(json.loads(msg.data))
        elif msg.type in CLOSED:
            return frames, msg.data if msg.type is WSMsgType.CLOSE else c.ws.close_code
        else:
            raise AssertionError(f"unexpected {msg.type}")


async def new_app(db: asyncpg.Connection, **caps: int | None) -> plans.AppRecord:
    suffix = secrets.token_hex(4)
    plan = await plans.create_plan(db, f"plan-{suffix}", **caps)
    return await plans.create_app(db, f"app-{suffix}", plan=plan.name)


# --- item 3: what a connection may make the relay hold before auth ------------------------------


async def test_before_auth_a_big_frame_is_cut_long_before_it_is_whole(relay, client):
    r = await relay(preauth_max_bytes=16 * 1024)
    bystander = await client(r)
    await bystander.auth(r.token("b", "1"))
    attacker = await RawWs.connect(r)
    assert (await attacker.json())["type"] == "init"
    # The head of a 4 MiB text frame and the first 256 KiB of it; then, as the
    # red team did, the attacker waits. Before the fix the relay waited too.
    attacker.writer.write(attacker.frame(b"", length=4 * 1024 * 1024) + b"x" * 256 * 1024)
    await attacker.writer.drain()
    frames, code = await attacker.until_closed()
    assert [f["type"] for f in frames] == ["error"]
    assert "before it authenticates" in frames[0]["data"] and "16384" in frames[0]["data"]
    assert code == CloseCode.TOO_BIG == 1009
    attacker.close()
    assert r.state.admission.pending() == 0
    await echoes(bystander)


async def test_after_auth_the_full_frame_limit_applies(relay, client):
    """The positive control: the pre-auth budget is lifted by auth."""
    r = await relay(preauth_max_bytes=16 * 1024)
    c = await client(r)
    await c.auth(r.token("u", "1"))
    await echoes(c, "y" * 100_000)


async def test_a_socket_that_never_authenticates_is_closed_at_the_deadline(relay, client):
    r = await relay(auth_timeout_seconds=1.0)
    member = await client(r)  # connected first, so its deadline passes first
    await member.auth(r.token("m", "1"))
    squatter = await client(r)
    frames, code = await read_until_closed(squatter)
    assert [f["type"] for f in frames] == ["error"]
    assert "authentication timeout" in frames[0]["data"] and frames[0]["sid"] == squatter.sid
    assert code == CloseCode.POLICY == 1008
    await echoes(member)  # its deadline passed too, but it had authenticated


async def test_each_unauthenticated_socket_gets_its_own_deadline(relay, client):
    """One timer serves every pending socket: each is closed when its own time is up,
    oldest first, and one that authenticated in between is left alone."""
    r = await relay(auth_timeout_seconds=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await client(r)
    await eventually(lambda: loop.time() > started + 0.4)  # a later connection
    second_started = loop.time()
    member = await client(r)
    second = await client(r)
    await member.auth(r.token("m", "1"))
    frames, code = await read_until_closed(first)
    assert "authentication timeout" in frames[0]["data"] and code == CloseCode.POLICY
    assert loop.time() >= started + 1.0
    assert r.state.admission.pending() == 1  # the second's time is not up yet
    frames, code = await read_until_closed(second)
    assert "authentication timeout" in frames[0]["data"] and code == CloseCode.POLICY
    assert loop.time() >= second_started + 1.0
    assert r.state.admission.pending() == 0
    await echoes(member)


async def test_unauthenticated_sockets_are_capped_per_address(relay, client):
    r = await relay(max_unauthenticated_per_address=3, auth_grace_seconds=60)
    pending = [await client(r) for _ in range(3)]
    refused = await client(r, init=False)
    frames, code = await read_until_closed(refused)
    assert [f["type"] for f in frames] == ["error"]
    assert "too many unauthenticated connections from your address" in frames[0]["data"]
    assert code == CloseCode.TRY_AGAIN_LATER == 1013
    # Authenticating frees the place for the next one.
    await pending[0].auth(r.token("u", "1"))
    admitted = await client(r)
    await echoes(admitted)
    for c in pending:
        await echoes(c)
    assert r.state.admission.pending() == 3


async def test_unauthenticated_sockets_are_capped_per_app(relay, client, db):
    app = await new_app(db)
    assert app.public_key is not None
    r = await relay(max_unauthenticated_per_app=2, auth_grace_seconds=60)
    inside = [await client(r, pk=app.public_key) for _ in range(2)]
    refused = await client(r, pk=app.public_key, init=False)
    frames, code = await read_until_closed(refused)
    assert "too many unauthenticated connections for this app" in frames[0]["data"]
    assert code == 1013
    outside = await client(r)  # another app is not affected
    for c in (*inside, outside):
        await echoes(c)


# --- item 11: connection slots taken before auth -----------------------------------------------


async def test_squatters_give_their_slots_to_a_real_user(relay, client, db):
    app = await new_app(db, max_connections=2)
    assert app.public_key is not None
    r = await relay(auth_grace_seconds=0)
    squatters = [await client(r, pk=app.public_key) for _ in range(2)]
    user = await client(r, pk=app.public_key)  # before the fix: "connection limit reached"
    await user.auth(app_token(app, "real", "1"))
    await echoes(user)
    frames, code = await read_until_closed(squatters[0])
    assert [f["type"] for f in frames] == ["error"]
    assert "closed to admit a new connection" in frames[0]["data"]
    assert code == 1008
    # The cap itself holds: with both slots authenticated, a newcomer is refused.
    second = await client(r, pk=app.public_key)
    await second.auth(app_token(app, "real2", "1"))
    frames, code = await read_until_closed(squatters[1])
    assert code == 1008
    refused = await client(r, pk=app.public_key, init=False)
    frames, code = await read_until_closed(refused)
    assert "connection limit reached" in frames[0]["data"] and code == 1008
    for c in (user, second):
        await echoes(c)


# --- item 4: permessage-deflate ----------------------------------------------------------------


async def test_deflate_is_not_negotiated_and_compressed_frames_are_refused(relay, client):
    r = await relay()
    bystander = await client(r)
    async with aiohttp.ClientSession() as http:
        offered = await http.ws_connect(r.ws_url, compress=15)
        assert json.loads((await offered.receive(timeout=5)).data)["type"] == "init"
        assert offered.compress == 0, "the relay accepted permessage-deflate"
        await offered.close()
    raw = await RawWs.connect(r, extensions="permessage-deflate; client_max_window_bits")
    assert "sec-websocket-extensions" not in raw.response_head.lower()
    assert (await raw.json())["type"] == "init"
    # A frame marked compressed (RSV1) is a protocol error: the relay inflates nothing.
    raw.writer.write(raw.frame(b"\x02\x00", rsv1=True))
    frames, code = await raw.until_closed()
    assert frames == [] and code == 1002
    raw.close()
    await echoes(bystander)


# --- item 5: slow consumers in aggregate --------------------------------------------------------


async def test_the_process_wide_send_budget_cuts_the_biggest_queues(relay, client):
    budget = 1024 * 1024
    r = await relay(send_queue_total_bytes=budget, messages_per_second=0)
    room = random_name()
    fast, sender = await client(r), await client(r)
    if True:
        stalled = []
        for i in range(8):  # never read once joined: their queues only grow
            c = await RawWs.connect(r)
            await c.session(r, f"s{i}", room)
            stalled.append(c)
        for c in (fast, sender):
            await c.auth(r.token("u", "1"))
            await c.join(room)
        received: list[str] = []

        async def read_fast() -> None:
            while True:
                received.append((await fast.expect("chan_out", timeout=30))["data"])

        reader = asyncio.create_task(read_fast())
        hub = r.state.hub
        sent: list[str] = []
        peak = 0

        def cut(c: RawWs) -> bool:
            s = hub.sockets.get(c.sid)
            return s is None or s.close_code is CloseCode.SLOW_CONSUMER

        # Loopback's kernel buffers take some 4 MB per socket before the relay queues any.
        for i in range(150):
            if all(cut(c) for c in stalled):
                break
            data = f"{i}-" + "x" * 100_000
            await sender.publish(room, data)
            assert (await sender.expect("chan_out"))["data"] == data
            sent.append(data)
            peak = max(peak, hub.budget.total)
            # Each stalled socket's own cap (16 MiB) is far away: only the sum is over.
            held = [s for s in hub.sockets.values() if s.queued_bytes]
            if len(held) > 1:
                assert hub.budget.total < sum(s.queued_bytes for s in held), "bodies copied"
        assert peak <= budget
        assert all(cut(c) for c in stalled), f"not cut after {len(sent)} messages"
        # Reading at last, each gets what was already on its way, then the close frame.
        ends = await asyncio.gather(*(c.until_closed(timeout=30) for c in stalled))
        assert [code for _, code in ends] == [CloseCode.SLOW_CONSUMER] * len(stalled)
        for c in stalled:
            c.close()
        await eventually(lambda: len(received) >= len(sent), timeout=60)
        reader.cancel()
        assert received == sent, "the reading client missed messages"
        await echoes(sender)


# --- item 6: connections outliving their accounting ---------------------------------------------


async def test_incomplete_request_heads_time_out(relay, client):
    r = await relay(request_head_timeout_seconds=1.0)
    member = await client(r)  # upgraded before the heads below: no head timer any more
    await member.auth(r.token("m", "1"))
    heads = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websock")
        heads.append((reader, writer))
    for reader, writer in heads:
        assert await asyncio.wait_for(reader.read(), 15) == b"", "the relay answered a half head"
        writer.close()
    await echoes(member)
    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/healthz") as resp:
        assert resp.status == 200


async def test_dead_peers_are_aborted_and_the_count_matches_open_transports(relay, client):
    r = await relay(heartbeat_seconds=2.0, messages_per_second=0)
    room = random_name()
    sender = await client(r)
    await sender.auth(r.token("sender", "1"))
    await sender.join(room)
    async with aiohttp.ClientSession() as http:
        dead = []
        for i in range(20):  # authenticate and join, then never read (nor answer pings)
            ws = await http.ws_connect(r.ws_url, heartbeat=None, autoping=False)
            c = WsClient(http, ws)
            c.sid = (await c.expect("init"))["data"]
            await c.auth(r.token(f"d{i}", "1"))
            await c.join(room)
            dead.append(c)
        hub = r.state.hub
        # Fill their pipes until the relay holds frames for every one of them.
        for i in range(100):
            await sender.publish(room, f"{i}-" + "z" * 100_000)
            await sender.expect("chan_out")
            if all(hub.sockets[c.sid].queued_bytes for c in dead if c.sid in hub.sockets):
                break
        assert all(hub.sockets[c.sid].queued_bytes for c in dead), "the stage was not set"
        assert r.state.per_app[DEFAULT_APP] == open_transports(r.port) == 21
        # The heartbeat finds them dead (the sender answers pings while it listens);
        # their transports must go, and the count with them.
        listening = asyncio.create_task(sender.silent(60))
        await eventually(lambda: not any(c.sid in hub.sockets for c in dead))
        await eventually(lambda: open_transports(r.port) == 1)
        assert r.state.per_app[DEFAULT_APP] == 1
        assert hub.budget.total < 1024 * 1024, "their queued frames were not released"
        listening.cancel()
    await echoes(sender)


# --- item 8: validation matches whole strings ---------------------------------------------------


async def test_names_with_a_trailing_newline_are_refused(db: asyncpg.Connection):
    with pytest.raises(RepoError):
        quote_table("nl_744_\n")
    with pytest.raises(RepoError):
        await create_repo(db, f"nl{secrets.token_hex(3)}_744_\n")
    with pytest.raises(PlanError, match="not a valid plan name"):
        await plans.create_plan(db, f"p{secrets.token_hex(3)}\n")
    with pytest.raises(PlanError, match="not a valid app name"):
        await plans.create_app(db, f"a{secrets.token_hex(3)}\n")
    # The permission suffix: PostgreSQL reads such a name as 740, and so does the relay.
    sql_mode = await db.fetchval(
        "SELECT coalesce(substring($1 from '_([0-7]{3})_$'), '740')", "nl_744_\n"
    )
    assert sql_mode == "740"
    assert mode_of("nl_744_\n") == Mode.parse("740") != Mode.parse("744")


async def test_channel_names_with_a_newline_are_refused(relay, client):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("u", "1"))
    for name in ("room\n", "db-nl_744_\n"):
        await c.send(type="join", data=name, token=c.token)
        error = await c.expect("error")
        assert "may contain only" in error["data"]
    await c.join("room")


# --- item 9: log injection ----------------------------------------------------------------------


async def test_client_text_cannot_forge_log_lines(relay, client, caplog):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("u", "1"))
    forged = "room\nINFO relay.ws connected sid=forged app=default"
    caplog.set_level(logging.INFO, logger="relay.ws")
    await c.send(type="chan_in", channel=forged, data="x", token=c.token)
    await c.expect("error")
    await c.send(type="join", data="a b=c\r\nx", token=c.token)
    await c.expect("error")
    await c.send(type=forged, token=c.token)
    await c.expect("error")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "relay.ws"]
    client_errors = [line for line in lines if line.startswith("client error")]
    assert len(client_errors) == 3  # the positive control: the frames were logged
    for line in lines:
        assert "\n" not in line and "\r" not in line, f"a log line was split: {line!r}"
    assert any('channel="room\\nINFO relay.ws' in line for line in client_errors)
    assert any('channel="a b=c\\r\\nx"' in line for line in client_errors)


# --- the settings ---------------------------------------------------------------------------------


def test_hardening_settings_come_from_the_environment():
    env = {
        "RELAY_SEND_QUEUE_TOTAL_BYTES": "1000000",
        "RELAY_AUTH_TIMEOUT_SECONDS": "2.5",
        "RELAY_PREAUTH_MAX_BYTES": "4096",
        "RELAY_MAX_UNAUTHENTICATED": "10",
        "RELAY_MAX_UNAUTHENTICATED_PER_APP": "5",
        "RELAY_MAX_UNAUTHENTICATED_PER_ADDRESS": "0",
        "RELAY_AUTH_GRACE_SECONDS": "0.5",
        "RELAY_REQUEST_HEAD_TIMEOUT_SECONDS": "3",
    }
    s = Settings.from_env(env)
    assert (s.send_queue_total_bytes, s.auth_timeout_seconds, s.preauth_max_bytes) == (
        1_000_000,
        2.5,
        4096,
    )
    assert (s.max_unauthenticated, s.max_unauthenticated_per_app) == (10, 5)
    assert s.max_unauthenticated_per_address == 0
    assert (s.auth_grace_seconds, s.request_head_timeout_seconds) == (0.5, 3.0)
    with pytest.raises(ConfigError, match="RELAY_PREAUTH_MAX_BYTES must not be negative"):
        Settings.from_env({"RELAY_PREAUTH_MAX_BYTES": "-1"})
    with pytest.raises(ConfigError, match="RELAY_MAX_UNAUTHENTICATED must be a whole number"):
        Settings.from_env({"RELAY_MAX_UNAUTHENTICATED": "many"})
