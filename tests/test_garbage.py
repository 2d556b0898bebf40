"""Garbage in, over real WebSockets: malformed frames get an ``error`` and change nothing else.

For every kind of bad input (binary frames, text that is not JSON, JSON that is
not an object, 1 MiB frames, fields of the wrong type, an empty object, huge
unknown type names and channel names) the sender gets an ``error`` frame with a
short, readable reason, its socket stays open and usable, and a second socket
sharing a channel with it receives nothing unexpected and still gets its
messages. Also: the error budget (more than ``ERROR_BUDGET`` errors within
``ERROR_WINDOW`` seconds closes a socket with code 4000, per socket), and the
protocol-level limits aiohttp enforces (invalid UTF-8: 1007, over 4 MiB: 1009).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from relay.limits import ERROR_BUDGET
from relay.protocol import CloseCode
from tests.conftest import RelayHandle, WsClient, random_name
from tests.helpers import read_until_closed

MIB = 1024 * 1024
# Placeholders in a frame template, filled in with the sender's real values.
TOKEN = object()
ROOM = object()


@dataclass
class Pair:
    """A sender of garbage and a bystander, both members of one channel."""

    relay: RelayHandle
    room: str
    sender: WsClient
    bystander: WsClient


@pytest.fixture
async def pair(relay, client) -> Pair:
    r = await relay()
    room = random_name()
    sender = await client(r)
    await sender.auth(r.token("sender", "acct"))
    await sender.join(room)
    bystander = await client(r)
    await bystander.auth(r.token("bystander", "acct"))
    await bystander.join(room)
    return Pair(r, room, sender, bystander)


def fill(template: Any, pair: Pair) -> Any:
    if template is TOKEN:
        return pair.sender.token
    if template is ROOM:
        return pair.room
    if isinstance(template, dict):
        return {k: fill(v, pair) for k, v in template.items()}
    return template


def assert_readable_error(frame: dict[str, Any], sid: str, *fragments: str) -> None:
    assert frame["type"] == "error", f"expected an error frame, got {frame}"
    assert frame["sid"] == sid
    reason = frame["data"]
    assert isinstance(reason, str) and 10 <= len(reason) <= 300, f"unreadable reason {reason!r}"
    assert reason.isprintable(), f"reason has control characters: {reason!r}"
    for fragment in fragments:
        assert fragment in reason, f"{fragment!r} not in {reason!r}"
    for name in ("channel", "token"):
        assert isinstance(frame[name], str) and len(frame[name]) <= 300


async def assert_unharmed(pair: Pair) -> None:
    """The sender still works, the bystander saw nothing and still gets channel messages
    (the sender's message is the first frame the bystander gets)."""
    await pair.sender.send(type="echo", data="still here")
    echo = await pair.sender.expect("echo")
    assert echo["data"] == "echo: still here" and echo["sid"] == pair.sender.sid
    await pair.sender.publish(pair.room, "after the garbage")
    assert (await pair.sender.expect("chan_out"))["data"] == "after the garbage"
    frame = await pair.bystander.expect("chan_out")
    assert frame["data"] == "after the garbage" and frame["channel"] == pair.room
    assert frame["sid"] == pair.bystander.sid


# --- text that is not a JSON object ------------------------------------------------------------

NOT_AN_OBJECT = [
    pytest.param("hello", "not valid JSON", id="word"),
    pytest.param("", "not valid JSON", id="empty-text"),
    pytest.param("{", "not valid JSON", id="open-brace"),
    pytest.param("{'type': 'echo'}", "not valid JSON", id="single-quotes"),
    pytest.param('{"type":"echo"}{"type":"echo"}', "not valid JSON", id="two-objects"),
    pytest.param('{"type":"echo","data":NaN}', "not valid JSON", id="nan"),
    pytest.param('{"type":"echo","data":"\\ud800"}', "not valid JSON", id="lone-surrogate"),
    pytest.param("[" * 5000 + "]" * 5000, "not valid JSON", id="deep-nesting"),
    pytest.param("\x00\x01\x02", "not valid JSON", id="control-chars"),
    pytest.param("[]", "JSON object, got an array", id="empty-array"),
    pytest.param('[{"type":"echo","data":"x"}]', "JSON object, got an array", id="array"),
    pytest.param("42", "JSON object, got a number", id="integer"),
    pytest.param("-1.5e10", "JSON object, got a number", id="float"),
    pytest.param('"echo"', "JSON object, got a string", id="string"),
    pytest.param("null", "JSON object, got null", id="null"),
    pytest.param("true", "JSON object, got a boolean", id="boolean"),
    pytest.param("{}", "no 'type'", id="empty-object"),
    pytest.param('{"data":"x","token":null}', "no 'type'", id="no-type"),
    pytest.param("x" * MIB, "frame too large", id="1MiB-not-json"),
    pytest.param(
        json.dumps({"type": "echo", "data": "x" * MIB}), "frame too large", id="1MiB-echo"
    ),
    pytest.param(json.dumps({"type": "t" * 100_000}), "unknown type", id="huge-unknown-type"),
]


@pytest.mark.parametrize(("text", "reason"), NOT_AN_OBJECT)
async def test_malformed_text_gets_readable_error_and_harms_nothing(pair: Pair, text, reason):
    await pair.sender.send_raw(text)
    assert_readable_error(await pair.sender.recv(), pair.sender.sid, reason)
    await assert_unharmed(pair)


@pytest.mark.parametrize(
    "payload",
    [b'{"type":"echo","data":"x"}', b"\x00\xff\xfe", b"", b"x" * MIB],
    ids=["json-bytes", "raw-bytes", "empty", "1MiB"],
)
async def test_binary_frame_gets_readable_error_and_harms_nothing(pair: Pair, payload):
    await pair.sender.ws.send_bytes(payload)
    assert_readable_error(await pair.sender.recv(), pair.sender.sid, "binary frames")
    await assert_unharmed(pair)


# --- JSON objects with bad content ----------------------------------------------------------------

WRONG_VALUES = [
    pytest.param(42, "a number", id="number"),
    pytest.param(-0.5, "a number", id="float"),
    pytest.param({"text": "hi"}, "an object", id="object"),
    pytest.param(True, "a boolean", id="true"),
    pytest.param(False, "a boolean", id="false"),
    pytest.param(["a"], "an array", id="array"),
]


@pytest.mark.parametrize("field", ["data", "type", "channel", "token", "sid"])
@pytest.mark.parametrize(("value", "kind"), WRONG_VALUES)
async def test_field_of_wrong_type_gets_readable_error(pair: Pair, field, value, kind):
    """A chan_in that would be delivered, but for one field that is not a string."""
    template = {"type": "chan_in", "channel": ROOM, "token": TOKEN, "data": "hello", field: value}
    await pair.sender.send(**fill(template, pair))
    assert_readable_error(
        await pair.sender.recv(), pair.sender.sid, f"field '{field}' must be a string", kind
    )
    await assert_unharmed(pair)


async def test_json_payload_as_object_hints_to_send_json_text(pair: Pair):
    await pair.sender.send(type="chan_in", channel=pair.room, token=pair.sender.token, data={})
    assert_readable_error(await pair.sender.recv(), pair.sender.sid, "JSON text")
    await assert_unharmed(pair)


async def test_1mib_data_in_chan_in_is_refused_and_not_delivered(pair: Pair):
    big = "y" * MIB
    await pair.sender.send(type="chan_in", channel=pair.room, token=pair.sender.token, data=big)
    assert_readable_error(await pair.sender.recv(), pair.sender.sid, "frame too large", "limit")
    await assert_unharmed(pair)


async def test_data_under_the_frame_limit_is_delivered_whole(pair: Pair):
    """The counterpart of the 1 MiB refusal: a large but allowed payload goes through."""
    limit = pair.relay.state.settings.max_frame_bytes
    data = "z" * (limit - 1000)
    await pair.sender.publish(pair.room, data)
    assert (await pair.sender.expect("chan_out"))["data"] == data
    assert (await pair.bystander.expect("chan_out"))["data"] == data


async def test_multibyte_data_over_the_byte_limit_is_refused(pair: Pair):
    """The frame limit counts UTF-8 bytes, not characters (each of these is 3 bytes)."""
    limit = pair.relay.state.settings.max_frame_bytes
    data = "日" * (limit // 3 + 1000)
    frame = {"type": "chan_in", "channel": pair.room, "token": pair.sender.token, "data": data}
    text = json.dumps(frame, ensure_ascii=False)  # raw UTF-8, not \u escapes
    assert len(text) < limit < len(text.encode())
    await pair.sender.send_raw(text)
    assert_readable_error(await pair.sender.recv(), pair.sender.sid, "frame too large")
    await assert_unharmed(pair)


async def test_huge_channel_name_in_chan_in_gets_a_small_error(pair: Pair):
    huge = "c" * 100_000
    await pair.sender.send(type="chan_in", channel=huge, token=pair.sender.token, data="x")
    msg = await asyncio.wait_for(pair.sender.ws.receive(), 5)
    assert msg.type is WSMsgType.TEXT
    assert len(msg.data) < 2000, f"error frame is {len(msg.data)} bytes long"
    assert_readable_error(json.loads(msg.data), pair.sender.sid, "not a member")
    await assert_unharmed(pair)


async def test_huge_channel_name_in_join_gets_a_small_error(pair: Pair):
    huge = "c" * 100_000
    await pair.sender.send(type="join", data=huge, token=pair.sender.token)
    msg = await asyncio.wait_for(pair.sender.ws.receive(), 5)
    assert len(msg.data) < 2000, f"error frame is {len(msg.data)} bytes long"
    assert_readable_error(json.loads(msg.data), pair.sender.sid, "channel name too long")
    await assert_unharmed(pair)


async def test_garbage_from_an_unauthenticated_socket_harms_nobody(relay, client):
    r = await relay()
    room = random_name()
    member = await client(r)
    await member.auth(r.token("m", "acct"))
    await member.join(room)
    intruder = await client(r)
    for text in ("nope", "[]", json.dumps({"type": "chan_in", "channel": room, "data": "x"})):
        await intruder.send_raw(text)
        assert (await intruder.recv())["type"] == "error"
    await member.publish(room, "mine")  # the first thing it hears is its own message
    assert (await member.expect("chan_out"))["data"] == "mine"
    await intruder.send(type="echo", data="ok")
    assert (await intruder.expect("echo"))["data"] == "echo: ok"


# --- the error budget ---------------------------------------------------------------------------


async def flood(c: WsClient, count: int) -> None:
    """Send ``count`` bad frames; the server may hang up part way, which is the point."""
    with contextlib.suppress(ConnectionError):
        for i in range(count):
            await c.send_raw(f"garbage {i}")


async def test_flooding_errors_closes_the_socket_with_4000(pair: Pair, client):
    other = await client(pair.relay)
    await other.auth(pair.relay.token("other", "acct"))
    await other.join(pair.room)

    await flood(pair.sender, ERROR_BUDGET * 3)
    frames, code = await read_until_closed(pair.sender)
    assert code == CloseCode.ABUSE == 4000
    assert len(frames) > ERROR_BUDGET
    assert all(f["type"] == "error" and "not valid JSON" in f["data"] for f in frames)

    # Everyone else carries on: no stray frames (the next one is the message), and
    # the channel still works.
    await other.publish(pair.room, "carry on")
    assert (await pair.bystander.expect("chan_out"))["data"] == "carry on"
    assert (await other.expect("chan_out"))["data"] == "carry on"
    await other.send(type="echo", data="x")
    assert (await other.expect("echo"))["data"] == "echo: x"
    # The closed socket is gone from the relay and has left the channel.
    assert pair.sender.sid not in pair.relay.state.hub.sockets


async def test_errors_within_the_budget_do_not_close(pair: Pair):
    await flood(pair.sender, ERROR_BUDGET)
    for _ in range(ERROR_BUDGET):
        assert (await pair.sender.recv())["type"] == "error"
    await assert_unharmed(pair)


async def test_error_budget_is_per_socket(pair: Pair):
    """Two sockets with most of a budget each: neither is closed."""
    each = ERROR_BUDGET * 3 // 4
    for c in (pair.sender, pair.bystander):
        await flood(c, each)
    for c in (pair.sender, pair.bystander):
        for _ in range(each):
            assert (await c.recv())["type"] == "error"
    await assert_unharmed(pair)


# --- what aiohttp cuts off at the WebSocket level ------------------------------------------------


async def test_invalid_utf8_text_frame_closes_only_that_socket(pair: Pair):
    await pair.sender.ws.send_frame(b'{"type":"echo","data":"\xff"}', WSMsgType.TEXT)
    frames, code = await read_until_closed(pair.sender)
    assert frames == []
    assert code == aiohttp.WSCloseCode.INVALID_TEXT  # 1007
    await pair.bystander.send(type="echo", data="x")
    assert (await pair.bystander.expect("echo"))["data"] == "echo: x"
    await pair.bystander.silent()


async def test_frame_over_the_hard_limit_closes_only_that_socket(pair: Pair):
    """Just over 4 MiB: close 1009 (message too big); just under it: an error frame."""
    under = json.dumps({"type": "echo", "data": "x" * (4 * MIB - 100)})
    await pair.sender.send_raw(under)
    assert "frame too large" in (await pair.sender.expect("error"))["data"]
    text = json.dumps({"type": "echo", "data": "x" * (4 * MIB + 1)})
    with contextlib.suppress(ConnectionError):
        await pair.sender.send_raw(text)
    frames, code = await read_until_closed(pair.sender, timeout=10)
    assert frames == []
    assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG == 1009
    await pair.bystander.send(type="echo", data="x")
    assert (await pair.bystander.expect("echo"))["data"] == "echo: x"
    other_room_msg = "still flowing"
    await pair.bystander.publish(pair.room, other_room_msg)
    assert (await pair.bystander.expect("chan_out"))["data"] == other_room_msg
