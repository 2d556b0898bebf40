"""Scenario: connection storm, orchestrating ``storm.py``.

``clients`` clients connect at once (aiohttp clients in this process), each ``auth``s
with a session JWT and ``join``s a chat channel; relay CPU per client, against the
same relay's CPU per client for a storm that only connects (upgrade + ``init``).
Every client must end up joined (the check).
"""

from __future__ import annotations

import asyncio
from typing import Any

import storm
from _common import Postgres
from _harness import Row


async def run(pg: Postgres, cfg: dict[str, Any]) -> dict[str, Any]:
    phases = await asyncio.to_thread(storm.measure, pg, cfg["clients"])
    figures = storm.report(phases, cfg["clients"])
    by = {f["phase"]: f for f in figures}
    failures = {f"{f['phase']}: {k}": v for f in figures for k, v in f["failures"].items()}
    short = [f["phase"] for f in figures if f["ready"] != f["clients"]]
    check = "ok"
    if failures or short:
        check = f"FAIL: not every client ready in {short} {failures}"[:300]
    label = f"connection storm, {cfg['clients']:,} clients: connect+auth+join"
    base = "the relay, connect + init only"
    s, c = by["session"], by["connect"]
    return {
        "rows": [
            Row(label, "relay CPU per client", s["cpu_us_per_client"], c["cpu_us_per_client"],
                base, "us", "lower", check).as_dict(),
            Row(label, "time to clear the storm", s["seconds"], c["seconds"],
                base, "s", "lower", check).as_dict(),
        ],
        "raw": figures,
        "config": cfg,
    }  # fmt: skip
