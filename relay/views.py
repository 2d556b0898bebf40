"""Filtered subscriptions: what one subscriber with a row filter gets for one event.

A subscriber that joined ``db-<repo>`` with a ``filter`` sees the rows it may
read (the permission rule) that also pass its filter. The relay keeps the ids
of the rows it has sent it (``known``), so an update that takes a row out of
the filter arrives as ``db_deleted`` and one that brings a row in as
``db_created``, exactly as for permission changes. After a snapshot the view
is ``complete``: ``known`` is all the client has, and rows it never had are
never mentioned. Without one (a plain or resumed join) the client may hold
rows the relay never sent it, so rows leaving its sight are always told.

The same function serves the live stream and replays, so both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Ids remembered per filtered subscriber; past this the view stops being
# complete (and tells every departure), so memory stays bounded.
MAX_KNOWN = 100_000

Row = dict[str, Any]


@dataclass
class View:
    matches: Callable[[Row], bool]
    source: str = ""  # the filter as the client wrote it (a paused session rejoins with it)
    known: set[str] = field(default_factory=set)
    complete: bool = False

    def remember(self, row_id: str) -> None:
        if len(self.known) >= MAX_KNOWN:
            self.known.clear()
            self.complete = False
        self.known.add(row_id)

    def frame_type(
        self, op: str, row_id: str, row: Row | None, reads_new: bool, read_old: bool
    ) -> str | None:
        """The frame this subscriber gets: db_created/db_updated/db_deleted, or None.

        ``reads_new`` / ``read_old``: the permission rule on the new (for a
        delete: the deleted) row and on the old row of an update.
        """
        if op == "d":
            return self._leave(row_id) if reads_new else None
        now = reads_new and row is not None and self.matches(row)
        if now:
            kind = "db_updated" if op == "u" and row_id in self.known else "db_created"
            self.remember(row_id)
            return kind
        if op == "u" and (read_old or row_id in self.known):
            return self._leave(row_id)
        return None

    def _leave(self, row_id: str) -> str | None:
        if row_id in self.known:
            self.known.discard(row_id)
            return "db_deleted"
        return None if self.complete else "db_deleted"
