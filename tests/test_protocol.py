"""The wire format in isolation: ``relay.protocol`` parsing client and encoding server frames.

Covers ``parse_frame`` (null fields count as absent, non-string fields and
non-object frames are refused with a reason a person can act on, invalid JSON,
oversized frames, a missing type, extra string fields kept in ``.extra``) and
``encode`` / ``encode_tail`` + ``with_sid`` (the five string fields, extras,
JSON escaping, one tail shared by many sockets).
"""

from __future__ import annotations

import json
import uuid

import pytest

from relay.protocol import (
    ClientFrame,
    RelayError,
    encode,
    encode_tail,
    is_db_channel,
    parse_frame,
    with_sid,
)

LIMIT = 64 * 1024
FIVE_FIELDS = {"sid", "type", "data", "channel", "token"}


def parse(obj_or_text: object, max_bytes: int = LIMIT) -> ClientFrame:
    raw = obj_or_text if isinstance(obj_or_text, str | bytes) else json.dumps(obj_or_text)
    return parse_frame(raw, max_bytes)


def refusal(obj_or_text: object, max_bytes: int = LIMIT) -> str:
    with pytest.raises(RelayError) as info:
        parse(obj_or_text, max_bytes)
    return info.value.message


# --- parse_frame: what is accepted ----------------------------------------------


def test_full_frame_is_parsed_into_its_fields():
    frame = parse({"sid": "s1", "type": "chan_in", "data": "hi", "channel": "c", "token": "t"})
    assert frame == ClientFrame(type="chan_in", data="hi", channel="c", token="t", sid="s1")
    assert frame.extra is None


def test_type_alone_is_enough_and_other_fields_are_none():
    frame = parse({"type": "echo"})
    assert frame.type == "echo"
    assert (frame.data, frame.channel, frame.token, frame.sid) == (None, None, None, None)


def test_bytes_input_is_accepted():
    frame = parse(b'{"type":"echo","data":"x"}')
    assert frame.type == "echo" and frame.data == "x"


@pytest.mark.parametrize("field", ["sid", "data", "channel", "token"])
def test_null_field_counts_as_absent(field):
    frame = parse({"type": "auth", field: None})
    assert getattr(frame, field) is None


def test_null_token_before_auth_like_real_clients_send():
    frame = parse({"type": "auth", "data": "jwt", "token": None, "channel": None, "sid": None})
    assert frame.type == "auth" and frame.data == "jwt" and frame.token is None


def test_extra_string_fields_are_kept_in_extra():
    frame = parse({"type": "join", "data": "db-x", "token": "t", "after": "12.3", "foo": "bar"})
    assert frame.extra == {"after": "12.3", "foo": "bar"}
    assert frame.get("after") == "12.3"
    assert frame.get("missing") is None


def test_null_extra_field_is_dropped():
    frame = parse({"type": "join", "after": None})
    assert frame.extra is None
    assert frame.get("after") is None


def test_empty_string_data_is_kept_as_empty_string():
    frame = parse({"type": "echo", "data": ""})
    assert frame.data == ""


def test_unicode_survives_parsing():
    frame = parse({"type": "echo", "data": "héllo ✓ 日本 \U0001f600"})
    assert frame.data == "héllo ✓ 日本 \U0001f600"


def test_frame_exactly_at_the_limit_is_accepted():
    text = json.dumps({"type": "echo", "data": ""})
    padded = text[:-1] + " " * 10 + "}"
    frame = parse_frame(padded, max_bytes=len(padded))
    assert frame.type == "echo"


# --- parse_frame: what is refused, and why -------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (42, "a number"),
        (1.5, "a number"),
        (True, "a boolean"),
        ({"a": 1}, "an object"),
        ([1], "an array"),
    ],
)
@pytest.mark.parametrize("field", ["type", "data", "channel", "token", "sid", "after"])
def test_non_string_field_is_refused_naming_field_and_kind(field, value, kind):
    obj = {"type": "echo", field: value}
    message = refusal(obj)
    assert f"field '{field}' must be a string" in message
    assert kind in message


def test_non_string_data_hint_says_to_send_json_as_text():
    message = refusal({"type": "chan_in", "data": {"x": 1}})
    assert "JSON text" in message


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[]", "an array"),
        ('[{"type":"echo"}]', "an array"),
        ("42", "a number"),
        ("3.14", "a number"),
        ('"echo"', "a string"),
        ("null", "null"),
        ("true", "a boolean"),
    ],
)
def test_non_object_frame_is_refused(text, kind):
    message = refusal(text)
    assert message == f"frame must be a JSON object, got {kind}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "{",
        '{"type": "echo"',
        "{'type': 'echo'}",
        "{type: echo}",
        "\x00",
        '{"type":"echo"} {"type":"echo"}',
    ],
)
def test_invalid_json_is_refused(text):
    message = refusal(text)
    assert "not valid JSON" in message
    assert "one JSON object per frame" in message


def test_invalid_utf8_bytes_are_refused_as_invalid_json():
    message = refusal(b'{"type":"echo","data":"\xff\xfe"}')
    assert "not valid JSON" in message


def test_oversized_frame_is_refused_with_size_and_limit():
    raw = json.dumps({"type": "echo", "data": "x" * 2000})
    message = refusal(raw, max_bytes=1000)
    assert message == f"frame too large: {len(raw)} bytes, the limit is 1000"


def test_oversized_limit_counts_utf8_bytes_not_characters():
    # 1000 CJK characters are 3000 bytes of UTF-8: over a 2000-byte limit.
    raw = '{"type":"echo","data":"' + "日" * 1000 + '"}'
    assert len(raw) < 2000 < len(raw.encode())
    message = refusal(raw, max_bytes=2000)
    assert message == f"frame too large: {len(raw.encode())} bytes, the limit is 2000"


def test_non_ascii_frame_under_the_byte_limit_is_accepted():
    raw = '{"type":"echo","data":"' + "日" * 100 + '"}'
    assert parse_frame(raw, max_bytes=len(raw.encode())).data == "日" * 100


def test_oversized_check_comes_before_json_parsing():
    message = refusal("not json at all" * 100, max_bytes=10)
    assert message.startswith("frame too large")


@pytest.mark.parametrize(
    "obj", [{}, {"data": "x"}, {"type": None, "data": "x"}, {"type": ""}, {"token": "t"}]
)
def test_missing_or_empty_type_is_refused(obj):
    message = refusal(obj)
    assert "no 'type'" in message
    assert "echo, auth, join, chan_in" in message


def test_refusal_is_a_relay_error_without_close_code():
    with pytest.raises(RelayError) as info:
        parse("nope")
    assert info.value.close_code is None
    assert str(info.value) == info.value.message


# --- encoding --------------------------------------------------------------------


def test_encode_carries_the_five_string_fields():
    sid = str(uuid.uuid4())
    frame = json.loads(encode(sid, "echo", "echo: hi"))
    assert frame == {"sid": sid, "type": "echo", "data": "echo: hi", "channel": "", "token": ""}
    assert all(isinstance(frame[k], str) for k in FIVE_FIELDS)


def test_encode_with_all_fields_and_sid_first():
    text = encode("abc", "chan_out", "d", "room", "tok")
    assert text.startswith('{"sid":"abc",')
    assert json.loads(text) == {
        "sid": "abc",
        "type": "chan_out",
        "data": "d",
        "channel": "room",
        "token": "tok",
    }


def test_encode_init_has_empty_sid():
    new_id = str(uuid.uuid4())
    frame = json.loads(encode("", "init", new_id))
    assert frame["sid"] == "" and frame["type"] == "init" and frame["data"] == new_id


def test_encode_appends_extra_fields():
    frame = json.loads(encode("s", "joined", "db-x", "db-x", pos="17"))
    assert frame["pos"] == "17"
    assert frame.keys() >= FIVE_FIELDS


def test_encode_escapes_data_that_looks_like_json():
    nasty = '","sid":"evil","x":"\\ \n \t \u2028 "quoted" \x00'
    frame = json.loads(encode("mine", "chan_out", nasty, "room"))
    assert frame["sid"] == "mine"
    assert frame["data"] == nasty
    assert "x" not in frame


def test_one_tail_is_spliced_with_each_sid():
    tail = encode_tail("chan_out", '{"n":1}', "room")
    sids = [str(uuid.uuid4()) for _ in range(3)]
    frames = [json.loads(with_sid(s, tail)) for s in sids]
    assert [f["sid"] for f in frames] == sids
    for f in frames:
        assert f["type"] == "chan_out" and f["data"] == '{"n":1}' and f["channel"] == "room"
        assert f["token"] == ""


def test_with_sid_of_tail_equals_encode():
    assert with_sid("s", encode_tail("ok", "", "c")) == encode("s", "ok", "", "c")


def test_encoded_frame_parses_back_as_a_client_frame():
    frame = parse_frame(encode("sid-1", "chan_in", "payload", "room", "tok"), LIMIT)
    assert frame == ClientFrame(
        type="chan_in", data="payload", channel="room", token="tok", sid="sid-1"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("db-tasks", True),
        ("db-", True),
        ("db", False),
        ("room", False),
        ("DB-tasks", False),
        ("xdb-tasks", False),
    ],
)
def test_is_db_channel(name, expected):
    assert is_db_channel(name) is expected
