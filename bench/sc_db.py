"""Scenario: database events to permission-filtered subscribers, relay vs a naive baseline.

Relay: a ``_760_`` repository (group-readable), subscribers that ``auth`` with a
session JWT and ``join db-<repo>``. Baseline: the same table shape with a per-row
``pg_notify(row_to_json(NEW))`` trigger, and a bare aiohttp server LISTENing that
loops over all its subscribers for every notification, checking each one's account
(``baseline.py``). The writers (4 asyncpg connections in this process) number every
row (``data.n``) and note when its transaction's COMMIT returned.

  rate     ``subscribers`` over ``accounts`` accounts (10 receivers per row), single-row
           transactions at ``rate`` rows/s for ``seconds``: commit->frame p50/p99.
  flat     the same subscribers, writers as fast as they go (1-row transactions for
           ``flat_seconds``; 100-row transactions up to ``flat_rows`` rows): rows/s
           ingested, deliveries/s, server CPU per delivered event.
  others   ``hot_receivers`` subscribers of one account get every row (``others_rate``
           rows/s), beside ``others`` subscribers of other accounts (first the small,
           then the large count, same server): server CPU per event, which should not
           depend on how many sockets are in the channel.

rate and flat run with the relay and the baseline server both up (each with its own
subscribers, load generators and table), interleaved relay, baseline, relay, ... for
``rounds`` rounds; the table shows medians. others runs once per side.

Checks, per subscriber: exactly the rows of its account, each once (a set per socket),
none of another account's; for the relay ``pos`` strictly increasing (commit order).
Server CPU is read from /proc during each phase (writes until the last delivery).
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from typing import Any

import asyncpg
from _common import Postgres, create_notify_table
from _harness import Row, check_text, cpu_of, fleets, latency_summary, median, server
from baseline import NOTIFY_CHANNEL
from loadgen import Fleet, call_all, open_spread

REPO = "dbev_760_"
NOTIFY_TABLE = "dbev_notify"
BASELINE = "pg_notify trigger + naive filter"
NOTES: list[str] = []
STALL = 5.0  # seconds without a new delivery after which a phase stops waiting
INSERT = """
INSERT INTO {table} (account_id, owner_id, data)
SELECT {account}, 'writer', jsonb_build_object('n', $1::int + g, 'pad', $2::text)
FROM generate_series(0, $3::int - 1) g
"""


async def setup(url: str) -> None:
    from relay.repos import create_repo

    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT to_regclass($1)", REPO):
            await create_repo(conn, REPO)
        if not await conn.fetchval("SELECT to_regclass($1)", NOTIFY_TABLE):
            await create_notify_table(conn, NOTIFY_TABLE, NOTIFY_CHANNEL)
    finally:
        await conn.close()


async def open_subs(
    side: str, port: int, fl: list[Fleet], count: int, first: int, **who: Any
) -> list[str]:
    replies = await open_spread(
        fl,
        first,
        count,
        kind="relay" if side == "relay" else "bare",
        port=port,
        role="db",
        channel=f"db-{REPO}",
        deflate=False,
        concurrency=50,
        **who,
    )
    opened = sum(r["open"] for r in replies)
    if retried := sum(r["retried"] for r in replies):
        NOTES.append(
            f"{side}: {retried} of {count:,} joins were answered 'try again' and were retried"
        )
    if opened == count:
        return []
    errors = {k: v for r in replies for k, v in r["errors"].items()}
    return [f"{side}: {opened}/{count} subscribers joined ({errors})"]


class Writers:
    def __init__(self, url: str, table: str, count: int, payload: int) -> None:
        self.url, self.table, self.count, self.pad = url, table, count, "x" * payload
        self.conns: list[asyncpg.Connection] = []
        self.base = 0

    async def __aenter__(self) -> Writers:
        self.conns = [await asyncpg.connect(self.url) for _ in range(self.count)]
        return self

    async def __aexit__(self, *_: object) -> None:
        for c in self.conns:
            await c.close()

    async def write(
        self, account: str, rate: float, seconds: float, batch: int, max_rows: int
    ) -> tuple[int, array[float], float]:
        """Rows base.. in ``batch``-row transactions: on an open-loop schedule at ``rate``
        rows/s, or (rate 0) as fast as the writers go, until ``seconds`` or ``max_rows``.
        Returns (rows, commit time per row, seconds spent writing)."""
        sql = INSERT.format(table=self.table, account=account)
        stmts = [await c.prepare(sql) for c in self.conns]
        cap = max_rows or int(rate * seconds)
        committed = array("d", [math.nan]) * cap
        base, nxt = self.base, 0
        start = time.monotonic()
        end = start + seconds

        async def worker(stmt: Any) -> None:
            nonlocal nxt
            while nxt < cap:
                if not rate and time.monotonic() > end:
                    break
                i = nxt
                n = min(batch, cap - i)
                nxt = i + n  # claimed before any await: no two writers take the same rows
                if rate:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await stmt.fetch(base + i, self.pad, n)
                t = time.monotonic()
                for k in range(i, i + n):
                    committed[k] = t

        await asyncio.gather(*(worker(s) for s in stmts))
        elapsed = max(time.monotonic() - start, 1e-6)
        self.base += nxt + (-nxt) % 100  # the next phase starts on a multiple of 100
        del committed[nxt:]
        return nxt, committed, elapsed


async def phase(
    srv_pid: int,
    fl: list[Fleet],
    writers: Writers,
    side: str,
    *,
    account: str,
    receivers_per_row: int,
    check: dict[str, Any],
    rate: float,
    seconds: float,
    batch: int = 1,
    max_rows: int = 0,
    drain: float = 60.0,
) -> dict[str, Any]:
    base = writers.base
    cpu0 = cpu_of(srv_pid)
    t0 = time.monotonic()
    rows, committed, write_s = await writers.write(account, rate, seconds, batch, max_rows)
    want = rows * receivers_per_row
    deadline = time.monotonic() + drain
    check = {**check, "base": base, "total": rows}
    seen, moved = -1, time.monotonic()
    while True:
        stats = await call_all(fl, op="db_stats", **check)
        got = sum(s["received"] for s in stats)
        now = time.monotonic()
        if got != seen:
            seen, moved = got, now
        # done, or out of time, or nothing new for STALL seconds (a frame that is missing)
        if got >= want or now > deadline or now - moved > STALL:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # anything extra (a duplicate) arrives now, or is not counted
    cpu = cpu_of(srv_pid) - cpu0
    stats = await call_all(fl, op="db_stats", collect=True, **check)
    received = sum(s["received"] for s in stats)
    problems = []
    for key, what in (
        ("missing", "frames missing"),
        ("unexpected", "frames for another account's rows"),
        ("dups", "duplicates"),
        ("order_bad", "frames with pos not increasing"),
        ("closed", "subscribers closed by the server"),
    ):
        if v := sum(s[key] for s in stats):
            problems.append(f"{v} {what}")
    problems += [p for s in stats for p in s["problems"]][:2]
    lat = array("d")
    for s in stats:
        ns, ts = array("q"), array("d")
        ns.frombytes(s["ns"])
        ts.frombytes(s["ts"])
        lat.extend(t - committed[n - base] for n, t in zip(ns, ts, strict=True))
    last = max(s["last_at"] for s in stats)
    span = max(last - t0, 1e-9)
    out = {
        "rows": rows,
        "write_seconds": write_s,
        "rows_per_s_written": rows / write_s if write_s else 0.0,
        "deliveries": received,
        "deliveries_per_s": received / span,
        "events_per_s": rows / span,
        "cpu_us_per_delivery": 1e6 * cpu / max(received, 1),
        "cpu_us_per_event": 1e6 * cpu / max(rows, 1),
        "latency": latency_summary(lat),
        "problems": [f"{side}: {p}" for p in problems],
    }
    lat_text = out["latency"]
    print(
        f"  db {side:<8} {rows:>7,} rows ({rows / max(write_s, 1e-9):>7,.0f}/s written)"
        f" {out['deliveries_per_s']:>9,.0f} deliveries/s"
        f" {out['cpu_us_per_delivery']:6.1f} us CPU/delivery"
        f" p50 {lat_text.get('p50', 0):7.1f} ms p99 {lat_text.get('p99', 0):7.1f} ms"
        f"  {check_text(problems)}",
        flush=True,
    )
    return out


async def main_phases(pg: Postgres, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """rate, flat1 and flat100 with both servers up, interleaved relay, baseline, relay, ...

    Each side has its own subscribers, load generators and table (the relay's watched
    table, the baseline's notify-trigger table), so a phase wakes only its own server.
    Every phase's figures are kept; the table shows medians over the rounds."""
    mod = cfg["accounts"]
    per_row = cfg["subscribers"] // mod
    spread = {"check": {"mod": mod, "account_prefix": "a"}, "receivers_per_row": per_row}
    spread_sql = f"'a' || (($1::int + g) % {mod})"
    who = {"user_prefix": "s", "account_prefix": "a", "accounts": mod}
    out: dict[str, dict[str, Any]] = {s: {"problems": []} for s in ("relay", "baseline")}
    async with (
        Writers(pg.url, REPO, cfg["writers"], cfg["payload_bytes"]) as w_relay,
        Writers(pg.url, NOTIFY_TABLE, cfg["writers"], cfg["payload_bytes"]) as w_base,
    ):
        with (
            server("relay", pg.url, "db", REPO) as relay,
            server("baseline", pg.url, "db", REPO) as base,
            fleets(cfg["fleets"]) as fl_relay,
            fleets(cfg["fleets"]) as fl_base,
        ):
            sides = {
                "relay": (relay, fl_relay, w_relay),
                "baseline": (base, fl_base, w_base),
            }
            for side, (srv, fl, _) in sides.items():
                out[side]["problems"] += await open_subs(
                    side, srv.port, fl, cfg["subscribers"], 0, **who
                )
            if out["relay"]["problems"] or out["baseline"]["problems"]:
                return out
            for side, (srv, fl, w) in sides.items():  # warm-up: not measured, but checked
                warm = {"rate": 200, "seconds": cfg["warm"]}
                ph = await phase(srv.pid, fl, w, side, account=spread_sql, **warm, **spread)
                out[side]["problems"] += ph["problems"]
            plans: list[tuple[str, dict[str, Any]]] = [
                ("rate", {"rate": cfg["rate"], "seconds": cfg["seconds"]}),
                (
                    "flat1",
                    {"rate": 0, "seconds": cfg["flat_seconds"], "max_rows": cfg["flat_rows"]},
                ),
                (
                    "flat100",
                    {
                        "rate": 0,
                        "seconds": cfg["flat_seconds"],
                        "max_rows": cfg["flat_rows"],
                        "batch": 100,
                    },
                ),
            ]
            for name, kw in plans:
                for _ in range(cfg["rounds"]):
                    for side, (srv, fl, w) in sides.items():
                        ph = await phase(srv.pid, fl, w, side, account=spread_sql, **kw, **spread)
                        out[side].setdefault(name, []).append(ph)
                        achieved = ph["rows_per_s_written"]
                        if name == "rate" and achieved < 0.9 * cfg["rate"]:
                            NOTES.append(
                                f"{side}: the writers achieved {achieved:,.0f} of"
                                f" {cfg['rate']:,.0f} rows/s in a fixed-rate run (machine busy)"
                            )
    return out


async def others_phases(pg: Postgres, side: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A fresh server: hot receivers of one account, beside few then many other subscribers."""
    table = REPO if side == "relay" else NOTIFY_TABLE
    out: dict[str, Any] = {"problems": []}
    hot = {"check": {"hot": "hot"}, "receivers_per_row": cfg["hot_receivers"]}
    async with Writers(pg.url, table, cfg["writers"], cfg["payload_bytes"]) as w:
        with server(side, pg.url, "db", REPO) as srv, fleets(cfg["fleets"]) as fl:
            who = {"user_prefix": "h", "account": "hot", "account_prefix": "", "accounts": 1}
            out["problems"] += await open_subs(side, srv.port, fl, cfg["hot_receivers"], 0, **who)
            opened = 0
            for size in cfg["others"]:
                who = {"user_prefix": "o", "account_prefix": "other", "accounts": 1000}
                out["problems"] += await open_subs(side, srv.port, fl, size - opened, opened, **who)
                opened = size
                if out["problems"]:
                    return out
                warm = await phase(
                    srv.pid, fl, w, side, account="'hot'", rate=200, seconds=cfg["warm"], **hot
                )
                out["problems"] += warm["problems"]
                out[f"others{size}"] = [
                    await phase(
                        srv.pid,
                        fl,
                        w,
                        side,
                        account="'hot'",
                        rate=cfg["others_rate"],
                        seconds=cfg["others_seconds"],
                        **hot,
                    )
                ]
    return out


def _fig(res: dict[str, Any], phase: str, key: str) -> float | None:
    """The median over a phase's runs of one figure (None if the phase did not run)."""
    values = []
    for ph in res.get(phase) or []:
        v = ph["latency"].get(key) if key in ("p50", "p99") else ph[key]
        if v is not None:
            values.append(float(v))
    return median(values) if values else None


def _runs(res: dict[str, Any], phase: str, key: str) -> list[float]:
    return [
        float(ph["latency"].get(key, math.nan) if key in ("p50", "p99") else ph[key])
        for ph in res.get(phase) or []
    ]


async def run(pg: Postgres, cfg: dict[str, Any]) -> dict[str, Any]:
    await setup(pg.url)
    res = await main_phases(pg, cfg)
    for side in ("relay", "baseline"):
        others = await others_phases(pg, side, cfg)
        res[side]["others_problems"] = others.pop("problems")
        res[side].update(others)
    rows: list[Row] = []
    n_subs = f"{cfg['subscribers']:,} subs/{cfg['accounts']} accounts"
    small, large = cfg["others"][0], cfg["others"][-1]
    rate = f"db events {cfg['rate']:g} rows/s, {n_subs}"
    flat1, flat100 = f"db flat out, 1-row txns, {n_subs}", f"db flat out, 100-row txns, {n_subs}"
    hot = f"db per-event cost, {cfg['hot_receivers']} receivers + "
    cpu_d = ("cpu_us_per_delivery", "server CPU per delivery", "us", "lower")
    ingest = ("rows_per_s_written", "rows/s ingested", "/s", "higher")
    dps = ("deliveries_per_s", "deliveries/s", "/s", "higher")
    cpu_e = ("cpu_us_per_event", "server CPU per event", "us", "lower")
    table: list[tuple[str, str, tuple[str, str, str, str]]] = [
        (rate, "rate", ("p50", "commit->frame p50", "ms", "lower")),
        (rate, "rate", ("p99", "commit->frame p99", "ms", "lower")),
        (rate, "rate", cpu_d),
        (flat1, "flat1", ingest),
        (flat1, "flat1", dps),
        (flat1, "flat1", cpu_d),
        (flat100, "flat100", ingest),
        (flat100, "flat100", dps),
        (flat100, "flat100", cpu_d),
        (hot + f"{small:,} others", f"others{small}", cpu_e),
        (hot + f"{large:,} others", f"others{large}", cpu_e),
    ]
    series: dict[str, Any] = {}
    for label, ph, (key, measure, unit, better) in table:
        opening = "others_problems" if ph.startswith("others") else "problems"
        problems = [
            p
            for side in ("relay", "baseline")
            for p in res[side][opening]
            + [q for run in res[side].get(ph) or [] for q in run["problems"]]
        ]
        rows.append(
            Row(
                label,
                measure,
                _fig(res["relay"], ph, key),
                _fig(res["baseline"], ph, key),
                BASELINE,
                unit,
                better,
                check_text(problems),
                {side: _runs(res[side], ph, key) for side in ("relay", "baseline")},
            )
        )
        if key == "p50":
            series[label] = {
                side: (res[side].get(ph) or [{}])[-1].get("latency", {}).get("quantiles", [])
                for side in ("relay", "baseline")
            }
    # Independent of channel size: the per-event cost with many others over that with few.
    small_k, large_k = f"others{small}", f"others{large}"
    growth: dict[str, float | None] = {}
    for side in ("relay", "baseline"):
        a, b = (
            _fig(res[side], small_k, "cpu_us_per_event"),
            _fig(res[side], large_k, "cpu_us_per_event"),
        )
        growth[side] = b / a if a and b else None
    rows.append(
        Row(
            f"db per-event cost growth, {small:,} -> {large:,} others",
            "CPU per event, ratio",
            growth["relay"],
            growth["baseline"],
            BASELINE,
            "x",
            "lower",
            rows[-1].check,
        )
    )
    return {
        "rows": [r.as_dict() for r in rows],
        "latency_quantiles_ms": series,
        "sides": {s: {k: v for k, v in r.items()} for s, r in res.items()},
        "notes": NOTES,
        "config": cfg,
    }
