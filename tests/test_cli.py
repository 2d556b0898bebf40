"""The ``relay`` command as an operator runs it: real subprocesses, real PostgreSQL.

Covers ``relay serve`` on an embedded PostgreSQL in a fresh data dir (it
answers ``/healthz``; a token printed by ``relay token`` with the same data dir
is accepted over ``/ws``, so the generated secret is shared; SIGTERM closes
sockets with 1001, exits 0 and stops the embedded PostgreSQL), ``relay token``
on its own, and ``relay repo create / list / watch / unwatch`` against the test
session's PostgreSQL, each repeatable and with readable failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jwt
import psutil
import pytest

from tests.conftest import free_port
from tests.helpers import CLI, ok, relay_cli, run_cli, wait_healthy
from tests.helpers import cli_env as clean_env

STARTUP_SECONDS = 120  # initdb + migrations on a busy 2-core machine


@pytest.fixture
def home() -> Iterator[Path]:
    """A short-pathed scratch dir (unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="relay-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cli_env(home: Path) -> dict[str, str]:
    """The relay command's environment (no RELAY_* settings) with its own data dir."""
    env = clean_env(RELAY_DATA_DIR=str(home / "data"))
    runtime = home / "xdg"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


# --- relay token ------------------------------------------------------------------------------


def test_token_creates_a_private_secret_and_signs_with_it(home: Path):
    env = cli_env(home)
    token = ok(run_cli("token", "--user", "u1", "--account", "a1", env=env)).strip()
    secret_file = home / "data" / "jwt-secret"
    assert secret_file.exists()
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "u1" and claims["account_id"] == "a1"
    assert claims["exp"] - claims["iat"] == 3600
    assert "role" not in claims

    # A second token uses the same stored secret.
    again = ok(run_cli("token", "--user", "u2", "--account", "a2", env=env)).strip()
    assert jwt.decode(again, secret, algorithms=["HS256"])["sub"] == "u2"
    assert secret_file.read_text().strip() == secret


def test_token_ttl_root_and_account_claim(home: Path):
    env = cli_env(home) | {"RELAY_JWT_SECRET": "s" * 40, "RELAY_JWT_ACCOUNT_CLAIM": "org"}
    out = ok(
        run_cli("token", "--user", "svc", "--account", "o9", "--ttl", "15m", "--root", env=env)
    )
    claims = jwt.decode(out.strip(), "s" * 40, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 900
    assert claims["role"] == "root"
    assert claims["org"] == "o9" and "account_id" not in claims
    assert not (home / "data" / "jwt-secret").exists()


def test_token_refuses_when_relay_verifies_with_a_public_key(home: Path):
    env = cli_env(home) | {"RELAY_JWT_PUBLIC_KEY": "/nonexistent/key.pem"}
    result = run_cli("token", "--user", "u", "--account", "a", env=env)
    assert result.returncode == 2
    assert "public key" in result.stderr
    assert result.stdout == ""


# --- relay serve ------------------------------------------------------------------------------


def read_log(path: Path) -> str:
    return path.read_text()


def wait_gone(path: Path, seconds: float) -> bool:
    """Whether ``path`` disappears within ``seconds`` (a blocking poll: run it in a thread)."""
    deadline = time.monotonic() + seconds
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def stop_leftovers(proc: asyncio.subprocess.Process, pgdata: Path) -> None:
    """Whatever the test's outcome: no relay and no PostgreSQL left running."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    pid = postmaster_pid(pgdata)
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(pid).wait(30)


@pytest.mark.timeout(400)
async def test_serve_on_embedded_postgres_token_and_graceful_sigterm(home: Path):
    env = cli_env(home)
    port = free_port()
    pgdata = home / "data" / "pgdata"
    log = home / "serve.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "serve", "--port", str(port), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await wait_healthy(
            f"http://127.0.0.1:{port}/healthz", proc, STARTUP_SECONDS, lambda: read_log(log)
        )
        assert (pgdata / "PG_VERSION").exists(), "embedded PostgreSQL not in the data dir"
        pg_pid = postmaster_pid(pgdata)
        assert pg_pid is not None and alive(pg_pid)

        result = await asyncio.to_thread(run_cli, "token", "--user", "u", "--account", "a", env=env)
        token = ok(result).strip()

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"

            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws", heartbeat=None)
            init = json.loads((await ws.receive(timeout=10)).data)
            assert init["type"] == "init" and init["sid"] == ""
            sid = init["data"]

            await ws.send_str(json.dumps({"type": "auth", "data": token, "token": None}))
            reply = json.loads((await ws.receive(timeout=10)).data)
            assert reply["type"] == "token", f"the server refused relay token's token: {reply}"
            assert reply["sid"] == sid and reply["data"]

            await ws.send_str(json.dumps({"type": "auth", "data": token + "x"}))
            refused = json.loads((await ws.receive(timeout=10)).data)
            assert refused["type"] == "error" and refused["data"] == "invalid token"

            proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.CLOSE, f"expected a close frame, got {msg}"
            assert msg.data == 1001
            assert ws.close_code == 1001

        code = await asyncio.wait_for(proc.wait(), 60)
        assert code == 0, f"relay serve exited with {code}:\n{read_log(log)}"

        gone = await asyncio.to_thread(wait_gone, pgdata / "postmaster.pid", 15)
        assert gone, "embedded PostgreSQL left running: postmaster.pid is still there"
        assert not alive(pg_pid), f"postgres pid {pg_pid} still running"
    finally:
        await stop_leftovers(proc, pgdata)


# --- relay repo ---------------------------------------------------------------------------------


async def repo_cli_async(pg_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await relay_cli("repo", "--database-url", pg_url, *args)


async def triggers_on(db: asyncpg.Connection, table: str) -> set[str]:
    rows = await db.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal", table
    )
    return {r["tgname"] for r in rows}


async def test_repo_create_list_unwatch_repeatable(pg_url: str, db: asyncpg.Connection):
    name = f"cli_{uuid.uuid4().hex[:8]}_760_"
    try:
        for _ in range(2):  # the second run changes nothing and still succeeds
            out = ok(await repo_cli_async(pg_url, "create", name))
            assert out.strip() == f"created and watching {name}: clients join db-{name}"

        columns = {
            r["column_name"]: r["data_type"]
            for r in await db.fetch(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = $1",
                name,
            )
        }
        assert columns == {
            "id": "uuid",
            "account_id": "text",
            "owner_id": "text",
            "created_at": "timestamp with time zone",
            "updated_at": "timestamp with time zone",
            "data": "jsonb",
        }
        assert await db.fetchval("SELECT count(*) FROM relay.watched WHERE repo = $1", name) == 1
        assert len(await triggers_on(db, name)) >= 3

        listing = ok(await repo_cli_async(pg_url, "list"))
        line = next((ln for ln in listing.splitlines() if ln.startswith(name + "\t")), None)
        assert line is not None, f"{name} missing from:\n{listing}"
        assert "mode=760" in line and "owner=owner_id" in line and "account=account_id" in line

        out = ok(await repo_cli_async(pg_url, "unwatch", name))
        assert out.strip() == f"{name}: no longer watched"
        assert await db.fetchval("SELECT count(*) FROM relay.watched WHERE repo = $1", name) == 0
        assert await triggers_on(db, name) == set()
        listing = ok(await repo_cli_async(pg_url, "list"))
        assert not any(ln.startswith(name + "\t") for ln in listing.splitlines())

        out = ok(await repo_cli_async(pg_url, "unwatch", name))
        assert out.strip() == f"{name}: was not watched"
        # The table itself and its rows are left alone.
        assert await db.fetchval(f'SELECT count(*) FROM "{name}"') == 0
    finally:
        await db.execute(f'DROP TABLE IF EXISTS "{name}"')


async def test_repo_watch_existing_table_with_custom_columns(
    pg_url: str, db: asyncpg.Connection, relay, client
):
    schema = f"cli_{uuid.uuid4().hex[:8]}"
    table = f"items_{uuid.uuid4().hex[:8]}"
    qualified = f"{schema}.{table}"
    await db.execute(f"CREATE SCHEMA {schema}")
    await db.execute(
        f"CREATE TABLE {qualified} (item_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
        " creator text, org text, body text)"
    )
    try:
        args = ["watch", qualified, "--id-column", "item_id"]
        args += ["--owner-column", "creator", "--account-column", "org"]
        for _ in range(2):
            out = ok(await repo_cli_async(pg_url, *args))
            assert out.strip() == f"watching {table}: clients join db-{table}"
        assert len(await triggers_on(db, qualified)) >= 3

        listing = ok(await repo_cli_async(pg_url, "list"))
        line = next(ln for ln in listing.splitlines() if ln.startswith(table + "\t"))
        assert "mode=740" in line
        assert "id=item_id" in line and "owner=creator" in line and "account=org" in line

        # The watched columns decide who hears about a row (mode 740: owner and account).
        r = await relay()
        reader = await client(r)
        await reader.auth(r.token("someone", "org-1"))
        await reader.join(f"db-{table}")
        await db.execute(
            f"INSERT INTO {qualified} (creator, org, body) VALUES ('x', 'org-2', 'hidden')"
        )
        await db.execute(
            f"INSERT INTO {qualified} (creator, org, body) VALUES ('y', 'org-1', 'seen')"
        )
        frame = await reader.expect("db_created")
        row = json.loads(frame["data"])
        assert row["body"] == "seen" and row["org"] == "org-1"
        await reader.silent()

        out = ok(await repo_cli_async(pg_url, "unwatch", qualified))
        assert out.strip() == f"{qualified}: no longer watched"
    finally:
        await db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "bad name!"], "not a table name"),
        (["watch", "public.no_such_table_here"], "no_such_table_here"),
        (["unwatch", "public.no_such_table_here"], "no_such_table_here"),
        (["watch", "a.b.c"], "not a table name"),
    ],
)
async def test_repo_mistakes_exit_2_with_a_readable_message(pg_url: str, args, message):
    result = await repo_cli_async(pg_url, *args)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    assert result.stderr.startswith("relay: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


async def test_repo_watch_without_the_id_column_is_refused(pg_url: str, db: asyncpg.Connection):
    table = f"noid_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE TABLE {table} (key text PRIMARY KEY)")
    try:
        result = await repo_cli_async(pg_url, "watch", table)
        assert result.returncode == 2
        assert "has no column id" in result.stderr
        assert "Traceback" not in result.stderr
        assert await triggers_on(db, table) == set()
    finally:
        await db.execute(f"DROP TABLE {table}")


# --- relay migrate, serve --no-migrate, SIGINT ----------------------------------------------


@pytest.fixture
async def fresh_database(pg_url: str, db: asyncpg.Connection) -> AsyncIterator[str]:
    """An empty database on the test PostgreSQL, dropped afterwards."""
    name = f"cli_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE DATABASE {name}")
    yield urlunsplit(urlsplit(pg_url)._replace(path="/" + name))
    await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def schema_state(url: str) -> tuple[bool, list[str]]:
    """(relay.events exists, alembic's recorded versions)."""
    conn = await asyncpg.connect(url)
    try:
        events = await conn.fetchval("SELECT to_regclass('relay.events') IS NOT NULL")
        has_versions = await conn.fetchval(
            "SELECT to_regclass('relay.alembic_version') IS NOT NULL"
        )
        versions = (
            [r[0] for r in await conn.fetch("SELECT version_num FROM relay.alembic_version")]
            if has_versions
            else []
        )
        return events, versions
    finally:
        await conn.close()


async def serve_and_interrupt(home: Path, url: str, *flags: str) -> None:
    """``relay serve`` on ``url``: it answers /healthz and a client; SIGINT
    closes the client with 1001 and the process exits 0."""
    port = free_port()
    env = cli_env(home) | {"RELAY_JWT_SECRET": "s" * 40}
    log = home / f"serve-{port}.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "serve", "--database-url", url, "--port", str(port), *flags,
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_healthy(
            f"http://127.0.0.1:{port}/healthz", proc, STARTUP_SECONDS, lambda: read_log(log)
        )
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws", heartbeat=None)
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "init"
            proc.send_signal(signal.SIGINT)
            msg = await ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001, msg
        code = await asyncio.wait_for(proc.wait(), 60)
        assert code == 0, f"relay serve exited with {code} after SIGINT:\n{read_log(log)}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_migrate_is_repeatable_and_serve_applies_migrations(home: Path, fresh_database):
    assert await schema_state(fresh_database) == (False, [])
    for _ in range(2):
        out = ok(await relay_cli("migrate", "--database-url", fresh_database))
        assert out.strip() == "relay schema is up to date"
        events, versions = await schema_state(fresh_database)
        assert events and len(versions) == 1

    # serve migrates a database that has not been migrated.
    await (await asyncpg.connect(fresh_database)).execute("DROP SCHEMA relay CASCADE")
    await serve_and_interrupt(home, fresh_database)
    events, versions = await schema_state(fresh_database)
    assert events and len(versions) == 1


async def test_serve_no_migrate_leaves_the_schema_alone(home: Path, fresh_database):
    ok(await relay_cli("migrate", "--database-url", fresh_database))
    _, versions = await schema_state(fresh_database)
    # Alembic now believes nothing was applied: a migrating start would try to
    # create the schema again (and fail); --no-migrate must not touch it.
    conn = await asyncpg.connect(fresh_database)
    await conn.execute("DELETE FROM relay.alembic_version")
    await conn.close()
    await serve_and_interrupt(home, fresh_database, "--no-migrate")
    assert await schema_state(fresh_database) == (True, [])
    assert versions  # (the migrate above had recorded one)
