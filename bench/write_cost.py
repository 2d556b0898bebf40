"""Write cost: what watching a table costs the application that writes to it.

Measures INSERT throughput (rows/s) and PostgreSQL CPU per row with several
concurrent asyncpg writer connections, for each configuration below, with
single-row transactions and with 100-row transactions (one
``INSERT ... SELECT ... FROM generate_series`` statement per transaction; the
same statement text in both cases, only the row count differs):

  unwatched        the plain table, no trigger: the baseline every ratio is against
  notify           a classic FOR EACH ROW trigger calling pg_notify() with the row
                   as JSON (the Supabase Realtime / pg_eventserv style), nobody listening
  notify+listen    the same, with an asyncpg LISTEN consumer (separate process)
                   receiving every notification
  relay            the table watched by relay (relay.repos.create_repo: statement-level
                   triggers with transition tables appending to relay.events, one empty
                   NOTIFY per statement), no relay running
  relay+listener   the same, with a relay Listener (default NOTIFY wake-up, default
                   1 s poll) consuming in a separate process: its relay.tick() and
                   relay.events_between() queries cost database CPU too
  relay-nonotify   diagnostic: relay's capture function with its pg_notify() call
                   removed, to show what the NOTIFY alone costs

Every configuration writes to its own freshly truncated table of the shape
``relay repo create`` makes; relay.events is truncated and a CHECKPOINT taken
before each measurement. Ratios are against "unwatched" measured in the same
run (and the same round), since the machines are small, shared and noisy.
Besides rows/s the table reports CPU seconds burnt by all PostgreSQL processes
per row (more robust than throughput when the writer process competes with the
server for 2 cores) and the consumer process's CPU per row.

Run (about 12 x (seconds + 3) s per round with the defaults, ~1.5 min):

    . .venv/bin/activate
    python bench/write_cost.py                      # 4 writers, 5 s per measurement
    python bench/write_cost.py --seconds 3 --rounds 3 --configs unwatched,relay
    python bench/write_cost.py --synchronous-commit off   # CPU cost without fsync waits
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from _common import (
    CpuMeter,
    Postgres,
    create_notify_table,
    embedded_pg,
    machine_header,
    pg_version,
    print_table,
    quiet_logs,
    self_cpu,
)

CONFIGS = ["unwatched", "notify", "notify+listen", "relay", "relay+listener", "relay-nonotify"]
NOTIFY_CHANNEL = "bench_rows"

# One statement for every batch size: $3 rows, ten accounts, a distinct owner per row.
INSERT_SQL = """
INSERT INTO {table} (account_id, owner_id, data)
SELECT 'acct' || (g % 10), $1 || g, jsonb_build_object('n', g, 'pad', $2::text)
FROM generate_series(1, $3::int) g
"""

TABLE_OF = {
    "unwatched": "w_plain",
    "notify": "w_notify",
    "notify+listen": "w_notify",
    "relay": "w_relay",
    "relay+listener": "w_relay",
    "relay-nonotify": "w_relay_nonotify",
}


# --------------------------------------------------------------------------- consumers


def _consumer_main(kind: str, url: str, conn: Any) -> None:
    """Child process: consume (relay Listener or LISTEN) and count what arrives."""
    quiet_logs()

    async def main() -> None:
        count = 0
        stop_consumer: Any
        if kind == "relay":
            from relay.dbhub import DbHub, Event
            from relay.listener import Listener

            class CountingHub(DbHub):
                def dispatch(self, event: Event) -> None:
                    nonlocal count
                    count += 1
                    super().dispatch(event)

            listener = Listener(url, CountingHub())
            await listener.start()
            stop_consumer = listener.stop
        else:
            pg = await asyncpg.connect(url)

            def on_notify(*_: object) -> None:
                nonlocal count
                count += 1

            await pg.add_listener(NOTIFY_CHANNEL, on_notify)
            stop_consumer = pg.close
        conn.send(("ready", count, self_cpu()))
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg == "stop":
                break
            conn.send(("stats", count, self_cpu()))
        await stop_consumer()
        conn.send(("stopped", count, self_cpu()))

    asyncio.run(main())


class Consumer:
    def __init__(self, kind: str, url: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_consumer_main, args=(kind, url, child), daemon=True)

    def start(self) -> None:
        self.proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("consumer did not start")
        self._conn.recv()

    def stats(self) -> tuple[int, float]:
        self._conn.send("stats")
        _, count, cpu = self._conn.recv()
        return count, cpu

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
            if self._conn.poll(10):
                self._conn.recv()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# --------------------------------------------------------------------------- measurement


@dataclass
class Result:
    config: str
    batch: int
    rows: int = 0
    seconds: float = 0.0
    pg_cpu: float = 0.0
    pg_writers_cpu: float = 0.0  # the writer connections' backends only
    writer_cpu: float = 0.0
    consumer_cpu: float | None = None
    consumed: int | None = None
    written_total: int = 0
    drain_seconds: float | None = None
    machine_busy: float = 0.0
    ticks: int | None = None
    waits: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def pg_us_per_row(self) -> float:
        return 1e6 * self.pg_cpu / self.rows if self.rows else float("nan")

    @property
    def writers_us_per_row(self) -> float:
        return 1e6 * self.pg_writers_cpu / self.rows if self.rows else float("nan")


async def setup_tables(url: str, configs: list[str]) -> list[str]:
    """Create the tables each configuration writes to; return notes on anything skipped."""
    from relay.repos import create_repo, repo_table_sql

    notes = []
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(repo_table_sql("w_plain"))
        await create_notify_table(conn, "w_notify", NOTIFY_CHANNEL)
        await create_repo(conn, "w_relay")
        if "relay-nonotify" in configs:
            await create_repo(conn, "w_relay_nonotify")
            fn = await conn.fetchval(
                "SELECT capture_function FROM relay.watched WHERE repo = 'w_relay_nonotify'"
            )
            body = await conn.fetchval(
                "SELECT pg_get_functiondef(('relay.' || quote_ident($1))::regproc)", fn
            )
            call = "PERFORM pg_notify('relay_events', '');"
            if call in body:
                await conn.execute(body.replace(call, "NULL;"))
            else:
                notes.append("relay-nonotify skipped: capture function has no pg_notify call")
                configs.remove("relay-nonotify")
    finally:
        await conn.close()
    return notes


async def measure(
    pg: Postgres, config: str, batch: int, args: argparse.Namespace, round_no: int
) -> Result:
    table = TABLE_OF[config]
    res = Result(config, batch)
    admin = await asyncpg.connect(pg.url)
    await admin.execute(f"TRUNCATE {table}")
    if config.startswith("relay"):
        await admin.execute("TRUNCATE relay.events")
    await admin.execute("CHECKPOINT")

    consumer: Consumer | None = None
    if config == "relay+listener":
        consumer = Consumer("relay", pg.url)
    elif config == "notify+listen":
        consumer = Consumer("listen", pg.url)
    if consumer is not None:
        consumer.start()

    sql = INSERT_SQL.format(table=table)
    pad = "x" * args.payload_bytes
    conns = [await asyncpg.connect(pg.url) for _ in range(args.writers)]
    written = 0
    rows_in_window = 0
    deadline = 0.0
    measuring = False

    async def writer(i: int, conn: asyncpg.Connection, until: float) -> None:
        nonlocal written, rows_in_window
        stmt = await conn.prepare(sql)
        owner = f"r{round_no}w{i}-"
        while time.monotonic() < until:
            await stmt.fetch(owner, pad, batch)
            written += batch
            if measuring:
                rows_in_window += batch

    # Warm-up: prepared statements, caches, the consumer's first rounds.
    warm_until = time.monotonic() + args.warmup
    await asyncio.gather(*(writer(i, c, warm_until) for i, c in enumerate(conns)))

    pids = [c.get_server_pid() for c in conns]
    tick0 = await admin.fetchval("SELECT max(id) FROM relay.ticks")
    meter = CpuMeter(pg.postmaster_pid)
    c0 = consumer.stats() if consumer else None
    meter.start()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    measuring = True
    sampler = asyncio.create_task(sample_waits(admin, pids, res.waits))
    await asyncio.gather(*(writer(i, c, deadline) for i, c in enumerate(conns)))
    measuring = False
    res.seconds = time.monotonic() - t0
    meter.stop()
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    res.ticks = await admin.fetchval("SELECT max(id) FROM relay.ticks") - tick0
    res.rows = rows_in_window
    res.pg_cpu = meter.pg
    res.pg_writers_cpu = sum(meter.by_pid.get(pid, 0.0) for pid in pids)
    res.writer_cpu = meter.me
    res.machine_busy = meter.machine_busy
    res.written_total = written
    if consumer is not None and c0 is not None:
        c1 = consumer.stats()
        res.consumer_cpu = c1[1] - c0[1]
        # Let the consumer finish what was written; how long that takes is its lag.
        t_end = time.monotonic()
        count = c1[0]
        while count < written and time.monotonic() - t_end < args.drain_timeout:
            await asyncio.sleep(0.05)
            count = consumer.stats()[0]
        res.consumed = count
        res.drain_seconds = time.monotonic() - t_end
        consumer.stop()
    for c in conns:
        await c.close()
    await admin.close()
    return res


WAITS_SQL = """
SELECT CASE WHEN state = 'idle' THEN 'client'
            WHEN wait_event IS NULL THEN 'CPU'
            ELSE wait_event_type || ':' || wait_event END
FROM pg_stat_activity WHERE pid = ANY($1::int[])
"""


async def sample_waits(conn: asyncpg.Connection, pids: list[int], into: Counter[str]) -> None:
    """What the writer backends are doing, sampled every 20 ms ('client': waiting for
    the next statement; 'CPU': running; else PostgreSQL's wait event)."""
    while True:
        for (what,) in await conn.fetch(WAITS_SQL, pids):
            into[what] += 1
        await asyncio.sleep(0.02)


def top_waits(waits: Counter[str], n: int = 3) -> str:
    total = sum(waits.values()) or 1
    return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in waits.most_common(n))


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def report(
    results: list[list[Result]], configs: list[str], batches: list[int]
) -> list[dict[str, Any]]:
    """results[round] -> list of Result; medians over rounds, ratios per round then median.
    Prints the table and returns its figures, one dict per (configuration, batch)."""

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    rows = []
    figures: list[dict[str, Any]] = []
    for batch in batches:
        for config in configs:
            per_round = []
            for rnd in results:
                base = next(r for r in rnd if r.config == "unwatched" and r.batch == batch)
                mine = next(r for r in rnd if r.config == config and r.batch == batch)
                per_round.append((base, mine))
            ms = [m for _, m in per_round]
            rate = med([m.rate for m in ms])
            ratio = med([m.rate / b.rate for b, m in per_round if b.rate])
            pg_us = med([m.pg_us_per_row for m in ms])
            pg_ratio = med([m.pg_us_per_row / b.pg_us_per_row for b, m in per_round])
            writers_us = med([m.writers_us_per_row for m in ms])
            cons = [m for m in ms if m.consumer_cpu is not None]
            cons_us = (
                f"{med([1e6 * (m.consumer_cpu or 0) / m.rows for m in cons]):.1f}" if cons else "-"
            )
            caught = "-"
            if cons:
                last = cons[-1]
                caught = f"{last.consumed}/{last.written_total} +{last.drain_seconds:.1f}s"
            ticks = med([(m.ticks or 0) / m.seconds for m in ms])
            figures.append(
                {
                    "config": config,
                    "batch": batch,
                    "rows_per_s": rate,
                    "vs_unwatched": ratio,
                    "pg_us_per_row": pg_us,
                    "runs": [m.rate for m in ms],
                    "pg_us_runs": [m.pg_us_per_row for m in ms],
                }
            )
            rows.append(
                [
                    config,
                    batch,
                    f"{rate:,.0f}",
                    fmt_ratio(ratio),
                    f"{pg_us:.1f}",
                    fmt_ratio(pg_ratio),
                    f"{writers_us:.1f}",
                    f"{pg_us - writers_us:.1f}",
                    cons_us,
                    f"{ticks:,.0f}" if ticks else "-",
                    caught,
                ]
            )
    print_table(
        [
            "configuration",
            "rows/txn",
            "rows/s",
            "vs unwatched",
            "PG CPU us/row",
            "vs unwatched",
            "writers' backends",
            "other PG",
            "consumer proc us/row",
            "ticks/s",
            "consumed/written",
        ],
        rows,
    )
    return figures


async def run(args: argparse.Namespace, pg: Postgres) -> list[dict[str, Any]]:
    """Measure and print; returns the figures of :func:`report`."""
    configs = [c for c in CONFIGS if c in args.configs]
    if "unwatched" not in configs:
        configs.insert(0, "unwatched")  # the baseline is always measured
    notes = await setup_tables(pg.url, configs)
    conn = await asyncpg.connect(pg.url)
    try:
        # Writers to a watched table NOTIFY only while some relay listener sleeps.
        asleep = await conn.fetchval("SELECT count(*) FROM relay.listeners WHERE sleeping")
    finally:
        await conn.close()
    if asleep:
        notes.append(f"{asleep} relay listener(s) asleep: writers to watched tables NOTIFY")
    print(machine_header("relay write cost", await pg_version(pg.url)))
    print(
        f"settings: writers={args.writers} seconds={args.seconds} warmup={args.warmup}"
        f" rounds={args.rounds} batch sizes={args.batch_sizes} payload={args.payload_bytes} B"
    )
    for n in notes:
        print("note    :", n)
    print(flush=True)
    results: list[list[Result]] = []
    for rnd in range(args.rounds):
        this_round = []
        for batch in args.batch_sizes:
            for config in configs:
                r = await measure(pg, config, batch, args, rnd)
                this_round.append(r)
                print(
                    f"  round {rnd + 1} {config:<15} rows/txn={batch:<4} {r.rate:>10,.0f} rows/s"
                    f"  PG {r.pg_us_per_row:6.1f} us/row"
                    f"  writer process {1e6 * r.writer_cpu / max(r.rows, 1):5.1f} us/row"
                    f"  machine busy {100 * r.machine_busy:3.0f}%"
                    + (
                        f"  consumer {r.consumed}/{r.written_total} (+{r.drain_seconds:.1f}s)"
                        if r.consumed is not None
                        else ""
                    )
                    + (f"  ticks/s {r.ticks / r.seconds:,.0f}" if r.ticks else "")
                    + f"\n      writer backends: {top_waits(r.waits)}",
                    flush=True,
                )
        results.append(this_round)
    print()
    figures = report(results, configs, args.batch_sizes)
    print()
    print(
        "rows/s: rows committed during the window by all writers (median over rounds; ratios are\n"
        "taken per round against that round's unwatched figure, then the median).\n"
        "PG CPU: user+system CPU of all PostgreSQL processes per row, split into the writer\n"
        "connections' backends and everything else (the consumer's backend, walwriter,\n"
        "checkpointer, the wait sampler). consumer proc: the consumer process itself.\n"
        "ticks/s: relay.ticks rows created (each one a write transaction by the listener).\n"
        "consumed/written: events or notifications the consumer had received when it caught up,\n"
        "+ seconds it needed after the writers stopped. Per-measurement lines above: what\n"
        "pg_stat_activity showed the writer backends doing (sampled every 20 ms; 'client' =\n"
        "waiting for the next statement, 'CPU' = running, else PostgreSQL's wait event;\n"
        "Lock:object is the cluster-wide lock every NOTIFYing transaction takes to commit)."
    )
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Insert throughput and PostgreSQL CPU per row: unwatched table vs "
        "per-row pg_notify trigger vs relay-watched table (with and without a relay consuming).",
        epilog="Configurations: " + ", ".join(CONFIGS),
    )
    p.add_argument("--seconds", type=float, default=5.0, help="measurement window (default 5)")
    p.add_argument("--warmup", type=float, default=0.5, help="untimed warm-up (default 0.5 s)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writer connections (4)")
    p.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 100],
        help="rows per transaction, comma-separated (default 1,100)",
    )
    p.add_argument(
        "--configs",
        type=lambda s: s.split(","),
        default=list(CONFIGS),
        help="comma-separated subset of: " + ",".join(CONFIGS) + " (default: all)",
    )
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians (1)")
    p.add_argument("--payload-bytes", type=int, default=100, help="filler in each row's data")
    p.add_argument(
        "--synchronous-commit",
        choices=["on", "off"],
        default="on",
        help="PostgreSQL synchronous_commit (default on, the server default)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="max wait for a consumer to catch up"
    )
    args = p.parse_args(argv)
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    settings = {"synchronous_commit": args.synchronous_commit}
    with embedded_pg(settings) as pg:
        asyncio.run(run(args, pg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
