"""Scenario: write cost, orchestrating ``write_cost.py``.

4 writers insert for ``seconds`` per measurement into an unwatched table, a table with
a per-row ``pg_notify(row_to_json(NEW))`` trigger, and a relay-watched table (nobody
consuming either stream: the cost to the writer), in 1-row and 100-row transactions,
``rounds`` interleaved rounds (medians).
"""

from __future__ import annotations

from typing import Any

import write_cost
from _common import Postgres
from _harness import Row


async def run(pg: Postgres, cfg: dict[str, Any]) -> dict[str, Any]:
    argv = ["--seconds", str(cfg["seconds"]), "--rounds", str(cfg["rounds"])]
    argv += ["--configs", "unwatched,notify,relay", "--warmup", "0.3"]
    figures = await write_cost.run(write_cost.parse_args(argv), pg)
    by = {(f["config"], f["batch"]): f for f in figures}
    rows = []
    for batch in (1, 100):
        relay, notify, plain = by[("relay", batch)], by[("notify", batch)], by[("unwatched", batch)]
        label = f"write cost, {batch}-row txns, 4 writers"
        rows += [
            Row(label, "rows/s", relay["rows_per_s"], notify["rows_per_s"],
                "per-row pg_notify trigger", "/s", "higher",
                runs={"relay": relay["runs"], "baseline": notify["runs"]}),
            Row(label, "rows/s", relay["rows_per_s"], plain["rows_per_s"],
                "unwatched table", "/s", "higher",
                runs={"relay": relay["runs"], "baseline": plain["runs"]}),
            Row(label, "PostgreSQL CPU per row", relay["pg_us_per_row"], notify["pg_us_per_row"],
                "per-row pg_notify trigger", "us", "lower"),
        ]  # fmt: skip
    return {"rows": [r.as_dict() for r in rows], "raw": figures, "config": cfg}
