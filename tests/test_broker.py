"""Brokers: the same contract for memory:// and redis://, and chat across relay processes.

The Redis tests use a real redis-server started by the ``redis_url`` fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from relay.broker import create_broker
from tests.conftest import random_name
from tests.helpers import eventually, readyz, redis_clients, redis_subscribers, wait_for_sockets


@pytest.fixture(params=["memory", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


async def test_broker_delivers_subscribed_channels_only(broker_url: str) -> None:
    got: list[tuple[str, str, str]] = []
    arrived = asyncio.Event()

    def deliver(app_id: str, channel: str, data: str) -> None:
        got.append((app_id, channel, data))
        if data == "last":
            arrived.set()

    broker = create_broker(broker_url, deliver)
    await broker.start()
    try:
        await broker.subscribe("app", "room")
        await broker.publish("other-app", "room", "not for us")
        await broker.publish("app", "room", "hello")
        await broker.publish("app", "room", "last")
        await asyncio.wait_for(arrived.wait(), 5)
        wanted = [("app", "room", "hello"), ("app", "room", "last")]
        if broker_url == "memory://":
            # In-process: the hub itself filters by membership; the broker hands everything on.
            got = [g for g in got if g[0] == "app"]
        assert got == wanted
    finally:
        await broker.close()


async def test_ping_says_whether_the_broker_answers(broker_url: str) -> None:
    broker = create_broker(broker_url, lambda *_: None)
    if broker_url != "memory://":
        assert await broker.ping() is False  # not connected yet
    await broker.start()
    try:
        assert await broker.ping() is True
    finally:
        await broker.close()


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError) as refused:
        create_broker("kafka://x", lambda *_: None)
    assert str(refused.value) == "unknown broker URL scheme 'kafka': use memory:// or redis://"


def test_redis_over_tls_is_a_redis_broker() -> None:
    from relay.broker.redis import RedisBroker

    # Choosing the broker does not connect: that happens in start().
    assert isinstance(create_broker("rediss://cache.example:6380/0", lambda *_: None), RedisBroker)


async def test_a_closed_redis_broker_leaves_its_channels(redis_url: str) -> None:
    """Closing leaves every channel and closes every connection it opened to Redis."""
    room = random_name("closing")
    before = await redis_clients(redis_url)
    broker = create_broker(redis_url, lambda *_: None)
    await broker.start()
    try:
        await broker.subscribe("app", room)
        await broker.publish("app", room, "x")  # a connection for commands, too
        assert await redis_subscribers(redis_url, room) == 1
        assert await redis_clients(redis_url) > before  # a positive control for the end
    finally:
        await broker.close()
    await eventually(
        lambda: _equals(redis_subscribers(redis_url, room), 0), what="the channel left"
    )
    await eventually(
        lambda: _equals(redis_clients(redis_url), before), what="its connections closed"
    )


async def test_two_relays_share_a_channel_through_redis(relay, client, redis_url: str) -> None:
    one = await relay(broker_url=redis_url)
    two = await relay(broker_url=redis_url)
    alice = await client(one)
    bob = await client(two)
    await alice.auth(one.token("alice", "1"))
    await bob.auth(two.token("bob", "1"))
    await alice.join("lobby")
    await bob.join("lobby")
    await alice.publish("lobby", "hi from one")
    for c in (alice, bob):
        frame = await c.expect("chan_out")
        assert (frame["channel"], frame["data"]) == ("lobby", "hi from one")
    await bob.publish("lobby", "hi from two")
    for c in (alice, bob):
        assert (await c.expect("chan_out"))["data"] == "hi from two"
    # A third socket on relay one that did not join hears nothing.
    carol = await client(one)
    await carol.auth(one.token("carol", "1"))
    await alice.publish("lobby", "again")
    await carol.silent()


async def test_leaving_the_last_member_unsubscribes(relay, client, redis_url: str) -> None:
    """Each relay follows a channel on Redis exactly while one of its sockets is in it."""
    one = await relay(broker_url=redis_url)
    two = await relay(broker_url=redis_url)
    room = random_name("quiet")
    alice = await client(one)
    await alice.auth(one.token("alice", "1"))
    await alice.join(room)
    assert await redis_subscribers(redis_url, room) == 1
    bob = await client(two)
    await bob.auth(two.token("bob", "1"))
    await bob.join(room)
    bob2 = await client(two)
    await bob2.auth(two.token("bob", "1"))
    await bob2.join(room)
    assert await redis_subscribers(redis_url, room) == 2  # one per relay, not per socket
    await bob.close()
    await wait_for_sockets(two, 1)
    assert await redis_subscribers(redis_url, room) == 2  # bob2 is still there
    await bob2.close()
    await eventually(
        lambda: _equals(redis_subscribers(redis_url, room), 1), what="relay two unsubscribed"
    )
    await alice.publish(room, "anyone?")
    assert (await alice.expect("chan_out"))["data"] == "anyone?"
    await alice.silent()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_redis_outage_gives_errors_not_dead_sockets(relay, client, tmp_path) -> None:
    """While Redis is down, chat requests get error frames and sockets live on;
    once it is back, new and old channels work again."""
    from tests.conftest import free_port, start_redis

    port = free_port()
    proc = start_redis(port, str(tmp_path))
    try:
        r = await relay(broker_url=f"redis://127.0.0.1:{port}/0")
        alice = await client(r)
        await alice.auth(r.token("alice", "1"))
        await alice.join("before")
        assert (await readyz(r))[0] == 200
        proc.terminate()
        proc.wait(timeout=10)
        status, body = await readyz(r)
        assert (status, body["problems"]) == (503, ["broker unreachable"])

        bob = await client(r)
        await bob.auth(r.token("bob", "1"))
        await bob.send(type="join", data="during", token=bob.token)
        assert "unavailable" in (await bob.expect("error"))["data"]
        await alice.send(type="chan_in", channel="before", data="lost", token=alice.token)
        await alice.expect("ok")
        assert "unavailable" in (await alice.expect("error"))["data"]
        await bob.send(type="echo", data="still here")
        assert (await bob.expect("echo"))["data"] == "echo: still here"

        proc = start_redis(port, str(tmp_path))
        await bob.join("during")  # the failed join left nothing half-done behind
        # The old channel too: the broker's reader reconnects and subscribes it
        # again (a channel joined before the outage must not stay silently unsubscribed).
        url = f"redis://127.0.0.1:{port}/0"
        for room in ("before", "during"):
            await eventually(
                lambda room=room: _equals(redis_subscribers(url, room), 1),
                timeout=30,
                what=f"{room} subscribed again",
            )
        await bob.publish("during", "back")
        assert (await bob.expect("chan_out"))["data"] == "back"
        await alice.publish("before", "also back")
        assert (await alice.expect("chan_out"))["data"] == "also back"
        assert await readyz(r) == (200, {"status": "ready"})
    finally:
        proc.kill()
        proc.wait(timeout=10)
