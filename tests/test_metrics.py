"""``GET /metrics`` reflects what a scripted session did; ``/readyz`` follows PostgreSQL.

The session: two clients echo, authenticate, chat, send garbage, follow a
``db-`` channel while rows are inserted, updated and deleted. Then every count
and label in the Prometheus text must match what the script did, frame by
frame. ``/readyz`` answers 503 while the relay's own PostgreSQL is stopped
and 200 again once it is back; ``/healthz`` (liveness) stays 200 throughout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RelayHandle, free_port, random_name
from tests.helpers import readyz
from tests.test_outage import OwnPostgres, own_pg, relay_on  # noqa: F401  (fixtures)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(r: RelayHandle) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, (
        f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    )
    return samples[key]


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    """Wait until ``check`` is true (polled), failing after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_metrics_match_a_scripted_session(relay, client, repo, db: asyncpg.Connection):
    r = await relay()
    table = await repo("_760_")
    room = random_name()
    a, b = await client(r), await client(r)
    await a.send(type="echo", data="hi")
    await a.expect("echo")
    await a.auth(r.token("alice", "acme"))
    await b.auth(r.token("bob", "acme"))
    await a.join(room)
    await b.join(room)
    await a.join(f"db-{table}")
    for text in ("one", "two"):
        await a.publish(room, text)
        await a.expect("chan_out")
        await b.expect("chan_out")
    await a.send_raw("this is not json")
    await a.expect("error")
    await a.send(type="shout", data="x")
    await a.expect("error")

    ids = [
        await db.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, data) VALUES ('alice', 'acme', $1)"
            " RETURNING id::text",
            json.dumps({"n": n}),
        )
        for n in (1, 2)
    ]
    await db.execute(f"UPDATE {table} SET data = '{{\"n\": 3}}' WHERE id = $1", ids[0])
    await db.execute(f"DELETE FROM {table} WHERE id = $1", ids[1])
    for kind in ("db_created", "db_created", "db_updated", "db_deleted"):
        await a.expect(kind)

    m = await scrape(r)
    assert value(m, "relay_sockets", app="default") == 2
    assert value(m, "relay_connections_total", app="default") == 2
    received = {"echo": 1, "auth": 2, "join": 3, "chan_in": 2, "invalid": 1, "other": 1}
    for type_, n in received.items():
        assert value(m, "relay_frames_received_total", type=type_) == n, type_
    sent = {
        "init": 2,
        "echo": 1,
        "token": 2,
        "joined": 3,
        "ok": 2,
        "chan_out": 4,
        "error": 2,
        "db_created": 2,
        "db_updated": 1,
        "db_deleted": 1,
        "other": 0,
    }
    for type_, n in sent.items():
        assert value(m, "relay_frames_sent_total", type=type_) == n, type_
    assert value(m, "relay_errors_total", reason="frame is not valid json") == 1
    assert value(m, "relay_errors_total", reason="unknown type") == 1
    assert value(m, "relay_joins_total", kind="chat") == 2
    assert value(m, "relay_joins_total", kind="db") == 1
    assert value(m, "relay_channels", kind="chat") == 1
    assert value(m, "relay_channels", kind="db") == 1
    assert value(m, "relay_db_subscriptions") == 1
    assert value(m, "relay_db_events_ingested_total") == 4
    assert value(m, "relay_db_events_delivered_total", type="db_created") == 2
    assert value(m, "relay_db_commit_to_delivery_seconds_count") == 4
    assert value(m, "relay_db_commit_to_delivery_seconds_bucket", le="+Inf") == 4
    assert value(m, "relay_replay_backlog", what="held_frames") == 0
    assert value(m, "relay_cuts_total", reason="slow_consumer") == 0
    listener_tick = value(m, "relay_listener_tick", which="listener")
    assert value(m, "relay_listener_tick", which="newest") >= listener_tick > 0
    assert value(m, "relay_listener_lag_ticks") >= 0
    assert value(m, "relay_up", what="listener") == 1
    assert value(m, "relay_up", what="broker") == 1
    assert value(m, "relay_pool_connections", state="size") == r.state.db.max_size
    assert value(m, "relay_pool_wedged") == 0

    # A leaves: the gauges follow.
    await b.close()
    await eventually(lambda: _sockets_are(r, 1))


async def _sockets_are(r: RelayHandle, n: int) -> bool:
    return value(await scrape(r), "relay_sockets", app="default") == n


async def test_cuts_are_counted(relay, client):
    r = await relay(error_budget=3, messages_per_second=1.0, message_burst_seconds=1.0)
    c = await client(r)
    await c.send(type="echo", data="1")
    await c.expect("echo")
    await c.send(type="echo", data="2")  # over the rate: dropped with an error
    assert "rate limit" in (await c.expect("error"))["data"]
    for _ in range(3):  # spend the rest of the error budget
        await c.send_raw("{")
    closed: Any = None
    while closed is None or closed.type is not aiohttp.WSMsgType.CLOSE:
        closed = await c.ws.receive(timeout=10)
    assert closed.data == 4000
    m = await scrape(r)
    assert value(m, "relay_cuts_total", reason="rate_limited_frame") == 1
    assert value(m, "relay_cuts_total", reason="abuse") == 1
    assert value(m, "relay_closes_total", code="4000") == 1
    assert value(m, "relay_errors_total", reason="rate limit") == 1


async def healthz_status(r: RelayHandle) -> int:
    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/healthz") as resp:
        return resp.status


async def test_readyz_follows_postgresql(own_pg: OwnPostgres, relay_on: RelayHandle):  # noqa: F811
    r = relay_on

    async def ready() -> bool:
        return (await readyz(r))[0] == 200

    async def not_ready() -> bool:
        return (await readyz(r))[0] == 503

    await eventually(ready)
    assert (await readyz(r))[1] == {"status": "ready"}
    await asyncio.to_thread(own_pg.stop_server)
    try:
        await eventually(not_ready)
        _, body = await readyz(r)
        assert any("database unreachable" in p for p in body["problems"]), body
        assert await healthz_status(r) == 200  # alive: nothing to restart for
    finally:
        await asyncio.to_thread(own_pg.restart_server)
    await eventually(ready, seconds=60)


# --- relay status ------------------------------------------------------------------------------


def run_status(r: RelayHandle, *args: str, env: dict[str, str] | None = None):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "status", "--url", r.http_url, *args],
        env=base | (env or {}) | {"COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_relay_status_shows_sockets_channels_and_the_listener(relay, client, repo):
    admin = "admin-" + "z" * 24
    r = await relay(admin_token=admin)
    table = await repo("_760_")
    room = random_name()
    clients = [await client(r) for _ in range(3)]
    for i, c in enumerate(clients):
        await c.auth(r.token(f"user{i}", "acme"))
        await c.join(room)
    await clients[0].join(f"db-{table}")

    result = await asyncio.to_thread(run_status, r, "--json", env={"RELAY_ADMIN_TOKEN": admin})
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["sockets"] == {"default": 3}
    top = {c["channel"]: c["members"] for c in status["top_channels"]}
    assert top[room] == 3 and top[f"db-{table}"] == 1
    assert status["listener"]["connected"] and status["listener"]["lag_ticks"] >= 0

    # The tables, with a root token of the default app instead of the admin token.
    root = r.token("ops", root=True)
    result = await asyncio.to_thread(run_status, r, "--token", root)
    assert result.returncode == 0, result.stderr
    for needle in ("sockets by app", "default", "top channels", room, "listener", "events/s"):
        assert needle in result.stdout, result.stdout

    # A wrong token: one line saying what to do.
    result = await asyncio.to_thread(run_status, r, "--token", "nope")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "refused the admin token" in result.stderr
    # Nobody there: one line too.
    gone = RelayHandle(r.app, r.runner, free_port(), r.secret)
    result = await asyncio.to_thread(run_status, gone, "--token", root)
    assert result.returncode == 1 and "no relay answers" in result.stderr


async def test_readyz_follows_the_redis_broker(relay, tmp_path):
    from tests.conftest import start_redis

    port = free_port()
    proc = await asyncio.to_thread(start_redis, port, str(tmp_path))
    try:
        r = await relay(broker_url=f"redis://127.0.0.1:{port}/0")

        async def ready() -> bool:
            return (await readyz(r))[0] == 200

        async def not_ready() -> bool:
            return (await readyz(r))[0] == 503

        await eventually(ready)
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        await eventually(not_ready)
        assert "broker unreachable" in (await readyz(r))[1]["problems"]
        assert value(await scrape(r), "relay_up", what="broker") == 0
        proc = await asyncio.to_thread(start_redis, port, str(tmp_path))
        await eventually(ready)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
