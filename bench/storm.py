"""Connection storm: N clients reconnecting at once, as after a deploy.

The relay (relay.server.create_app) runs in its own process on an embedded
PostgreSQL; this process opens N WebSockets at the same moment and, for each,
times connect -> ``init``, then ``auth`` -> ``token`` and ``join`` -> ``joined``.
Three phases in the same run, each with N fresh clients:

  connect   connect and wait for ``init`` only (the baseline: HTTP upgrade + socket setup)
  session   connect, ``auth`` with a session JWT (HS256; each client its own), ``join``
            a chat channel
  app key   the same with ``?pk=<an app's public key>`` (the app lookup path, cached)

Reported per phase: how long the storm took to clear, clients/s, the
per-client time to be ready (p50/p90/p99/max), failures, and the relay
process's CPU per client. Every client must end up ready; the script exits
non-zero if any did not.

Run (well under a minute with the defaults):

    . .venv/bin/activate
    python bench/storm.py
    python bench/storm.py --clients 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from _common import (
    Postgres,
    RelayProcess,
    embedded_pg,
    machine_header,
    percentile,
    pg_version,
    print_table,
    quiet_logs,
    raise_fd_limit,
    token,
)


@dataclass
class Phase:
    name: str
    ready: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu: float = 0.0


async def one_client(
    http: aiohttp.ClientSession, url: str, session_token: str | None, start: float, phase: Phase
) -> aiohttp.ClientWebSocketResponse | None:
    try:
        ws = await http.ws_connect(url, heartbeat=None, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        init = json.loads((await ws.receive(timeout=60)).data)
        if init["type"] != "init":
            raise RuntimeError(f"expected init, got {init['type']}: {init['data']}")
        if session_token is not None:
            await ws.send_str(json.dumps({"type": "auth", "data": session_token}))
            reply = json.loads((await ws.receive(timeout=60)).data)
            if reply["type"] != "token":
                raise RuntimeError(f"auth: {reply['data']}")
            await ws.send_str(json.dumps({"type": "join", "data": "lobby", "token": reply["data"]}))
            reply = json.loads((await ws.receive(timeout=60)).data)
            if reply["type"] != "joined":
                raise RuntimeError(f"join: {reply['data']}")
        phase.ready.append(time.monotonic() - start)
        return ws
    except Exception as exc:  # a bench reports failures, it does not stop at the first
        key = type(exc).__name__ + (f": {exc}"[:60] if str(exc) else "")
        phase.failures[key] = phase.failures.get(key, 0) + 1
        return None


async def storm(relay: RelayProcess, url: str, tokens: list[str | None], phase: Phase) -> None:
    """One client per entry of ``tokens``, all at once; None: connect only."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        cpu0 = relay.cpu()
        start = time.monotonic()
        sockets = await asyncio.gather(
            *(one_client(http, url, tok, start, phase) for tok in tokens)
        )
        phase.seconds = time.monotonic() - start
        phase.cpu = relay.cpu() - cpu0
        await asyncio.gather(*(ws.close() for ws in sockets if ws is not None))


async def create_app_key(pg_url: str) -> tuple[str, str]:
    """A second app: its public key, and the secret that signs its session tokens."""
    import asyncpg

    from relay import plans

    conn = await asyncpg.connect(pg_url)
    try:
        app = await plans.create_app(conn, "storm")
    finally:
        await conn.close()
    assert app.public_key is not None and app.jwt_secret is not None
    return app.public_key, app.jwt_secret


def measure(pg: Postgres, clients: int) -> list[Phase]:
    """The three storms against one relay process (this process is the client side)."""
    from relay.auth import mint_token

    raise_fd_limit(2 * clients + 256)  # inherited by the relay process
    # Every client here is one app's, from one address, unauthenticated at first:
    # the caps on unauthenticated sockets would refuse most of a storm this big.
    for name in ("", "_PER_APP", "_PER_ADDRESS"):
        os.environ.setdefault(f"RELAY_MAX_UNAUTHENTICATED{name}", "0")
    key, app_secret = asyncio.run(create_app_key(pg.url))
    relay = RelayProcess(pg.url)
    relay.start()
    phases = [Phase("connect"), Phase("session"), Phase("app key")]
    try:
        # Every client its own token, as after a deploy: nobody's token has been
        # seen by this process before (a verifier remembers the tokens it accepted).
        users = [f"storm{i}" for i in range(clients)]
        session_tokens: list[str | None] = [token(u, "1", ttl_seconds=3600) for u in users]
        app_tokens: list[str | None] = [
            mint_token(app_secret, u, "1", ttl_seconds=3600) for u in users
        ]
        for phase, url, tokens in zip(
            phases,
            [relay.ws_url, relay.ws_url, relay.ws_url + "?pk=" + key],
            [[None] * clients, session_tokens, app_tokens],
            strict=True,
        ):
            asyncio.run(storm(relay, url, tokens, phase))
            time.sleep(1.0)  # let the relay settle the closes before the next storm
    finally:
        relay.stop()
    return phases


def report(phases: list[Phase], clients: int) -> list[dict[str, Any]]:
    """Print the table; return one dict of figures per phase."""
    rows = []
    figures = []
    for p in phases:
        ready = sorted(p.ready)
        figures.append(
            {
                "phase": p.name,
                "ready": len(ready),
                "clients": clients,
                "seconds": p.seconds,
                "cpu_us_per_client": 1e6 * p.cpu / max(1, len(ready)),
                "p50_ms": 1000 * percentile(ready, 50),
                "p99_ms": 1000 * percentile(ready, 99),
                "failures": p.failures,
            }
        )
        rows.append(
            [
                p.name,
                f"{len(ready)}/{clients}",
                f"{p.seconds:.2f}",
                f"{len(ready) / p.seconds:.0f}" if p.seconds else "-",
                *(f"{1000 * percentile(ready, q):.0f}" for q in (50, 90, 99, 100)),
                f"{1e6 * p.cpu / max(1, len(ready)):.0f}",
            ]
        )
    print()
    print_table(
        [
            "phase",
            "ready",
            "clear s",
            "clients/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "relay CPU us/client",
        ],
        rows,
    )
    for p in phases:
        for what, count in p.failures.items():
            print(f"FAILED {count}x {p.name}: {what}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    args = parser.parse_args()
    quiet_logs()
    raise_fd_limit(2 * args.clients + 256)
    with embedded_pg() as pg:
        print(machine_header("connection storm", asyncio.run(pg_version(pg.url))))
        phases = measure(pg, args.clients)
    report(phases, args.clients)
    return 1 if any(p.failures for p in phases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
