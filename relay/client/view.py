"""A live view: a dict of rows kept equal to what the relay says a user may read.

The view is fed by its :class:`~relay.client.Client`: a snapshot (``db_created``
per row, then ``db_synced``), then events. Snapshot rows are collected apart and
swapped in at ``db_synced``, so a view being reloaded keeps showing its old rows
until the new ones are complete, and callbacks hear only what changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("relay.client")

Row = dict[str, Any]
# kind ("created" | "updated" | "deleted"), the row's id, the row (None when deleted)
ChangeCallback = Callable[[str, str, Row | None], None]


class LiveView:
    """The rows of one ``db-`` channel (under an optional filter), by id, kept in sync.

    - ``rows``: ``{id: row}``, ids as strings.
    - ``synced``: set once a snapshot is complete (cleared while a reload is in progress).
    - ``position``: the ``pos`` of the last event applied (what a resume starts after).
    - ``ended``: set when the subscription ended for good (the table was dropped, or the
      relay refused the join); ``error`` says why.
    """

    def __init__(self, channel: str, filter: str | None = None, id_column: str = "id") -> None:
        self.channel = channel
        self.filter = filter
        self.id_column = id_column
        self.rows: dict[str, Row] = {}
        self.synced = asyncio.Event()
        self.ended = asyncio.Event()
        self.error: str | None = None
        self.position = ""
        self.snapshots = 0  # snapshots completed (1 + reloads)
        self._staging: dict[str, Row] | None = None  # a snapshot being received
        self._reload = True  # the next join asks for a snapshot
        self._callbacks: list[ChangeCallback] = []
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(kind, id, row)`` on every change; returns a function that stops it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    # --- what the client asks and tells ------------------------------------------------

    def join_fields(self) -> dict[str, str]:
        """The extra fields of the next join: a snapshot, or a resume after ``position``."""
        fields = {"snapshot": "true"} if self._reload or not self.position else {}
        if not fields:
            fields["after"] = self.position
        if self.filter:
            fields["filter"] = self.filter
        return fields

    def joined(self, fields: dict[str, str]) -> None:
        """The relay answered a join sent with ``fields``."""
        if fields.get("snapshot") == "true":
            self._staging = {}
            self.synced.clear()

    def refused(self, text: str) -> None:
        """The relay refused the view's join for good."""
        self.error = text
        self.ended.set()
        if not self._first.done():
            self._first.set_exception(ViewRefused(self.channel, text))

    def reload(self) -> None:
        """The relay said the position is lost: the next join takes a snapshot."""
        self._reload = True

    def apply(self, kind: str, data: str, pos: str, reason: str = "") -> None:
        """One frame of the channel: ``db_created`` / ``db_updated`` / ``db_deleted`` /
        ``db_synced`` / ``error`` (a notice with ``reason``)."""
        if kind == "db_synced":
            self._synced(data or pos)
            return
        if kind == "error":
            self._notice(reason, data, pos)
            return
        row: Row = orjson.loads(data)
        key = str(row[self.id_column] if kind != "db_deleted" else row["id"])
        if self._staging is not None:  # part of a snapshot (or, defensively, during one)
            if kind == "db_deleted":
                self._staging.pop(key, None)
            else:
                self._staging[key] = row
            return
        if pos:
            self.position = pos
        if kind == "db_deleted":
            if self.rows.pop(key, None) is not None:
                self._emit("deleted", key, None)
        else:
            existed = key in self.rows
            self.rows[key] = row
            self._emit("updated" if existed else "created", key, row)

    async def wait_first(self) -> None:
        """Until the first snapshot is complete (or the join is refused: raises)."""
        await asyncio.shield(self._first)

    # --- internals ---------------------------------------------------------------------

    def _synced(self, pos: str) -> None:
        staged, self._staging = self._staging or {}, None
        old, self.rows = self.rows, staged
        for key, row in old.items():
            if key not in staged:
                self._emit("deleted", key, None)
            elif staged[key] != row:
                self._emit("updated", key, staged[key])
        for key, row in staged.items():
            if key not in old:
                self._emit("created", key, row)
        if pos:
            self.position = pos
        self._reload = False
        self.snapshots += 1
        self.synced.set()
        if not self._first.done():
            self._first.set_result(None)

    def _notice(self, reason: str, text: str, pos: str) -> None:
        if reason == "truncated":  # every row is gone; the stream goes on
            if self._staging is not None:
                self._staging.clear()
            old, self.rows = self.rows, {}
            for key in old:
                self._emit("deleted", key, None)
            if pos and self._staging is None:
                self.position = pos
        elif reason == "pruned":
            self._reload = True
        elif reason == "dropped":
            self.error = text
            self.ended.set()

    def _emit(self, kind: str, key: str, row: Row | None) -> None:
        for callback in list(self._callbacks):
            try:
                callback(kind, key, row)
            except Exception:
                log.exception("live view callback failed channel=%s", self.channel)


class ViewRefused(Exception):
    """The relay refused a live view's join (e.g. an unwatched table, a bad filter,
    a snapshot over the row limit)."""

    def __init__(self, channel: str, text: str) -> None:
        super().__init__(f"{channel}: {text}")
        self.channel = channel
        self.text = text
