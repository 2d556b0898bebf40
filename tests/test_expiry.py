"""Session expiry: when a session token's ``exp`` passes, the socket is told; its channels pause.

A fresh ``auth`` on the same socket renews the session: before expiry nothing
is interrupted; after it, the paused channels are rejoined (one ``joined``
frame each after the ``token`` frame).
"""

from __future__ import annotations

import json
import time

import jwt

from relay.sessions import COMPACT_MIN
from tests.conftest import WsClient, random_name
from tests.helpers import eventually, insert

# Tokens carry whole seconds: a 2 s token expires 1-2 s after it is minted.
EXPIRY_WAIT = 10.0


async def expect_n(c: WsClient, type_: str) -> int:
    frame = await c.expect(type_, timeout=10)
    n: int = json.loads(frame["data"])["data"]["n"]
    return n


async def expiring_member(relay, client, repo):
    """Alice (session ending in 2 s) with Bob in a chat room and on a db- channel."""
    r = await relay()
    table = await repo("_760_")
    room = random_name()
    c = await client(r)
    other = await client(r)
    await c.auth(r.token("alice", "1", ttl_seconds=2))
    await other.auth(r.token("bob", "1"))
    for member in (c, other):
        await member.join(room)
        await member.join(f"db-{table}")
    return r, table, room, c, other


async def still_serving(c: WsClient) -> None:
    """The next frame ``c`` gets is the answer to an echo: nothing was pending before it.

    The relay runs in this test's event loop, so a timer due before the echo
    was sent has run before the echo is answered."""
    await c.send(type="echo", data="ping")
    assert (await c.expect("echo"))["data"] == "echo: ping"


async def past(deadline: float) -> None:
    """Wait until the wall clock has passed ``deadline`` (a token's exp is wall-clock time)."""
    await eventually(lambda: time.time() > deadline, timeout=30, what="the deadline")


async def test_expired_session_is_told_and_loses_its_subscriptions(relay, client, db, repo):
    _, table, room, c, other = await expiring_member(relay, client, repo)

    error = await c.expect("error", timeout=EXPIRY_WAIT)
    assert "session expired" in error["data"] and error["sid"] == c.sid

    # Nothing reaches it any more: not the chat channel, not the database channel
    # (Bob, in both, gets each first: the positive control for alice's silence).
    await other.publish(room, "while expired")
    assert (await other.expect("chan_out"))["data"] == "while expired"
    await insert(db, table, "alice", "1", 1)
    assert await expect_n(other, "db_created") == 1
    await c.silent()
    # And it cannot act on its old socket token.
    await c.send(type="chan_in", channel=room, data="x", token=c.token)
    assert "session expired" in (await c.expect("error"))["data"]
    await c.send(type="join", data=random_name(), token=c.token)
    assert "session expired" in (await c.expect("error"))["data"]
    await other.silent()


async def test_fresh_auth_after_expiry_rejoins_the_paused_channels(relay, client, db, repo):
    r, table, room, c, other = await expiring_member(relay, client, repo)
    assert "session expired" in (await c.expect("error", timeout=EXPIRY_WAIT))["data"]

    await c.send(type="auth", data=r.token("alice", "1"))
    token = await c.expect("token")
    assert token["data"] and token["data"] != c.token
    c.token = token["data"]
    rejoined = {(await c.expect("joined"))["channel"] for _ in range(2)}
    assert rejoined == {room, f"db-{table}"}

    await other.publish(room, "welcome back")
    assert (await c.expect("chan_out"))["data"] == "welcome back"
    await insert(db, table, "alice", "1", 2)
    assert await expect_n(c, "db_created") == 2
    await c.publish(room, "and I can talk")
    assert (await c.expect("chan_out"))["data"] == "and I can talk"


async def test_renewing_before_expiry_interrupts_nothing(relay, client, db, repo):
    r = await relay()
    table = await repo("_760_")
    room = random_name()
    c = await client(r)
    other = await client(r)
    first = r.token("alice", "1", ttl_seconds=3)
    await c.auth(first)
    await other.auth(r.token("bob", "1"))
    await c.join(room)
    await c.join(f"db-{table}")
    await other.join(room)

    await c.auth(r.token("alice", "1", ttl_seconds=3600))
    await past(jwt.decode(first, options={"verify_signature": False})["exp"] + 1)
    await still_serving(c)  # past the first token's exp: no error came before the echo

    await other.publish(room, "still here")
    assert (await c.expect("chan_out"))["data"] == "still here"
    await insert(db, table, "alice", "1", 3)
    assert await expect_n(c, "db_created") == 3


async def test_expiry_timer_follows_the_latest_token(relay, client):
    """Renewing with another short token moves the deadline; expiry still comes."""
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "1", ttl_seconds=3600))
    await c.auth(r.token("alice", "1", ttl_seconds=2))
    error = await c.expect("error", timeout=EXPIRY_WAIT)
    assert "session expired" in error["data"]
    await still_serving(c)  # told once: no second error before the echo


async def test_expiry_is_per_socket(relay, client):
    r = await relay()
    room = random_name()
    short = await client(r)
    forever = await client(r)
    await short.auth(r.token("a", "1", ttl_seconds=2))
    await forever.auth(r.token("b", "1", ttl_seconds=3600))
    await short.join(room)
    await forever.join(room)
    assert "session expired" in (await short.expect("error", timeout=EXPIRY_WAIT))["data"]
    await forever.publish(room, "only me")
    assert (await forever.expect("chan_out"))["data"] == "only me"
    await short.silent()


async def test_session_expiring_during_a_db_join_is_not_subscribed(relay, client, db, repo):
    """The join's database round trip is held up until the session has expired:
    the join must be refused, not completed for an expired socket."""
    r = await relay()
    table = await repo("_700_")
    c = await client(r)
    await c.auth(r.token("alice", "1", ttl_seconds=2))
    probe = await client(r)
    await probe.auth(r.token("root", "x", root=True))
    await probe.join(f"db-{table}")
    async with db.transaction():
        await db.execute("LOCK TABLE relay.watched IN ACCESS EXCLUSIVE MODE")
        await c.send(type="join", data=f"db-{table}", token=c.token)
        # The session expires while the join waits for the lock: the socket is told.
        expired = await c.expect("error", timeout=EXPIRY_WAIT)
        assert "session expired" in expired["data"]
    refused = await c.expect("error", timeout=EXPIRY_WAIT)
    assert "session expired" in refused["data"] and refused["channel"] == f"db-{table}"
    await insert(db, table, "alice", "1", 1)
    assert await expect_n(probe, "db_created") == 1
    await c.silent()


def exp_of(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_each_session_expires_at_its_own_deadline(relay, client):
    """One timer serves every session: each socket is told when its own token's exp
    passes, not before, whichever order the sockets authenticated in."""
    r = await relay()
    short, longer, forever = [await client(r) for _ in range(3)]
    short_token = r.token("a", "1", ttl_seconds=2)
    longer_token = r.token("b", "1", ttl_seconds=4)
    await longer.auth(longer_token)  # armed first, due last of the two
    await short.auth(short_token)
    await forever.auth(r.token("c", "1", ttl_seconds=3600))

    assert "session expired" in (await short.expect("error", timeout=EXPIRY_WAIT))["data"]
    assert time.time() >= exp_of(short_token) - 0.01
    await still_serving(longer)  # its own exp is a second or more later
    assert "session expired" in (await longer.expect("error", timeout=EXPIRY_WAIT))["data"]
    assert time.time() >= exp_of(longer_token) - 0.01
    await still_serving(forever)
    await still_serving(short)  # told once


async def test_renewals_and_departures_leave_no_entries_behind(relay, client):
    """Every auth re-arms the session; the deadlines it replaced (and those of sockets
    that left) are dropped from the heap, so a client renewing in a loop cannot grow it."""
    r = await relay(messages_per_second=0)
    expiry = r.state.expiry
    c = await client(r)
    for i in range(300):
        await c.auth(r.token("a", "1", ttl_seconds=3600 + i))
    assert len(expiry) == 1
    assert len(expiry._heap) <= 2 * COMPACT_MIN + 2
    for _ in range(3):
        gone = await client(r)
        await gone.auth(r.token("g", "1", ttl_seconds=3600))
        await gone.close()
    await eventually(lambda: len(expiry) == 1, what="the departed sockets' deadlines dropped")
    # The live entry still fires, at its new deadline.
    await c.auth(r.token("a", "1", ttl_seconds=2))
    assert "session expired" in (await c.expect("error", timeout=EXPIRY_WAIT))["data"]
    assert len(expiry) == 0
