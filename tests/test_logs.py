"""The logs of a full scripted session: readable, sid and app on every socket line, no secrets.

``relay serve`` runs as an operator runs it (a subprocess, text or JSON log
format); a scripted session authenticates (once with a bad token), chats,
echoes, follows a ``db-`` channel while a row is written, misuses a socket
token and asks the admin endpoint with a right and a wrong admin token.
Then the log must contain none of the tokens, secrets or payloads it used,
and every line that names a socket must name its app.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from relay.auth import mint_token
from tests.conftest import free_port
from tests.test_cli import CLI, cli_env, read_log, stop_leftovers, wait_healthy
from tests.test_ops_cli import home  # noqa: F401  (the fixture)


async def recv(ws: aiohttp.ClientWebSocketResponse, type_: str) -> dict[str, str]:
    frame: dict[str, str] = json.loads((await ws.receive(timeout=15)).data)
    assert frame["type"] == type_, frame
    return frame


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_logs_of_a_session_hold_no_secret_and_name_each_sockets_app(
    fmt: str,
    pg_url: str,
    repo,
    db: asyncpg.Connection,
    home: Path,  # noqa: F811
):
    jwt_secret = "jwt-" + secrets.token_hex(24)
    admin_token = "adm-" + secrets.token_hex(16)
    payloads = {f"payload-{what}-{secrets.token_hex(6)}" for what in ("echo", "chat", "row", "bad")}
    echo_p, chat_p, row_p, bad_p = sorted(payloads)
    env = cli_env(home) | {
        "RELAY_JWT_SECRET": jwt_secret,
        "RELAY_ADMIN_TOKEN": admin_token,
        "RELAY_LOG_FORMAT": fmt,
    }
    table = await repo("_760_")
    port = free_port()
    log = home / "serve.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "serve", "--no-migrate", "--database-url", pg_url, "--port", str(port),
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    session = mint_token(jwt_secret, "alice", "acme")
    base = f"http://127.0.0.1:{port}"
    used = {jwt_secret, admin_token, session, *payloads}
    try:
        await wait_healthy(base + "/healthz", proc, log=lambda: read_log(log))
        async with aiohttp.ClientSession() as http:
            a = await http.ws_connect(base + "/ws", heartbeat=None)
            b = await http.ws_connect(base + "/ws", heartbeat=None)
            await recv(a, "init")
            await recv(b, "init")
            await a.send_json({"type": "echo", "data": echo_p})
            await recv(a, "echo")
            await a.send_json({"type": "auth", "data": session + "x"})
            await recv(a, "error")
            await a.send_json({"type": "auth", "data": session})
            token = (await recv(a, "token"))["data"]
            used.add(token)
            await a.send_json({"type": "join", "data": "lobby", "token": token})
            await recv(a, "joined")
            chat = {"type": "chan_in", "channel": "lobby", "data": chat_p, "token": token}
            await a.send_json(chat)
            await recv(a, "ok")
            await recv(a, "chan_out")
            # Another socket's token, and a frame without one: refused, and logged as such.
            await b.send_json({"type": "join", "data": "lobby", "token": token})
            await recv(b, "error")
            await b.send_json({"type": "chan_in", "channel": "lobby", "data": bad_p})
            await recv(b, "error")
            await a.send_json({"type": "join", "data": f"db-{table}", "token": token})
            await recv(a, "joined")
            await db.execute(
                f"INSERT INTO {table} (owner_id, account_id, data) VALUES ('alice', 'acme', $1)",
                json.dumps({"note": row_p}),
            )
            assert row_p in (await recv(a, "db_created"))["data"]
            for given, status in ((admin_token, 200), ("wrong-" + admin_token, 401)):
                headers = {"Authorization": f"Bearer {given}"}
                async with http.get(base + "/admin/status", headers=headers) as resp:
                    assert resp.status == status
            await b.close()
            proc.send_signal(signal.SIGTERM)
            await a.receive(timeout=30)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        await stop_leftovers(proc, home / "data" / "pgdata")

    text = read_log(log)
    assert "connected sid=" in text and "client error" in text, text
    for secret in used:
        assert secret not in text, f"{secret!r} is in the log:\n{text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if fmt == "json":
        records = [json.loads(ln) for ln in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
        about_sockets = [r for r in records if "sid" in r]
        assert about_sockets and all(r.get("app") == "default" for r in about_sockets)
    else:
        about_sockets = [ln for ln in lines if "sid=" in ln]
        assert about_sockets and all("app=default" in ln for ln in about_sockets), about_sockets


def test_the_scrubber_and_a_malformed_record():
    import io
    import logging

    from relay import logs

    out = io.StringIO()
    log = logging.getLogger("relay.test-scrub")
    log.addHandler(logs.handler("text", out))
    log.propagate = False
    token = secrets.token_urlsafe(24)
    logs.token_issued(token)
    try:
        jwt_text = mint_token("k" * 32, "u", "a")
        log.warning("saw %s and %s at %s", jwt_text, token, "postgresql://relay:pw123@db/relay")
        log.warning("broken %s %s", "only one")  # must not raise at the call site
    finally:
        logs.token_retired(token)
        log.handlers.clear()
    text = out.getvalue()
    assert jwt_text not in text and "<jwt>" in text
    assert token not in text and "<token>" in text
    assert "pw123" not in text and "relay:***@db" in text


async def test_no_aiohttp_access_log_whatever_runs_the_app(relay, caplog):
    """``relay serve`` never had aiohttp's access log; a runner with aiohttp's
    defaults (tests, benches) gets none either: relay logs each connection itself."""
    handle = await relay()
    caplog.set_level("DEBUG", logger="aiohttp.access")
    async with aiohttp.ClientSession() as http:
        async with http.get(handle.http_url + "/healthz") as resp:
            assert resp.status == 200
        async with http.ws_connect(handle.ws_url) as ws:
            assert (await ws.receive_json())["type"] == "init"
    await handle.stop()
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]
