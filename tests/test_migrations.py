"""Upgrades: frozen migrations, functions re-applied by every migrate, matching models, no way back.

Each test gets a database of its own on the session's PostgreSQL server. The
upgrade test starts from the schema the first landed version of main made
(``tests/fixtures/first_main``: that version's ``sql/relay.sql`` verbatim,
and the tables its migration 0001 then created) and from the frozen
migration 0001, and upgrades with a real ``relay migrate`` process while a
writer keeps committing.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import CheckConstraint, Column, Index, MetaData, Text, create_engine, text
from sqlalchemy.engine import Connection

from relay.config import Settings
from relay.db import FORWARD_ONLY, alembic_config, run_migrations, sqlalchemy_url
from relay.schema import SCHEMA, include_name, metadata
from relay.server import create_app
from tests.conftest import JWT_SECRET, RelayHandle, WsClient, free_port
from tests.test_limits import eventually

ROOT = Path(__file__).resolve().parent.parent
FIRST_MAIN = Path(__file__).resolve().parent / "fixtures" / "first_main"
HEAD = ScriptDirectory.from_config(alembic_config("unused")).get_current_head()


# --- databases ------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
def new_database(pg_url: str) -> Iterator[Callable[[], str]]:
    """A factory of empty databases on the session's server, dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"upg_{secrets.token_hex(4)}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return with_database(pg_url, name)

    yield make
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def build_first_main(url: str) -> None:
    """The relay schema exactly as the first landed version of main left it at revision 0001."""
    with psycopg.connect(url) as conn:
        # Straight to psycopg with no parameters, as that version's migration did.
        conn.execute((FIRST_MAIN / "relay.sql").read_text())
        conn.execute((FIRST_MAIN / "0001_tables.sql").read_text())


def build_0001(url: str) -> None:
    """The relay schema as migration 0001 makes it today (from its frozen SQL)."""
    command.upgrade(alembic_config(url), "0001")


# --- the models against a database ----------------------------------------------------


def _comparison(conn: Connection, target: MetaData) -> list[Any]:
    context = MigrationContext.configure(
        conn,
        opts={
            "include_schemas": True,
            "include_name": include_name,
            "compare_type": True,
            "compare_server_default": True,
            "target_metadata": target,
        },
    )
    return list(compare_metadata(context, target))


def _index_differences(conn: Connection, target: MetaData) -> list[str]:
    """Index access methods and columns, which autogenerate does not compare."""
    rows = conn.execute(
        text(
            """
            SELECT t.relname, i.relname, am.amname,
                   array_agg(a.attname ORDER BY k.ord) AS columns
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_am am ON am.oid = i.relam
            CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
            WHERE t.relnamespace = CAST(:schema AS regnamespace)
              AND NOT x.indisprimary
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
            GROUP BY 1, 2, 3
            """
        ),
        {"schema": SCHEMA},
    )
    found = {(r[0], r[1], r[2], tuple(r[3])) for r in rows}
    wanted = {
        (
            table.name,
            str(ix.name),
            ix.dialect_options["postgresql"]["using"] or "btree",
            tuple(c.name for c in ix.columns),
        )
        for table in target.tables.values()
        for ix in table.indexes
    }
    return [f"index in the database only: {i}" for i in sorted(found - wanted)] + [
        f"index in the models only: {i}" for i in sorted(wanted - found)
    ]


def _check_differences(conn: Connection, target: MetaData) -> list[str]:
    """CHECK constraints, which autogenerate does not compare: each model's
    expression, normalized by PostgreSQL itself on a scratch copy of its table,
    against the database's."""
    found = {
        (r[0], r[1]): r[2]
        for r in conn.execute(
            text(
                """
                SELECT t.relname, c.conname, pg_get_constraintdef(c.oid)
                FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
                WHERE c.contype = 'c' AND t.relnamespace = CAST(:schema AS regnamespace)
                """
            ),
            {"schema": SCHEMA},
        )
    }
    wanted: dict[tuple[str, str], str] = {}
    savepoint = conn.begin_nested()
    for table in target.tables.values():
        checks = [c for c in table.constraints if isinstance(c, CheckConstraint)]
        if not checks:
            continue
        conn.execute(text(f"CREATE TEMP TABLE scratch (LIKE {SCHEMA}.{table.name})"))
        for check in checks:
            expression = str(check.sqltext)
            conn.execute(
                text(f"ALTER TABLE scratch ADD CONSTRAINT {check.name} CHECK ({expression})")
            )
            wanted[(table.name, str(check.name))] = conn.execute(
                text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conrelid = 'scratch'::regclass AND conname = :name"
                ),
                {"name": check.name},
            ).scalar_one()
        conn.execute(text("DROP TABLE scratch"))
    savepoint.rollback()
    return [
        f"CHECK {key}: database {found.get(key)!r}, models {wanted.get(key)!r}"
        for key in sorted(set(found) | set(wanted))
        if found.get(key) != wanted.get(key)
    ]


def schema_differences(url: str, target: MetaData = metadata) -> list[Any]:
    """Everything in which schema relay of ``url`` and the models disagree."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return (
                _comparison(conn, target)
                + _index_differences(conn, target)
                + _check_differences(conn, target)
            )
    finally:
        engine.dispose()


def test_models_match_the_migrated_schema(new_database: Callable[[], str]) -> None:
    url = new_database()
    run_migrations(url)
    assert schema_differences(url) == []


def test_the_comparison_sees_every_kind_of_disagreement(new_database: Callable[[], str]) -> None:
    """The check above can fail: models that drift from the migrations in each way are caught."""
    url = new_database()
    run_migrations(url)
    drifted = MetaData(schema=SCHEMA)
    for table in metadata.tables.values():
        table.to_metadata(drifted)
    drifted.remove(drifted.tables["relay.listeners"])
    drifted.tables["relay.ticks"].c.snapshot.type = Text()
    drifted.tables["relay.apps"].c.suspended.server_default = None
    events = drifted.tables["relay.events"]
    (brin,) = [ix for ix in events.indexes if ix.name == "events_seq"]
    events.indexes.discard(brin)
    Index("events_seq", events.c.seq)  # btree instead of BRIN
    (op_check,) = [c for c in events.constraints if c.name == "events_op_check"]
    assert isinstance(op_check, CheckConstraint)
    op_check.sqltext = text("op IN ('c', 'u')")
    drifted.tables["relay.watched"].append_column(Column("note", Text))

    found = schema_differences(url, drifted)

    text_of = repr(found)
    assert any(
        d[0] == "remove_table" and d[1].name == "listeners" for d in found if isinstance(d, tuple)
    )
    assert "modify_type" in text_of and "'snapshot'" in text_of
    assert "modify_default" in text_of and "'suspended'" in text_of
    assert any(d[0] == "add_column" and d[3].name == "note" for d in found if isinstance(d, tuple))
    assert "('events', 'events_seq', 'brin', ('seq',))" in text_of
    assert "events_op_check" in text_of


# --- the upgrade ------------------------------------------------------------------------


class Writer:
    """Commits one row per transaction until stopped; remembers every committed id."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        self.committed: list[int] = []
        self.error: BaseException | None = None
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        conn = await asyncpg.connect(self.url)
        self._task = asyncio.create_task(self._run(conn))

    async def _run(self, conn: asyncpg.Connection) -> None:
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                row_id = await conn.fetchval(
                    f"INSERT INTO {self.table} (owner_id, account_id, k)"
                    " VALUES ('writer', 'acme', $1) RETURNING id",
                    n,
                    timeout=30,
                )
                async with self._progress:
                    self.committed.append(row_id)
                    self._progress.notify_all()
        except BaseException as err:  # the test reports it; nothing may fail
            self.error = err
            async with self._progress:
                self._progress.notify_all()
        finally:
            await conn.close()

    async def wait_for(self, count: int, timeout: float = 20) -> None:
        """Until ``count`` rows in all are committed."""
        async with self._progress:
            await asyncio.wait_for(
                self._progress.wait_for(
                    lambda: len(self.committed) >= count or self.error is not None
                ),
                timeout,
            )
        assert self.error is None, f"the writer failed: {self.error!r}"

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        assert self.error is None, f"the writer failed: {self.error!r}"


async def relay_migrate(url: str) -> str:
    """``relay migrate`` as an operator runs it: a separate process. Its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli",
        "migrate",
        "--database-url",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def functions_in_force(conn: asyncpg.Connection) -> dict[str, tuple[Any, ...]]:
    """Every function of schema relay but the generated capture functions, by signature."""
    rows = await conn.fetch(
        """
        SELECT p.oid::regprocedure::text AS signature, pg_get_function_result(p.oid) AS result,
               p.prosrc, p.prosecdef, p.proconfig, p.provolatile
        FROM pg_proc p
        WHERE p.pronamespace = 'relay'::regnamespace AND p.proname NOT LIKE 'capture\\_%'
        """
    )
    return {r["signature"]: tuple(r)[1:] for r in rows}


async def capture_function(conn: asyncpg.Connection, table: str) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        """
        SELECT p.prosrc, p.prosecdef, p.proconfig
        FROM relay.watched w
        JOIN pg_proc p ON p.proname = w.capture_function
                      AND p.pronamespace = 'relay'::regnamespace
        WHERE w.table_oid = $1::regclass
        """,
        table,
    )
    assert row is not None
    return row


async def start_relay(url: str) -> RelayHandle:
    """A relay on ``url`` in this event loop, as the ``relay`` fixture starts one."""
    from aiohttp import web

    settings = Settings(jwt_secret=JWT_SECRET, database_url=url, poll_seconds=0.5)
    app = create_app(settings, url, JWT_SECRET)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return RelayHandle(app, runner, port, JWT_SECRET)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start", [build_first_main, build_0001], ids=["first-main", "0001"])
async def test_upgrade_while_writing_loses_nothing(
    start: Callable[[str], None],
    new_database: Callable[[], str],
    pg_url: str,
    client: Callable[..., Awaitable[WsClient]],
) -> None:
    url = new_database()
    await asyncio.to_thread(start, url)
    table = f"items_{uuid.uuid4().hex[:8]}_777_"
    conn = await asyncpg.connect(url)
    straddler = await asyncpg.connect(url)
    writer = Writer(url, table)
    handle: RelayHandle | None = None
    try:
        await conn.execute(
            f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " owner_id text, account_id text, k integer)"
        )
        # relay.watch as it was at revision 0001: (regclass, text, text, text).
        assert await conn.fetchval(
            "SELECT to_regprocedure('relay.watch(regclass, text, text, text)') IS NOT NULL"
        )
        await conn.execute(
            "SELECT relay.watch($1::regclass, 'id', 'owner_id', 'account_id')", table
        )
        # A position from before the upgrade, before any row: the newest tick.
        before = await conn.fetchval("SELECT max(id) FROM relay.ticks")
        old_rows = await conn.fetch(
            f"INSERT INTO {table} (owner_id, account_id, k)"
            " SELECT 'old', 'acme', g FROM generate_series(1, 20) g RETURNING id"
        )
        await conn.fetchval("SELECT relay.tick()")  # an old relay ticked meanwhile
        old_rows += await conn.fetch(
            f"INSERT INTO {table} (owner_id, account_id, k) VALUES ('old', 'acme', 0) RETURNING id"
        )
        old_ids = [r["id"] for r in old_rows]

        await writer.start()
        await writer.wait_for(10)
        # A writer's transaction open when the upgrade starts, its event written
        # by the old capture function; committed while the upgrade waits on it.
        await straddler.execute("BEGIN")
        straddling = await straddler.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, k)"
            " VALUES ('straddler', 'acme', -2) RETURNING id"
        )
        at_start = len(writer.committed)
        migrate = asyncio.create_task(relay_migrate(url))

        async def upgrade_waits_or_is_done() -> bool:
            return migrate.done() or bool(
                await conn.fetchval(
                    # It waits on the watched table (it locks those first, in the
                    # writers' order: table, then relay.events) or on the log.
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted"
                    " AND relation IN ('relay.events'::regclass, $1::regclass))",
                    table,
                )
            )

        await eventually(upgrade_waits_or_is_done, 30)
        waited = not migrate.done()
        await straddler.execute("COMMIT")
        # Writers keep committing while the upgrade runs (they wait out its locks).
        await writer.wait_for(at_start + 5)
        output = await migrate
        at_exit = len(writer.committed)
        assert at_exit > at_start, "no row was committed while relay migrate ran"
        assert "relay schema is up to date" in output
        assert waited, "the upgrade did not wait for the writer's open transaction"
        # And after it, through the capture function it wrote.
        await writer.wait_for(at_exit + 20)
        await writer.stop()

        all_ids = [*old_ids, straddling, *writer.committed]
        assert [r["id"] for r in await conn.fetch(f"SELECT id FROM {table} ORDER BY id")] == sorted(
            all_ids
        )
        # Every committed row has exactly one event, and the old capture
        # function's events belong to the default app.
        counts = await conn.fetch(
            "SELECT row_id::text::bigint AS id, count(*) AS n, array_agg(DISTINCT app) AS apps"
            " FROM relay.events WHERE repo = $1 GROUP BY 1",
            table,
        )
        assert {r["id"]: r["n"] for r in counts} == dict.fromkeys(all_ids, 1)
        assert {a for r in counts for a in r["apps"]} == {"default"}
        assert await conn.fetchval("SELECT version_num FROM relay.alembic_version") == HEAD

        # The new plumbing is in force, exactly as on a fresh install at head.
        assert await asyncio.to_thread(schema_differences, url) == []
        fresh = await asyncpg.connect(pg_url)
        try:
            assert await functions_in_force(conn) == await functions_in_force(fresh)
            twin = f"upg_{secrets.token_hex(4)}"
            await fresh.execute(
                f"CREATE SCHEMA {twin}; CREATE TABLE {twin}.{table} (id bigint GENERATED ALWAYS"
                " AS IDENTITY PRIMARY KEY, owner_id text, account_id text, k integer)"
            )
            try:
                await fresh.execute(
                    "SELECT relay.watch($1::regclass, 'id', 'owner_id', 'account_id')",
                    f"{twin}.{table}",
                )
                written = await capture_function(fresh, f"{twin}.{table}")
            finally:
                await fresh.execute(f"SELECT relay.unwatch('{twin}.{table}'::regclass)")
                await fresh.execute(f"DROP SCHEMA {twin} CASCADE")
        finally:
            await fresh.close()
        in_force = await capture_function(conn, table)
        assert in_force["prosecdef"], "the capture function runs as the writer, not as relay"
        assert tuple(in_force) == tuple(written)
        assert await conn.fetchval(
            "SELECT to_regprocedure('relay.events_page(bigint, bigint, bigint, integer, text,"
            " text)') IS NOT NULL"
        )
        # The relay's pruner calls prune with untyped parameters: one candidate only.
        assert (
            await conn.fetchval(
                "SELECT relay.prune(make_interval(secs => $1), $2)", 86400.0, 10_000_000
            )
            == 0
        )

        # Idempotent: a second migrate changes nothing.
        events_before = await conn.fetchval("SELECT count(*) FROM relay.events")
        functions_before = await functions_in_force(conn)
        await relay_migrate(url)
        assert await conn.fetchval("SELECT count(*) FROM relay.events") == events_before
        assert await functions_in_force(conn) == functions_before
        assert tuple(await capture_function(conn, table)) == tuple(in_force)

        # A relay on the upgraded database replays from the old position every
        # row written before, during and after the upgrade, once, in log order
        # (commit order across ticks; the one writer's rows in its commit
        # order); then the live stream.
        handle = await start_relay(url)
        c = await client(handle)
        await c.auth(handle.token("reader", "acme"))
        joined = await c.join(f"db-{table}", after=str(before))
        assert joined["channel"] == f"db-{table}"
        replayed: list[int] = []
        positions: list[tuple[int, int]] = []
        while len(replayed) < len(all_ids):
            frame = await c.expect("db_created")
            replayed.append(json.loads(frame["data"])["id"])
            tick, seq = frame["pos"].split("-")
            positions.append((int(tick), int(seq)))
        assert sorted(replayed) == sorted(all_ids)
        assert positions == sorted(set(positions))
        assert replayed[: len(old_ids)] == old_ids
        written = set(writer.committed)
        assert [i for i in replayed if i in written] == writer.committed
        await c.silent(0.3)
        live = await conn.fetchval(
            f"INSERT INTO {table} (owner_id, account_id, k)"
            " VALUES ('live', 'acme', -1) RETURNING id"
        )
        frame = await c.expect("db_created")
        assert json.loads(frame["data"])["id"] == live
        assert (int(frame["pos"].split("-")[0]), int(frame["pos"].split("-")[1])) > positions[-1]
    finally:
        if writer._task is not None and not writer._task.done():
            await writer.stop()
        if handle is not None:
            await handle.stop()
        await straddler.close()
        await conn.close()


# --- no way back ------------------------------------------------------------------------


def _assert_untouched(url: str, revision: str, table: str) -> None:
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version_num FROM relay.alembic_version").fetchone() == (
            revision,
        )
        assert conn.execute("SELECT count(*) FROM relay.events").fetchone() == (1,)
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass", (table,)
        ).fetchone()
        # insert, update, delete; and truncate from 0004 on
        assert triggers == ((4,) if revision >= "0004" else (3,))


@pytest.mark.parametrize("revision", [HEAD, "0001"])
def test_downgrade_refuses_and_keeps_the_log(
    revision: str, new_database: Callable[[], str]
) -> None:
    url = new_database()
    if revision == HEAD:
        run_migrations(url)
    else:
        build_0001(url)
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (id bigint PRIMARY KEY)")
        conn.execute("SELECT relay.watch('kept'::regclass)")
        conn.execute("INSERT INTO kept VALUES (1)")

    for target in ("base", "-1"):
        with pytest.raises(CommandError, match="go forward only"):
            command.downgrade(alembic_config(url), target)
        _assert_untouched(url, revision, "kept")

    # The operator's view: alembic's own command line, run by hand.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "-x", f"url={url}", "downgrade", "base"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    said = " ".join((done.stdout + done.stderr).split())
    assert f"FAILED: {FORWARD_ONLY}" in said, said
    _assert_untouched(url, revision, "kept")


def test_sql_scripts_are_refused_rather_than_incomplete(new_database: Callable[[], str]) -> None:
    """``alembic upgrade --sql`` cannot render the raw SQL: it says so, no partial script."""
    url = new_database()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "alembic"),
            "-x",
            f"url={url}",
            "upgrade",
            "head",
            "--sql",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "cannot be rendered offline" in done.stdout + done.stderr
    assert "CREATE" not in done.stdout
