"""Scenario: catch-up, orchestrating ``catchup.py`` with the command's parameters.

A client that joined ``db-<repo>`` goes away, ``events`` rows are written, it comes back
with ``after`` = the position it had: replay rate (events/s) against reading the same
events with ``relay.events_between()`` over asyncpg. catchup.py checks that every
event arrived once, in ``pos`` order.
"""

from __future__ import annotations

from typing import Any

import catchup
from _common import Postgres
from _harness import Row


async def run(pg: Postgres, cfg: dict[str, Any]) -> dict[str, Any]:
    args = catchup.parse_args(["--events", str(cfg["events"]), "--live-batch", "0"])
    res = await catchup.run(args, pg)
    rows = res["rows"]
    label = f"catch-up: resume after {cfg['events']:,} missed events"
    if len(rows) < 2:
        check = "FAIL: " + res.get("error", "no replay measured")
        return {"rows": [Row(label, "events/s", None, None, "raw SQL", check=check).as_dict()]}
    sql, replay = rows[0], rows[1]
    check = "ok" if replay["check"] == "ok" and sql["check"] == "ok" else "FAIL: " + replay["check"]

    def rate(r: dict[str, Any]) -> float:
        return float(r["events"] / r["seconds"]) if r["seconds"] else 0.0

    baseline = "SQL: relay.events_between() over asyncpg"
    cpu = 1e6 * replay["relay_cpu"] / replay["events"] if replay["events"] else None
    return {
        "rows": [
            Row(
                label, "events/s", rate(replay), rate(sql), baseline, "/s", "higher", check
            ).as_dict(),
            Row(label, "relay CPU per event", cpu, None, baseline, "us", "lower", check).as_dict(),
        ],
        "raw": rows,
        "config": cfg,
    }
