"""Scenario: idle memory per authenticated, joined socket, relay vs a bare aiohttp server.

A fresh server per side. ``warm`` sockets connect first (imports, caches, first
allocations), then the server's RSS and USS (psutil) are read; sockets are added up
to each size in ``sizes`` (spread over two load-generator processes, raw clients that
do not offer permessage-deflate), and after a short settle the memory is read again:
(memory - memory before) / sockets added. Relay sockets connect, ``auth`` with a
session JWT and ``join`` one chat channel; the bare server's sockets are appended to
its one channel's member list on connect. Every socket must be open and joined at
the end (the check).
"""

from __future__ import annotations

import asyncio
from typing import Any

from _common import Postgres
from _harness import Row, check_text, fleets, memory_of, server
from loadgen import Fleet, open_spread

CHANNEL = "idle-lobby"
BASELINE = "bare aiohttp"


async def open_sockets(
    side: str, port: int, fl: list[Fleet], first: int, count: int
) -> tuple[int, dict[str, int]]:
    replies = await open_spread(
        fl,
        first,
        count,
        kind="relay" if side == "relay" else "bare",
        port=port,
        role="idle",
        channel=CHANNEL,
        deflate=False,
        user_prefix="idle",
        account_prefix="a",
        accounts=100,
        concurrency=100,
    )
    errors: dict[str, int] = {}
    for r in replies:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return sum(r["open"] for r in replies), errors


async def one_side(pg: Postgres, side: str, cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": {}, "problems": []}
    with server(side, pg.url, "chat") as srv, fleets(2) as fl:
        _, errors = await open_sockets(side, srv.port, fl[:1], 0, cfg["warm"])
        await asyncio.sleep(cfg["settle"])
        rss0, uss0 = memory_of(srv.pid)
        total = 0
        for size in cfg["sizes"]:
            n, errs = await open_sockets(side, srv.port, fl, cfg["warm"] + total, size - total)
            total += n
            errors.update(errs)
            await asyncio.sleep(cfg["settle"])
            rss, uss = memory_of(srv.pid)
            added = max(total, 1)
            out["sizes"][str(size)] = {
                "sockets": total,
                "rss_kb": (rss - rss0) / added / 1024,
                "uss_kb": (uss - uss0) / added / 1024,
                "rss_mb": rss / 2**20,
            }
            print(
                f"  memory {side:<8} {total:>6,} sockets: RSS {(rss - rss0) / added / 1024:5.1f} KB"
                f"  USS {(uss - uss0) / added / 1024:5.1f} KB per socket"
                f" (process RSS {rss / 2**20:.0f} MiB)",
                flush=True,
            )
            if total != size:
                out["problems"].append(f"{side}: {total:,}/{size:,} sockets joined ({errors})")
                break
        stats = await asyncio.gather(
            *(asyncio.to_thread(f.call, op="chat_stats", end_seq=0) for f in fl)
        )
        if closed := sum(s["closed"] for s in stats):
            out["problems"].append(f"{side}: {closed} sockets were closed while idle")
    return out


async def run(pg: Postgres, cfg: dict[str, Any]) -> dict[str, Any]:
    res = {side: await one_side(pg, side, cfg) for side in ("relay", "baseline")}
    problems = res["relay"]["problems"] + res["baseline"]["problems"]
    rows = []
    for size in cfg["sizes"]:
        r, b = res["relay"]["sizes"].get(str(size)), res["baseline"]["sizes"].get(str(size))
        for key, measure in (("uss_kb", "server USS per socket"),):
            rows.append(
                Row(
                    f"idle memory, {size:,} joined sockets",
                    measure,
                    r[key] if r else None,
                    b[key] if b else None,
                    BASELINE,
                    "KB",
                    "lower",
                    check_text(problems),
                ).as_dict()
            )
    return {"rows": rows, "sides": res, "config": cfg}
