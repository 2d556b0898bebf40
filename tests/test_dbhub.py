"""Unit tests of relay.dbhub: who gets which frame for an event, exactly once.

Sockets here are real relay.hub.Socket objects that are never started: their
queued frames are read back instead of being written to a network.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from relay import protocol
from relay.auth import Identity
from relay.dbhub import DbHub, Event, Position
from relay.hub import Socket


def make_socket(user: str, account: str | None, root: bool = False) -> Socket:
    s = Socket(None, "default", queue_limit=100)  # type: ignore[arg-type]
    s.identity = Identity(user, account, is_root=root)
    return s


def sent(s: Socket) -> list[dict[str, Any]]:
    """The frames queued for ``s`` (shared bodies with its sid put in front), dequeued."""
    frames = [
        json.loads(item if isinstance(item, str) else s.prefix + item.data) for item in s._queue
    ]
    s._drop_queue()
    return frames


def event(op: str, owner: str | None, account: str | None, **kw: Any) -> Event:
    return Event(
        tick=5,
        seq=kw.pop("seq", 1),
        repo=kw.pop("repo_override", "tasks_760_"),
        op=op,
        row_id='"r1"',
        owner_id=owner,
        account_id=account,
        **{"data": None if op == "d" else json.dumps({"id": "r1", "owner_id": owner}), **kw},
    )


@pytest.fixture
def hub() -> tuple[DbHub, dict[str, Socket]]:
    h = DbHub()
    sockets = {"A": make_socket("A", "1"), "B": make_socket("B", "1"), "C": make_socket("C", "2")}
    for s in sockets.values():
        h.subscribe(s, "tasks_760_")
    return h, sockets


def test_created_reaches_account_readers_once(hub) -> None:
    h, s = hub
    h.dispatch(event("c", owner="A", account="1"))
    # A is both the owner and in the account: one frame, not two.
    assert [f["type"] for f in sent(s["A"])] == ["db_created"]
    assert [f["type"] for f in sent(s["B"])] == ["db_created"]
    assert sent(s["C"]) == []


def test_frames_carry_each_sockets_own_sid_and_the_position(hub) -> None:
    h, s = hub
    h.dispatch(event("c", owner="A", account="1", seq=9))
    for name in ("A", "B"):
        (frame,) = sent(s[name])
        assert frame["sid"] == s[name].id
        assert frame["pos"] == "5-9"
        assert frame["channel"] == "db-tasks_760_"
        assert set(frame) >= {"sid", "type", "data", "channel", "token"}


def test_update_moving_account_splits_audiences(hub) -> None:
    h, s = hub
    h.dispatch(event("u", owner="Z", account="2", old_owner_id="Z", old_account_id="1"))
    assert [f["type"] for f in sent(s["A"])] == ["db_deleted"]
    assert json.loads(sent(s["B"])[0]["data"]) == {"id": "r1"}
    assert [f["type"] for f in sent(s["C"])] == ["db_created"]


def test_delete_uses_the_old_row(hub) -> None:
    h, s = hub
    h.dispatch(event("d", owner="Z", account="2"))
    assert sent(s["A"]) == [] and sent(s["B"]) == []
    assert [f["type"] for f in sent(s["C"])] == ["db_deleted"]


def test_root_reads_everything_and_unsubscribed_nothing(hub) -> None:
    h, s = hub
    root = make_socket("svc", None, root=True)
    h.subscribe(root, "tasks_760_")
    h.unsubscribe(s["C"], "tasks_760_")
    h.dispatch(event("c", owner="Z", account="2"))
    assert [f["type"] for f in sent(root)] == ["db_created"]
    assert sent(s["C"]) == []


def test_catching_up_holds_live_frames_until_release(hub) -> None:
    h, _ = hub
    late = make_socket("A", "1")
    h.subscribe(late, "tasks_760_", after=Position(5, 3))
    h.dispatch(event("c", owner="A", account="1", seq=20))
    assert sent(late) == []  # held back
    assert h.replay_event(late, "tasks_760_", event("c", owner="A", account="1", seq=4)) == 1
    assert h.replay_event(late, "tasks_760_", event("c", owner="B", account="2", seq=5)) == 0
    assert h.release_some(late, "tasks_760_")
    assert [f["pos"] for f in sent(late)] == ["5-4", "5-20"]
    h.dispatch(event("c", owner="A", account="1", seq=21))
    assert [f["pos"] for f in sent(late)] == ["5-21"]  # live now


def test_release_in_steps_keeps_order(hub) -> None:
    h, _ = hub
    late = Socket(None, "default", queue_limit=4)  # type: ignore[arg-type]
    late.identity = Identity("A", "1")
    h.subscribe(late, "tasks_760_", after=Position(5, 3))
    for n in range(1, 6):
        h.dispatch(event("c", owner="A", account="1", seq=n))
    assert not h.release_some(late, "tasks_760_")  # stops once the queue is over half full
    assert len(late._queue) == 3
    released = sent(late)
    h.dispatch(event("c", owner="A", account="1", seq=6))  # still held, behind the rest
    while not h.release_some(late, "tasks_760_"):
        released += sent(late)
    released += sent(late)
    assert [f["pos"] for f in released] == [f"5-{n}" for n in range(1, 7)]


def test_replay_stops_for_a_socket_no_longer_catching_up(hub) -> None:
    h, _ = hub
    late = make_socket("A", "1")
    h.subscribe(late, "tasks_760_", after=Position(5, 3))
    h.unsubscribe(late, "tasks_760_")
    assert h.replay_event(late, "tasks_760_", event("c", owner="A", account="1")) is None
    assert sent(late) == []


@pytest.mark.parametrize(
    ("text", "pos"),
    [("12-7", Position(12, 7)), ("12", Position(12, None))],
)
def test_position_parse(text: str, pos: Position) -> None:
    assert Position.parse(text) == pos
    assert str(pos) == text


def test_a_position_comes_after_its_own_event_and_before_the_next() -> None:
    at = Position(5, 3)
    assert not at.before(event("c", "A", "1", seq=3))  # dispatched already
    assert at.before(event("c", "A", "1", seq=4))
    assert not Position(5).before(event("c", "A", "1", seq=9))  # the whole tick
    assert Position(4).before(event("c", "A", "1", seq=1))


def test_position_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        Position.parse("x-1")


def test_reauth_as_another_user_reindexes_and_unsubscribe_cleans_every_index(hub) -> None:
    h, s = hub
    a = s["A"]
    a.identity = Identity("Z", "2")
    h.subscribe(a, "tasks_760_")  # what the server does after a re-auth
    h.dispatch(event("c", owner="Q", account="1"))
    assert sent(a) == []  # no longer in account 1
    h.dispatch(event("c", owner="Q", account="2"))
    assert [f["type"] for f in sent(a)] == ["db_created"]
    for sock in s.values():
        h.unsubscribe(sock, "tasks_760_")
    assert h.subscribers("default", "tasks_760_") is None


async def test_held_frames_are_bounded_by_the_send_queue_bytes() -> None:
    from aiohttp import web

    h = DbHub()
    # An unprepared WebSocketResponse: closing it is a no-op, nothing is written.
    late = Socket(web.WebSocketResponse(), "default", queue_limit=100, queue_bytes=2_000)
    late.identity = Identity("A", "1")
    h.subscribe(late, "tasks_760_", after=Position(5, 3))
    for n in range(1, 20):  # each frame is a few hundred characters
        h.dispatch(event("c", owner="A", account="1", seq=n))
        if late.closing:
            break
    assert late.closing
    assert h.subscribers("default", "tasks_760_") is None  # dropped from every index, once
    await asyncio.sleep(0)  # let the close task run to completion


def test_held_frames_bounds_are_inclusive_and_sizes_exact() -> None:
    """Held keeps up to exactly MAX_HELD_FRAMES frames and exactly max_bytes characters."""
    from relay.dbhub import MAX_HELD_FRAMES, Held

    held = Held(Position(5))
    assert held.size == 0
    assert held.hold(Position(5, 1), "abc", None, max_bytes=5) and held.size == 3
    assert held.hold(Position(5, 2), "de", None, max_bytes=5) and held.size == 5  # at the cap
    assert not held.hold(Position(5, 3), "f", None, max_bytes=5)  # one character over
    assert [held.pop() for _ in range(3)] == ["abc", "de", "f"] and held.size == 0
    assert held.cursor == Position(5, 3)  # where a paused stream would resume

    many = Held(Position(5))
    assert all(
        many.hold(Position(6, 1), "x", None, max_bytes=10**9) for _ in range(MAX_HELD_FRAMES)
    )
    assert not many.hold(Position(6, 2), "x", None, max_bytes=10**9)  # one frame over


def test_an_event_is_an_immutable_value() -> None:
    import dataclasses

    e = event("c", owner="A", account="1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.owner_id = "B"  # type: ignore[misc]


async def test_without_a_byte_cap_held_frames_stop_at_16_mib(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket with no send-queue byte cap may hold 16 MiB of live frames while it
    replays; past that it is a slow consumer, and the relay.db logger says so."""
    from aiohttp import web

    h = DbHub()
    late = Socket(web.WebSocketResponse(), "default", queue_limit=100, queue_bytes=None)
    late.identity = Identity("A", "1")
    h.subscribe(late, "tasks_760_", after=Position(5))
    mib = 1024 * 1024
    big = json.dumps({"id": "r1", "pad": "x" * mib})
    frame_size = len(
        protocol.with_sid(
            late.id, protocol.encode_tail("db_created", big, "db-tasks_760_", pos="5-1")
        )
    )
    fits = 16 * mib // frame_size
    for n in range(1, fits + 1):
        h.dispatch(event("c", owner="A", account="1", seq=n, data=big))
    assert not late.closing  # just under 16 MiB held
    with caplog.at_level(logging.WARNING, logger="relay.db"):
        h.dispatch(event("c", owner="A", account="1", seq=fits + 1, data=big))
    assert late.closing
    assert [
        r.name
        for r in caplog.records
        if r.getMessage() == f"replay could not catch up sid={late.id} channel=db-tasks_760_"
    ] == ["relay.db"]
    assert late._close_reason == "slow consumer: could not catch up"  # the 4001 frame's reason
    await asyncio.sleep(0)  # let the close task run to completion


def test_positions_are_ordered_immutable_values() -> None:
    import dataclasses

    assert Position(5, 3) < Position(5, 4) < Position(6, 1)
    assert sorted([Position(6, 1), Position(5, 4), Position(5, 3)])[0] == Position(5, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Position(5, 3).tick = 6  # type: ignore[misc]
    assert Position(7) == Position(7, None) and str(Position(7)) == "7"


def test_malformed_positions_say_what_is_expected() -> None:
    for text in ("x-1", "yesterday", "1-2-3", ""):
        with pytest.raises(ValueError) as refused:
            Position.parse(text)
        assert str(refused.value) == (f"not a position: {text!r} (expected 'tick-seq' or 'tick')")


def test_leaving_keeps_the_others_indexed(hub) -> None:
    """A and B share account 1: when A leaves, B still gets account 1's events."""
    h, s = hub
    h.unsubscribe(s["A"], "tasks_760_")
    h.dispatch(event("c", owner="Q", account="1"))
    assert sent(s["A"]) == []
    assert [f["type"] for f in sent(s["B"])] == ["db_created"]


def test_a_socket_without_an_account_leaves_every_index() -> None:
    """No account claim: indexed by user only; after leaving, its own rows no longer reach it."""
    h = DbHub()
    loner, other = make_socket("L", None), make_socket("O", "1")
    for sock in (loner, other):
        h.subscribe(sock, "tasks_700_")
    h.dispatch(event("c", owner="L", account=None, repo_override="tasks_700_"))
    assert [f["type"] for f in sent(loner)] == ["db_created"]
    h.unsubscribe(loner, "tasks_700_")
    h.dispatch(event("c", owner="L", account=None, repo_override="tasks_700_"))
    assert sent(loner) == []
    subs = h.subscribers("default", "tasks_700_")
    assert subs is not None and subs.by_user.keys() == {"O"}


def test_replay_reaches_only_a_socket_that_is_catching_up(hub) -> None:
    h, s = hub
    missed = event("c", owner="A", account="1", seq=3)
    # A live subscriber, and a socket that never joined, get no replay (None: stop).
    assert h.replay_event(s["A"], "tasks_760_", missed) is None
    assert sent(s["A"]) == []
    stranger = make_socket("A", "1")
    assert h.replay_event(stranger, "tasks_760_", missed) is None
    assert sent(stranger) == []
    late = make_socket("A", "1")
    h.subscribe(late, "tasks_760_", after=Position(5, 2))
    update = event("u", owner="A", account="1", seq=5, old_owner_id="A", old_account_id="1")
    assert h.replay_event(late, "tasks_760_", missed) == 1  # frames sent
    assert h.replay_event(late, "tasks_760_", update) == 1
    replayed = sent(late)
    assert [(f["type"], f["pos"], f["channel"]) for f in replayed] == [
        ("db_created", "5-3", "db-tasks_760_"),
        ("db_updated", "5-5", "db-tasks_760_"),
    ]
    assert all(f["sid"] == late.id for f in replayed)
    late.identity = None  # (a socket whose session is gone)
    assert h.replay_event(late, "tasks_760_", missed) is None
    assert sent(late) == []


def test_release_of_a_socket_that_is_not_catching_up_is_done_at_once(hub) -> None:
    h, s = hub
    assert h.release_some(s["A"], "tasks_760_") is True  # live already
    assert h.release_some(s["A"], "no_such_repo") is True
    assert sent(s["A"]) == []
