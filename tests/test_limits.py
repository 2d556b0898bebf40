"""Limits and abuse, over real sockets: connection caps, plans, origins, rates, slow readers, pings.

Each test checks what a client (or an operator watching ``/healthz``) would
see: the documented frames and close codes for the offender, and nothing but
ordinary service for everybody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import WSMsgType

from relay import plans
from relay.protocol import CloseCode
from tests.conftest import RelayHandle, WsClient, app_token, random_name

CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


async def read_until_closed(
    c: WsClient | aiohttp.ClientWebSocketResponse, timeout: float = 20.0
) -> tuple[list[dict[str, Any]], int | None]:
    """Every text frame up to the close, and the close code."""
    ws = c.ws if isinstance(c, WsClient) else c
    frames: list[dict[str, Any]] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type is WSMsgType.TEXT:
            frames.append(json.loads(msg.data))
        elif msg.type in CLOSED:
            code = msg.data if msg.type is WSMsgType.CLOSE else ws.close_code
            return frames, code


async def sockets_open(r: RelayHandle) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(r.http_url + "/healthz") as resp,
    ):
        body = await resp.json()
        count: int = body["sockets"]
        return count


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def assert_echoes(c: WsClient, text: str = "still here") -> None:
    await c.send(type="echo", data=text)
    assert (await c.expect("echo"))["data"] == "echo: " + text


async def new_app(
    db: asyncpg.Connection, origins: tuple[str, ...] = (), **plan_caps: int | None
) -> plans.AppRecord:
    suffix = secrets.token_hex(4)
    plan = await plans.create_plan(db, f"plan-{suffix}", **plan_caps)
    app = await plans.create_app(db, f"app-{suffix}", plan=plan.name, origins=origins)
    assert app.jwt_secret is not None
    return app


# --- connection caps --------------------------------------------------------------------------


async def test_cap_allows_n_refuses_n_plus_one_and_frees_the_slot(relay, client):
    r = await relay(max_connections=3)
    first = [await client(r) for _ in range(3)]
    assert len({c.sid for c in first}) == 3

    refused = await client(r, init=False)
    frames, code = await read_until_closed(refused)
    assert len(frames) == 1, "expected exactly one frame (an error), and no init"
    assert frames[0]["type"] == "error" and frames[0]["sid"] == ""
    assert "connection limit reached" in frames[0]["data"]
    assert code == CloseCode.POLICY == 1008
    for c in first:
        await assert_echoes(c)

    await first[0].close()
    await eventually(lambda: _is(sockets_open(r), 2))
    again = await client(r)
    assert again.sid and again.sid not in {c.sid for c in first}
    await assert_echoes(again)


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_plan_caps_connections_per_app_by_query_or_header(relay, client, db):
    app = await new_app(db, max_connections=2)
    assert app.public_key is not None
    r = await relay()
    a = await client(r, pk=app.public_key)
    b = await client(r, headers={"SB-PUBLIC-KEY": app.public_key})
    refused = await client(r, pk=app.public_key, init=False)
    frames, code = await read_until_closed(refused)
    assert [f["type"] for f in frames] == ["error"]
    assert "connection limit reached" in frames[0]["data"] and "2" in frames[0]["data"]
    assert code == 1008
    # The cap is the app's own: the default app still admits connections.
    others = [await client(r) for _ in range(3)]
    for c in (a, b, *others):
        await assert_echoes(c)


async def test_apps_do_not_share_channels(relay, client, db):
    app = await new_app(db)
    assert app.public_key is not None
    r = await relay()
    room = random_name()
    inside = await client(r, pk=app.public_key)
    outside = await client(r)
    await inside.auth(app_token(app, "u", "1"))
    await outside.auth(r.token("u", "1"))
    for c in (inside, outside):
        await c.join(room)
    await outside.publish(room, "default app only")
    assert (await outside.expect("chan_out"))["data"] == "default app only"
    await inside.silent()


async def test_unknown_public_key_is_refused_with_its_own_message(relay, client):
    r = await relay()
    c = await client(r, pk="pk_nobody_has_this_" + secrets.token_hex(4), init=False)
    frames, code = await read_until_closed(c)
    assert [f["type"] for f in frames] == ["error"]
    assert "unknown app" in frames[0]["data"]
    assert "connection limit" not in frames[0]["data"]
    assert code == 1008


async def test_absurdly_long_public_key_is_unknown(relay, client):
    r = await relay()
    c = await client(r, headers={"SB-PUBLIC-KEY": "k" * 5000}, init=False)
    frames, code = await read_until_closed(c)
    assert "unknown app" in frames[0]["data"] and code == 1008


# --- origins ----------------------------------------------------------------------------------


async def test_origin_allow_list_refuses_others_at_upgrade(relay, client, db):
    app = await new_app(db, origins=("https://good.example", "http://localhost:3000/"))
    assert app.public_key is not None
    r = await relay()
    ok = await client(r, pk=app.public_key, headers={"Origin": "https://good.example"})
    local = await client(r, pk=app.public_key, headers={"Origin": "http://localhost:3000"})
    for bad in ("https://evil.example", "https://good.example.evil.example", "null"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client(r, pk=app.public_key, headers={"Origin": bad})
        assert refused.value.status == 403
    # A client that sends no Origin is not a browser; an allow-list cannot bind it.
    native = await client(r, pk=app.public_key)
    for c in (ok, local, native):
        await assert_echoes(c)


async def test_default_app_accepts_any_origin(relay, client):
    r = await relay()
    c = await client(r, headers={"Origin": "https://anywhere.example"})
    await assert_echoes(c)


# --- message rate -----------------------------------------------------------------------------


async def test_rate_limit_drops_excess_with_an_error_and_the_socket_recovers(relay, client):
    r = await relay(messages_per_second=5, message_burst_seconds=2)  # bursts of 10
    c = await client(r)
    bystander = await client(r)
    for i in range(30):
        await c.send(type="echo", data=str(i))
    replies = [await c.recv() for _ in range(30)]
    echoed = [f for f in replies if f["type"] == "echo"]
    limited = [f for f in replies if f["type"] == "error"]
    assert len(echoed) + len(limited) == 30
    assert len(echoed) >= 10, "the burst passes"
    assert len(limited) >= 10, "the excess is refused"
    assert all("rate limit" in f["data"] and f["sid"] == c.sid for f in limited)
    assert echoed[:10] == [
        {"sid": c.sid, "type": "echo", "data": f"echo: {i}", "channel": "", "token": ""}
        for i in range(10)
    ]
    await assert_echoes(bystander)
    await asyncio.sleep(1.0)  # tokens refill
    await assert_echoes(c)


async def test_persistent_flooding_closes_only_that_socket_with_4000(relay, client):
    r = await relay(messages_per_second=5, error_budget=20)
    room = random_name()
    flooder = await client(r)
    other = await client(r)
    for c in (flooder, other):
        await c.auth(r.token("u", "1"))
        await c.join(room)
    with contextlib.suppress(ConnectionError):
        for _ in range(300):
            await flooder.send(type="chan_in", channel=room, data="spam", token=flooder.token)
    frames, code = await read_until_closed(flooder)
    assert code == CloseCode.ABUSE == 4000
    assert any("rate limit" in f["data"] for f in frames if f["type"] == "error")
    # The other member got at most what the bucket let through, and carries on.
    got = 0
    with contextlib.suppress(TimeoutError):
        while True:
            frame = await other.recv(timeout=1.0)
            assert frame["type"] == "chan_out" and frame["data"] == "spam"
            got += 1
    assert 1 <= got <= 20
    await other.publish(room, "after the flood")
    assert (await other.expect("chan_out"))["data"] == "after the flood"


async def test_plan_sets_the_message_rate(relay, client, db):
    app = await new_app(db, messages_per_second=2)
    assert app.public_key is not None
    r = await relay(messages_per_second=1000)
    metered = await client(r, pk=app.public_key)
    free = await client(r)
    for c in (metered, free):
        for i in range(20):
            await c.send(type="echo", data=str(i))
    metered_types = [(await metered.recv())["type"] for _ in range(20)]
    free_types = [(await free.recv())["type"] for _ in range(20)]
    assert free_types == ["echo"] * 20
    assert metered_types.count("error") >= 10  # 2/s with bursts of 4


# --- input limits -----------------------------------------------------------------------------


async def test_frame_channel_and_membership_limits_are_errors_not_disconnects(relay, client):
    r = await relay(max_frame_bytes=2000, max_channels_per_socket=3)
    c = await client(r)
    await c.auth(r.token("u", "1"))
    await c.send(type="echo", data="é" * 1500)  # 1500 characters, 3000 bytes
    error = await c.expect("error")
    assert "frame too large" in error["data"] and "2000" in error["data"]
    await c.send(type="join", data="x" * 201, token=c.token)
    assert "channel name too long" in (await c.expect("error"))["data"]
    await c.send(type="join", data="no spaces please", token=c.token)
    assert "may contain only" in (await c.expect("error"))["data"]
    rooms = [random_name() for _ in range(4)]
    for room in rooms[:3]:
        await c.join(room)
    await c.send(type="join", data=rooms[3], token=c.token)
    error = await c.expect("error")
    assert "too many channels" in error["data"] and error["channel"] == rooms[3]
    await c.join(rooms[0])  # joining one it is already in is fine
    await c.publish(rooms[2], "still works")
    assert (await c.expect("chan_out"))["data"] == "still works"


async def test_plan_sets_channels_per_socket(relay, client, db):
    app = await new_app(db, max_channels_per_socket=1)
    assert app.public_key is not None
    r = await relay()
    c = await client(r, pk=app.public_key)
    await c.auth(app_token(app, "u", "1"))
    await c.join(random_name())
    await c.send(type="join", data=random_name(), token=c.token)
    assert "at most 1" in (await c.expect("error"))["data"]


# --- slow consumers ---------------------------------------------------------------------------


async def test_slow_consumer_is_cut_off_while_the_fast_one_gets_everything(relay, client):
    r = await relay(send_queue_frames=50, messages_per_second=0)
    room = random_name()
    fast, slow, sender = await client(r), await client(r), await client(r)
    for c in (fast, slow, sender):
        await c.auth(r.token("u", "1"))
        await c.join(room)
    received: list[str] = []

    async def read_fast() -> None:
        while True:
            frame = await fast.recv(timeout=60)
            assert frame["type"] == "chan_out", frame["type"]
            received.append(frame["data"])

    reader = asyncio.create_task(read_fast())
    payload = "x" * 16_000
    sent: list[str] = []
    # The slow client never reads: once the kernel's and the relay's buffers
    # are full, the relay must drop it, not buffer without end.
    for batch in range(60):
        for i in range(50):
            data = f"{batch}-{i}-{payload}"
            await sender.send(type="chan_in", channel=room, data=data, token=sender.token)
            sent.append(data)
        for _ in range(50):
            while (await sender.recv(timeout=30))["type"] != "ok":
                pass
        if await sockets_open(r) == 2:
            break
    else:
        raise AssertionError(f"the slow consumer was never cut off ({len(sent)} messages sent)")

    # Now the slow one reads: what was already on its way, then the close frame.
    frames, code = await read_until_closed(slow, timeout=30)
    assert code == CloseCode.SLOW_CONSUMER == 4001
    assert len(frames) < len(sent), "the relay dropped it instead of buffering everything"

    await sender.send(type="chan_in", channel=room, data="after the cut", token=sender.token)
    sent.append("after the cut")
    while (await sender.recv(timeout=30))["type"] != "ok":
        pass
    await eventually(lambda: _true(len(received) >= len(sent)), timeout=60)
    reader.cancel()
    assert len(received) == len(sent)
    assert received == sent, "the fast consumer missed or reordered messages"


async def _true(value: bool) -> bool:
    return value


# --- heartbeats -------------------------------------------------------------------------------


async def test_peer_that_does_not_answer_pings_is_reaped(relay, client):
    r = await relay(heartbeat_seconds=1.0)
    healthy = await client(r)
    await healthy.auth(r.token("u", "1"))  # or the auth deadline (10 s) would close it
    # A well-behaved client answers pings while it waits in receive(): for
    # the whole test, about ten heartbeats, it hears nothing and stays.
    listening = asyncio.create_task(healthy.silent(10.0))
    async with aiohttp.ClientSession() as http:
        mute = await http.ws_connect(r.ws_url, autoping=False)
        assert json.loads((await mute.receive(timeout=5)).data)["type"] == "init"
        assert await sockets_open(r) == 2
        pinged = False
        while True:
            msg = await mute.receive(timeout=15)
            if msg.type is WSMsgType.PING:
                pinged = True  # and no pong goes back
                continue
            assert msg.type in CLOSED, msg
            break
        assert pinged
    await eventually(lambda: _is(sockets_open(r), 1))
    await listening
    assert await sockets_open(r) == 1
    await assert_echoes(healthy)
