"""Database events to sockets: db- channel subscribers and the permission filter.

Subscribers of each repository are indexed by account and by user, so an
event costs work in proportion to the sockets that may read it, not to all
subscribers of the repository. Each event is encoded once per audience
(created, updated, deleted) and spliced with each socket's id on send.

A subscriber that resumes from a position is "catching up": live events for
it are held back until its replay from the log has been sent, then released
in order, so the seam between replay and live stream has no gap and no
duplicate.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay import protocol
from relay.auth import Identity
from relay.hub import Socket
from relay.outbox import Body
from relay.permissions import Mode, can_read, mode_of
from relay.protocol import CloseCode
from relay.replay import PageFrames
from relay.schema import DEFAULT_APP
from relay.views import View

log = logging.getLogger("relay.db")

# Live frames held for one resuming socket before it counts as a slow consumer:
# at most this many, and at most its send queue's byte cap (or this default).
MAX_HELD_FRAMES = 50_000
DEFAULT_HELD_BYTES = 16 * 1024 * 1024

# Events about a whole repository, told to every subscriber as an ``error``
# frame (the one type every client already shows) with a fixed text, the
# event's ``pos`` and a ``reason`` field that programs can match on.
TRUNCATED = "repository emptied: every row was deleted by TRUNCATE; reload the data"
DROPPED = (
    "repository dropped: its table, or a column relay reads, is gone; "
    "you are no longer subscribed to it"
)
NOTICES = {"t": (TRUNCATED, "truncated"), "x": (DROPPED, "dropped")}
PRUNED = (
    "events of this channel were pruned before this relay could deliver them: "
    "reload the data, then join without 'after'"
)
LOST = (
    "events of this channel may have been delivered from a tick the database lost in a"
    " crash: reload the data, then join without 'after'"
)


class Held:
    """Live frames held back for one socket while it replays, bounded in count and size.

    ``cursor`` is the position of the last event whose frames went to the
    socket's queue (replayed, or released from here): where a subscription
    paused now must resume from.
    """

    __slots__ = ("cursor", "frames", "size")

    def __init__(self, cursor: Position) -> None:
        self.cursor = cursor
        self.frames: deque[tuple[Position, str, int | None]] = deque()
        self.size = 0

    def hold(self, pos: Position, text: str, xid: int | None, max_bytes: int) -> bool:
        """Keep one frame; False when that breaks the bounds (the socket is too slow)."""
        self.frames.append((pos, text, xid))
        self.size += len(text)
        return len(self.frames) <= MAX_HELD_FRAMES and self.size <= max_bytes

    def pop(self) -> str:
        self.cursor, text, _ = self.frames.popleft()
        self.size -= len(text)
        return text

    def drop_visible(self, snapshot: Snapshot) -> None:
        """Forget frames of transactions a snapshot already saw (they are in its rows)."""
        kept = deque(f for f in self.frames if f[2] is None or not snapshot.sees(f[2]))
        self.frames = kept
        self.size = sum(len(f[1]) for f in kept)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A PostgreSQL snapshot (pg_current_snapshot() as text: 'xmin:xmax:xip,...')."""

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, xid: int) -> bool:
        """Whether a transaction's changes are visible in this snapshot (it committed before)."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)


@dataclass(frozen=True, slots=True)
class Event:
    """One row of relay.events, at position (tick, seq)."""

    tick: int
    seq: int
    repo: str
    op: str  # 'c', 'u' or 'd'
    row_id: str  # the id as JSON text
    owner_id: str | None
    account_id: str | None
    old_owner_id: str | None = None
    old_account_id: str | None = None
    data: str | None = None  # the full new row as JSON text
    app: str = DEFAULT_APP  # the app the table belongs to
    xid: int | None = None  # the writing transaction (live events only)

    @property
    def pos(self) -> str:
        return f"{self.tick}-{self.seq}"

    def deleted_data(self) -> str:
        return '{"id":' + self.row_id + "}"


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where a client is in the log: after event (tick, seq); seq None = after the whole tick."""

    tick: int
    seq: int | None = None

    @classmethod
    def parse(cls, text: str) -> Position:
        tick, sep, seq = text.partition("-")
        try:
            return cls(int(tick), int(seq) if sep else None)
        except ValueError:
            raise ValueError(f"not a position: {text!r} (expected 'tick-seq' or 'tick')") from None

    def before(self, event: Event) -> bool:
        """True when ``event`` comes after this position."""
        return self.before_row(event.tick, event.seq)

    def before_row(self, tick: int, seq: int) -> bool:
        """True when the event at (``tick``, ``seq``) comes after this position."""
        if tick != self.tick:
            return tick > self.tick
        return self.seq is not None and seq > self.seq

    def __str__(self) -> str:
        return str(self.tick) if self.seq is None else f"{self.tick}-{self.seq}"


@dataclass
class RepoSubscribers:
    app: str
    repo: str
    mode: Mode
    everyone: set[Socket] = field(default_factory=set)
    roots: set[Socket] = field(default_factory=set)
    by_account: dict[str, set[Socket]] = field(default_factory=dict)
    by_user: dict[str, set[Socket]] = field(default_factory=dict)
    # Sockets replaying from the log, with the live frames held back for them.
    catching_up: dict[Socket, Held] = field(default_factory=dict)
    # The identity each socket was indexed under (it may re-auth as another).
    indexed_as: dict[Socket, Identity] = field(default_factory=dict)
    # Subscribers with a row filter: indexed apart (so that they cost nothing
    # to the others), each with its view (relay.views).
    filtered: RepoSubscribers | None = None
    views: dict[Socket, View] = field(default_factory=dict)
    # Sockets that joined with a snapshot: events of transactions it saw are
    # skipped for them, until the listener has passed the tick it noted.
    seen: dict[Socket, tuple[Snapshot, int]] = field(default_factory=dict)

    def members(self) -> set[Socket]:
        """Every subscriber, filtered or not."""
        if self.filtered is None or not self.filtered.everyone:
            return self.everyone
        return self.everyone | self.filtered.everyone

    def add(self, socket: Socket) -> None:
        ident = socket.identity
        assert ident is not None
        self.everyone.add(socket)
        self.indexed_as[socket] = ident
        if ident.is_root:
            self.roots.add(socket)
        if ident.account_id is not None:
            self.by_account.setdefault(ident.account_id, set()).add(socket)
        self.by_user.setdefault(ident.user_id, set()).add(socket)

    def remove(self, socket: Socket) -> None:
        """Drop a socket from every index, in time independent of the subscriber count."""
        ident = self.indexed_as.pop(socket, None)
        self.everyone.discard(socket)
        self.roots.discard(socket)
        self.catching_up.pop(socket, None)
        self.seen.pop(socket, None)
        if self.views.pop(socket, None) is not None and self.filtered is not None:
            self.filtered.remove(socket)
        if ident is None:
            return
        for index, key in ((self.by_account, ident.account_id), (self.by_user, ident.user_id)):
            if key is None or key not in index:
                continue
            index[key].discard(socket)
            if not index[key]:
                del index[key]

    def readers(self, owner: str | None, account: str | None) -> set[Socket]:
        if self.mode.everyone_reads:
            return self.everyone
        found = set(self.roots)
        if self.mode.group_reads and account is not None:
            found |= self.by_account.get(account, set())
        if self.mode.owner_reads and owner is not None:
            found |= self.by_user.get(owner, set())
        return found


RepoKey = tuple[str, str]  # (app id, repository name): repositories are per app


class DbHub:
    def __init__(self) -> None:
        self.repos: dict[RepoKey, RepoSubscribers] = {}

    def subscribers(self, app: str, repo: str) -> RepoSubscribers | None:
        return self.repos.get((app, repo))

    def subscribe(
        self,
        socket: Socket,
        repo: str,
        after: Position | None = None,
        view: View | None = None,
    ) -> None:
        """Subscribe to ``repo`` of the socket's own app; with ``after``, as catching up
        from that position (live frames are held until :meth:`release_some`); with a
        ``view``, through a row filter. Subscribing again replaces the subscription."""
        key = (socket.app_id, repo)
        subs = self.repos.get(key)
        if subs is None:
            subs = self.repos[key] = RepoSubscribers(socket.app_id, repo, mode_of(repo))
        held = subs.catching_up.get(socket)
        kept_view = subs.views.get(socket)
        subs.remove(socket)  # re-joining (perhaps as another user) re-indexes
        if view is None and after is None and held is not None:
            view = kept_view  # re-indexed mid-replay: keep its filter too
        if view is None:
            subs.add(socket)
        else:
            if subs.filtered is None:
                subs.filtered = RepoSubscribers(subs.app, subs.repo, subs.mode)
            subs.filtered.add(socket)
            subs.views[socket] = view
        if after is not None:
            subs.catching_up[socket] = Held(after)
        elif held is not None:  # re-indexed mid-replay: the replay goes on
            subs.catching_up[socket] = held
        socket.channels.add(protocol.DB_CHANNEL_PREFIX + repo)

    def reindex(self, socket: Socket, repo: str) -> None:
        """Index the socket's subscription under its new identity (a renewed session),
        keeping its row filter and any replay in progress."""
        subs = self.repos.get((socket.app_id, repo))
        view = subs.views.get(socket) if subs is not None else None
        self.subscribe(socket, repo, view=view)

    def delivered(self, socket: Socket, repo: str, live: Position) -> tuple[Position, str | None]:
        """Where the socket's stream of ``repo`` stands, and its filter: ``live`` (the
        listener's position) once it is live, else how far its replay has got."""
        subs = self.repos.get((socket.app_id, repo))
        held = subs.catching_up.get(socket) if subs is not None else None
        view = subs.views.get(socket) if subs is not None else None
        return (held.cursor if held is not None else live), (view.source if view else None)

    def unsubscribe(self, socket: Socket, repo: str) -> None:
        key = (socket.app_id, repo)
        subs = self.repos.get(key)
        socket.channels.discard(protocol.DB_CHANNEL_PREFIX + repo)
        if subs is None:
            return
        subs.remove(socket)
        if not subs.members():
            del self.repos[key]

    def unsubscribe_all(self, socket: Socket) -> None:
        for name in list(socket.channels):
            if protocol.is_db_channel(name):
                self.unsubscribe(socket, name[len(protocol.DB_CHANNEL_PREFIX) :])

    def dispatch(self, event: Event) -> None:
        subs = self.repos.get((event.app, event.repo))
        if subs is None:
            return
        channel = protocol.DB_CHANNEL_PREFIX + event.repo
        notice = NOTICES.get(event.op)
        if notice is not None:
            self._notify(subs, event, channel, *notice)
            return
        for targets, type_, data in audiences(subs, event):
            if targets:
                tail = protocol.encode_tail(type_, data, channel, pos=event.pos)
                self._send(subs, targets, tail, event)
        if subs.filtered is not None and subs.filtered.everyone:
            self._dispatch_views(subs, subs.filtered, event, channel)

    def _dispatch_views(
        self, subs: RepoSubscribers, index: RepoSubscribers, event: Event, channel: str
    ) -> None:
        """Filtered subscribers: the permission index narrows, each view decides."""
        new = index.readers(event.owner_id, event.account_id)
        old: set[Socket] = set()
        if event.op == "u":
            old = (
                new
                if index.mode.everyone_reads
                else index.readers(event.old_owner_id, event.old_account_id)
            )
        if not new and not old:
            return  # none of them may read it: the row is not even decoded
        row = orjson.loads(event.data) if event.data else None
        groups: dict[str, list[Socket]] = {}
        for s in new | old:
            kind = subs.views[s].frame_type(event.op, event.row_id, row, s in new, s in old)
            if kind is not None:
                groups.setdefault(kind, []).append(s)
        for kind, targets in groups.items():
            data = event.deleted_data() if kind == "db_deleted" else event.data or ""
            self._send(
                subs, targets, protocol.encode_tail(kind, data, channel, pos=event.pos), event
            )

    def _notify(
        self, subs: RepoSubscribers, event: Event, channel: str, text: str, reason: str
    ) -> None:
        tail = protocol.encode_tail("error", text, channel, pos=event.pos, reason=reason)
        if event.op != "x":
            self._send(subs, subs.members(), tail, event)
            return
        # Dropped: told at once (held frames go with the subscription), then unsubscribed.
        everyone = list(subs.members())
        for s in everyone:
            s.send(protocol.with_sid(s.id, tail))
        for s in everyone:
            self.unsubscribe(s, subs.repo)
        log.info(
            "repository dropped app=%s repo=%s subscribers=%d", subs.app, subs.repo, len(everyone)
        )

    def announce_lost(self, text: str = PRUNED) -> None:
        """Events were lost to this relay (pruned unread, or their tick lost in a
        database crash): every subscriber must reload."""
        for subs in self.repos.values():
            channel = protocol.DB_CHANNEL_PREFIX + subs.repo
            tail = protocol.encode_tail("error", text, channel, reason="pruned")
            for s in subs.members():
                s.send(protocol.with_sid(s.id, tail))

    def _send(
        self, subs: RepoSubscribers, targets: Iterable[Socket], tail: str, event: Event
    ) -> None:
        held = subs.catching_up
        seen = subs.seen
        overflowed = []
        body = Body(tail)  # encoded once, queued by reference (relay.outbox)
        for s in targets:
            if seen and s in seen and _already_seen(seen, s, event):
                continue
            if held and s in held:
                text = protocol.with_sid(s.id, tail)
                pos = Position(event.tick, event.seq)
                if not held[s].hold(pos, text, event.xid, s.queue_bytes or DEFAULT_HELD_BYTES):
                    overflowed.append(s)
            else:
                s.send_shared(body)
        for s in overflowed:
            log.warning("replay could not catch up sid=%s channel=db-%s", s.id, subs.repo)
            s.close(CloseCode.SLOW_CONSUMER, "slow consumer: could not catch up")
            self.unsubscribe(s, subs.repo)

    def replay_event(self, socket: Socket, repo: str, event: Event) -> int | None:
        """Send a catching-up socket one event from the log, if it may read it.

        Returns the frames sent, or None when the socket is no longer catching
        up on ``repo`` (it left, re-joined or was cut off): the replay stops.
        """
        subs = self.repos.get((socket.app_id, repo))
        ident = socket.identity
        held = subs.catching_up.get(socket) if subs is not None else None
        if subs is None or held is None or ident is None:
            return None
        held.cursor = Position(event.tick, event.seq)
        channel = protocol.DB_CHANNEL_PREFIX + repo
        notice = NOTICES.get(event.op)
        if notice is not None:
            text, reason = notice
            socket.send(
                protocol.encode(socket.id, "error", text, channel, pos=event.pos, reason=reason)
            )
            if event.op == "x":
                self.unsubscribe(socket, repo)
            return 1
        view = subs.views.get(socket)
        frames = (
            audience_of(subs.mode, ident, event)
            if view is None
            else _view_frames(view, subs.mode, ident, event)
        )
        for type_, data in frames:
            socket.send(protocol.encode(socket.id, type_, data, channel, pos=event.pos))
        return len(frames)

    def replay_rows(
        self, socket: Socket, repo: str, rows: Sequence[Any], start: int, stop: int
    ) -> tuple[int, int] | None:
        """Send a catching-up socket the events of ``rows[start:stop]`` (a page of the
        log, rows of :data:`relay.replay.COLUMNS`) that it may read, as many as fit while
        it has room: room is checked before each event, as between :meth:`replay_event`
        calls, and the frames are queued together.

        Returns (the index of the first row not sent, frames sent); that index is
        ``start`` when the row is one for :meth:`replay_event` (a notice, or any row
        of a filtered subscription). None when the socket is no longer catching up
        on ``repo`` (it left, re-joined or was cut off) or is closing (nothing more
        can be queued for it): the replay stops.
        """
        subs = self.repos.get((socket.app_id, repo))
        ident = socket.identity
        held = subs.catching_up.get(socket) if subs is not None else None
        if subs is None or held is None or ident is None or socket.closing:
            return None
        if socket in subs.views:
            return start, 0
        frames, chars = socket.room()
        page = PageFrames(socket.id, protocol.DB_CHANNEL_PREFIX + repo, subs.mode, ident)
        out: list[str] = []
        end, size = page.build(
            rows, start, stop, frames, sys.maxsize if chars is None else chars, out
        )
        if end > start:
            last = rows[end - 1]
            held.cursor = Position(last[0], last[1])
            socket.send_many(out, size)
        return end, len(out)

    def snapshot_taken(self, socket: Socket, repo: str, snapshot: Snapshot, tick: int) -> None:
        """The socket's rows were read as of ``snapshot``; every transaction it saw is
        in a tick at or before ``tick``. From now on, events of those transactions are
        not sent to it (they are in its rows), whether held already or still to come."""
        subs = self.repos.get((socket.app_id, repo))
        held = subs.catching_up.get(socket) if subs is not None else None
        if subs is None or held is None:
            return
        held.drop_visible(snapshot)
        subs.seen[socket] = (snapshot, tick)

    def snapshot_row(
        self, socket: Socket, repo: str, row_id: str, data: str, pos: Position
    ) -> bool:
        """Send one row of a snapshot as db_created; False once the socket stopped catching up."""
        subs = self.repos.get((socket.app_id, repo))
        if subs is None or socket not in subs.catching_up:
            return False
        view = subs.views.get(socket)
        if view is not None:
            view.remember(row_id)
        channel = protocol.DB_CHANNEL_PREFIX + repo
        socket.send(protocol.encode(socket.id, "db_created", data, channel, pos=str(pos)))
        return True

    def snapshot_done(self, socket: Socket, repo: str) -> None:
        """Every row was sent: a filtered view now knows all its client holds."""
        subs = self.repos.get((socket.app_id, repo))
        view = subs.views.get(socket) if subs is not None else None
        if view is not None:
            view.complete = True

    def release_some(self, socket: Socket, repo: str) -> bool:
        """Send what was held back during a replay while the socket has room.

        Returns True once nothing is held any more: the socket is then live.
        Called repeatedly with flow control in between, so a subscriber whose
        backlog grew while it replayed is neither flooded nor cut off.
        """
        subs = self.repos.get((socket.app_id, repo))
        held = subs.catching_up.get(socket) if subs is not None else None
        if subs is None or held is None:
            return True
        while held.frames and socket.has_room and not socket.closing:
            socket.send(held.pop())
        if held.frames:
            return False
        del subs.catching_up[socket]
        return True


def audiences(subs: RepoSubscribers, event: Event) -> list[tuple[Iterable[Socket], str, str]]:
    """(sockets, frame type, data) for each audience of one event."""
    if event.op == "c":
        return [(subs.readers(event.owner_id, event.account_id), "db_created", event.data or "")]
    if event.op == "d":
        return [
            (subs.readers(event.owner_id, event.account_id), "db_deleted", event.deleted_data())
        ]
    new = subs.readers(event.owner_id, event.account_id)
    old = subs.readers(event.old_owner_id, event.old_account_id)
    if new is old:  # everyone reads: no one gains or loses sight
        return [(new, "db_updated", event.data or "")]
    return [
        (new & old, "db_updated", event.data or ""),
        (old - new, "db_deleted", event.deleted_data()),
        (new - old, "db_created", event.data or ""),
    ]


def audience_of(mode: Mode, ident: Identity, event: Event) -> list[tuple[str, str]]:
    """The frames one subscriber gets for one event (the replay path's filter)."""

    def sees(owner: str | None, account: str | None) -> bool:
        return ident.is_root or can_read(mode, ident.user_id, ident.account_id, owner, account)

    if event.op == "c":
        return [("db_created", event.data or "")] if sees(event.owner_id, event.account_id) else []
    if event.op == "d":
        return (
            [("db_deleted", event.deleted_data())] if sees(event.owner_id, event.account_id) else []
        )
    now = sees(event.owner_id, event.account_id)
    before = sees(event.old_owner_id, event.old_account_id)
    if now and before:
        return [("db_updated", event.data or "")]
    if before:
        return [("db_deleted", event.deleted_data())]
    if now:
        return [("db_created", event.data or "")]
    return []


def _view_frames(view: View, mode: Mode, ident: Identity, event: Event) -> list[tuple[str, str]]:
    """The replay path of a filtered subscriber: the same decision as the live one."""

    def sees(owner: str | None, account: str | None) -> bool:
        return ident.is_root or can_read(mode, ident.user_id, ident.account_id, owner, account)

    row = orjson.loads(event.data) if event.data else None
    read_old = event.op == "u" and sees(event.old_owner_id, event.old_account_id)
    kind = view.frame_type(
        event.op, event.row_id, row, sees(event.owner_id, event.account_id), read_old
    )
    if kind is None:
        return []
    return [(kind, event.deleted_data() if kind == "db_deleted" else event.data or "")]


def _already_seen(seen: dict[Socket, tuple[Snapshot, int]], socket: Socket, event: Event) -> bool:
    """True when ``socket``'s snapshot already holds this event's change."""
    snapshot, tick = seen[socket]
    if event.tick > tick:
        del seen[socket]  # every transaction the snapshot saw has been dispatched
        return False
    return event.xid is not None and snapshot.sees(event.xid)
