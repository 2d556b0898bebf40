"""Catch-up rate: how fast a returning client replays the database events it missed.

1. A client (this process) joins ``db-<repo>`` on a relay running in its own
   process and keeps the ``pos`` of the ``joined`` frame; then it goes away.
2. N events (default 50,000 inserts, in 1,000-row transactions) are written
   while it is away; the script waits until the relay's listener has ticked
   past all of them (a probe socket re-joins until its ``joined`` pos reaches
   the tick that covers the last write).
3. The client reconnects, authenticates and sends
   ``{"type":"join","data":"db-<repo>","token":...,"after":"<pos>"}``; the clock runs
   from sending that join to receiving the N-th ``db_created`` frame.

Baselines in the same run: reading the same events straight from PostgreSQL
with ``SELECT * FROM relay.events_between(...)`` over asyncpg (what the relay
itself runs to replay); and, as a reference for the socket path, the live
stream: the same number of rows written as fast as one connection can (in
--live-batch-row transactions) while the client is connected.

Checks: exactly N frames, no duplicates, every row seen, ``pos`` increasing. The receiver is
the bench's own client (``wsclient.py``, as the other scenarios' load generators):
aiohttp's costs some 10-20 us per frame, and the replay would wait on it.
With --during-rate R > 0 a second replay runs while a writer keeps inserting
R rows/s (in --during-batch-row transactions), exercising the seam between
replay and live stream (frames held back during the replay are released at
its end).

Run (about a minute with the defaults):

    . .venv/bin/activate
    python bench/catchup.py
    python bench/catchup.py --events 20000 --during-rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import wsclient
from _common import (
    CpuMeter,
    Postgres,
    RelayProcess,
    embedded_pg,
    machine_header,
    pg_version,
    print_table,
    profile_summary,
    quiet_logs,
    self_cpu,
    token,
)

REPO = "cu_bench"
USER, ACCOUNT = "u1", "acct1"

INSERT_SQL = f"""
INSERT INTO {REPO} (account_id, owner_id, data)
SELECT $1, $2, jsonb_build_object('n', $3::int + g, 'pad', $4::text)
FROM generate_series(0, $5::int - 1) g
"""


class WsClient:
    """One relay socket on the bench's cheap client (:mod:`wsclient`), as the other
    scenarios' load generators use: aiohttp's client costs some 10-20 us per received
    frame, enough to make the receiver, not the relay, what a replay waits on."""

    def __init__(self, ws: wsclient.WsClient) -> None:
        self.ws = ws
        self.token = ""

    @classmethod
    async def connect(cls, url: str, user: str = USER, account: str = ACCOUNT) -> WsClient:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        c = cls(await wsclient.WsClient.connect(parts.hostname, parts.port, parts.path))
        await c.expect("init")
        await c.send(type="auth", data=token(user, account))
        c.token = (await c.expect("token"))["data"]
        return c

    async def send(self, **fields: Any) -> None:
        self.ws.send(orjson.dumps(fields))

    async def recv(self, wait: float = 10) -> dict[str, Any]:
        frame: dict[str, Any] = orjson.loads(await self.ws.recv(wait))
        return frame

    async def expect(self, type_: str) -> dict[str, Any]:
        f = await self.recv()
        if f["type"] != type_:
            raise RuntimeError(f"expected {type_}, got {f}")
        return f

    async def join(self, **extra: str) -> dict[str, Any]:
        await self.send(type="join", data=f"db-{REPO}", token=self.token, **extra)
        return await self.expect("joined")

    async def close(self) -> None:
        self.ws.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.ws.closed), 5)


@dataclass
class Receive:
    """The db_created frames one client got, with timing and checks.

    The receiving handler only keeps the raw bytes (a substring test picks
    db_created frames), so the client costs as little as possible while the clock
    runs; :meth:`check` decodes and verifies everything afterwards."""

    expected: int
    first_at: float | None = None
    last_at: float | None = None
    raw: list[bytes] = field(default_factory=list)
    error: str = ""

    @property
    def frames(self) -> int:
        return len(self.raw)

    async def run(self, c: WsClient, idle_timeout: float, stop_at: int | None = None) -> None:
        """Receive until ``stop_at`` (default: expected) db_created frames, an error frame
        ends nothing (it is reported), the socket closes, or nothing comes for
        ``idle_timeout`` seconds."""
        want = stop_at if stop_at is not None else self.expected
        ws = c.ws
        raw = self.raw
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        append = raw.append

        def handler(payload: bytes, now: float) -> None:
            if b'"type":"db_created"' not in payload:
                if b'"type":"error"' in payload:
                    self.error = "error frame: " + orjson.loads(payload)["data"]
                return
            if self.first_at is None:
                self.first_at = now
            self.last_at = now
            append(payload)
            if len(raw) >= want:
                ws.handler = None  # what comes next waits in the client's queue
                if not done.done():
                    done.set_result(None)

        while not ws.queue.empty() and len(raw) < want:  # frames that came before
            handler(ws.queue.get_nowait(), time.monotonic())
        if len(raw) >= want:
            return
        ws.handler = handler
        try:
            while not done.done():
                seen = len(raw)
                finished, _ = await asyncio.wait(
                    {done, ws.closed}, timeout=idle_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if ws.closed in finished and not done.done():
                    self.error = f"socket ended: code={ws.close_code}"
                    return
                if not finished and len(raw) == seen:
                    self.error = self.error or f"nothing for {idle_timeout:.0f} s"
                    return
        finally:
            ws.handler = None

    def check(self, expected: set[int]) -> str:
        seen: set[int] = set()
        duplicates = out_of_order = 0
        last_pos = (0, 0)
        for text in self.raw:
            f = orjson.loads(text)
            tick, _, seq = f["pos"].partition("-")
            pos = (int(tick), int(seq))
            if pos <= last_pos:
                out_of_order += 1
            last_pos = pos
            n = orjson.loads(f["data"])["data"]["n"]
            if n in seen:
                duplicates += 1
            seen.add(n)
        problems = []
        if missing := len(expected - seen):
            problems.append(f"{missing} missing")
        if unexpected := len(seen - expected):
            problems.append(f"{unexpected} unexpected")
        if duplicates:
            problems.append(f"{duplicates} duplicates")
        if out_of_order:
            problems.append(f"{out_of_order} pos out of order")
        if self.error:
            problems.append(self.error)
        return "; ".join(problems) or "ok"


async def write(url: str, start: int, count: int, batch: int, pad: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for off in range(0, count, batch):
            await conn.execute(INSERT_SQL, ACCOUNT, USER, start + off, pad, min(batch, count - off))
    finally:
        await conn.close()


async def write_at_rate(
    url: str, start: int, rate: float, batch: int, pad: str, stop: asyncio.Event
) -> int:
    """Insert ``rate`` rows/s in ``batch``-row transactions until ``stop``; return the count."""
    conn = await asyncpg.connect(url)
    n = 0
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            delay = t0 + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.execute(INSERT_SQL, ACCOUNT, USER, start + n, pad, batch)
            n += batch
    finally:
        await conn.close()
    return n


async def wait_relay_past(relay: RelayProcess, url: str) -> None:
    """Wait until the relay's listener has dispatched every event committed so far."""
    conn = await asyncpg.connect(url)
    target = await conn.fetchval("SELECT relay.tick()")
    await conn.close()
    # A user of another account: it may read none of the rows, so it gets only 'joined'.
    probe = await WsClient.connect(relay.ws_url, "probe", "nobody")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pos = int((await probe.join())["pos"].partition("-")[0])
            if pos >= target:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"relay did not reach tick {target} within 30 s")
    finally:
        await probe.close()


@dataclass
class Row:
    label: str
    events: int
    seconds: float
    first_ms: float | None = None
    relay_cpu: float | None = None
    client_cpu: float | None = None
    pg_cpu: float | None = None
    check: str = ""


async def run(args: argparse.Namespace, pg: Postgres) -> dict[str, Any]:
    """Measure and print; returns {"status": exit status, "rows": [Row as a dict, ...]}
    (the first row is the SQL baseline, the second the replay)."""
    from relay.repos import create_repo

    admin = await asyncpg.connect(pg.url)
    await create_repo(admin, REPO)
    print(machine_header("relay catch-up (resume with 'after')", await pg_version(pg.url)))
    print(
        f"settings: events={args.events:,} write batch={args.batch} rows/txn"
        f" payload={args.payload_bytes} B live batch={args.live_batch} rows/txn"
        f" during-rate={args.during_rate:,.0f} rows/s ({args.during_batch} rows/txn)\n",
        flush=True,
    )
    pad = "x" * args.payload_bytes
    n_events = args.events
    results: list[Row] = []
    status = 0
    relay = RelayProcess(pg.url)
    relay.start()
    try:
        # 1. Join, keep the position, go away.
        c = await WsClient.connect(relay.ws_url)
        joined = await c.join()
        after = joined["pos"]
        await c.close()
        print(f"joined frame: pos={after!r}; client away", flush=True)
        if not after:
            print("the joined frame carries no pos: resume cannot be measured")
            return {"status": 1, "rows": [], "error": "the joined frame carries no pos"}

        # 2. Write N events while it is away; wait until the relay has them.
        t = time.monotonic()
        await write(pg.url, 0, n_events, args.batch, pad)
        wrote_s = time.monotonic() - t
        print(f"wrote {n_events:,} rows in {wrote_s:.2f} s", flush=True)
        await wait_relay_past(relay, pg.url)
        upto = await admin.fetchval("SELECT max(id) FROM relay.ticks")

        # Baseline: the relay's own replay query, read over asyncpg.
        q = await asyncpg.connect(pg.url)
        meter = CpuMeter(pg.postmaster_pid)
        meter.start()
        c0 = self_cpu()
        t = time.monotonic()
        rows = await q.fetch(
            "SELECT * FROM relay.events_between($1, $2)", int(after.partition("-")[0]), upto
        )
        sql_s = time.monotonic() - t
        meter.stop()
        await q.close()
        results.append(
            Row(
                "SQL: relay.events_between() over asyncpg",
                len(rows),
                sql_s,
                client_cpu=self_cpu() - c0,
                pg_cpu=meter.pg,
                check="ok" if len(rows) == n_events else f"{len(rows)} rows",
            )
        )
        del rows

        # 3. Come back with 'after' and replay.
        c = await WsClient.connect(relay.ws_url)
        rcv = Receive(n_events)
        if args.profile_relay:
            relay.start_profile(args.profile_relay)
        window = Window.open(relay, pg)
        await c.send(type="join", data=f"db-{REPO}", token=c.token, after=after)
        first = await c.recv(30)
        if first["type"] != "joined":
            print(f"join with after={after!r} refused: {first}")
            return {"status": 1, "rows": [], "error": f"join with after refused: {first}"}
        await rcv.run(c, idle_timeout=30)
        window.close()
        results.append(
            window.row(f"relay replay: join after={after}", rcv, expected=set(range(n_events)))
        )
        relay.stop_profile()
        await c.close()

        # Live reference: the same socket path, events arriving as they are written.
        if args.live_batch:
            results.append(await live(relay, pg, args, pad))

        # Replay while writes continue: the seam between replay and live stream.
        if args.during_rate > 0:
            results.append(await during(relay, pg, args, pad, admin))
    finally:
        relay.stop()
        await admin.close()

    print()
    base = results[0].events / results[0].seconds if results[0].seconds else 0
    table = []
    for r in results:
        rate = r.events / r.seconds if r.seconds else 0
        table.append(
            [
                r.label,
                f"{r.events:,}",
                f"{r.seconds:.2f}",
                f"{rate:,.0f}",
                f"{rate / base:.2f}x" if base else "-",
                f"{r.first_ms:.0f}" if r.first_ms is not None else "-",
                f"{1e6 * r.relay_cpu / r.events:.1f}" if r.relay_cpu and r.events else "-",
                f"{1e6 * r.client_cpu / r.events:.1f}" if r.client_cpu and r.events else "-",
                f"{1e6 * r.pg_cpu / r.events:.1f}" if r.pg_cpu and r.events else "-",
                r.check,
            ]
        )
        if r.check != "ok":
            status = 1
    print_table(
        [
            "path",
            "events",
            "seconds",
            "events/s",
            "vs SQL",
            "first event ms",
            "relay CPU us/ev",
            "client CPU us/ev",
            "PG CPU us/ev",
            "check",
        ],
        table,
    )
    print(
        "\nevents/s: events received / time from sending the join (or the query) to the last"
        "\none; first event ms: join sent -> first db_created frame; CPU columns per event:"
        "\nthe relay process, this client process, all PostgreSQL processes."
    )
    if args.profile_relay:
        print("\n" + profile_summary(args.profile_relay))
    return {"status": status, "rows": [asdict(r) for r in results]}


@dataclass
class Window:
    """A measured window: from :meth:`open` to the last frame received, with the CPU
    the relay process, this client and PostgreSQL spent meanwhile."""

    relay: RelayProcess
    meter: CpuMeter
    relay_cpu0: float
    client_cpu0: float
    t0: float

    @classmethod
    def open(cls, relay: RelayProcess, pg: Postgres) -> Window:
        meter = CpuMeter(pg.postmaster_pid)
        relay_cpu0, client_cpu0 = relay.cpu(), self_cpu()
        meter.start()
        return cls(relay, meter, relay_cpu0, client_cpu0, time.monotonic())

    def close(self) -> None:
        self.meter.stop()

    def row(self, label: str, rcv: Receive, expected: set[int]) -> Row:
        end = rcv.last_at or time.monotonic()
        row = Row(
            label,
            rcv.frames,
            end - self.t0,
            first_ms=1000 * (rcv.first_at - self.t0) if rcv.first_at else None,
            relay_cpu=self.relay.cpu() - self.relay_cpu0,
            client_cpu=self_cpu() - self.client_cpu0,
            pg_cpu=self.meter.pg,
        )
        row.check = rcv.check(expected)
        return row


async def live(
    relay: RelayProcess,
    pg: Postgres,
    args: argparse.Namespace,
    pad: str,
) -> Row:
    """Reference: the same number of events delivered live, written as fast as one
    connection can in --live-batch-row transactions while the client is connected."""
    start = 10_000_000
    count = args.events
    c = await WsClient.connect(relay.ws_url)
    await c.join()
    rcv = Receive(count)
    window = Window.open(relay, pg)
    reader = asyncio.create_task(rcv.run(c, idle_timeout=10))
    await write(pg.url, start, count, args.live_batch, pad)
    await reader
    window.close()
    await c.close()
    return window.row(
        f"live: same rows written in {args.live_batch}-row txns, client connected",
        rcv,
        expected=set(range(start, start + count)),
    )


async def during(
    relay: RelayProcess,
    pg: Postgres,
    args: argparse.Namespace,
    pad: str,
    admin: asyncpg.Connection,
) -> Row:
    """Replay N events while a writer keeps inserting; every row must arrive exactly once."""
    start = 20_000_000
    n_events = args.events
    c = await WsClient.connect(relay.ws_url)
    after = (await c.join())["pos"]
    await c.close()
    await write(pg.url, start, n_events, args.batch, pad)
    await wait_relay_past(relay, pg.url)
    stop = asyncio.Event()
    writer = asyncio.create_task(
        write_at_rate(pg.url, start + n_events, args.during_rate, args.during_batch, pad, stop)
    )
    await asyncio.sleep(0.2)  # the live stream is flowing before the client comes back
    c = await WsClient.connect(relay.ws_url)
    rcv = Receive(n_events)
    window = Window.open(relay, pg)
    await c.send(type="join", data=f"db-{REPO}", token=c.token, after=after)
    await c.expect("joined")
    # Receive the replay plus what the writer adds meanwhile, then stop the writer and
    # collect the remainder.
    await rcv.run(c, idle_timeout=30, stop_at=n_events)
    stop.set()
    written = await writer
    rcv.expected = n_events + written
    if not rcv.error:
        await rcv.run(c, idle_timeout=10)
    window.close()
    await c.close()
    want = set(range(start, start + n_events + written))
    row = window.row(
        f"relay replay with {args.during_rate:,.0f} rows/s written meanwhile", rcv, expected=want
    )
    row.check += f" ({written} rows written during the replay)"
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Replay rate of relay's resume ('after' on a db- join) against reading the "
        "same events with SQL."
    )
    p.add_argument("--events", type=int, default=50_000, help="events missed (default 50,000)")
    p.add_argument("--batch", type=int, default=1000, help="rows per write transaction (1000)")
    p.add_argument("--payload-bytes", type=int, default=100, help="filler in each row's data")
    p.add_argument(
        "--live-batch",
        type=int,
        default=100,
        help="rows per transaction of the live reference (default 100; 0 skips it)",
    )
    p.add_argument(
        "--during-rate",
        type=float,
        default=0.0,
        help="also replay while writing this many rows/s (default 0: skip)",
    )
    p.add_argument(
        "--profile-relay",
        metavar="FILE",
        help="sample the relay process with py-spy during the replay; collapsed stacks go to"
        " FILE and a summary is printed",
    )
    p.add_argument(
        "--during-batch", type=int, default=10, help="rows per transaction of that writer (10)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    with embedded_pg() as pg:
        status: int = asyncio.run(run(args, pg))["status"]
        return status


if __name__ == "__main__":
    sys.exit(main())
