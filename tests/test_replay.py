"""The replay's inner loop: a page of the log rendered and queued a room's worth at a time.

``relay.replay`` renders a page's rows itself (not through ``Event`` and
``protocol.encode``) and ``DbHub.replay_rows`` queues them with one
``Socket.send_many``. The oracle for each is the per-event path it replaces:
``audience_of`` + ``protocol.encode``, and ``replay_event`` called while
``has_room`` holds. Then a real resume through a tiny send queue.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import asyncpg
from aiohttp import web

from relay import protocol
from relay.auth import Identity
from relay.dbhub import DbHub, Event, Position, audience_of
from relay.hub import Socket
from relay.outbox import SendBudget
from relay.permissions import mode_of
from relay.protocol import CloseCode
from relay.replay import PageFrames
from tests.conftest import RelayHandle
from tests.helpers import collect

REPO = "tasks_740_"
# JSON text that needs escaping inside a string: quotes, backslashes, control
# characters, non-ASCII, a line separator.
DATA = '{"id": "r\\"1", "t": "a\\\\b\\n\\u0001", "u": "é✓ \u2028"}'


def row(tick: int, seq: int, op: str, owner: Any, account: Any, *old: Any, data: str = DATA):
    old_owner, old_account = old or (None, None)
    return (tick, seq, op, '"r\\"1"', owner, account, old_owner, old_account, data)


def event_of(r: tuple[Any, ...]) -> Event:
    tick, seq, op, row_id, owner, account, old_owner, old_account, data = r
    return Event(tick, seq, REPO, op, row_id, owner, account, old_owner, old_account, data)


def queued(s: Socket) -> list[str]:
    texts = [item for item in s._queue if isinstance(item, str)]
    assert len(texts) == len(s._queue)
    return texts


def catching_up(h: DbHub, user: str, account: str | None, **kw: Any) -> Socket:
    s = Socket(None, "default", **{"queue_limit": 100, **kw})  # type: ignore[arg-type]
    s.identity = Identity(user, account)
    h.subscribe(s, REPO, after=Position(1))
    return s


def test_frames_are_what_protocol_encode_renders_for_every_mode_and_reader() -> None:
    owners = ["A", "Z", None]
    accounts = ["1", "2", None]
    rows = [row(7, 1, "c", o, a) for o, a in itertools.product(owners, accounts)]
    rows += [row(7, 2, "d", o, a, data=None) for o, a in itertools.product(owners, accounts)]
    rows += [
        row(8, 3, "u", o, a, oo, oa)
        for o, a, oo, oa in itertools.product(owners, accounts, owners, accounts)
    ]
    readers = [Identity("A", "1"), Identity("A", None), Identity("B", "2"), Identity("x", None)]
    readers.append(Identity("svc", None, is_root=True))
    for digits, ident in itertools.product(["700", "740", "704", "070", "000", "444"], readers):
        mode = mode_of(f"t_{digits}_")
        page = PageFrames("sid-1", "db-t_" + digits + "_", mode, ident)
        out: list[str] = []
        end, size = page.build(rows, 0, len(rows), len(rows), 10**9, out)
        want = [
            protocol.encode("sid-1", type_, data, f"db-t_{digits}_", pos=f"{r[0]}-{r[1]}")
            for r in rows
            for type_, data in audience_of(mode, ident, event_of(r))
        ]
        assert (end, size) == (len(rows), sum(map(len, want)))
        assert out == want, (digits, ident)
    assert json.loads(json.loads(want[0])["data"]) == json.loads(DATA)


def test_a_room_worth_is_what_replay_event_sends_while_has_room_holds() -> None:
    """Each call queues exactly what the per-event loop queued before it had to wait,
    by frame count and by byte cap, skipped (unreadable) rows included."""
    h = DbHub()
    rows = [
        row(
            9, n, "c", "A" if n % 4 else "Z", "1" if n % 4 else "2", data=json.dumps({"p": "x" * n})
        )
        for n in range(60)
    ]
    for caps in ({"queue_limit": 10}, {"queue_limit": 100, "queue_bytes": 2500}):
        new, old = catching_up(h, "A", "1", **caps), catching_up(h, "A", "1", **caps)
        start = old_at = 0
        while start < len(rows):
            got = h.replay_rows(new, REPO, rows, start, len(rows))
            assert got is not None
            end, count = got
            assert end > start and count == len(new._queue)
            while old_at < len(rows) and old.has_room:
                assert h.replay_event(old, REPO, event_of(rows[old_at])) is not None
                old_at += 1
            mine = [t.replace(new.id, old.id) for t in queued(new)]
            assert (end, mine) == (old_at, queued(old))
            assert new.has_room == old.has_room
            assert h.delivered(new, REPO, Position(99)) == h.delivered(old, REPO, Position(99))
            new._drop_queue()
            old._drop_queue()
            start = end


def test_a_notice_or_a_filtered_subscription_is_left_to_replay_event() -> None:
    h = DbHub()
    s = catching_up(h, "A", "1")
    rows = [
        row(3, 1, "c", "A", "1"),
        row(3, 2, "t", None, None, data=None),
        row(3, 3, "c", "A", "1"),
    ]
    assert h.replay_rows(s, REPO, rows, 0, 3) == (1, 1)
    assert h.replay_rows(s, REPO, rows, 1, 3) == (1, 0)  # the notice: not rendered here
    assert h.replay_event(s, REPO, event_of(rows[1])) == 1
    assert h.replay_rows(s, REPO, rows, 2, 3) == (3, 1)
    assert [json.loads(t)["type"] for t in queued(s)] == ["db_created", "error", "db_created"]

    from relay.views import View

    viewed = Socket(None, "default", queue_limit=100)  # type: ignore[arg-type]
    viewed.identity = Identity("A", "1")
    h.subscribe(viewed, REPO, after=Position(1), view=View(lambda row: True, source="n=gte.0"))
    assert h.replay_rows(viewed, REPO, rows, 0, 3) == (0, 0)


async def test_replay_rows_stops_for_a_socket_no_longer_catching_up_or_closing() -> None:
    h = DbHub()
    s = catching_up(h, "A", "1")
    h.unsubscribe(s, REPO)
    assert h.replay_rows(s, REPO, [row(3, 1, "c", "A", "1")], 0, 1) is None

    # An unprepared WebSocketResponse: closing it is a no-op, nothing is written.
    cut = Socket(web.WebSocketResponse(), "default", queue_limit=100)
    cut.identity = Identity("A", "1")
    h.subscribe(cut, REPO, after=Position(1))
    cut.close(CloseCode.SLOW_CONSUMER, "slow consumer: too many frames queued")
    assert h.replay_rows(cut, REPO, [row(3, 1, "c", "A", "1")], 0, 1) is None
    assert h.delivered(cut, REPO, Position(9)) == (Position(1), None)  # nothing went out
    await asyncio.sleep(0)  # let the close task run to completion


async def test_send_many_keeps_order_and_the_caps() -> None:
    """As many ``send`` calls would: in order with the others, counted once each, and a
    batch over the frame or byte cap cuts the socket off (its queue dropped)."""
    budget = SendBudget(None)

    def socket(**caps: int) -> Socket:
        # An unprepared WebSocketResponse: closing it is a no-op, nothing is written.
        return Socket(web.WebSocketResponse(), "default", budget=budget, **caps)  # type: ignore[arg-type]

    s = socket(queue_limit=5, queue_bytes=100)
    s.send("a" * 10)
    s.send_many(["b" * 10, "c" * 10], 20)
    s.send("d" * 10)
    s.send_many([], 0)
    assert queued(s) == ["a" * 10, "b" * 10, "c" * 10, "d" * 10]
    assert s.queued_bytes == budget.total == 40
    s.send_many(["e", "f"], 2)  # six frames: over the cap
    assert s.close_code is CloseCode.SLOW_CONSUMER
    assert s.queued_bytes == budget.total == 0 and not s._queue

    at_cap = socket(queue_limit=3)
    at_cap.send("a")
    at_cap.send_many(["b", "c"], 2)
    assert not at_cap.closing and queued(at_cap) == ["a", "b", "c"]
    at_cap._drop_queue()

    by_bytes = socket(queue_limit=50, queue_bytes=100)
    by_bytes.send_many(["x" * 40], 40)
    by_bytes.send_many(["y" * 30, "z" * 30], 60)  # 100: at the cap
    assert not by_bytes.closing
    by_bytes.send_many(["!"], 1)
    assert by_bytes.close_code is CloseCode.SLOW_CONSUMER
    assert budget.total == 0
    await asyncio.sleep(0)  # let the close tasks run to completion


async def test_a_resume_through_a_tiny_send_queue_is_the_log_in_order(
    relay, client, db: asyncpg.Connection, repo
) -> None:
    """Over two pages of creations, moves out of and into sight, deletions and a TRUNCATE,
    replayed five frames at a time: every frame the reader may see, once, in order."""
    handle: RelayHandle = await relay(send_queue_frames=8)
    table = await repo("_740_")
    c = await client(handle)
    await c.auth(handle.token("A", "1"))
    pos = (await c.join("db-" + table))["pos"]
    await c.close()

    # Where each row is: n % 3 == 2 is another user's row of another account, out of A's sight.
    where = {n: ("C", "2") if n % 3 == 2 else ("A", "1") for n in range(700)}
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, data)"
        " SELECT CASE WHEN g % 3 = 2 THEN 'C' ELSE 'A' END,"
        " CASE WHEN g % 3 = 2 THEN '2' ELSE '1' END, jsonb_build_object('n', g)"
        " FROM generate_series(0, 699) g"
    )
    ids = dict(await db.fetch(f"SELECT (data->>'n')::int, id::text FROM {table}"))
    want: list[tuple[str, Any]] = [("db_created", ids[n]) for n in range(700) if n % 3 != 2]
    for n in range(12):  # moved out of A's sight (deleted for A) or into it (created)
        moved = ("A", "1") if where[n] == ("C", "2") else ("C", "2")
        await db.execute(
            f"UPDATE {table} SET owner_id = $1, account_id = $2 WHERE id = $3", *moved, ids[n]
        )
        want.append(("db_created" if moved == ("A", "1") else "db_deleted", ids[n]))
        where[n] = moved
        await db.execute(f"UPDATE {table} SET data = data || '{{\"u\": 1}}' WHERE id = $1", ids[n])
        if where[n] == ("A", "1"):
            want.append(("db_updated", ids[n]))
    for n in (1, 2, 13, 14, 30):  # deleted: seen by A where it could read the row
        await db.execute(f"DELETE FROM {table} WHERE id = $1", ids[n])
        if where[n] == ("A", "1"):
            want.append(("db_deleted", ids[n]))
    await db.execute(f"TRUNCATE {table}")
    want.append(("error", "truncated"))
    await db.execute(
        f"INSERT INTO {table} (owner_id, account_id, data)"
        " SELECT 'B', '1', jsonb_build_object('n', 1000 + g) FROM generate_series(0, 399) g"
    )
    later = await db.fetch(f"SELECT id::text FROM {table} ORDER BY (data->>'n')::int")
    want += [("db_created", r["id"]) for r in later]

    resumed = await client(handle)
    await resumed.auth(handle.token("A", "1"))
    await resumed.join("db-" + table, after=pos)
    frames = await collect(resumed, len(want))
    got = [
        ("error", f["reason"]) if f["type"] == "error" else (f["type"], json.loads(f["data"])["id"])
        for f in frames
    ]
    assert got == want
    positions = [tuple(int(x) for x in f["pos"].split("-")) for f in frames]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    await resumed.silent()


def test_pages_are_sized_by_the_rows_of_the_last_one() -> None:
    """Small rows: big pages (up to the most); big rows: few per page (down to the least),
    so a page holds about REPLAY_PAGE_CHARS of row text either way."""
    from relay import dbjoin

    def rows(n: int, chars: int) -> list[dict[str, Any]]:
        return [{"data": "x" * chars} for _ in range(n)]

    assert dbjoin._page_size(rows(500, 1)) == dbjoin.REPLAY_PAGE_MAX
    assert dbjoin._page_size(rows(500, 4_000)) == dbjoin.REPLAY_PAGE_CHARS // 4_200
    assert dbjoin._page_size(rows(20, 10_000_000)) == dbjoin.REPLAY_PAGE_MIN
    assert dbjoin._page_size([*rows(3, 0), {"data": None}]) == dbjoin.REPLAY_PAGE_MAX


def test_frames_written_together_are_counted_as_one_by_one() -> None:
    """The writer counts a write's frames with one ``sent_all``: the same counts as ``sent``
    for each, the frames whose type is not at the usual place (``init``) included."""
    from relay.metrics import Counts

    sid = "0b5f3c1e-8f53-4a7b-9a39-5b0c1e2d3f4a"
    texts = [
        protocol.encode("", "init", sid),
        *(protocol.encode(sid, t, "x", "db-t") for t in ("db_created", "db_deleted", "error")),
        protocol.encode(sid, "db_created", "y", "db-t", pos="1-2"),
        protocol.encode(sid, "not_a_type"),
    ]
    one, together = Counts(), Counts()
    for text in texts:
        one.sent(text)
    together.sent_all(texts)
    assert together.frames_out == one.frames_out
    assert one.frames_out["db_created"] == 2 and one.frames_out["init"] == 1
