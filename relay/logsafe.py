"""Client-controlled text in log lines, made safe to log.

The relay logs one line per event as ``key=value`` pairs. A value a client
chose (a channel name, a frame type, a JWT claim, an error text quoting them)
could otherwise hold a newline and forge a second line, or a space and forge
a ``key=value`` pair. :func:`clean` leaves plain tokens as they are and renders
anything else as a JSON string literal (quoted, control characters and
non-ASCII escaped), cut to ``limit`` characters.
"""

from __future__ import annotations

import json
import re

LIMIT = 120
# What may appear unquoted: the characters of a valid channel name, ids and codes.
_PLAIN = re.compile(r"[A-Za-z0-9_\-.:@/]+")


def clean(value: object, limit: int = LIMIT) -> str:
    """``value`` as one safe log token: unquoted when plain, else a quoted JSON string."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if text and not cut and _PLAIN.fullmatch(text):
        return text
    return json.dumps(text + ("..." if cut else ""), ensure_ascii=True)
