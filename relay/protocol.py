"""The wire format: parsing client frames and encoding server frames.

Every frame is one JSON object. Client fields are strings (``null`` counts as
absent). Server frames always carry the five string fields ``sid``, ``type``,
``data``, ``channel`` and ``token``; extra fields (such as ``pos`` on database
events) may follow.

Encoding is split so that a frame sent to many sockets is serialized once:
:func:`encode_tail` renders everything but the ``sid`` and :func:`with_sid`
prefixes one socket's id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

DB_CHANNEL_PREFIX = "db-"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the relay uses, each saying why a socket ended."""

    GOING_AWAY = 1001  # the server shuts down
    POLICY = 1008  # refused: over the plan's connection cap, unknown app, origin
    TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013
    ABUSE = 4000  # persistent malformed input or rate-limit breaches
    SLOW_CONSUMER = 4001
    EXPIRED = 4002


class RelayError(Exception):
    """A problem to report to one client as an ``error`` frame.

    ``close_code`` is set when the problem also ends that client's socket.
    """

    def __init__(self, message: str, close_code: CloseCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code


class InvalidToken(RelayError):
    def __init__(self) -> None:
        super().__init__("invalid token")


@dataclass(frozen=True, slots=True)
class ClientFrame:
    type: str
    data: str | None = None
    channel: str | None = None
    token: str | None = None
    sid: str | None = None
    # Extra string fields a client may add, e.g. ``after`` on a db- join.
    extra: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        return self.extra.get(name) if self.extra else None


def parse_frame(raw: str | bytes, max_bytes: int) -> ClientFrame:
    """Decode one client frame or raise :class:`RelayError` with a reason a person can act on."""
    # The limit is in bytes: a str of non-ASCII text is longer in UTF-8 than in characters.
    if isinstance(raw, bytes) or raw.isascii():
        size = len(raw)
    else:
        size = len(raw.encode(errors="replace"))
    if size > max_bytes:
        raise RelayError(f"frame too large: {size} bytes, the limit is {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RelayError("frame is not valid JSON: send one JSON object per frame") from None
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        raise RelayError(f"frame must be a JSON object, got {_json_kind(kind)}")
    fields: dict[str, str] = {}
    for key, value in obj.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise RelayError(
                f"field {key!r} must be a string, got {_json_kind(type(value).__name__)}"
                + (" (send JSON payloads as JSON text)" if key == "data" else "")
            )
        fields[key] = value
    frame_type = fields.pop("type", None)
    if not frame_type:
        raise RelayError("frame has no 'type': expected one of echo, auth, join, chan_in")
    known = {k: fields.pop(k) for k in ("sid", "data", "channel", "token") if k in fields}
    return ClientFrame(type=frame_type, extra=fields or None, **known)


def _json_kind(python_name: str) -> str:
    return {
        "list": "an array",
        "dict": "an object",
        "int": "a number",
        "float": "a number",
        "bool": "a boolean",
        "str": "a string",
        "null": "null",
    }.get(python_name, python_name)


def encode_tail(type: str, data: str = "", channel: str = "", token: str = "", **extra: Any) -> str:
    """Everything of a server frame after ``{"sid":"<sid>``; see :func:`with_sid`."""
    body = {"type": type, "data": data, "channel": channel, "token": token, **extra}
    # orjson renders '{"type":...}'; drop the opening brace so a sid can be spliced in.
    return '",' + orjson.dumps(body).decode()[1:]


def with_sid(sid: str, tail: str) -> str:
    # Socket ids are UUIDs we generate, so they need no JSON escaping.
    return '{"sid":"' + sid + tail


def encode(
    sid: str, type: str, data: str = "", channel: str = "", token: str = "", **extra: Any
) -> str:
    return with_sid(sid, encode_tail(type, data, channel, token, **extra))


def is_db_channel(name: str) -> bool:
    return name.startswith(DB_CHANNEL_PREFIX)
