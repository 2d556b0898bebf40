"""A page of the event log as one catching-up subscriber's frames: the replay's inner loop.

A resuming client may be owed tens of thousands of events at once, so per event
this does only what the contract asks (DESIGN.md section 1, "Who receives a
database event"): the rule of :func:`relay.permissions.can_read`, inlined, and
the frame's text. The row arrives from PostgreSQL as JSON text; it is escaped
once as a JSON string and spliced between the frame's fixed parts, never
decoded. The result is what :func:`relay.protocol.encode` renders, character
for character (``tests/test_replay.py`` holds that).

Notices (TRUNCATE, a dropped table) and the rows of a filtered subscription are
left to :meth:`relay.dbhub.DbHub.replay_event`: a notice stops this loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from relay.auth import Identity
from relay.permissions import Mode

NOBODY = object()  # equal to nothing but itself

# The columns of relay.events_page a replay reads, in this order (rows are unpacked).
COLUMNS = (
    "tick",
    "seq",
    "op",
    "row_id",
    "owner_id",
    "account_id",
    "old_owner_id",
    "old_account_id",
    "data",
)


class PageFrames:
    """The fixed parts of one socket's frames on one repository, and who it may read."""

    __slots__ = ("account", "created", "deleted", "everyone", "tail", "updated", "user")

    def __init__(self, sid: str, channel: str, mode: Mode, ident: Identity) -> None:
        head = '{"sid":"' + sid + '","type":"'
        self.created = head + 'db_created","data":'
        self.updated = head + 'db_updated","data":'
        self.deleted = head + 'db_deleted","data":'
        self.tail = ',"channel":' + orjson.dumps(channel).decode() + ',"token":"","pos":"'
        # can_read's three rules. A row's column equals the reader's id only where
        # that rule reads; NOBODY equals no column (a row's NULL included).
        self.everyone = ident.is_root or mode.everyone_reads
        self.user: object = ident.user_id if mode.owner_reads else NOBODY
        self.account: object = (
            ident.account_id if mode.group_reads and ident.account_id is not None else NOBODY
        )

    def build(
        self,
        rows: Sequence[Any],
        start: int,
        stop: int,
        frames: int,
        chars: int,
        out: list[str],
    ) -> tuple[int, int]:
        """Append the frames of ``rows[start:stop]`` (rows of :data:`COLUMNS`) to ``out``.

        Before each row, what was appended is checked against ``frames`` and
        ``chars`` (the socket's room): the row that reaches either is the last.
        A row that is not an insert, update or delete (a notice) is not rendered.
        Returns the index of the first row not rendered, and the characters appended.
        """
        everyone, user, account = self.everyone, self.user, self.account
        created, updated, deleted, tail = self.created, self.updated, self.deleted, self.tail
        dumps = orjson.dumps
        append = out.append
        size = n = 0
        i = start
        while i < stop and n <= frames and size <= chars:
            tick, seq, op, row_id, owner, acct, old_owner, old_acct, data = rows[i]
            now = everyone or owner == user or acct == account
            if op == "c":
                kind = created if now else None
            elif op == "u":
                before = everyone or old_owner == user or old_acct == account
                # Out of sight: deleted for this reader; into sight: created.
                kind = (updated if before else created) if now else deleted if before else None
            elif op == "d":  # checked against the deleted row
                kind = deleted if now else None
            else:
                break  # a notice: for replay_event
            if kind is not None:
                body = '{"id":' + row_id + "}" if kind is deleted else data or ""
                text = f'{kind}{dumps(body).decode()}{tail}{tick}-{seq}"}}'
                append(text)
                size += len(text)
                n += 1
            i += 1
        return i, size
