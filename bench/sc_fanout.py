"""Scenario: chat fan-out, 1 channel x N members, relay vs a bare aiohttp server.

Per run: a fresh server, N sockets over load-generator processes (the publisher's fleet
holds the first socket to join, which publishes, and the last, which is its
flow-control view of the fan-out), then two measured phases on the same sockets:

  bursty  bursts of ``burst`` publishes back to back, at most two bursts in flight,
          for ``seconds``;
  steady  ``rate`` publishes/s for ``seconds`` (open loop).

Every member checks that it got every publish exactly once and in order (seq 0, 1, 2,
... with no gap, duplicate or reordering) and notes publish->receive latency.
Measured: deliveries/s (N x publishes over the time from the first publish to the
last delivery), server CPU per delivery in that window (psutil on the server process),
latency p50/p99. Runs are interleaved relay, baseline, relay, baseline, ... and each
figure is the median over rounds. With ``deflate`` the clients offer
permessage-deflate as browsers do; the relay does not negotiate it, aiohttp's default
server does (and compresses every frame once per member).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any

from _common import Postgres
from _harness import Row, check_text, cpu_of, fleets, latency_summary, median, server
from loadgen import Fleet, call_all

CHANNEL = "bench-chat"
BASELINE = "bare aiohttp"


async def open_members(
    side: str, port: int, pub: Fleet, members: list[Fleet], n: int, deflate: bool
) -> tuple[list[str], int]:
    """Publisher first, N-2 members spread over ``members``, the tail last.
    Returns problems, and on how many sockets permessage-deflate was negotiated."""
    common: dict[str, Any] = {
        "op": "open",
        "kind": "relay" if side == "relay" else "bare",
        "port": port,
        "role": "chat",
        "channel": CHANNEL,
        "deflate": deflate,
        "user_prefix": "m",
        "account_prefix": "a",
        "accounts": 10,
    }
    problems = []
    r = await asyncio.to_thread(pub.call, **common, first=0, count=1, concurrency=1)
    opened = [r]
    rest = n - 2
    per = [rest // len(members) + (i < rest % len(members)) for i in range(len(members))]
    firsts = [1 + sum(per[:i]) for i in range(len(members))]
    for f, first, count in zip(members, firsts, per, strict=True):
        f.send(**common, first=first, count=count, concurrency=100)
    opened += await asyncio.to_thread(lambda: [f.reply(180) for f in members])
    opened.append(await asyncio.to_thread(pub.call, **common, first=n - 1, count=1, concurrency=1))
    total = sum(o["open"] for o in opened)
    if total != n:
        errs = {k: v for o in opened for k, v in o["errors"].items()}
        problems.append(f"{total}/{n} sockets joined ({errs})")
    return problems, sum(o["deflate"] for o in opened)


async def phase(
    srv_pid: int, pub: Fleet, all_fleets: list[Fleet], n: int, cmd: dict[str, Any], seq: int
) -> tuple[dict[str, Any], int]:
    """One measured phase; returns its figures and the next seq."""
    within = cmd["seconds"] + 60
    before = await call_all(all_fleets, op="chat_stats", end_seq=seq)
    cpu0 = cpu_of(srv_pid)
    t0 = time.monotonic()
    res = await asyncio.to_thread(
        pub.call, within=within, op="publish", start_seq=seq, tail_within=10.0, **cmd
    )
    end_seq = res["end_seq"]
    problems = [res["failure"]] if res["failure"] else []
    deadline = time.monotonic() + 30
    seen, moved = -1, time.monotonic()
    while True:
        stats = await call_all(all_fleets, op="chat_stats", end_seq=end_seq)
        got, now = sum(s["received"] for s in stats), time.monotonic()
        if got != seen:
            seen, moved = got, now
        # done, or out of time, or nothing new for 5 s (a frame that is missing)
        if sum(s["done"] for s in stats) >= n or now > deadline or now - moved > 5:
            break
        await asyncio.sleep(0.05)
    cpu = cpu_of(srv_pid) - cpu0
    stats = await call_all(all_fleets, op="chat_stats", end_seq=end_seq, collect=True)
    done = sum(s["done"] for s in stats)
    received = sum(s["received"] for s in stats)
    published = res["published"]
    if done < n:
        problems.append(f"{n - done} of {n} members did not get every publish")
    if received != n * published:
        problems.append(f"{received} deliveries, expected {n} x {published}")
    if bad := sum(s["bad"] for s in stats):
        problems.append(
            f"{bad} out of order/duplicate/malformed: " + "; ".join(stats[0]["problems"])
        )
    if closed := sum(s["closed"] for s in stats):
        codes = sorted({c for s in stats for c in s["close_codes"]})
        problems.append(f"{closed} sockets closed by the server (codes {codes})")
    last = max(s["last_at"] for s in stats)
    lat = array("d")
    for s in stats:
        lat.frombytes(s["lat"])
    elapsed = max(last - t0, 1e-9)
    client_cpu = sum(s["cpu"] for s in stats) - sum(s["cpu"] for s in before)
    return {
        "client_cpu_us_per_delivery": 1e6 * client_cpu / max(received, 1),
        "published": published,
        "deliveries": received,
        "deliveries_per_s": received / elapsed,
        "cpu_us_per_delivery": 1e6 * cpu / max(received, 1),
        "latency": latency_summary(lat),
        "problems": problems,
    }, end_seq


async def one_run(pg: Postgres, side: str, deflate: bool, cfg: dict[str, Any]) -> dict[str, Any]:
    n = cfg["members"]
    out: dict[str, Any] = {}
    with server(side, pg.url, "chat") as srv, fleets(1 + cfg["fleets"]) as fl:
        pub, members = fl[0], fl[1:]
        problems, negotiated = await open_members(side, srv.port, pub, members, n, deflate)
        if problems:
            return {"open_problems": problems}
        out["deflate_negotiated"] = negotiated
        seq = 0
        # warm-up: a few publishes, not measured
        warm = {"mode": "bursty", "seconds": 0.3, "burst": cfg["burst"]}
        warmed, seq = await phase(srv.pid, pub, fl, n, warm, seq)
        if warmed["problems"]:
            return {"open_problems": ["warm-up: " + p for p in warmed["problems"]]}
        for mode in ("bursty", "steady"):
            cmd = {"mode": mode, "seconds": cfg["seconds"], "burst": cfg["burst"]}
            cmd["rate"] = cfg["rate"]
            out[mode], seq = await phase(srv.pid, pub, fl, n, cmd, seq)
            print(
                f"  fanout {side:<8} deflate={deflate!s:<5} {mode:<6}"
                f" {out[mode]['deliveries_per_s']:>9,.0f} deliveries/s"
                f" {out[mode]['cpu_us_per_delivery']:6.1f} us CPU each"
                f"  p50 {out[mode]['latency'].get('p50', 0):7.1f} ms"
                f"  p99 {out[mode]['latency'].get('p99', 0):7.1f} ms"
                f"  (load generators {out[mode]['client_cpu_us_per_delivery']:.1f} us each)"
                f"  {check_text(out[mode]['problems'])}",
                flush=True,
            )
    return out


async def run(pg: Postgres, cfg: dict[str, Any]) -> dict[str, Any]:
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for _ in range(cfg["rounds"]):
        for deflate in cfg["deflate"]:
            for side in ("relay", "baseline"):
                runs.setdefault((side, deflate), []).append(await one_run(pg, side, deflate, cfg))
    rows: list[Row] = []
    series: dict[str, Any] = {}
    notes = []
    if True in cfg["deflate"]:
        for side, name in (("relay", "the relay"), ("baseline", BASELINE)):
            got = [r.get("deflate_negotiated", 0) for r in runs[(side, True)]]
            notes.append(
                f"clients offering permessage-deflate: {name} negotiated it on"
                f" {max(got, default=0):,} of {cfg['members']:,} sockets"
            )
    for deflate in cfg["deflate"]:
        offer = "offering deflate" if deflate else "no deflate"
        for mode in ("bursty", "steady"):
            label = (
                f"fan-out {mode} ({cfg['burst']}/burst)"
                if mode == "bursty"
                else f"fan-out steady {cfg['rate']:g} msg/s"
            ) + f", 1x{cfg['members']:,}, {offer}"
            figs: dict[str, dict[str, list[float]]] = {}
            problems: list[str] = []
            for side in ("relay", "baseline"):
                for r in runs[(side, deflate)]:
                    if "open_problems" in r:
                        problems += [f"{side}: {p}" for p in r["open_problems"]]
                        continue
                    ph = r[mode]
                    problems += [f"{side}: {p}" for p in ph["problems"]]
                    f = figs.setdefault(side, {})
                    f.setdefault("dps", []).append(ph["deliveries_per_s"])
                    f.setdefault("cpu", []).append(ph["cpu_us_per_delivery"])
                    f.setdefault("p50", []).append(ph["latency"].get("p50", float("nan")))
                    f.setdefault("p99", []).append(ph["latency"].get("p99", float("nan")))
                    series.setdefault(label, {})[side] = ph["latency"].get("quantiles", [])
            check = check_text(problems)
            for key, measure, unit, better in (
                ("dps", "deliveries/s", "/s", "higher"),
                ("cpu", "server CPU per delivery", "us", "lower"),
                ("p50", "publish->receive p50", "ms", "lower"),
                ("p99", "publish->receive p99", "ms", "lower"),
            ):
                rv = figs.get("relay", {}).get(key, [])
                bv = figs.get("baseline", {}).get(key, [])
                rows.append(
                    Row(
                        label,
                        measure,
                        median(rv) if rv else None,
                        median(bv) if bv else None,
                        BASELINE + (" (negotiates deflate)" if deflate else ""),
                        unit,
                        better,
                        check,
                        {"relay": rv, "baseline": bv},
                    )
                )
    return {
        "rows": [r.as_dict() for r in rows],
        "latency_quantiles_ms": series,
        "notes": notes,
        "config": cfg,
    }
