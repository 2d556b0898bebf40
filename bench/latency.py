"""Commit-to-client latency: from a row's COMMIT returning to the row arriving at a client.

Two phases at the same write rate, in the same run:

  baseline  a classic FOR EACH ROW trigger calling pg_notify() with the row as JSON,
            received by an asyncpg LISTEN connection (the floor: PostgreSQL's own
            notification path, no relay)
  relay     the relay app (relay.server.create_app on a free loopback port) in its own
            process; a real aiohttp WebSocket client in another process authenticates
            with a token from relay.auth.mint_token and joins db-<repo>; rows travel
            trigger -> relay.events -> NOTIFY wake-up -> Listener tick -> permission
            filter -> socket queue -> WebSocket frame

The writer (this process, a few asyncpg connections) inserts single-row
transactions on an open-loop schedule (default 1,000 rows/s for 10 s); each row
carries its number n in ``data``, and the writer notes time.monotonic() right
after each INSERT (an autocommit transaction) returns. The client notes
time.monotonic() as each frame arrives, before decoding it (CLOCK_MONOTONIC is
one clock for every process on the machine). Reported: p50/p90/p99/max
latency, the achieved write rate, rows missing (must be 0), duplicates, and
for relay frames whose ``pos`` did not increase; plus CPU per row of
PostgreSQL and of the relay process.

Run (about 40 s with the defaults):

    . .venv/bin/activate
    python bench/latency.py
    python bench/latency.py --rate 2000 --seconds 5 --writers 8
    python bench/latency.py --synchronous-commit off
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from _common import (
    CpuMeter,
    Postgres,
    RelayProcess,
    create_notify_table,
    embedded_pg,
    machine_header,
    percentile,
    pg_version,
    print_table,
    profile_summary,
    quiet_logs,
    self_cpu,
    token,
)

REPO = "lat_bench"
NOTIFY_TABLE = "lat_notify"
NOTIFY_CHANNEL = "bench_rows"
USER, ACCOUNT = "u1", "acct1"
WARMUP_ROWS = 20

INSERT_SQL = (
    "INSERT INTO {table} (account_id, owner_id, data)"
    " VALUES ($1, $2, jsonb_build_object('n', $3::int, 'pad', $4::text))"
)


# --------------------------------------------------------------------------- client process


@dataclass
class ClientResult:
    received: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    out_of_order: int = 0
    other_frames: list[str] = field(default_factory=list)
    cpu: float = 0.0
    error: str = ""


def _client_main(kind: str, target: str, expected: int, deadline_s: float, conn: Any) -> None:
    """Child process: subscribe, say ready, then note the arrival time of every row."""
    quiet_logs()
    result = ClientResult()

    def note(t: float, row: dict[str, Any]) -> None:
        n = row["data"]["n"]
        if n < 0:
            return  # warm-up row
        if n in result.received:
            result.duplicates += 1
        else:
            result.received[n] = t

    async def via_listen() -> None:
        pg = await asyncpg.connect(target)
        done = asyncio.Event()

        def on_notify(_c: object, _pid: int, _ch: str, payload: str) -> None:
            note(time.monotonic(), orjson.loads(payload))
            if len(result.received) >= expected:
                done.set()

        await pg.add_listener(NOTIFY_CHANNEL, on_notify)
        conn.send("ready")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), deadline_s)
        await pg.close()

    async def via_relay() -> None:
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(target, heartbeat=None, max_msg_size=0) as ws,
        ):

            async def frame() -> dict[str, Any]:
                msg = await ws.receive(timeout=10)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"unexpected message {msg.type} {msg.data!r}")
                f: dict[str, Any] = orjson.loads(msg.data)
                return f

            init = await frame()
            assert init["type"] == "init", init
            await ws.send_str(orjson.dumps({"type": "auth", "data": token(USER, ACCOUNT)}).decode())
            tok = await frame()
            assert tok["type"] == "token", tok
            await ws.send_str(
                orjson.dumps({"type": "join", "data": f"db-{REPO}", "token": tok["data"]}).decode()
            )
            joined = await frame()
            assert joined["type"] == "joined", joined
            conn.send("ready")
            last_pos = (0, 0)
            end = time.monotonic() + deadline_s
            while len(result.received) < expected and time.monotonic() < end:
                try:
                    msg = await ws.receive(timeout=max(0.01, end - time.monotonic()))
                except TimeoutError:
                    break
                t = time.monotonic()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    result.error = f"socket ended: {msg.type.name} {msg.data!r} {msg.extra!r}"
                    break
                f = orjson.loads(msg.data)
                if f["type"] != "db_created":
                    result.other_frames.append(msg.data[:200])
                    continue
                tick, _, seq = f.get("pos", "0-0").partition("-")
                pos = (int(tick), int(seq or 0))
                if pos <= last_pos:
                    result.out_of_order += 1
                last_pos = pos
                note(t, orjson.loads(f["data"]))

    try:
        asyncio.run(via_listen() if kind == "listen" else via_relay())
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            conn.send("ready")  # unblock the parent if we failed before subscribing
    result.cpu = self_cpu()
    conn.send(result)


class Client:
    def __init__(self, kind: str, target: str, expected: int, deadline_s: float) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_client_main, args=(kind, target, expected, deadline_s, child), daemon=True
        )

    def start(self) -> None:
        self.proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("client did not start")
        self._conn.recv()

    def result(self, timeout: float) -> ClientResult:
        if not self._conn.poll(timeout):
            self.proc.terminate()
            return ClientResult(error="client gave no result in time")
        res: ClientResult = self._conn.recv()
        self.proc.join(5)
        return res


# --------------------------------------------------------------------------- writer


@dataclass
class WriteResult:
    committed: dict[int, float]
    seconds: float
    max_behind: float  # how late the writer started a row vs its schedule, at worst


async def warm_up(
    conns: list[asyncpg.Connection], table: str, args: argparse.Namespace
) -> list[Any]:
    """Prepare the INSERT on every connection and write a few rows numbered below 0."""
    sql = INSERT_SQL.format(table=table)
    stmts = [await c.prepare(sql) for c in conns]
    for i in range(WARMUP_ROWS):
        await stmts[i % len(stmts)].fetch(ACCOUNT, USER, -1 - i, "x" * args.payload_bytes)
    await asyncio.sleep(0.5)  # let warm-up rows drain before the clock starts
    return stmts


async def write_rows(stmts: list[Any], args: argparse.Namespace) -> WriteResult:
    """Open-loop writer: row i is due at start + i/rate; free connections take the next row."""
    total = int(args.rate * args.seconds)
    pad = "x" * args.payload_bytes
    committed: dict[int, float] = {}
    next_row = 0
    max_behind = 0.0
    start = time.monotonic() + 0.05

    async def worker(stmt: Any) -> None:
        nonlocal next_row, max_behind
        while next_row < total:
            n = next_row
            next_row += 1
            due = start + n / args.rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                max_behind = max(max_behind, now - due)
            await stmt.fetch(ACCOUNT, USER, n, pad)
            committed[n] = time.monotonic()

    await asyncio.gather(*(worker(s) for s in stmts))
    elapsed = max(committed.values()) - start if committed else 0.0
    return WriteResult(committed, elapsed, max_behind)


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    write: WriteResult
    client: ClientResult
    pg_cpu: float
    relay_cpu: float | None = None

    def latencies_ms(self) -> list[float]:
        c = self.write.committed
        return sorted(1000 * (t - c[n]) for n, t in self.client.received.items() if n in c)

    @property
    def missing(self) -> int:
        return sum(1 for n in self.write.committed if n not in self.client.received)


async def phase(
    pg: Postgres, name: str, kind: str, target: str, table: str, args: argparse.Namespace
) -> tuple[WriteResult, ClientResult, float]:
    expected = int(args.rate * args.seconds)
    client = Client(kind, target, expected, deadline_s=args.seconds * 3 + 30)
    client.start()
    conns = [await asyncpg.connect(pg.url) for _ in range(args.writers)]
    stmts = await warm_up(conns, table, args)
    meter = CpuMeter(pg.postmaster_pid)  # opened connections first: backends are counted
    meter.start()
    write = await write_rows(stmts, args)
    res = await asyncio.get_running_loop().run_in_executor(
        None, client.result, args.seconds * 3 + 60
    )
    meter.stop()
    for c in conns:
        await c.close()
    return write, res, meter.pg


async def run(args: argparse.Namespace, pg: Postgres) -> int:
    from relay.repos import create_repo

    admin = await asyncpg.connect(pg.url)
    await create_repo(admin, REPO)
    await create_notify_table(admin, NOTIFY_TABLE, NOTIFY_CHANNEL)
    await admin.close()
    print(machine_header("relay commit-to-client latency", await pg_version(pg.url)))
    print(
        f"settings: rate={args.rate:,.0f} rows/s seconds={args.seconds} writers={args.writers}"
        f" payload={args.payload_bytes} B, single-row transactions\n",
        flush=True,
    )
    phases: list[Phase] = []

    w, c, pg_cpu = await phase(pg, "baseline", "listen", pg.url, NOTIFY_TABLE, args)
    phases.append(Phase("pg_notify row trigger -> asyncpg LISTEN", w, c, pg_cpu))

    relay = RelayProcess(pg.url)
    relay.start()
    try:
        if args.profile_relay:
            relay.start_profile(args.profile_relay)
        cpu0 = relay.cpu()
        w, c, pg_cpu = await phase(pg, "relay", "relay", relay.ws_url, REPO, args)
        relay_cpu = relay.cpu() - cpu0
        relay.stop_profile()
    finally:
        relay.stop()
    phases.append(Phase("relay: WebSocket client on db-" + REPO, w, c, pg_cpu, relay_cpu))

    rows = []
    base_p50 = None
    for p in phases:
        lat = p.latencies_ms()
        written = len(p.write.committed)
        p50 = percentile(lat, 50)
        if base_p50 is None:
            base_p50 = p50
        rows.append(
            [
                p.name,
                f"{written / p.write.seconds:,.0f}" if p.write.seconds else "-",
                f"{lat[0]:.2f}" if lat else "-",
                f"{p50:.2f}",
                f"{percentile(lat, 90):.2f}",
                f"{percentile(lat, 99):.2f}",
                f"{lat[-1]:.2f}" if lat else "-",
                f"+{p50 - base_p50:.2f}",
                p.missing,
                p.client.duplicates,
                p.client.out_of_order if p.relay_cpu is not None else "-",
                f"{1e6 * p.pg_cpu / max(written, 1):.0f}",
                f"{1e6 * p.relay_cpu / max(written, 1):.0f}" if p.relay_cpu is not None else "-",
            ]
        )
    print_table(
        [
            "path",
            "rows/s",
            "min ms",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "p50 - base p50",
            "missing",
            "dup",
            "pos out of order",
            "PG CPU us/row",
            "relay CPU us/row",
        ],
        rows,
    )
    print()
    for p in phases:
        behind = p.write.max_behind * 1000
        print(
            f"{p.name}: {len(p.write.committed)} rows written in {p.write.seconds:.2f} s,"
            f" writer at worst {behind:.1f} ms behind schedule;"
            f" client CPU {1e6 * p.client.cpu / max(len(p.write.committed), 1):.0f} us/row"
        )
        if p.client.error:
            print(f"  client error: {p.client.error}")
        for f in p.client.other_frames[:5]:
            print(f"  other frame: {f}")
    print(
        "\nrows/s: achieved write rate (rows / time from the first due time to the last commit);"
        "\nlatency: client receive time - writer's commit-return time, per row (a NOTIFY is sent"
        "\nat commit, so it can reach the LISTEN client before the writer sees its own commit"
        "\nreturn: the baseline can read ~0 or below); p50 - base p50: what relay adds;"
        "\nPG CPU: all PostgreSQL processes during the phase, per row;"
        " relay CPU: the relay process."
    )
    if args.profile_relay:
        print("\n" + profile_summary(args.profile_relay))
    return 0 if all(p.missing == 0 and not p.client.error for p in phases) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Commit-to-client latency of relay db- events, against a pg_notify/LISTEN "
        "baseline, at a fixed single-row insert rate."
    )
    p.add_argument("--rate", type=float, default=1000.0, help="rows/s to write (default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to write (default 10)")
    p.add_argument(
        "--writers", type=int, default=4, help="writer connections sharing the schedule (4)"
    )
    p.add_argument("--payload-bytes", type=int, default=100, help="filler in each row's data")
    p.add_argument(
        "--synchronous-commit",
        choices=["on", "off"],
        default="on",
        help="PostgreSQL synchronous_commit (default on, the server default)",
    )
    p.add_argument(
        "--profile-relay",
        metavar="FILE",
        help="sample the relay process with py-spy during the relay phase; collapsed stacks"
        " go to FILE and a summary is printed",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    with embedded_pg({"synchronous_commit": args.synchronous_commit}) as pg:
        return asyncio.run(run(args, pg))


if __name__ == "__main__":
    sys.exit(main())
