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
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from relay import heartbeat
from relay.protocol import CloseCode
from tests.conftest import RelayHandle, WsClient, app_token, random_name
from tests.helpers import (
    CLOSED,
    assert_echoes,
    eventually,
    new_app,
    read_until_closed,
    sockets_open,
)


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


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


async def test_connection_caps_are_per_app_by_query_or_header(relay, client, db):
    """An app's plan caps its own connections; the default app's cap is
    RELAY_MAX_CONNECTIONS; neither counts the other's sockets."""
    app = await new_app(db, max_connections=2)
    assert app.public_key is not None
    r = await relay(max_connections=1)
    default = await client(r)
    a = await client(r, pk=app.public_key)
    b = await client(r, headers={"SB-PUBLIC-KEY": app.public_key})
    for kw in ({"pk": app.public_key}, {"headers": {"SB-PUBLIC-KEY": app.public_key}}, {}):
        refused = await client(r, init=False, **kw)
        frames, code = await read_until_closed(refused)
        assert [f["type"] for f in frames] == ["error"], kw
        cap = "1" if not kw else "2"
        assert f"connection limit reached: this app allows {cap}" in frames[0]["data"]
        assert code == 1008
    for c in (default, a, b):
        await assert_echoes(c)


@pytest.mark.parametrize("how", ["query", "header"])
async def test_unknown_public_key_is_refused_with_its_own_message(relay, client, how):
    r = await relay()
    key = "pk_nobody_has_this_" + secrets.token_hex(4)
    kw: dict[str, Any] = {"pk": key} if how == "query" else {"headers": {"SB-PUBLIC-KEY": key}}
    c = await client(r, init=False, **kw)
    frames, code = await read_until_closed(c)
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["sid"] == ""
    assert "unknown app" in frames[0]["data"]
    assert "connection limit" not in frames[0]["data"]
    assert code == CloseCode.POLICY == 1008


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
    # The other member got at most what the bucket let through, and carries on:
    # its own message comes after every spam frame that was delivered.
    await other.send(type="chan_in", channel=room, data="after the flood", token=other.token)
    got = 0
    while (frame := await other.recv())["data"] != "after the flood":
        if frame["type"] != "ok":  # (the answer to its own chan_in)
            assert frame["type"] == "chan_out" and frame["data"] == "spam", frame
            got += 1
    assert frame["type"] == "chan_out"
    assert 1 <= got <= 20


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


async def test_frame_size_and_channel_count_limits_are_errors_not_disconnects(relay, client):
    r = await relay(max_frame_bytes=2000, max_channels_per_socket=3)
    c = await client(r)
    await c.auth(r.token("u", "1"))
    await c.send(type="echo", data="é" * 1500)  # 1500 characters, 3000 bytes
    error = await c.expect("error")
    assert "frame too large" in error["data"] and "2000" in error["data"]
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


async def test_the_send_budget_is_back_to_zero_once_everything_is_read(relay, client):
    """Replies (one socket's frames) and fan-out (bodies shared by sockets) are
    counted in the process-wide send budget while queued, and uncounted once
    written: after the traffic, nothing is left counted, so the budget can still
    hold as much as it was given."""
    r = await relay(send_queue_total_bytes=4 * 1024 * 1024, messages_per_second=0)
    room = random_name()
    a, b = await client(r), await client(r)
    for c in (a, b):
        await c.auth(r.token("u", "1"))
        await c.join(room)
    alone = random_name()  # a body queued for one socket only
    await a.join(alone)
    payload = "x" * 10_000
    for i in range(30):
        await a.send(type="echo", data=f"{i}-{payload}")
        await a.send(type="chan_in", channel=room, data=f"{i}-{payload}", token=a.token)
        await a.send(type="chan_in", channel=alone, data=f"{i}-{payload}", token=a.token)
    got_a = [await a.recv() for _ in range(150)]  # echo, and ok and chan_out twice, for each
    got_b = [await b.expect("chan_out") for _ in range(30)]
    assert [f["type"] for f in got_a].count("echo") == 30
    assert [f["channel"] for f in got_a if f["type"] == "chan_out"].count(alone) == 30
    assert [f["data"] for f in got_b] == [f"{i}-{payload}" for i in range(30)]
    budget = r.state.hub.budget
    await eventually(lambda: budget.total == 0 and not budget.holders, what="nothing counted")
    assert all(s.queued_bytes == 0 for s in r.state.hub.sockets.values())


async def test_a_cut_off_consumer_leaves_nothing_counted(relay, client):
    """A consumer that reads nothing has replies (its own frames) and fan-out
    (shared bodies) queued: its queue never holds more than its byte cap; when
    cut off, the queue is dropped and
    uncounted. Once the others have read everything, the send budget is empty."""
    cap = 256 * 1024
    r = await relay(send_queue_frames=100_000, send_queue_bytes=cap, messages_per_second=0)
    room = random_name()
    slow, sender = await client(r), await client(r)
    for c in (slow, sender):
        await c.auth(r.token("u", "1"))
        await c.join(room)
    hub = r.state.hub
    victim = hub.sockets[slow.sid]
    peak = 0
    for n in range(1, 2001):
        await slow.send(type="echo", data=f"{n}-" + "y" * 10_000)
        await sender.publish(room, f"{n}-" + "x" * 20_000)
        assert (await sender.expect("chan_out", timeout=30))["data"].startswith(f"{n}-")
        if victim.closing:
            break
        peak = max(peak, victim.queued_bytes)
    else:
        raise AssertionError("the slow consumer was never cut off")
    assert victim.close_code is CloseCode.SLOW_CONSUMER
    assert 0 < peak <= cap
    assert victim.queued_bytes == 0  # dropped
    for i in range(3):
        await sender.publish(room, f"after-{i}")
        assert (await sender.expect("chan_out"))["data"] == f"after-{i}"
    assert victim.queued_bytes == 0
    budget = hub.budget
    await eventually(lambda: budget.total == 0 and not budget.holders, what="nothing counted")
    # Reading at last: what was on its way, then the close frame and why.
    while (msg := await slow.ws.receive(timeout=30)).type is not WSMsgType.CLOSE:
        assert msg.type is WSMsgType.TEXT, msg
    assert (msg.data, msg.extra) == (4001, "slow consumer: too many frames queued")


# --- heartbeats -------------------------------------------------------------------------------


@pytest.fixture(params=["relay", "aiohttp"])
def heartbeat_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The relay's own heartbeat (it reads TCP_INFO), or aiohttp's per-socket one where the
    kernel cannot say when a connection last received data (another OS)."""
    if request.param == "aiohttp":
        monkeypatch.setattr(heartbeat, "_TCP_INFO", None)
    return str(request.param)


async def test_peer_that_does_not_answer_pings_is_reaped(relay, client, heartbeat_kind):
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
    watched = heartbeat.watches(r.state.hub.sockets[healthy.sid].transport)
    assert watched is (heartbeat_kind == "relay")


async def test_the_heartbeat_round_pings_only_quiet_sockets_and_aborts_only_silent_ones(
    relay, client
):
    """Rounds driven by hand (the relay's own heartbeat is off): a socket that has sent
    nothing for an interval is pinged; one that answers is kept; one that does not is dropped."""
    r = await relay(heartbeat_seconds=0)
    chatty = await client(r)
    await chatty.auth(r.token("u", "1"))
    beat = heartbeat.Heartbeat(0.2)
    async with aiohttp.ClientSession() as http:
        mute = await http.ws_connect(r.ws_url, autoping=False)
        init = json.loads((await mute.receive(timeout=5)).data)
        assert init["type"] == "init"
        sockets = list(r.state.hub.sockets.values())
        await eventually(
            lambda: all((heartbeat.idle_seconds(s.transport) or 0) >= 0.2 for s in sockets)
        )
        loop = asyncio.get_running_loop()
        await beat.round(sockets, loop.time())
        assert all(s.pinged for s in sockets), "quiet sockets are pinged"
        assert (await mute.receive(timeout=5)).type is WSMsgType.PING  # and no pong goes back
        # chatty's client answers the ping as soon as it reads: wait for that, then judge.
        await chatty.send(type="echo", data="x")
        await chatty.expect("echo")
        await eventually(lambda: loop.time() > beat._last_round + 0.1)  # type: ignore[operator]
        await beat.round(sockets, loop.time())
        assert [s.id for s in sockets if s.closing] == [init["data"]]
        assert (await mute.receive(timeout=5)).type in CLOSED
    await assert_echoes(chatty)


async def flood_until_cut_off(r: RelayHandle, sender: WsClient, room: str, payload: str) -> int:
    """Publish ``payload`` until the relay holds one socket fewer; return how many were sent.

    Bounded: 2,000 messages are far more than the kernel's socket buffers and the
    send-queue caps of these tests can hold.
    """
    before = len(r.state.hub.sockets)
    for n in range(1, 2001):
        await sender.publish(room, f"{n}-{payload}")
        assert (await sender.expect("chan_out", timeout=30))["data"].startswith(f"{n}-")
        if len(r.state.hub.sockets) < before:
            return n
    raise AssertionError("the slow consumer was never cut off")


async def test_send_queue_byte_cap_cuts_off_a_slow_consumer(relay, client):
    """The frame cap is out of reach (100,000); only the byte cap (256 KiB) can cut it off."""
    r = await relay(send_queue_frames=100_000, send_queue_bytes=256 * 1024, messages_per_second=0)
    room = random_name()
    slow, sender = await client(r), await client(r)
    for c in (slow, sender):
        await c.auth(r.token("u", "1"))
        await c.join(room)
    await flood_until_cut_off(r, sender, room, "x" * 20_000)
    _, code = await read_until_closed(slow, timeout=30)
    assert code == CloseCode.SLOW_CONSUMER == 4001
    await assert_echoes(sender)


async def test_a_cut_off_peer_that_still_reads_nothing_is_dropped(relay, client):
    """After the 4001 close the relay waits SLOW_CLOSE_SECONDS (10 s) for the
    peer to read its backlog, then drops the TCP connection."""
    r = await relay(send_queue_frames=20, messages_per_second=0)
    room = random_name()
    slow, sender = await client(r), await client(r)
    for c in (slow, sender):
        await c.auth(r.token("u", "1"))
        await c.join(room)
    await flood_until_cut_off(r, sender, room, "x" * 20_000)
    assert r.runner.server is not None
    # The slow peer's connection is still open (its backlog unread) ...
    assert len(r.runner.server.connections) == 2
    # ... until the relay gives up on it; the sender's stays.
    await eventually(
        lambda: len(r.runner.server.connections) == 1, timeout=40, what="the peer dropped"
    )
    await assert_echoes(sender)


async def test_slow_db_subscriber_is_cut_off_and_the_others_get_every_row(relay, client, db, repo):
    from tests.helpers import insert

    r = await relay(send_queue_frames=50)
    name = await repo("_744_")
    fast, slow = await client(r), await client(r)
    for c in (fast, slow):
        await c.auth(r.token("A", "1"))
        await c.join(f"db-{name}")
    received: list[int] = []

    async def read_fast() -> None:
        while True:
            frame = await fast.expect("db_created", timeout=60)
            received.append(json.loads(frame["data"])["data"]["n"])

    reader = asyncio.create_task(read_fast())
    written = 0
    try:
        while len(r.state.hub.sockets) == 2:
            assert written < 5000, "the slow db- subscriber was never cut off"
            await db.execute(
                f"INSERT INTO {name} (owner_id, account_id, data) SELECT 'A', '1',"
                " jsonb_build_object('n', g, 'pad', repeat('x', 20000))"
                " FROM generate_series($1::int, $1::int + 9) g ORDER BY g",
                written,
            )
            written += 10
            await eventually(lambda w=written: len(received) >= w - 60, timeout=30)
        frames, code = await read_until_closed(slow, timeout=30)
        assert code == CloseCode.SLOW_CONSUMER == 4001
        assert len(frames) < written
        last = await insert(db, name, "A", "1", written)
        assert last
        written += 1
        await eventually(lambda: len(received) == written, timeout=30, what="every row")
    finally:
        reader.cancel()
    assert received == list(range(written))
