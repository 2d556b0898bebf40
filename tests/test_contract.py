"""The wire contract (DESIGN.md section 1) end to end, row by row, over real WebSockets.

A real relay on a free port, real aiohttp WebSocket clients and the session's
real PostgreSQL. Covers: ``init``, ``echo``, ``auth``, ``join``, ``chan_in`` /
``chan_out``; every error row (missing, wrong or foreign socket token, writing
to a channel not joined, without a channel or to a ``db-`` channel, an unknown
type, a foreign ``sid``); the shape of every server frame; who receives what in
a channel; app (tenant) isolation by ``pk`` query and ``SB-PUBLIC-KEY`` header;
and ``GET /healthz``. Unknown public keys and connection limits are in test_limits.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import RelayHandle, WsClient, app_token, random_name
from tests.helpers import new_app

FIVE_FIELDS = ("sid", "type", "data", "channel", "token")


def assert_frame_of(c: WsClient, frame: dict[str, Any]) -> None:
    """Every server frame after init: the socket's own sid and the five string fields."""
    for name in FIVE_FIELDS:
        assert name in frame, f"server frame lacks {name!r}: {frame}"
        assert isinstance(frame[name], str), f"{name!r} is not a string: {frame}"
    assert frame["sid"] == c.sid, f"frame carries sid {frame['sid']!r}, socket is {c.sid!r}"


async def expect(c: WsClient, type_: str) -> dict[str, Any]:
    frame = await c.expect(type_)
    assert_frame_of(c, frame)
    return frame


async def recv_by_type(c: WsClient, count: int) -> dict[str, dict[str, Any]]:
    """The next ``count`` frames keyed by type (for replies whose order is not specified)."""
    got: dict[str, dict[str, Any]] = {}
    for _ in range(count):
        frame = await c.recv()
        assert_frame_of(c, frame)
        assert frame["type"] not in got, f"{frame['type']} twice: {frame}"
        got[frame["type"]] = frame
    return got


async def expect_error(c: WsClient, *fragments: str) -> dict[str, Any]:
    frame = await expect(c, "error")
    for fragment in fragments:
        assert fragment in frame["data"], f"{fragment!r} not in error {frame['data']!r}"
    return frame


async def expect_echo_works(c: WsClient, text: str = "still here") -> None:
    await c.send(type="echo", data=text)
    frame = await expect(c, "echo")
    assert frame["data"] == "echo: " + text


async def member(
    relay_handle: RelayHandle, client, user: str, channel: str, app: Any = None, **kw
) -> WsClient:
    """A client that connected, authenticated and joined ``channel`` (``app``: an app
    record from relay.plans.create_app, whose own key signs the token)."""
    c = await client(relay_handle, **kw)
    await c.auth(app_token(app, user, "acct") if app else relay_handle.token(user, "acct"))
    await c.join(channel)
    return c


# --- connect, echo ------------------------------------------------------------------------


async def test_init_has_empty_sid_and_a_uuid_socket_id(relay, client):
    r = await relay()
    c = await client(r, init=False)
    frame = await c.recv()
    assert frame["type"] == "init"
    assert frame["sid"] == ""
    assert str(uuid.UUID(frame["data"])) == frame["data"]
    assert frame["channel"] == "" and frame["token"] == ""


async def test_every_socket_gets_its_own_id(relay, client):
    r = await relay()
    ids = {(await client(r)).sid for _ in range(3)}
    assert len(ids) == 3


async def test_echo_replies_with_prefix_and_own_sid(relay, client):
    r = await relay()
    c = await client(r)
    await c.send(type="echo", data="hello")
    frame = await expect(c, "echo")
    assert frame["data"] == "echo: hello"
    assert frame["channel"] == "" and frame["token"] == ""


async def test_echo_without_data_and_with_null_fields(relay, client):
    r = await relay()
    c = await client(r)
    await c.send(type="echo", token=None, channel=None, sid=None)
    frame = await expect(c, "echo")
    assert frame["data"] == "echo: "


async def test_echo_keeps_unicode_and_json_text(relay, client):
    r = await relay()
    c = await client(r)
    payload = '{"msg": "héllo ✓ \\"quoted\\""}'
    await c.send(type="echo", data=payload)
    assert (await expect(c, "echo"))["data"] == "echo: " + payload


# --- auth ---------------------------------------------------------------------------------


async def test_auth_with_valid_session_token_returns_socket_token(relay, client):
    r = await relay()
    c = await client(r)
    await c.send(type="auth", data=r.token("alice", "acme"), token=None)
    frame = await expect(c, "token")
    assert frame["data"]
    assert frame["data"] != r.token("alice", "acme")


async def test_auth_twice_gives_a_fresh_socket_token(relay, client):
    r = await relay()
    c = await client(r)
    first = await c.auth(r.token("alice", "acme"))
    second = await c.auth(r.token("alice", "acme"))
    assert first != second


@pytest.mark.parametrize(
    "bad",
    ["", "garbage", "a.b.c", "wrong-secret", "expired"],
)
async def test_auth_with_bad_session_token_is_invalid_token(relay, client, bad):
    from relay.auth import mint_token

    r = await relay()
    c = await client(r)
    if bad == "wrong-secret":
        bad = mint_token("not-the-relay-secret-" + "z" * 32, "alice", "acme")
    elif bad == "expired":
        bad = r.token("alice", "acme", ttl_seconds=-60)
    await c.send(type="auth", data=bad)
    frame = await expect_error(c)
    assert frame["data"] == "invalid token"
    await expect_echo_works(c)


async def test_auth_without_data_is_invalid_token(relay, client):
    r = await relay()
    c = await client(r)
    await c.send(type="auth", token=None)
    assert (await expect_error(c))["data"] == "invalid token"


# --- join and chan_in ---------------------------------------------------------------------


async def test_join_replies_joined_with_data_and_channel(relay, client):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acme"))
    room = random_name()
    await c.send(type="join", data=room, token=c.token)
    frame = await expect(c, "joined")
    assert frame["data"] == room and frame["channel"] == room


async def test_join_twice_is_harmless_and_delivers_once(relay, client):
    r = await relay()
    room = random_name()
    c = await member(r, client, "alice", room)
    await c.join(room)
    await c.publish(room, "once")
    assert (await expect(c, "chan_out"))["data"] == "once"
    await c.silent()


async def test_chan_in_gives_ok_to_sender_and_chan_out_to_every_member(relay, client):
    r = await relay()
    room = random_name()
    alice = await member(r, client, "alice", room)
    bob = await member(r, client, "bob", room)
    carol = await member(r, client, "carol", room)

    await alice.send(type="chan_in", channel=room, data='{"text":"hi"}', token=alice.token)
    got = await recv_by_type(alice, 2)
    assert set(got) == {"ok", "chan_out"}
    assert got["ok"]["channel"] == room
    assert got["chan_out"]["channel"] == room and got["chan_out"]["data"] == '{"text":"hi"}'

    for other in (bob, carol):
        frame = await expect(other, "chan_out")
        assert frame["channel"] == room and frame["data"] == '{"text":"hi"}'
        assert frame["token"] == ""
    for c in (alice, bob, carol):
        await c.silent()


async def test_two_users_see_each_others_messages_and_a_stranger_sees_nothing(relay, client):
    r = await relay()
    room = random_name()
    alice = await member(r, client, "alice", room)
    bob = await member(r, client, "bob", room)
    stranger = await member(r, client, "eve", random_name("elsewhere"))
    lurker = await client(r)  # connected, never authenticated
    await lurker.auth(r.token("mallory", "acct"))

    await alice.publish(room, "from alice")
    assert (await expect(alice, "chan_out"))["data"] == "from alice"
    assert (await expect(bob, "chan_out"))["data"] == "from alice"

    await bob.publish(room, "from bob")
    assert (await expect(bob, "chan_out"))["data"] == "from bob"
    assert (await expect(alice, "chan_out"))["data"] == "from bob"

    await stranger.silent()
    await lurker.silent()


async def test_messages_arrive_in_the_order_sent(relay, client):
    r = await relay()
    room = random_name()
    alice = await member(r, client, "alice", room)
    bob = await member(r, client, "bob", room)
    for i in range(20):
        await alice.send(type="chan_in", channel=room, data=str(i), token=alice.token)
    received = [(await expect(bob, "chan_out"))["data"] for _ in range(20)]
    assert received == [str(i) for i in range(20)]


async def test_member_who_disconnected_does_not_break_the_channel(relay, client):
    r = await relay()
    room = random_name()
    alice = await member(r, client, "alice", room)
    bob = await member(r, client, "bob", room)
    await bob.close()
    await alice.publish(room, "anyone?")
    assert (await expect(alice, "chan_out"))["data"] == "anyone?"


# --- error rows -------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "not-a-token"])
async def test_join_without_valid_socket_token_is_invalid_token(relay, client, token):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acme"))
    await c.send(type="join", data=random_name(), token=token)
    assert (await expect_error(c))["data"] == "invalid token"


async def test_join_before_auth_is_invalid_token(relay, client):
    r = await relay()
    c = await client(r)
    await c.send(type="join", data=random_name(), token=None)
    assert (await expect_error(c))["data"] == "invalid token"


async def test_join_with_session_token_instead_of_socket_token_is_invalid_token(relay, client):
    r = await relay()
    c = await client(r)
    session = r.token("alice", "acme")
    await c.auth(session)
    await c.send(type="join", data=random_name(), token=session)
    assert (await expect_error(c))["data"] == "invalid token"


@pytest.mark.parametrize("token", [None, "", "not-a-token"])
async def test_chan_in_without_valid_socket_token_is_invalid_token(relay, client, token):
    r = await relay()
    room = random_name()
    c = await member(r, client, "alice", room)
    listener = await member(r, client, "bob", room)
    await c.send(type="chan_in", channel=room, data="x", token=token)
    assert (await expect_error(c))["data"] == "invalid token"
    await listener.silent()


async def test_socket_token_from_another_socket_is_refused(relay, client):
    r = await relay()
    room = random_name()
    a = await member(r, client, "alice", room)
    b = await client(r)
    await b.auth(r.token("bob", "acct"))

    await b.send(type="join", data=room, token=a.token)
    assert (await expect_error(b))["data"] == "invalid token"

    never_authed = await client(r)
    await never_authed.send(type="join", data=room, token=a.token)
    assert (await expect_error(never_authed))["data"] == "invalid token"
    await never_authed.send(type="chan_in", channel=room, data="spoof", token=a.token)
    assert (await expect_error(never_authed))["data"] == "invalid token"
    await a.silent()


async def test_old_socket_token_is_refused_after_reauth(relay, client):
    r = await relay()
    c = await client(r)
    old = await c.auth(r.token("alice", "acme"))
    await c.auth(r.token("alice", "acme"))
    await c.send(type="join", data=random_name(), token=old)
    assert (await expect_error(c))["data"] == "invalid token"


async def test_chan_in_to_a_channel_not_joined_is_an_error(relay, client):
    r = await relay()
    room = random_name()
    insider = await member(r, client, "alice", room)
    outsider = await member(r, client, "bob", random_name("other"))
    await outsider.send(type="chan_in", channel=room, data="sneak", token=outsider.token)
    frame = await expect_error(outsider, "not a member", "join it first")
    assert frame["channel"] == room
    await insider.silent()


@pytest.mark.parametrize("channel", [None, ""])
async def test_chan_in_without_channel_is_an_error(relay, client, channel):
    r = await relay()
    c = await member(r, client, "alice", random_name())
    await c.send(type="chan_in", channel=channel, data="x", token=c.token)
    await expect_error(c, "needs 'channel'")


async def test_chan_in_to_a_db_channel_is_an_error(relay, client, repo):
    r = await relay()
    name = await repo("_766_")
    c = await client(r)
    await c.auth(r.token("alice", "acme"))
    await c.join(f"db-{name}")
    await c.send(type="chan_in", channel=f"db-{name}", data="{}", token=c.token)
    await expect_error(c, "cannot write to a database channel")
    await c.send(type="chan_in", channel="db-not-joined", data="{}", token=c.token)
    await expect_error(c, "cannot write to a database channel")


async def test_join_db_channel_of_unwatched_table_is_an_error(relay, client):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acme"))
    await c.send(type="join", data="db-no_such_table_xyz", token=c.token)
    frame = await expect_error(c, "not a watched table")
    assert frame["channel"] == "db-no_such_table_xyz"


@pytest.mark.parametrize("data", [None, ""])
async def test_join_without_channel_name_is_an_error(relay, client, data):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acme"))
    await c.send(type="join", data=data, token=c.token)
    await expect_error(c, "channel name")


@pytest.mark.parametrize("name", ["has space", "semi;colon", 'quote"s', "x" * 201])
async def test_join_with_an_unusable_channel_name_is_an_error(relay, client, name):
    r = await relay()
    c = await client(r)
    await c.auth(r.token("alice", "acme"))
    await c.send(type="join", data=name, token=c.token)
    await expect_error(c, "channel name")
    await expect_echo_works(c)


@pytest.mark.parametrize("type_", ["publish", "ECHO", "leave", "chan_out", "init", "token"])
async def test_unknown_type_is_an_error_naming_it(relay, client, type_):
    r = await relay()
    c = await client(r)
    await c.send(type=type_, data="x")
    await expect_error(c, "unknown type", repr(type_), "echo, auth, join, chan_in")
    await expect_echo_works(c)


async def test_sid_of_another_socket_is_refused(relay, client):
    r = await relay()
    room = random_name()
    a = await member(r, client, "alice", room)
    b = await member(r, client, "bob", room)
    await a.send(type="echo", data="x", sid=b.sid)
    await expect_error(a, "sid does not match")
    await a.send(type="chan_in", channel=room, data="as bob", token=a.token, sid=b.sid)
    await expect_error(a, "sid does not match")
    await a.send(type="echo", data="x", sid="made-up")
    await expect_error(a, "sid does not match")
    await b.silent()


async def test_own_sid_or_empty_or_null_sid_is_accepted(relay, client):
    r = await relay()
    room = random_name()
    c = await client(r)
    for sid in (c.sid, "", None):
        await c.send(type="echo", data="x", sid=sid)
        assert (await expect(c, "echo"))["data"] == "echo: x"
    await c.send(type="auth", data=r.token("alice", "acme"), sid=c.sid)
    c.token = (await expect(c, "token"))["data"]
    await c.send(type="join", data=room, token=c.token, sid=c.sid)
    await expect(c, "joined")
    await c.send(type="chan_in", channel=room, data="mine", token=c.token, sid=c.sid)
    got = await recv_by_type(c, 2)
    assert set(got) == {"ok", "chan_out"} and got["chan_out"]["data"] == "mine"


async def test_every_frame_after_init_carries_own_sid_and_five_strings(relay, client):
    """Walk through every kind of reply and check each frame's shape on the raw socket."""
    r = await relay()
    room = random_name()
    c = await client(r)
    other = await member(r, client, "bob", room)
    sent = [
        {"type": "echo", "data": "a"},
        {"type": "auth", "data": "bad"},
        {"type": "auth", "data": r.token("alice", "acme")},
        {"type": "nope"},
        {"type": "join", "data": room, "token": "wrong"},
    ]
    frames: list[dict[str, Any]] = []
    for obj in sent:
        await c.send(**obj)
        frames.append(await c.recv())
    token = frames[2]["data"]
    await c.send(type="join", data=room, token=token)
    frames.append(await c.recv())
    await c.send(type="chan_in", channel=room, data="x", token=token)
    frames += [await c.recv(), await c.recv()]
    assert (await expect(other, "chan_out"))["data"] == "x"
    await other.publish(room, "y")
    frames.append(await c.recv())
    types = [f["type"] for f in frames]
    assert types[:6] == ["echo", "error", "token", "error", "error", "joined"]
    assert sorted(types[6:8]) == ["chan_out", "ok"]
    assert types[8] == "chan_out" and frames[8]["data"] == "y"
    for frame in frames:
        assert_frame_of(c, frame)


# --- apps (tenants) ----------------------------------------------------------------------


async def test_channels_of_different_apps_do_not_leak(relay, client, db):
    r = await relay()
    x, y_app = [await new_app(db) for _ in range(2)]
    key_x, key_y = x.public_key, y_app.public_key
    assert key_x and key_y
    room = random_name()  # the same channel name in every app
    default = await member(r, client, "d", room)
    x_by_query = await member(r, client, "x1", room, x, pk=key_x)
    x_by_header = await member(r, client, "x2", room, x, headers={"SB-PUBLIC-KEY": key_x})
    y = await member(r, client, "y", room, y_app, pk=key_y)

    await default.publish(room, "to default")
    assert (await expect(default, "chan_out"))["data"] == "to default"
    for c in (x_by_query, x_by_header, y):
        await c.silent()

    await x_by_query.publish(room, "to x")
    assert (await expect(x_by_query, "chan_out"))["data"] == "to x"
    assert (await expect(x_by_header, "chan_out"))["data"] == "to x"
    for c in (default, y):
        await c.silent()

    await y.publish(room, "to y")
    assert (await expect(y, "chan_out"))["data"] == "to y"
    for c in (default, x_by_query, x_by_header):
        await c.silent()


async def test_empty_public_key_means_the_default_app(relay, client):
    r = await relay()
    room = random_name()
    plain = await member(r, client, "a", room)
    empty_query = await member(r, client, "b", room, pk="")
    empty_header = await member(r, client, "c", room, headers={"SB-PUBLIC-KEY": ""})
    await plain.publish(room, "hello")
    for c in (plain, empty_query, empty_header):
        assert (await expect(c, "chan_out"))["data"] == "hello"


# --- http --------------------------------------------------------------------------------


async def test_healthz_answers_200(relay, client):
    r = await relay()
    await client(r)
    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/healthz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ok"
    assert body["sockets"] == 1
