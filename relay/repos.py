"""Repositories: watched tables. Create, watch, list and unwatch them.

The work is done by the SQL functions relay.watch() and relay.unwatch()
(``sql/relay.sql``), so a DBA can do the same by hand with psql.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from relay.schema import DEFAULT_APP

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


class RepoError(Exception):
    pass


def quote_table(qualified: str) -> str:
    """'tasks_760_' or 'app.tasks' -> a safely quoted SQL name."""
    parts = qualified.split(".")
    if len(parts) > 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise RepoError(
            f"not a table name: {qualified!r} (letters, digits and _, optionally SCHEMA.TABLE)"
        )
    return ".".join('"' + p + '"' for p in parts)


def app_table(app: str, name: str) -> str:
    """Where ``relay repo create NAME --app APP`` puts the table: the app's own schema
    (the default app: the search path, as before apps had schemas)."""
    table = quote_table(name)
    if app == DEFAULT_APP or "." in name:
        return table
    return quote_ident(app) + "." + table


def quote_ident(name: str) -> str:
    """Any name as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Repo:
    app: str
    repo: str
    table: str
    id_column: str
    owner_column: str | None
    account_column: str | None
    mode: str


def repo_table_sql(table: str) -> str:
    """CREATE TABLE for a repository with the standard columns (``table`` already quoted)."""
    return f"""
        CREATE TABLE IF NOT EXISTS {table} (
            id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            account_id  text,
            owner_id    text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            data        jsonb NOT NULL DEFAULT '{{}}'::jsonb
        )"""


async def create_repo(conn: asyncpg.Connection, name: str, app: str = DEFAULT_APP) -> str:
    """Create a repository table with the standard columns, and watch it for ``app``.

    Idempotent. A table of an app other than the default lives in that app's
    own schema, created when missing.
    """
    table = app_table(app, name)
    try:
        async with conn.transaction():
            if app != DEFAULT_APP and "." not in name:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(app)}")
            await conn.execute(repo_table_sql(table))
            repo: str = await conn.fetchval(
                "SELECT relay.watch($1::regclass, 'id', 'owner_id', 'account_id', $2)", table, app
            )
    except (asyncpg.RaiseError, asyncpg.UniqueViolationError) as err:
        raise RepoError(str(err)) from None
    return repo


async def watch(
    conn: asyncpg.Connection,
    name: str,
    id_column: str = "id",
    owner_column: str | None = None,
    account_column: str | None = None,
    app: str = DEFAULT_APP,
) -> str:
    table = quote_table(name)
    try:
        repo: str = await conn.fetchval(
            "SELECT relay.watch($1::regclass, $2, $3, $4, $5)",
            table,
            id_column,
            owner_column,
            account_column,
            app,
        )
    except (asyncpg.UndefinedTableError, asyncpg.RaiseError, asyncpg.UniqueViolationError) as err:
        raise RepoError(str(err)) from None
    return repo


async def unwatch(conn: asyncpg.Connection, name: str) -> bool:
    table = quote_table(name)
    try:
        removed: bool = await conn.fetchval("SELECT relay.unwatch($1::regclass)", table)
    except asyncpg.UndefinedTableError as err:
        raise RepoError(str(err)) from None
    return removed


async def list_repos(conn: asyncpg.Connection, app: str | None = None) -> list[Repo]:
    rows = await conn.fetch(
        "SELECT app, repo, table_oid::text AS tbl, id_column, owner_column, account_column, mode"
        " FROM relay.watched WHERE $1::text IS NULL OR app = $1 ORDER BY app, repo",
        app,
    )
    return [
        Repo(
            r["app"],
            r["repo"],
            r["tbl"],
            r["id_column"],
            r["owner_column"],
            r["account_column"],
            r["mode"],
        )
        for r in rows
    ]
