"""Fuzzing the wire: the frame parser in isolation, then random frames against a live relay.

1. ``parse_frame`` on random text, random bytes and random JSON never raises
   anything but ``RelayError``, and a frame it accepts carries exactly the
   string fields that were sent.
2. One socket sends random frames (garbage, wrong types, real and fake tokens,
   channels it is and is not in) to a running relay. A small model of the wire
   contract predicts the one reply to each frame; a second socket in the
   channel must receive exactly the ``chan_out`` frames of the valid
   publishes, in order, and nothing else. Silence is checked in-band: after
   each example the observer publishes a marker, and everything it receives
   before its own marker must be what the model expected.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay.protocol import ClientFrame, RelayError, parse_frame
from tests.conftest import RelayHandle, WsClient, random_name

LIMIT = 64 * 1024

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.none() | st.text(max_size=30) | json_values
frame_dicts = st.dictionaries(
    st.sampled_from(["sid", "type", "data", "channel", "token", "after"]) | st.text(max_size=8),
    field_values,
    max_size=6,
)


def check_parse(raw: str | bytes) -> ClientFrame | None:
    try:
        frame = parse_frame(raw, LIMIT)
    except RelayError as err:
        assert err.message and isinstance(err.message, str)
        return None
    assert isinstance(frame.type, str) and frame.type
    for value in (frame.sid, frame.data, frame.channel, frame.token):
        assert value is None or isinstance(value, str)
    return frame


# --- 1. the parser -------------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_parse_frame_random_text_raises_only_relay_error(raw: str):
    check_parse(raw)


@given(st.binary(max_size=300))
def test_parse_frame_random_bytes_raises_only_relay_error(raw: bytes):
    check_parse(raw)


@given(json_values)
def test_parse_frame_random_json_raises_only_relay_error(value: Any):
    raw = json.dumps(value)
    frame = check_parse(raw)
    if frame is not None:
        assert isinstance(value, dict)


@given(frame_dicts)
def test_parse_frame_accepts_exactly_objects_of_strings_with_a_type(obj: dict[str, Any]):
    frame = check_parse(json.dumps(obj))
    sent = {k: v for k, v in obj.items() if v is not None}
    valid = all(isinstance(v, str) for v in sent.values()) and bool(sent.get("type"))
    assert (frame is not None) == valid
    if frame is not None:
        got = {"type": frame.type, **(frame.extra or {})}
        for name in ("sid", "data", "channel", "token"):
            if getattr(frame, name) is not None:
                got[name] = getattr(frame, name)
        assert got == sent


@given(frame_dicts, st.data())
def test_parse_frame_survives_corrupted_frames(obj: dict[str, Any], data: st.DataObject):
    raw = json.dumps(obj)
    cut = data.draw(st.integers(0, len(raw)))
    junk = data.draw(st.text(max_size=5))
    check_parse(raw[:cut] + junk + raw[cut + 1 :])


@given(st.integers(LIMIT + 1, LIMIT * 2))
def test_parse_frame_refuses_oversized_before_parsing(size: int):
    assert check_parse(" " * (size - 2) + "{}") is None


# --- 2. a live relay -----------------------------------------------------------------------------

# Placeholders in generated frames, resolved when the frame is sent.
TOKEN, OLD_TOKEN, SESSION, OWN_SID, ROOM, OTHER_ROOM = (
    "<token>",
    "<old-token>",
    "<session>",
    "<sid>",
    "<room>",
    "<other-room>",
)
CHANNEL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:@/")

channels = st.sampled_from(
    [ROOM, OTHER_ROOM, "db-not-watched", "", "bad name!", "x" * 201, "ok.name:1@x/y"]
) | st.text(alphabet="abc-:/ ", min_size=1, max_size=8)
structured = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["echo", "auth", "join", "chan_in", "", "ECHO", "leave"])
        | st.text(max_size=6)
        | st.integers(),
        "data": st.none() | st.text(max_size=40) | channels | st.just(SESSION) | json_values,
        "token": st.sampled_from([TOKEN, TOKEN, OLD_TOKEN, "garbage", "", None]) | st.integers(),
        "channel": st.none() | channels | st.lists(st.text(max_size=3), max_size=2),
        "sid": st.sampled_from([None, OWN_SID, "", str(uuid.UUID(int=7))]),
        "x-extra": st.text(max_size=5) | st.integers(),
    },
)
# Near-valid frames, so that the paths past validation are exercised too.
tokens = st.sampled_from([TOKEN, TOKEN, TOKEN, OLD_TOKEN, None])
sids = st.sampled_from([OWN_SID, OWN_SID, "", str(uuid.UUID(int=7))])
payloads = st.text(max_size=40) | json_values.map(json.dumps)
publish = st.fixed_dictionaries(
    {
        "type": st.just("chan_in"),
        "token": tokens,
        "channel": st.sampled_from([ROOM, ROOM, ROOM, OTHER_ROOM, "db-not-watched", ""]),
        "data": payloads,
    },
    optional={"sid": sids},
)
join = st.fixed_dictionaries({"type": st.just("join"), "token": tokens, "data": channels})
auth = st.fixed_dictionaries(
    {"type": st.just("auth"), "data": st.sampled_from([SESSION, SESSION, "garbage", ""])},
    optional={"token": st.none()},
)
echo = st.fixed_dictionaries({"type": st.just("echo"), "data": payloads}, optional={"sid": sids})
raw_text = st.text(max_size=60).filter(lambda t: not t.lstrip().startswith("{"))
json_frames = st.one_of(publish, publish, publish, join, auth, echo, structured)
frames = st.one_of(
    *[json_frames.map(lambda d: ("json", d))] * 6,
    raw_text.map(lambda t: ("text", t)),
    st.binary(max_size=30).map(lambda b: ("binary", b)),
)


@dataclass
class Env:
    relay: RelayHandle
    fuzzer: WsClient
    observer: WsClient
    room: str
    other_room: str
    session: str
    old_token: str
    joined: set[str] = field(default_factory=set)
    markers: int = 0


@pytest.fixture
async def env(relay, client) -> Env:
    r = await relay(messages_per_second=0, error_budget=10**9)
    fuzzer, observer = await client(r), await client(r)
    room, other_room = random_name("fuzz"), random_name("other")
    session = r.token("fuzzer", "1")
    old_token = await fuzzer.auth(session)
    await fuzzer.auth(session)  # the first socket token is now stale
    await fuzzer.join(room)
    await observer.auth(r.token("observer", "1"))
    await observer.join(room)
    return Env(r, fuzzer, observer, room, other_room, session, old_token, {room})


def resolve(value: Any, e: Env) -> Any:
    if isinstance(value, dict):
        return {k: resolve(v, e) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, e) for v in value]
    return (
        {
            TOKEN: e.fuzzer.token,
            OLD_TOKEN: e.old_token,
            SESSION: e.session,
            OWN_SID: e.fuzzer.sid,
            ROOM: e.room,
            OTHER_ROOM: e.other_room,
        }.get(value, value)
        if isinstance(value, str)
        else value
    )


def predict(obj: dict[str, Any], e: Env) -> tuple[str, str | None]:
    """The reply type the contract promises for one frame, and the channel it publishes to."""
    fields = {k: v for k, v in obj.items() if v is not None}
    if any(not isinstance(v, str) for v in fields.values()) or not fields.get("type"):
        return "error", None
    if fields.get("sid") and fields["sid"] != e.fuzzer.sid:
        return "error", None
    kind, data = fields["type"], fields.get("data", "")
    if kind == "echo":
        return "echo", None
    if kind == "auth":
        return ("token" if data == e.session else "error"), None
    if kind not in ("join", "chan_in") or fields.get("token") != e.fuzzer.token:
        return "error", None
    if kind == "join":
        if not data or len(data) > 200 or not set(data) <= CHANNEL_NAME_CHARS:
            return "error", None
        if data.startswith("db-"):
            return "error", None  # not a watched table
        return "joined", None
    channel = fields.get("channel", "")
    if not channel or channel.startswith("db-") or channel not in e.joined:
        return "error", None
    return "ok", channel


def assert_server_frame(frame: dict[str, Any], sid: str) -> None:
    for name in ("sid", "type", "data", "channel", "token"):
        assert isinstance(frame.get(name), str), frame
    assert frame["sid"] == sid


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(frames, min_size=1, max_size=25))
async def test_random_frames_never_reach_another_socket(env: Env, batch):
    e = env
    expected_out: list[str] = []
    for kind, payload in batch:
        if kind == "binary":
            await e.fuzzer.ws.send_bytes(payload)
            reply, publish, obj = "error", None, None
        elif kind == "text":
            try:
                parsed = orjson.loads(payload)
            except orjson.JSONDecodeError:
                parsed = None
            assume(not isinstance(parsed, dict))
            await e.fuzzer.send_raw(payload)
            reply, publish, obj = "error", None, None
        else:
            obj = resolve(payload, e)
            reply, publish = predict(obj, e)
            await e.fuzzer.send_raw(json.dumps(obj))
        frame = await e.fuzzer.recv(timeout=10)
        assert_server_frame(frame, e.fuzzer.sid)
        assert frame["type"] == reply, (obj if obj is not None else payload, frame)
        if reply == "echo":
            assert obj is not None and frame["data"] == "echo: " + (obj.get("data") or "")
        elif reply == "token":
            e.fuzzer.token = frame["data"]
        elif reply == "joined":
            assert obj is not None
            e.joined.add(obj["data"])
        elif reply == "ok":
            assert obj is not None and publish is not None
            data = obj.get("data") or ""
            own = await e.fuzzer.expect("chan_out", timeout=10)
            assert (own["channel"], own["data"], own["sid"]) == (publish, data, e.fuzzer.sid)
            if publish == e.room:
                expected_out.append(data)

    # In-band silence check: everything before the observer's own marker.
    e.markers += 1
    marker = f"marker-{e.markers}"
    await e.observer.send(type="chan_in", channel=e.room, data=marker, token=e.observer.token)
    received: list[str] = []
    while True:
        frame = await e.observer.recv(timeout=10)
        assert_server_frame(frame, e.observer.sid)
        if frame["type"] == "ok":
            continue
        assert frame["type"] == "chan_out" and frame["channel"] == e.room, frame
        if frame["data"] == marker:
            break
        received.append(frame["data"])
    assert received == expected_out
    if e.room in e.joined:
        assert (await e.fuzzer.expect("chan_out", timeout=10))["data"] == marker


async def test_relay_still_serves_after_fuzzing(env: Env, client):
    """The same setup, after a burst of every kind of garbage at once: nothing is left broken."""
    e = env
    garbage = ["", "{", "[]", "null", '{"type":7}', "\x00", '{"type":"join","token":[]}']
    for text in garbage * 20:
        await e.fuzzer.send_raw(text)
    for _ in range(len(garbage) * 20):
        assert (await e.fuzzer.recv())["type"] == "error"
    await e.fuzzer.ws.send_bytes(b"\x00\xff")
    assert (await e.fuzzer.recv())["type"] == "error"
    newcomer = await client(e.relay)
    await newcomer.auth(e.relay.token("late", "1"))
    await newcomer.join(e.room)
    await e.fuzzer.publish(e.room, "alive")
    for c in (e.fuzzer, e.observer, newcomer):
        assert (await c.expect("chan_out"))["data"] == "alive"
    async with aiohttp.ClientSession() as http, http.get(e.relay.http_url + "/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["sockets"] == 3
